// A minimal test harness for the ctest programs: CHECK(cond), CHECK_STATUS(call, status),
// CHECK_NEAR(a, b, tol); failures print file:line, the expression and fe_last_error(), and the
// program exits 1 at the end if any check failed.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "fusion_engine/fusion_engine.h"

namespace fe_test {
inline int failures = 0;
inline int checks = 0;
inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failures\n", name, checks, failures);
  return failures == 0 ? 0 : 1;
}
}  // namespace fe_test

#define CHECK(cond)                                                                  \
  do {                                                                               \
    ++fe_test::checks;                                                               \
    if (!(cond)) {                                                                   \
      ++fe_test::failures;                                                           \
      std::printf("%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);           \
    }                                                                                \
  } while (0)

#define CHECK_STATUS(call, expected)                                                                 \
  do {                                                                                               \
    ++fe_test::checks;                                                                               \
    const fe_status check_status_ = (call);                                                          \
    if (check_status_ != (expected)) {                                                               \
      ++fe_test::failures;                                                                           \
      std::printf("%s:%d: %s returned %s, expected %s\n  last error: %s\n", __FILE__, __LINE__, #call, \
                  fe_status_string(check_status_), fe_status_string(expected), fe_last_error());     \
    } else if ((expected) != FE_OK && fe_last_error()[0] == '\0') {                                  \
      ++fe_test::failures;                                                                           \
      std::printf("%s:%d: %s failed without a message\n", __FILE__, __LINE__, #call);                \
    }                                                                                                \
  } while (0)

#define CHECK_OK(call) CHECK_STATUS(call, FE_OK)

#define CHECK_NEAR(a, b, tol)                                                                     \
  do {                                                                                            \
    ++fe_test::checks;                                                                            \
    const double check_a_ = (a), check_b_ = (b);                                                  \
    if (!(std::fabs(check_a_ - check_b_) <= (tol))) {                                             \
      ++fe_test::failures;                                                                        \
      std::printf("%s:%d: %s = %.9g, expected %.9g (tol %g)\n", __FILE__, __LINE__, #a, check_a_, \
                  check_b_, double(tol));                                                         \
    }                                                                                             \
  } while (0)

#include <cstring>

// The call fails with `expected` and fe_last_error() contains `fragment`.
#define CHECK_ERROR(call, expected, fragment)                                                         \
  do {                                                                                                \
    CHECK_STATUS(call, expected);                                                                     \
    ++fe_test::checks;                                                                                \
    if (std::strstr(fe_last_error(), (fragment)) == nullptr) {                                        \
      ++fe_test::failures;                                                                            \
      std::printf("%s:%d: the error of %s lacks \"%s\": %s\n", __FILE__, __LINE__, #call, (fragment), \
                  fe_last_error());                                                                   \
    }                                                                                                 \
  } while (0)

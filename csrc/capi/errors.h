// Errors inside the C API: an exception carrying an fe_status, and the guard that turns every
// exception into a status code plus a thread-local message at the extern "C" boundary.
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#include "fusion_engine/fusion_engine.h"

namespace fe::capi {

class Error : public std::exception {
 public:
  Error(fe_status status, std::string message) : status_(status), message_(std::move(message)) {}
  fe_status status() const noexcept { return status_; }
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  fe_status status_;
  std::string message_;
};

// The integer stored in a caller's enum field, read without loading it as the enum type (a C
// caller may store any int there; loading an out-of-range enum value is undefined in C++).
template <class Enum>
int64_t raw(const Enum& e) {
  static_assert(sizeof(Enum) == sizeof(int32_t), "C enums are int-sized");
  int32_t v;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

[[noreturn]] inline void fail(fe_status status, std::string message) { throw Error(status, std::move(message)); }

// Stores "<function>: <message>" as this thread's last error.
void set_last_error(const char* function, const char* message);

// Runs `body`; an exception becomes its status and the thread's last error. Never throws.
template <class Body>
fe_status guard(const char* function, Body&& body) noexcept {
  try {
    body();
    return FE_OK;
  } catch (const Error& e) {
    set_last_error(function, e.what());
    return e.status();
  } catch (const std::bad_alloc&) {
    set_last_error(function, "out of memory");
    return FE_ERR_OUT_OF_MEMORY;
  } catch (const std::invalid_argument& e) {  // from the kernels' own checks
    set_last_error(function, e.what());
    return FE_ERR_INVALID_ARGUMENT;
  } catch (const std::exception& e) {
    set_last_error(function, (std::string("internal error: ") + e.what()).c_str());
    return FE_ERR_INTERNAL;
  } catch (...) {
    set_last_error(function, "internal error: unknown exception");
    return FE_ERR_INTERNAL;
  }
}

}  // namespace fe::capi

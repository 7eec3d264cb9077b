// fe_status_string, fe_last_error and the thread-local message behind them.
#include "errors.h"

#include <cstring>

namespace fe::capi {

namespace {
thread_local std::string last_error;

// Length of the well-formed UTF-8 sequence at s[0..n) (RFC 3629: no overlongs, no surrogates, <= U+10FFFF),
// or 0 when it is not one.
size_t utf8_sequence(const unsigned char* s, size_t n) {
  const unsigned char c = s[0];
  if (c < 0x80) return 1;
  size_t len = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c == 0xE0) { len = 3; lo = 0xA0; }
  else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) len = 3;
  else if (c == 0xED) { len = 3; hi = 0x9F; }
  else if (c == 0xF0) { len = 4; lo = 0x90; }
  else if (c >= 0xF1 && c <= 0xF3) len = 4;
  else if (c == 0xF4) { len = 4; hi = 0x8F; }
  else return 0;
  if (n < len || s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < len; ++i)
    if (s[i] < 0x80 || s[i] > 0xBF) return 0;
  return len;
}

// The message with every byte that is not part of well-formed UTF-8, and every control character, written
// as \xNN: messages quote untrusted input (tensor names from a file), and callers may decode them as UTF-8.
void append_escaped(std::string& out, const char* message) {
  static const char hex[] = "0123456789abcdef";
  const auto* s = reinterpret_cast<const unsigned char*>(message);
  const size_t n = std::strlen(message);
  for (size_t i = 0; i < n;) {
    const size_t len = utf8_sequence(s + i, n - i);
    if (len == 0 || (len == 1 && (s[i] < 0x20 || s[i] == 0x7F))) {
      out.append("\\x").push_back(hex[s[i] >> 4]);
      out.push_back(hex[s[i] & 0xF]);
      ++i;
    } else {
      out.append(reinterpret_cast<const char*>(s + i), len);
      i += len;
    }
  }
}
}  // namespace

void set_last_error(const char* function, const char* message) {
  try {
    last_error.assign(function).append(": ");
    append_escaped(last_error, message);
  } catch (...) {  // no memory for the message: keep what fits
    last_error.clear();
  }
}

}  // namespace fe::capi

extern "C" {

FE_API const char* fe_status_string(fe_status status) {
  switch (status) {
    case FE_OK: return "FE_OK: success";
    case FE_ERR_INVALID_ARGUMENT: return "FE_ERR_INVALID_ARGUMENT: invalid argument";
    case FE_ERR_DTYPE_MISMATCH: return "FE_ERR_DTYPE_MISMATCH: dtype mismatch";
    case FE_ERR_SHAPE_MISMATCH: return "FE_ERR_SHAPE_MISMATCH: shape mismatch";
    case FE_ERR_DEVICE_MISMATCH: return "FE_ERR_DEVICE_MISMATCH: device mismatch";
    case FE_ERR_UNSUPPORTED: return "FE_ERR_UNSUPPORTED: not supported";
    case FE_ERR_NONFINITE: return "FE_ERR_NONFINITE: NaN or Inf in an input";
    case FE_ERR_NOT_FOUND: return "FE_ERR_NOT_FOUND: not found";
    case FE_ERR_IO: return "FE_ERR_IO: input/output error";
    case FE_ERR_FORMAT: return "FE_ERR_FORMAT: malformed file";
    case FE_ERR_OUT_OF_MEMORY: return "FE_ERR_OUT_OF_MEMORY: out of memory";
    case FE_ERR_CUDA: return "FE_ERR_CUDA: CUDA error";
    case FE_ERR_INTERNAL: return "FE_ERR_INTERNAL: internal error";
  }
  return "unknown fe_status value";
}

FE_API const char* fe_last_error(void) { return fe::capi::last_error.c_str(); }

}  // extern "C"

// A strict scanner for the JSON subset of safetensors headers: objects, arrays, strings and
// non-negative integers (RFC 8259 syntax; no floats, negatives, literals or nesting beyond what
// the caller asks for). Input is untrusted: every read is bounds-checked and every error throws
// FormatError with the byte offset. Strings are checked to be valid UTF-8 without NUL, and
// escapes (\uXXXX with surrogate pairs included) are decoded.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace fe::st {

// A malformed file (FE_ERR_FORMAT at the C API).
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A failed system call on a file (FE_ERR_IO at the C API).
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The length of the valid UTF-8 sequence at p (1 for ASCII), or 0 if it is invalid or longer
// than the `avail` bytes left.
size_t utf8_sequence_length(const uint8_t* p, size_t avail);

// Whether s is valid UTF-8 without NUL bytes: what tensor and metadata names must be.
bool is_valid_name(std::string_view s);

class JsonCursor {
 public:
  explicit JsonCursor(std::string_view text) : text_(text) {}

  void skip_ws();                        // JSON whitespace: space, tab, CR, LF
  bool at_end() const { return pos_ == text_.size(); }
  // Skips whitespace, then consumes `c` if it is next (returns whether it was).
  bool accept(char c);
  // Skips whitespace, then requires `c` (`what` names the place for the message).
  void expect(char c, const char* what);
  std::string read_string();             // skips whitespace; a JSON string, decoded
  uint64_t read_uint(uint64_t max);      // skips whitespace; 0 or [1-9][0-9]*, <= max
  [[noreturn]] void fail(const std::string& message) const;

 private:
  uint32_t read_hex4();
  void append_utf8_raw(std::string& out);  // one raw UTF-8 sequence (first byte >= 0x80), validated

  std::string_view text_;
  size_t pos_ = 0;
};

}  // namespace fe::st

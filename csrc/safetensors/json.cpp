#include "json.h"

namespace fe::st {

void JsonCursor::fail(const std::string& message) const {
  throw FormatError("header byte " + std::to_string(pos_) + ": " + message);
}

void JsonCursor::skip_ws() {
  while (pos_ < text_.size()) {
    const char c = text_[pos_];
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return;
    ++pos_;
  }
}

bool JsonCursor::accept(char c) {
  skip_ws();
  if (pos_ < text_.size() && text_[pos_] == c) {
    ++pos_;
    return true;
  }
  return false;
}

void JsonCursor::expect(char c, const char* what) {
  if (!accept(c)) fail(std::string("expected '") + c + "' " + what);
}

uint64_t JsonCursor::read_uint(uint64_t max) {
  skip_ws();
  if (pos_ >= text_.size() || text_[pos_] < '0' || text_[pos_] > '9')
    fail("expected a non-negative integer");
  if (text_[pos_] == '0' && pos_ + 1 < text_.size() && text_[pos_ + 1] >= '0' && text_[pos_ + 1] <= '9')
    fail("integers must not have leading zeros");
  uint64_t value = 0;
  while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
    const uint64_t digit = static_cast<uint64_t>(text_[pos_] - '0');
    if (value > (max - digit) / 10) fail("integer too large (at most " + std::to_string(max) + ")");
    value = value * 10 + digit;
    ++pos_;
  }
  if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E'))
    fail("expected an integer, not a fractional number");
  return value;
}

uint32_t JsonCursor::read_hex4() {
  if (text_.size() - pos_ < 4) fail("truncated \\u escape");
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) {
    const char c = text_[pos_++];
    uint32_t digit;
    if (c >= '0' && c <= '9') digit = static_cast<uint32_t>(c - '0');
    else if (c >= 'a' && c <= 'f') digit = static_cast<uint32_t>(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') digit = static_cast<uint32_t>(c - 'A' + 10);
    else fail("bad hex digit in \\u escape");
    value = value * 16 + digit;
  }
  return value;
}

static void encode_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

size_t utf8_sequence_length(const uint8_t* p, size_t avail) {
  // Unicode Table 3-7: no overlong forms, no surrogates, nothing above U+10FFFF.
  const uint8_t b0 = p[0];
  size_t len;
  uint8_t lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) len = 2;
  else if (b0 == 0xE0) { len = 3; lo = 0xA0; }
  else if (b0 >= 0xE1 && b0 <= 0xEC) len = 3;
  else if (b0 == 0xED) { len = 3; hi = 0x9F; }
  else if (b0 >= 0xEE && b0 <= 0xEF) len = 3;
  else if (b0 == 0xF0) { len = 4; lo = 0x90; }
  else if (b0 >= 0xF1 && b0 <= 0xF3) len = 4;
  else if (b0 == 0xF4) { len = 4; hi = 0x8F; }
  else return 0;
  if (avail < len || p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < len; ++i)
    if (p[i] < 0x80 || p[i] > 0xBF) return 0;
  return len;
}

bool is_valid_name(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  for (size_t i = 0; i < s.size();) {
    if (p[i] == 0) return false;
    const size_t len = utf8_sequence_length(p + i, s.size() - i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

void JsonCursor::append_utf8_raw(std::string& out) {
  const size_t len = utf8_sequence_length(reinterpret_cast<const uint8_t*>(text_.data()) + pos_, text_.size() - pos_);
  if (len == 0) fail("invalid UTF-8 in a string");
  out.append(text_.data() + pos_, len);
  pos_ += len;
}

std::string JsonCursor::read_string() {
  skip_ws();
  if (pos_ >= text_.size() || text_[pos_] != '"') fail("expected a string");
  ++pos_;
  std::string out;
  for (;;) {
    if (pos_ >= text_.size()) fail("unterminated string");
    const uint8_t c = static_cast<uint8_t>(text_[pos_]);
    if (c == '"') {
      ++pos_;
      return out;
    }
    if (c < 0x20) fail("unescaped control character in a string");
    if (c >= 0x80) {
      append_utf8_raw(out);
      continue;
    }
    ++pos_;
    if (c != '\\') {
      out += static_cast<char>(c);
      continue;
    }
    if (pos_ >= text_.size()) fail("unterminated escape");
    const char e = text_[pos_++];
    switch (e) {
      case '"': out += '"'; break;
      case '\\': out += '\\'; break;
      case '/': out += '/'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'u': {
        uint32_t cp = read_hex4();
        if (cp >= 0xDC00 && cp <= 0xDFFF) fail("lone low surrogate in a \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (text_.size() - pos_ < 2 || text_[pos_] != '\\' || text_[pos_ + 1] != 'u')
            fail("high surrogate without a low surrogate");
          pos_ += 2;
          const uint32_t low = read_hex4();
          if (low < 0xDC00 || low > 0xDFFF) fail("high surrogate without a low surrogate");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        }
        if (cp == 0) fail("NUL characters (\\u0000) are not supported in names");
        encode_utf8(cp, out);
        break;
      }
      default: fail(std::string("bad escape \\") + e);
    }
  }
}

}  // namespace fe::st

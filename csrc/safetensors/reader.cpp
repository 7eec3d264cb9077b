#include "reader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace fe::st {

namespace {

[[noreturn]] void io_fail(const std::string& what, const std::string& path, int err) {
  throw IoError(what + " " + quoted(path) + ": " + std::strerror(err));
}

}  // namespace

std::unique_ptr<File> File::open(const std::string& path) {
  // O_NONBLOCK: opening a FIFO must not hang (it is then rejected as not a regular file).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) io_fail("cannot open", path, errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    io_fail("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError("cannot open " + quoted(path) + ": not a regular file");
  }
  const auto size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw FormatError("the file has " + std::to_string(size) + " bytes, fewer than the 8-byte header length");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (map == MAP_FAILED) io_fail("cannot map", path, err);
  std::unique_ptr<File> file(new File(static_cast<const uint8_t*>(map), size, true, path));
  file->header_ = parse_file(file->bytes_, size, &file->data_offset_);  // the map is released on a throw
  return file;
}

std::unique_ptr<File> File::from_memory(const void* data, size_t size) {
  if (data == nullptr && size != 0) throw FormatError("no data");
  static const uint8_t empty = 0;
  std::unique_ptr<File> file(new File(data ? static_cast<const uint8_t*>(data) : &empty, size, false, "<memory>"));
  file->header_ = parse_file(file->bytes_, size, &file->data_offset_);
  return file;
}

File::~File() {
  if (mapped_) ::munmap(const_cast<uint8_t*>(bytes_), size_);
}

}  // namespace fe::st

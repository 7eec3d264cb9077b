#include "writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <stdexcept>

namespace fe::st {

namespace {

constexpr uint64_t kChunk = uint64_t(4) << 20;  // bytes moved per write/copy step

[[noreturn]] void io_fail(const std::string& what, const std::string& path, int err) {
  throw IoError(what + " " + quoted(path) + ": " + std::strerror(err));
}

void write_all(int fd, const uint8_t* data, uint64_t len, const std::string& path) {
  while (len > 0) {
    const ssize_t n = ::write(fd, data, std::min<uint64_t>(len, kChunk));
    if (n < 0) {
      if (errno == EINTR) continue;
      io_fail("cannot write", path, errno);
    }
    data += n;
    len -= static_cast<uint64_t>(n);
  }
}

// Appends bytes [offset, offset + len) of `from` to `to` (at its current position).
void copy_range(int from, uint64_t offset, uint64_t len, int to, const std::string& path) {
  auto in = static_cast<off_t>(offset);
  bool kernel_copy = true;
  std::unique_ptr<uint8_t[]> buffer;
  while (len > 0) {
    const size_t step = static_cast<size_t>(std::min(len, kChunk));
    if (kernel_copy) {
      const ssize_t n = ::copy_file_range(from, &in, to, nullptr, step, 0);
      if (n > 0) {
        len -= static_cast<uint64_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno != EXDEV && errno != ENOSYS && errno != EINVAL && errno != EOPNOTSUPP)
        io_fail("cannot copy data into", path, errno);
      kernel_copy = false;  // unsupported here (or a short spool): fall back to read + write
    }
    if (!buffer) buffer.reset(new uint8_t[kChunk]);
    const ssize_t n = ::pread(from, buffer.get(), step, in);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) io_fail("cannot read back the spool of", path, errno);
    if (n == 0) throw IoError("the spool of " + quoted(path) + " is shorter than expected");
    write_all(to, buffer.get(), static_cast<uint64_t>(n), path);
    in += n;
    len -= static_cast<uint64_t>(n);
  }
}

std::string directory_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

Writer::Writer(std::string path) : path_(std::move(path)) {
  if (path_.empty()) throw std::invalid_argument("the path is empty");
  std::string spool = path_ + ".spool-XXXXXX";
  spool_ = ::mkostemp(spool.data(), O_CLOEXEC);
  if (spool_ < 0) io_fail("cannot create a temporary file beside", path_, errno);
  ::unlink(spool.c_str());  // anonymous from now on: nothing is left behind after a crash
}

Writer::~Writer() { abort(); }

void Writer::abort() noexcept {
  if (spool_ >= 0) ::close(spool_);
  spool_ = -1;
  done_ = true;
}

void Writer::check_name(const std::string& name, const char* what) const {
  if (done_) throw std::invalid_argument("the writer is already finished");
  if (name.empty()) throw std::invalid_argument(std::string("the ") + what + " name is empty");
  if (!is_valid_name(name)) throw std::invalid_argument(std::string("the ") + what + " name is not valid UTF-8");
}

void Writer::set_metadata(const std::string& key, const std::string& value) {
  check_name(key, "metadata key");
  if (!is_valid_name(value)) throw std::invalid_argument("the metadata value of " + quoted(key) + " is not valid UTF-8");
  for (const auto& kv : metadata_)
    if (kv.first == key) throw std::invalid_argument("duplicate metadata key " + quoted(key));
  metadata_.emplace_back(key, value);
}

void Writer::add(const std::string& name, fe_dtype dtype, int32_t ndim, const int64_t* shape, const Fill& fill) {
  check_name(name, "tensor");
  if (name == "__metadata__") throw std::invalid_argument("'__metadata__' is reserved and cannot name a tensor");
  for (const TensorEntry& t : tensors_)
    if (t.name == name) throw std::invalid_argument("duplicate tensor name " + quoted(name));
  const DTypeInfo* info = dtype_info(dtype);
  if (info == nullptr) throw std::invalid_argument("unknown dtype " + std::to_string(int(dtype)));
  if (ndim < 0 || ndim > FE_MAX_DIMS || (ndim > 0 && shape == nullptr)) throw std::invalid_argument("bad rank");
  TensorEntry t;
  t.name = name;
  t.dtype = dtype;
  t.ndim = ndim;
  std::copy(shape, shape + ndim, t.shape);
  uint64_t bytes = 0;
  if (!tensor_bytes(t.shape, ndim, info->size, &bytes))
    throw std::invalid_argument("the size of tensor " + quoted(name) + " overflows");
  if (poisoned_) throw IoError("an earlier write to the spool of " + quoted(path_) + " failed");

  t.begin = spool_size_;
  t.end = spool_size_ + bytes;
  std::unique_ptr<uint8_t[]> chunk(new uint8_t[std::min(std::max<uint64_t>(bytes, 1), kChunk)]);
  try {
    for (uint64_t offset = 0; offset < bytes; offset += kChunk) {
      const uint64_t len = std::min(kChunk, bytes - offset);
      fill(chunk.get(), offset, len);
      try {
        write_all(spool_, chunk.get(), len, path_);
      } catch (...) {
        poisoned_ = true;
        throw;
      }
      spool_size_ += len;
    }
  } catch (...) {  // roll the spool back to where this tensor began
    if (!poisoned_ && (::ftruncate(spool_, static_cast<off_t>(t.begin)) != 0 ||
                       ::lseek(spool_, static_cast<off_t>(t.begin), SEEK_SET) < 0))
      poisoned_ = true;
    spool_size_ = t.begin;
    throw;
  }
  tensors_.push_back(std::move(t));
}

void Writer::finish() {
  if (done_) throw std::invalid_argument("the writer is already finished");
  if (poisoned_) {
    abort();
    throw IoError("an earlier write to the spool of " + quoted(path_) + " failed; nothing was written");
  }
  // Layout: by element size (largest first), then by name.
  std::vector<const TensorEntry*> order;  // spool ranges
  for (const TensorEntry& t : tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorEntry* a, const TensorEntry* b) {
    const uint32_t sa = dtype_info(a->dtype)->size, sb = dtype_info(b->dtype)->size;
    return sa != sb ? sa > sb : a->name < b->name;
  });
  std::vector<TensorEntry> placed;  // file ranges
  placed.reserve(order.size());
  uint64_t offset = 0;
  for (const TensorEntry* spooled : order) {
    TensorEntry t = *spooled;
    t.begin = offset;
    t.end = offset + (spooled->end - spooled->begin);
    offset = t.end;
    placed.push_back(std::move(t));
  }
  std::vector<const TensorEntry*> entries;
  for (const TensorEntry& t : placed) entries.push_back(&t);
  Metadata metadata = metadata_;
  std::sort(metadata.begin(), metadata.end());
  std::string header = serialize_header(entries, metadata);
  header.append((8 - header.size() % 8) % 8, ' ');  // data starts 8-aligned
  if (header.size() > kMaxHeaderBytes) {
    abort();
    throw IoError("the header of " + quoted(path_) + " would exceed 100 MB (too many tensors)");
  }

  // A temporary sibling, created with the usual permissions (0666 & ~umask).
  static std::atomic<unsigned> counter{0};
  std::string staging;
  int fd = -1;
  for (int attempt = 0; fd < 0 && attempt < 100; ++attempt) {
    staging = path_ + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    fd = ::open(staging.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    const int err = errno;
    abort();
    io_fail("cannot create a temporary file beside", path_, err);
  }
  try {
    uint8_t length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(uint64_t(header.size()) >> (8 * i));
    write_all(fd, length, 8, path_);
    write_all(fd, reinterpret_cast<const uint8_t*>(header.data()), header.size(), path_);
    for (const TensorEntry* t : order) copy_range(spool_, t->begin, t->end - t->begin, fd, path_);
    if (::fsync(fd) != 0) io_fail("cannot sync", path_, errno);
    if (::close(fd) != 0) {
      fd = -1;
      io_fail("cannot close", path_, errno);
    }
    fd = -1;
    if (::rename(staging.c_str(), path_.c_str()) != 0) io_fail("cannot rename the temporary file onto", path_, errno);
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(staging.c_str());
    abort();
    throw;
  }
  const int dir = ::open(directory_of(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {  // make the rename durable; best effort
    ::fsync(dir);
    ::close(dir);
  }
  abort();  // closes the spool
}

}  // namespace fe::st

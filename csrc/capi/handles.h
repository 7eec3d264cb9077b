// The opaque handles of the C API that more than one file of csrc/capi needs to see inside.
#pragma once

#include <memory>

#include "../safetensors/reader.h"
#include "../safetensors/writer.h"

struct fe_st_file {
  std::unique_ptr<fe::st::File> file;
};

struct fe_st_writer {
  std::unique_ptr<fe::st::Writer> writer;
};

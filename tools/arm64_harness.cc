// Runs one function of a TVM-compiled library on tensors read from raw binary files; built for
// aarch64 by tools/arm64_runtime.py so that tests can check cross-compiled kernels under qemu.
//
//   arm64_harness LIB.so FUNC PATH:DTYPE:SHAPE... OUT_PATH:DTYPE:SHAPE
//
// Every tensor argument is `path:dtype:shape` with dtype float32|int32 and shape `d0xd1x...`
// (an empty shape is a scalar tensor). All but the last are read from their files (raw,
// C-contiguous, little-endian); the last is the destination: zero-filled, passed last, and
// written to its path after the call. Exit status 0 on success, 1 with a message otherwise.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr size_t kAlignment = 64;  // TVM kernels may assume 64-byte aligned buffers

struct HostTensor {
  std::string path;
  std::vector<int64_t> shape;
  DLDataType dtype;
  std::unique_ptr<void, decltype(&std::free)> data{nullptr, &std::free};
  size_t nbytes = 0;
  DLTensor view{};
};

DLDataType ParseDtype(const std::string& name) {
  if (name == "float32") return DLDataType{kDLFloat, 32, 1};
  if (name == "int32") return DLDataType{kDLInt, 32, 1};
  throw std::runtime_error("unsupported dtype '" + name + "' (float32 or int32)");
}

// `path:dtype:shape`; the path is everything before the last two colons.
void ParseSpec(const std::string& spec, HostTensor* tensor) {
  size_t shape_colon = spec.rfind(':');
  size_t dtype_colon = shape_colon == std::string::npos ? shape_colon : spec.rfind(':', shape_colon - 1);
  if (dtype_colon == std::string::npos || dtype_colon == 0) {
    throw std::runtime_error("tensor argument '" + spec + "' is not PATH:DTYPE:SHAPE");
  }
  tensor->path = spec.substr(0, dtype_colon);
  tensor->dtype = ParseDtype(spec.substr(dtype_colon + 1, shape_colon - dtype_colon - 1));
  std::stringstream dims(spec.substr(shape_colon + 1));
  std::string dim;
  size_t count = 1;
  while (std::getline(dims, dim, 'x')) {
    if (dim.empty()) continue;
    tensor->shape.push_back(std::stoll(dim));
    count *= static_cast<size_t>(tensor->shape.back());
  }
  tensor->nbytes = count * tensor->dtype.bits / 8;
  size_t padded = (tensor->nbytes + kAlignment - 1) / kAlignment * kAlignment;
  tensor->data.reset(std::aligned_alloc(kAlignment, padded > 0 ? padded : kAlignment));
  if (tensor->data == nullptr) throw std::runtime_error("out of memory for " + tensor->path);
  std::memset(tensor->data.get(), 0, tensor->nbytes);
  tensor->view.data = tensor->data.get();
  tensor->view.device = DLDevice{kDLCPU, 0};
  tensor->view.ndim = static_cast<int32_t>(tensor->shape.size());
  tensor->view.dtype = tensor->dtype;
  tensor->view.shape = tensor->shape.data();
  tensor->view.strides = nullptr;
  tensor->view.byte_offset = 0;
}

void ReadFile(HostTensor* tensor) {
  std::ifstream in(tensor->path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + tensor->path);
  size_t size = static_cast<size_t>(in.tellg());
  if (size != tensor->nbytes) {
    throw std::runtime_error(tensor->path + " holds " + std::to_string(size) + " bytes, the shape needs " +
                             std::to_string(tensor->nbytes));
  }
  in.seekg(0);
  in.read(static_cast<char*>(tensor->data.get()), static_cast<std::streamsize>(size));
}

void WriteFile(const HostTensor& tensor) {
  std::ofstream out(tensor.path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(tensor.data.get()), static_cast<std::streamsize>(tensor.nbytes));
  if (!out) throw std::runtime_error("cannot write " + tensor.path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " LIB.so FUNC PATH:DTYPE:SHAPE... OUT_PATH:DTYPE:SHAPE\n";
    return 1;
  }
  std::vector<HostTensor> tensors(static_cast<size_t>(argc - 3));
  try {
    for (size_t i = 0; i < tensors.size(); ++i) ParseSpec(argv[i + 3], &tensors[i]);
    for (size_t i = 0; i + 1 < tensors.size(); ++i) ReadFile(&tensors[i]);
    tvm::ffi::Module module = tvm::ffi::Module::LoadFromFile(argv[1]);
    tvm::ffi::Optional<tvm::ffi::Function> func = module->GetFunction(argv[2]);
    if (!func.has_value()) throw std::runtime_error(std::string("no function ") + argv[2] + " in " + argv[1]);
    std::vector<tvm::ffi::AnyView> args;
    for (HostTensor& tensor : tensors) args.emplace_back(&tensor.view);
    tvm::ffi::Any result;
    func.value().CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    WriteFile(tensors.back());
  } catch (const std::exception& err) {
    std::cerr << "arm64_harness: " << err.what() << "\n";
    return 1;
  }
  return 0;
}

// Runs a TVM-compiled library on tensors read from raw binary files; built for aarch64 by
// tools/arm64_runtime.py so that tests can check cross-compiled kernels and whole models under qemu.
//
//   arm64_harness LIB.so FUNC PATH:DTYPE:SHAPE... OUT_PATH:DTYPE:SHAPE
//   arm64_harness --vm LIB.so N_INPUTS PATH:DTYPE:SHAPE... OUT_PATH:DTYPE:SHAPE...
//
// Every tensor argument is `path:dtype:shape` with dtype float32|int32 and shape `d0xd1x...`
// (an empty shape is a scalar tensor). Inputs are read from their files (raw, C-contiguous,
// little-endian). A kernel (first form) gets them and a zero-filled destination, passed last and
// written to its path after the call. A whole model (`--vm`, a Relax VM executable as
// pruneaug's artifacts are) runs its `main` on the N_INPUTS inputs; each of its outputs, in order,
// is written to the next OUT spec, whose shape and dtype it must have. Exit status 0 on success, 1
// with a message otherwise.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
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

void WriteBytes(const std::string& path, const void* data, size_t nbytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

void WriteFile(const HostTensor& tensor) { WriteBytes(tensor.path, tensor.data.get(), tensor.nbytes); }

// Host memory the VM may hold on to: a Tensor that owns a copy of a HostTensor's bytes.
struct AlignedAlloc {
  void AllocData(DLTensor* tensor) {
    size_t nbytes = tvm::ffi::GetDataSize(*tensor);
    tensor->data = std::aligned_alloc(kAlignment, (nbytes + kAlignment - 1) / kAlignment * kAlignment + kAlignment);
    if (tensor->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

tvm::ffi::Tensor ToTensor(const HostTensor& host) {
  tvm::ffi::Tensor tensor = tvm::ffi::Tensor::FromNDAlloc(
      AlignedAlloc(), tvm::ffi::ShapeView(host.shape.data(), host.shape.size()), host.dtype, DLDevice{kDLCPU, 0});
  std::memcpy(tensor.data_ptr(), host.data.get(), host.nbytes);
  return tensor;
}

// Copy one VM output into its destination after checking that it is what the caller expects.
void WriteOutput(const tvm::ffi::Any& value, const HostTensor& expected, size_t index) {
  tvm::ffi::Optional<tvm::ffi::Tensor> tensor = value.try_cast<tvm::ffi::Tensor>();
  if (!tensor.has_value()) throw std::runtime_error("output " + std::to_string(index) + " is not a tensor");
  const DLTensor* dl = tensor.value().GetDLTensorPtr();
  std::vector<int64_t> shape(dl->shape, dl->shape + dl->ndim);
  if (shape != expected.shape || dl->dtype.code != expected.dtype.code || dl->dtype.bits != expected.dtype.bits) {
    throw std::runtime_error("output " + std::to_string(index) + " does not have the shape and dtype of " +
                             expected.path);
  }
  if (dl->device.device_type != kDLCPU) throw std::runtime_error("output " + std::to_string(index) + " is not on the CPU");
  WriteBytes(expected.path, static_cast<const char*>(dl->data) + dl->byte_offset, expected.nbytes);
}

// `--vm LIB N in... out...`: load the Relax VM executable, initialise it for the CPU with the
// pooled allocator (what tvm.runtime.vm.VirtualMachine does), run `main`, write each output.
void RunVirtualMachine(int argc, char** argv) {
  if (argc < 5) throw std::runtime_error("--vm needs LIB.so N_INPUTS, the inputs and at least one output");
  size_t n_inputs = static_cast<size_t>(std::stoul(argv[3]));
  std::vector<HostTensor> tensors(static_cast<size_t>(argc - 4));
  if (n_inputs >= tensors.size()) throw std::runtime_error("--vm: no output spec after the inputs");
  for (size_t i = 0; i < tensors.size(); ++i) ParseSpec(argv[i + 4], &tensors[i]);
  std::vector<tvm::ffi::Tensor> inputs;
  for (size_t i = 0; i < n_inputs; ++i) {
    ReadFile(&tensors[i]);
    inputs.push_back(ToTensor(tensors[i]));
  }
  tvm::ffi::Module library = tvm::ffi::Module::LoadFromFile(argv[2]);
  auto get = [](const tvm::ffi::Module& module, const char* name) {
    tvm::ffi::Optional<tvm::ffi::Function> func = module->GetFunction(name);
    if (!func.has_value()) throw std::runtime_error(std::string("no function ") + name + " in the library");
    return func.value();
  };
  tvm::ffi::Module vm = get(library, "vm_load_executable")().cast<tvm::ffi::Module>();
  constexpr int64_t kPooledAllocator = 2;
  get(vm, "vm_initialization")(static_cast<int64_t>(kDLCPU), static_cast<int64_t>(0), kPooledAllocator);
  std::vector<tvm::ffi::AnyView> args(inputs.begin(), inputs.end());
  // a pruneaug CPU artifact's `main` takes the intermediate tensors that `workspace` allocates after its
  // inputs (pruneaug/codegen/workspace.py)
  tvm::ffi::Array<tvm::ffi::Any> workspace;
  if (tvm::ffi::Optional<tvm::ffi::Function> allocate = vm->GetFunction("workspace")) {
    workspace = allocate.value()().cast<tvm::ffi::Array<tvm::ffi::Any>>();
  }
  for (const tvm::ffi::Any& tensor : workspace) args.push_back(tensor);
  tvm::ffi::Any result;
  get(vm, "main").CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  size_t n_outputs = tensors.size() - n_inputs;
  if (auto tuple = result.try_cast<tvm::ffi::Array<tvm::ffi::Any>>()) {
    if (tuple.value().size() != n_outputs) {
      throw std::runtime_error("the model has " + std::to_string(tuple.value().size()) + " outputs, " +
                               std::to_string(n_outputs) + " given");
    }
    for (size_t i = 0; i < n_outputs; ++i) WriteOutput(tuple.value()[i], tensors[n_inputs + i], i);
  } else {
    if (n_outputs != 1) throw std::runtime_error("the model has 1 output, " + std::to_string(n_outputs) + " given");
    WriteOutput(result, tensors[n_inputs], 0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " LIB.so FUNC PATH:DTYPE:SHAPE... OUT_PATH:DTYPE:SHAPE\n"
              << "       " << argv[0] << " --vm LIB.so N_INPUTS PATH:DTYPE:SHAPE... OUT_PATH:DTYPE:SHAPE...\n";
    return 1;
  }
  if (std::string(argv[1]) == "--vm") {
    try {
      RunVirtualMachine(argc, argv);
    } catch (const std::exception& err) {
      std::cerr << "arm64_harness: " << err.what() << "\n";
      return 1;
    }
    return 0;
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

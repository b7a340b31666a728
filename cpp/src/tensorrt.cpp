// TensorRT engines as the parts' executors (executor.hpp), compiled into libforesight_runtime only
// where cmake found TensorRT's headers and library and a CUDA build of libtorch (cpp/CMakeLists.txt).
// It follows the Python backend (runtime/backends.py, TensorRTBackend) call for call: one execution
// context per part, all sharing one scratch allocation (parts run one after another), torch CUDA
// tensors as the I/O buffers, enqueueV3 on the engines' own stream. Written to the TensorRT 10/11 C++
// runtime API (NvInferRuntime.h); no machine this project is developed on has TensorRT, so this file
// is built and run only on hosts that do (docs/cpp.md says what a GPU run checks).
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <c10/core/Event.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <iostream>
#include <set>
#include <sstream>
#include <tuple>

#include "executor.hpp"

using nlohmann::json;

namespace foresight::detail {
namespace {

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << message << "\n";
  }
};

// What every part's executor shares: the logger and runtime the engines came from, the scratch
// memory of every context, and the stream the engines run on.
struct TensorRTEngines : Engines {
  Logger logger;  // before runtime: the runtime keeps a reference to it
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  at::Tensor scratch;
  c10::Device device;
  c10::cuda::CUDAStream stream;

  TensorRTEngines(c10::Device d, c10::cuda::CUDAStream s) : device(d), stream(s) {}

  // The loop's torch work runs on the engines' stream: it first waits for what the caller's stream
  // queued (the starting latents, the encoded prompt), and the caller's stream waits for the loop's
  // results when the scope ends.
  std::shared_ptr<void> loop_scope() override {
    struct Scope {
      c10::cuda::CUDAStream outer, inner;
      c10::cuda::CUDAStreamGuard guard;
      Scope(c10::cuda::CUDAStream o, c10::cuda::CUDAStream i) : outer(o), inner(i), guard(i) {
        c10::Event ready(c10::DeviceType::CUDA);
        ready.record(outer);
        ready.block(inner);
      }
      ~Scope() {
        c10::Event done(c10::DeviceType::CUDA);
        done.record(inner);
        done.block(outer);
      }
    };
    return std::make_shared<Scope>(c10::cuda::getCurrentCUDAStream(device.index()), stream);
  }
};

const std::map<nvinfer1::DataType, std::pair<std::string, at::ScalarType>>& dtypes() {
  static const std::map<nvinfer1::DataType, std::pair<std::string, at::ScalarType>> table = {
      {nvinfer1::DataType::kFLOAT, {"float32", at::kFloat}}, {nvinfer1::DataType::kHALF, {"float16", at::kHalf}},
      {nvinfer1::DataType::kBF16, {"bfloat16", at::kBFloat16}}, {nvinfer1::DataType::kINT64, {"int64", at::kLong}},
      {nvinfer1::DataType::kINT32, {"int32", at::kInt}},       {nvinfer1::DataType::kBOOL, {"bool", at::kBool}}};
  return table;
}

std::string shape_text(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

struct TensorRTExecutor : Executor {
  std::shared_ptr<TensorRTEngines> owner;  // first member: destroyed last, after the context and engine
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  std::string part;
  std::vector<std::string> inputs, outputs;     // the manifest's order
  std::vector<at::ScalarType> input_types, output_types;

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& args) override {
    if (args.size() != inputs.size())
      throw BackendError(part + " takes " + std::to_string(inputs.size()) + " inputs, got " + std::to_string(args.size()));
    const c10::cuda::CUDAGuard guard(owner->device);
    std::vector<at::Tensor> bound;  // alive until the enqueue returns; later frees are ordered on this stream
    for (size_t i = 0; i < args.size(); ++i) {
      at::Tensor t = args[i].to(owner->device, input_types[i]).contiguous();
      if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 256 != 0) t = t.clone();  // TensorRT wants 256-byte alignment
      if (t.dim() > nvinfer1::Dims::MAX_DIMS) throw BackendError(part + ": input " + inputs[i] + " has too many dimensions");
      nvinfer1::Dims dims;
      dims.nbDims = static_cast<int32_t>(t.dim());
      for (int64_t k = 0; k < t.dim(); ++k) dims.d[k] = t.size(k);
      if (!context->setInputShape(inputs[i].c_str(), dims))
        throw BackendError(part + ": the TensorRT engine refuses " + inputs[i] + " of shape " + shape_text(t) +
                           " (outside the shapes it was built for; see the manifest's tensorrt profile)");
      if (!context->setTensorAddress(inputs[i].c_str(), t.data_ptr()))
        throw BackendError(part + ": TensorRT refused the address of " + inputs[i]);
      bound.push_back(std::move(t));
    }
    std::vector<at::Tensor> outs;
    for (size_t j = 0; j < outputs.size(); ++j) {
      const nvinfer1::Dims dims = context->getTensorShape(outputs[j].c_str());
      std::vector<int64_t> shape;
      for (int32_t k = 0; k < dims.nbDims; ++k) shape.push_back(dims.d[k]);
      for (int64_t d : shape)
        if (d < 0) throw BackendError(part + ": TensorRT could not infer the shape of " + outputs[j] + " from the inputs");
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(output_types[j]).device(owner->device));
      if (!context->setTensorAddress(outputs[j].c_str(), t.data_ptr()))
        throw BackendError(part + ": TensorRT refused the address of " + outputs[j]);
      outs.push_back(std::move(t));
    }
    if (!context->enqueueV3(c10::cuda::getCurrentCUDAStream(owner->device.index()).stream()))
      throw BackendError("TensorRT failed to enqueue " + part + "; check the shapes against the engine's profile");
    return outs;
  }
};

// "10.8.0.43" -> {10, 8, 0}; missing parts are -1.
std::tuple<int, int, int> version_triple(const std::string& text) {
  int v[3] = {-1, -1, -1};
  std::istringstream in(text);
  std::string piece;
  for (int i = 0; i < 3 && std::getline(in, piece, '.'); ++i) {
    try {
      v[i] = std::stoi(piece);
    } catch (const std::exception&) {
      return {-1, -1, -1};
    }
  }
  return {v[0], v[1], v[2]};
}

}  // namespace

std::shared_ptr<Engines> load_tensorrt(const Manifest& m, const c10::Device& device,
                                       const std::vector<const PartSpec*>& parts,
                                       std::map<std::string, std::shared_ptr<Executor>>& executors) {
  const json& section = m.data.at("tensorrt");
  const std::string fix = "re-export with `foresight-export --backend tensorrt --out " + m.root + " --overwrite` on this machine";
  // Engines run only on the TensorRT (major.minor.patch) that built them: the linked library's
  // version, getInferLibVersion() = major * 10000 + minor * 100 + patch.
  const int32_t lib = getInferLibVersion();
  const int major = lib / 10000, minor = lib / 100 % 100, patch = lib % 100;
  const std::string built = section.value("tensorrt_version", "");
  if (version_triple(built) != std::make_tuple(major, minor, patch))
    throw BackendError("engines in " + m.root + " were built with TensorRT " + built + ", this is " +
                       std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch) + ": " + fix);
  if (c10::cuda::device_count() == 0)
    throw BackendError("TensorRT engines need an NVIDIA GPU and none is visible here: run the aoti backend on the CPU");
  const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
  if (index >= c10::cuda::device_count())
    throw BackendError("there is no " + device.str() + " (this machine has " + std::to_string(c10::cuda::device_count()) +
                       " CUDA devices)");
  const c10::Device cuda(c10::kCUDA, index);
  const c10::cuda::CUDAGuard guard(cuda);
  cudaDeviceProp props{};
  if (cudaGetDeviceProperties(&props, index) != cudaSuccess)
    throw BackendError("CUDA could not describe " + cuda.str() + ": run the aoti backend, or check the driver");
  const std::string capability = std::to_string(props.major) + "." + std::to_string(props.minor);
  const std::string built_for = section.value("device", json::object()).value("compute_capability", "");
  if (built_for != capability)
    throw BackendError("engines in " + m.root + " were built for compute capability " + built_for + ", this GPU is " +
                       capability + " (" + props.name + "): " + fix);

  auto engines = std::make_shared<TensorRTEngines>(cuda, c10::cuda::getStreamFromPool(false, index));
  engines->runtime.reset(nvinfer1::createInferRuntime(engines->logger));
  if (!engines->runtime) throw BackendError("TensorRT could not create a runtime (see its messages above)");
  std::vector<std::shared_ptr<TensorRTExecutor>> loaded;
  int64_t scratch = 1;
  for (const PartSpec* part : parts) {
    const std::string path = m.path(section.at("engines").at(part->name).at("file").get<std::string>());
    const std::string plan = read_file(path);
    auto exec = std::make_shared<TensorRTExecutor>();
    exec->owner = engines;
    exec->part = part->name;
    exec->engine.reset(engines->runtime->deserializeCudaEngine(plan.data(), plan.size()));
    if (!exec->engine) throw BackendError("TensorRT could not load " + path + " (see its messages above): " + fix);
    // Its I/O as the manifest lists it: (name, rank, dtype), as sets, so a valid engine in another
    // part's slot is refused.
    std::set<std::tuple<std::string, int, std::string>> got[2], want[2];
    std::map<std::string, at::ScalarType> types;
    for (int32_t i = 0; i < exec->engine->getNbIOTensors(); ++i) {
      const char* name = exec->engine->getIOTensorName(i);
      const auto type = dtypes().find(exec->engine->getTensorDataType(name));
      const bool input = exec->engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
      got[input ? 0 : 1].insert({name, exec->engine->getTensorShape(name).nbDims,
                                 type == dtypes().end() ? "?" : type->second.first});
      types[name] = type == dtypes().end() ? at::kFloat : type->second.second;
    }
    for (const auto& t : part->inputs) want[0].insert({t.name, static_cast<int>(t.shape.size()), t.dtype});
    for (const auto& t : part->outputs) want[1].insert({t.name, static_cast<int>(t.shape.size()), t.dtype});
    if (got[0] != want[0] || got[1] != want[1])
      throw BackendError(path + " is not the engine of " + part->name + ": its inputs or outputs are not the manifest's "
                         "(a file in the wrong slot?); " + fix);
    for (const auto& t : part->inputs) {
      exec->inputs.push_back(t.name);
      exec->input_types.push_back(types.at(t.name));
    }
    for (const auto& t : part->outputs) {
      exec->outputs.push_back(t.name);
      exec->output_types.push_back(types.at(t.name));
    }
    scratch = std::max(scratch, exec->engine->getDeviceMemorySizeV2());
    loaded.push_back(exec);
  }
  // One scratch allocation for every context, sized to the largest requirement.
  engines->scratch = at::empty({scratch}, at::TensorOptions().dtype(at::kByte).device(cuda));
  for (auto& exec : loaded) {
    exec->context.reset(exec->engine->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
    if (!exec->context) throw BackendError("TensorRT could not create an execution context for " + exec->part);
    exec->context->setDeviceMemoryV2(engines->scratch.data_ptr(), scratch);
    executors[exec->part] = exec;
  }
  return engines;
}

}  // namespace foresight::detail

// The executors behind Runtime, private to the library: one compiled part (or component) takes its
// inputs in the manifest's order and returns its outputs in the manifest's order. runtime.cpp holds
// the AOTInductor one; tensorrt.cpp, compiled only where cmake found TensorRT, the TensorRT one.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "foresight/runtime.hpp"

namespace foresight::detail {

struct Executor {
  virtual ~Executor() = default;
  virtual std::vector<at::Tensor> run(const std::vector<at::Tensor>& args) = 0;
};

// What one backend's executors share. A denoising loop holds loop_scope() while it runs: the
// TensorRT engines make their own CUDA stream current for the loop's torch work (as the Python
// backend's denoise_context does), so engine calls and the glue between them need no syncs.
struct Engines {
  virtual ~Engines() = default;
  virtual std::shared_ptr<void> loop_scope() { return nullptr; }
};

std::string read_file(const std::string& path);  // the whole file, or ManifestError (runtime.cpp)

// The checks of the folder's `tensorrt` section that need no TensorRT (runtime.cpp): the section,
// no experts, an engine file per part built from that part's current ONNX file, a CUDA device.
void check_tensorrt_section(const Manifest& manifest, const c10::Device& device);

#ifdef FORESIGHT_HAVE_TENSORRT
// The parts' TensorRT engines (tensorrt.cpp): refuses another TensorRT version or GPU, checks each
// engine's I/O against the manifest, and fills `executors` by part name.
std::shared_ptr<Engines> load_tensorrt(const Manifest& manifest, const c10::Device& device,
                                       const std::vector<const PartSpec*>& parts,
                                       std::map<std::string, std::shared_ptr<Executor>>& executors);
#endif

}  // namespace foresight::detail

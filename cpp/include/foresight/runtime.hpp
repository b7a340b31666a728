// The C++ runtime on libtorch: reads an engines folder (docs/engines-format.md) and nothing else,
// runs its AOTInductor packages, and drives the denoising loop with the Foresight controller,
// as the Python runtime (runtime/engine.py) does, step for step.
//
//   auto rt = foresight::Runtime::load("engines/latte-tiny-aoti");            // CPU (or "cuda")
//   foresight::DenoiseRequest req;  req.steps = 50;  req.seed = 3;
//   req.text = embeddings;                        // the encoded prompt, (2 or 1, T, C): negative first
//   foresight::DenoiseResult res = rt.denoise(req);   // final latents, stats, the decision trace
//
// Status: the manifest (versions, paths inside the folder, every file's size and sha256), the
// AOTInductor executors (one set per expert: Wan 2.2 A14B's two transformers), the flow between
// parts, the reuse of cached outputs, and every shipped model's sampler: Latte's (DDIM, batched
// CFG, learned-sigma split), CogVideoX's (CogVideoXDDIM or CogVideoXDPM, the sin-cos or rotary
// position tables per shape, dynamic CFG), Open-Sora 1.2's (rectified flow with its timestep transform, [conditional, null]
// CFG, fps and pixel size as stem inputs) and Wan's (FlowMatchEuler or UniPC with flow sigmas,
// CFG as two batch-1 passes, the expert switch at boundary_ratio with one controller stage per
// expert). Runtime::generate goes from a prompt to frames (tokenizer, compiled text encoder and VAE
// decoder) for every shipped pipeline, each prompt encoded as its Python pipeline encodes it, CogVideoX
// 5B's (rotary tables, CogVideoXDPMScheduler) included. TensorRT engines (the folder's `tensorrt`
// section) run the parts instead of the AOTInductor packages with load(..., "tensorrt"): compiled into
// the library only where cmake found TensorRT and CUDA (docs/cpp.md); elsewhere load refuses them.
//
// Thread safety, as the Python runtime's: one Runtime runs one call at a time. Concurrent calls
// (denoise, generate, encode_prompt, decode) from several threads are serialised by a lock; each
// gives what a sequential call gives. For parallel generations load one Runtime per thread.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "foresight/controller.hpp"
#include "foresight/tokenizer.hpp"

namespace foresight {

struct ManifestError : Error {  // the folder or its manifest is missing, corrupt or of another version
  using Error::Error;
};
struct BackendError : Error {  // an engine cannot be loaded or run here
  using Error::Error;
};
struct NumericsError : Error {  // a layer produced NaN or Inf
  using Error::Error;
};
struct ShapeError : Error {  // a frame count or size the model cannot make
  using Error::Error;
};

inline constexpr int kMinSchemaVersion = 2;
inline constexpr int kSchemaVersion = 3;

// One input or output of a part: its name and shape (ints or symbol names).
struct TensorSpec {
  std::string name;
  std::vector<nlohmann::json> shape;
  std::string dtype = "float32";
};

struct PartSpec {
  std::string name;
  std::vector<TensorSpec> inputs, outputs;
  std::string file;  // the part's ONNX file, relative to the folder
};

// The engines folder's manifest, checked as the Python runtime checks it (runtime/manifest.py):
// the version, every listed file inside the folder with its size and sha256, every file a part
// or component uses listed.
struct Manifest {
  std::string root;  // the folder, absolute, symlinks resolved
  nlohmann::json data;
  PartSpec stem, head;
  std::vector<PartSpec> layers;
  std::vector<std::string> probes;

  // backend "aoti" requires the folder's AOTInductor packages, "tensorrt" its TensorRT engines.
  static Manifest load(const std::string& folder, bool verify_hashes = true, const std::string& backend = "aoti");
  std::string path(const std::string& relative) const;  // inside the folder, or ManifestError
  std::vector<const PartSpec*> all_parts() const;         // stem, head, then the layers
  const nlohmann::json& pipeline() const { return data.at("pipeline"); }
  const nlohmann::json& flow() const { return data.at("flow"); }
  int num_experts() const { return 1 + static_cast<int>(data.value("experts", nlohmann::json::array()).size()); }
  // Expert k's AOTInductor parts (name -> {program, weights}); expert 0's are the top-level ones.
  const nlohmann::json& aoti_parts(int expert) const;
};

std::string sha256_file(const std::string& path);

struct DenoiseRequest {
  at::Tensor text;  // the encoded prompt (2 or 1, T, C), the unconditional row first when guidance > 1
  // Or every stem input the Python pipeline's encode_prompt returns, by name (Open-Sora: caption and
  // caption_mask, the conditional row first and the null caption second).
  std::map<std::string, at::Tensor> inputs;
  int frames = -1, height = -1, width = -1, steps = -1;  // -1: the manifest's defaults
  double guidance = -1;                                  // -1: the manifest's default
  double guidance_2 = -1;  // the second expert's (two-expert folders); -1: the manifest's default_guidance_2
  uint64_t seed = 0;
  nlohmann::json policy = {{"policy", "none"}};  // Policy.to_dict()
};

struct DenoiseResult {
  at::Tensor latents;  // (1, C, F, h, w), float32, on the runtime's device
  nlohmann::ordered_json trace;
  nlohmann::json stats;
};

// A prompt to frames (Runtime::generate): the prompt tokenized, encoded by the compiled text encoder,
// denoised, decoded by the compiled VAE decoder, as foresight-run does it with the same seed.
struct Request {
  std::string prompt;
  std::string negative_prompt;
  bool default_negative = true;  // true: the manifest's default_negative_prompt, not negative_prompt
  int frames = -1, height = -1, width = -1, steps = -1;  // -1: the manifest's defaults
  double guidance = -1;                                  // -1: the manifest's default
  uint64_t seed = 0;
  nlohmann::json policy = {{"policy", "none"}};  // Policy.to_dict()
};

struct Result {
  at::Tensor frames;   // uint8 (F, H, W, 3) on the CPU
  at::Tensor latents;  // the final latents, as DenoiseResult's
  nlohmann::ordered_json trace;
  nlohmann::json stats;
};

namespace detail {
struct Executor;  // one part's (or component's) compiled form (runtime.cpp, tensorrt.cpp)
struct Engines;   // what a backend's executors share
}  // namespace detail

class Runtime {
 public:
  // backend: "aoti" (AOTInductor packages, CPU or CUDA) or "tensorrt" (TensorRT engines, CUDA; the text
  // encoder and VAE decoder, which TensorRT folders do not hold, from the folder's aoti.components).
  static Runtime load(const std::string& folder, const std::string& device = "cpu", bool verify_hashes = true,
                      const std::string& backend = "aoti");
  DenoiseResult denoise(const DenoiseRequest& request);
  // Needs the compiled text encoder and VAE decoder (`foresight-export --backend aoti` writes them);
  // folders without them are refused with ConfigError. A video VAE's decoder is compiled for the
  // default video's frame count: other frame counts are refused with ShapeError before denoising.
  Result generate(const Request& request);
  // The encoded prompt as the Python pipeline's encode_prompt gives it, by stem input name:
  // encoder_hidden_states (2 or 1, T, C), negative first; Open-Sora: caption and caption_mask, the
  // conditional row first, then the null caption. DenoiseRequest::inputs takes it as it is.
  std::map<std::string, at::Tensor> encode_prompt(const std::string& prompt, const std::string& negative_prompt,
                                                  bool guidance);
  // Final latents (as DenoiseResult's) -> uint8 frames (F, H, W, 3) on the CPU.
  at::Tensor decode(const at::Tensor& latents);
  const Manifest& manifest() const { return manifest_; }
  long engine_calls(const std::string& part) const;  // every expert's together

 private:
  using Executor = detail::Executor;
  Runtime(Manifest manifest, c10::Device device);
  Manifest manifest_;
  c10::Device device_;
  std::vector<std::map<std::string, std::shared_ptr<Executor>>> executors_;  // per expert, by part name
  std::shared_ptr<detail::Engines> engines_;  // the parts' backend (its stream, its scratch memory)
  std::map<std::string, long> calls_;
  nlohmann::json scheduler_;  // the scheduler's config, read once at load (its file was hashed then)
  std::shared_ptr<Executor> text_encoder_, vae_decoder_;  // aoti.components, when the folder has them
  std::shared_ptr<Tokenizer> tokenizer_;
  std::string no_generate_;  // why generate() cannot run here ("" if it can)
  double vae_scaling_ = 1.0;
  int64_t vae_latent_frames_ = -1, vae_frames_ = -1;  // a video VAE decoder's compiled frame counts
  at::Tensor null_caption_;                            // Open-Sora's learned null caption (T, C)
  std::shared_ptr<std::mutex> lock_ = std::make_shared<std::mutex>();  // one call at a time
  void check_generate() const;
  DenoiseResult denoise_unlocked(const DenoiseRequest& request);
  std::map<std::string, at::Tensor> encode_unlocked(const std::string& prompt, const std::string& negative_prompt,
                                                    bool guidance);
  at::Tensor decode_unlocked(const at::Tensor& latents);
  std::vector<at::Tensor> run(const PartSpec& part, const std::map<std::string, at::Tensor>& inputs, int expert);
};

}  // namespace foresight

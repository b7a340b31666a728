// The C++ runtime (runtime.hpp): manifest checks, AOTInductor executors, the denoising loop.
// Each piece follows its Python original so the two give the same numbers: runtime/manifest.py
// (refusals), runtime/backends.py (AOTInductorBackend), runtime/engine.py (_run_step: the flow,
// the cached outputs, one host transfer per step), runtime/pipelines/latte.py and diffusers'
// DDIMScheduler (the sampler, op for op).
#include "foresight/runtime.hpp"

#include <openssl/evp.h>

#include "executor.hpp"

#include <ATen/Version.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>

namespace fs = std::filesystem;
using nlohmann::json;

namespace foresight {
namespace detail {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ManifestError("cannot read " + path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace detail

namespace {

using detail::read_file;
constexpr uintmax_t kMaxManifestBytes = 16u << 20;

std::vector<TensorSpec> tensor_specs(const json& list) {
  std::vector<TensorSpec> out;
  for (const auto& t : list)
    out.push_back({t.at("name").get<std::string>(), t.at("shape").get<std::vector<json>>(), t.value("dtype", "float32")});
  return out;
}

PartSpec part_spec(const json& p) {
  return {p.at("name").get<std::string>(), tensor_specs(p.at("inputs")), tensor_specs(p.at("outputs")),
          p.at("file").get<std::string>()};
}

// safetensors: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes. No
// library reads it from C++ (the format's own is Rust and Python); the layout is fixed by its spec.
std::map<std::string, at::Tensor> load_safetensors(const std::string& path, c10::Device device) {
  const std::string bytes = read_file(path);
  uint64_t n = 0;
  if (bytes.size() < 8) throw ManifestError(path + " is not a safetensors file (too short)");
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  if (n > bytes.size() - 8) throw ManifestError(path + " is not a safetensors file (header past the end)");
  const json header = json::parse(bytes.substr(8, n));
  const char* data = bytes.data() + 8 + n;
  const uint64_t data_size = bytes.size() - 8 - n;
  static const std::map<std::string, c10::ScalarType> dtypes = {
      {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"F64", at::kDouble},
      {"I64", at::kLong},  {"I32", at::kInt},  {"I16", at::kShort},     {"I8", at::kChar},
      {"U8", at::kByte},   {"BOOL", at::kBool}};
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    auto dtype = dtypes.find(info.at("dtype").get<std::string>());
    if (dtype == dtypes.end()) throw ManifestError(path + ": tensor " + name + " has an unsupported dtype");
    auto shape = info.at("shape").get<std::vector<int64_t>>();
    auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype->second));
    const uint64_t size = t.numel() * t.element_size();
    if (offsets.size() != 2 || offsets[1] < offsets[0] || offsets[1] > data_size || offsets[1] - offsets[0] != size)
      throw ManifestError(path + ": tensor " + name + " has bad data offsets (a corrupt file)");
    std::memcpy(t.data_ptr(), data + offsets[0], size);
    out[name] = t.to(device);
  }
  return out;
}

}  // namespace

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ManifestError("cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL could not start a sha256");
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), buffer.size());
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<size_t>(in.gcount()));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &length);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) out += {hex[digest[i] >> 4], hex[digest[i] & 15]};
  return out;
}

// ------------------------------------------------------------------------------------ manifest
const json& Manifest::aoti_parts(int expert) const {
  return expert == 0 ? data.at("aoti").at("parts") : data.at("experts").at(expert - 1).at("aoti");
}

std::vector<const PartSpec*> Manifest::all_parts() const {
  std::vector<const PartSpec*> parts{&stem, &head};
  for (const auto& l : layers) parts.push_back(&l);
  return parts;
}

std::string Manifest::path(const std::string& relative) const {
  std::error_code ec;
  fs::path resolved = fs::weakly_canonical(fs::path(root) / relative, ec);
  const std::string r = resolved.string();
  if (ec || (r != root && r.rfind(root + "/", 0) != 0))
    throw ManifestError(root + "/" + relative + " resolves to " + r + ", outside the engines folder: the folder is refused");
  return r;
}

Manifest Manifest::load(const std::string& folder, bool verify_hashes, const std::string& backend) {
  if (backend != "aoti" && backend != "tensorrt")
    throw ConfigError("backend " + backend + " is not one the C++ runtime runs: use aoti or tensorrt");
  const std::string fix = "re-export with `foresight-export --out " + folder + " --overwrite`";
  if (fs::exists(folder) && !fs::is_directory(folder))
    throw ManifestError(folder + " is a file, not an engines folder: pass the folder foresight-export wrote");
  if (!fs::is_directory(folder))
    throw ManifestError("engines folder " + folder + " does not exist: build it with "
                        "`foresight-export --model latte --preset tiny --backend aoti --out " + folder + "`");
  Manifest m;
  m.root = fs::canonical(folder).string();
  const std::string mpath = m.root + "/manifest.json";
  if (!fs::is_regular_file(mpath))
    throw ManifestError(m.root + " has no manifest.json: it is not an engines folder, or its export was interrupted; " + fix);
  if (fs::file_size(mpath) > kMaxManifestBytes)
    throw ManifestError(mpath + " is larger than 16 MiB: not a manifest; " + fix);
  try {
    m.data = json::parse(read_file(mpath));
  } catch (const json::parse_error& e) {
    throw ManifestError(mpath + " is not valid JSON (" + e.what() + "); " + fix);
  }
  if (!m.data.is_object()) throw ManifestError(mpath + " is not a manifest object; " + fix);
  const json& version = m.data.value("schema_version", json());
  if (!version.is_number_integer()) throw ManifestError(mpath + " has no integer schema_version; " + fix);
  const int v = version.get<int>();
  if (v > kSchemaVersion)
    throw ManifestError(mpath + " has schema version " + std::to_string(v) + ", newer than this runtime's " +
                        std::to_string(kSchemaVersion) + ": upgrade foresight-dit or re-export with this version");
  if (v < kMinSchemaVersion)
    throw ManifestError(mpath + " has old schema version " + std::to_string(v) + " (this runtime reads " +
                        std::to_string(kMinSchemaVersion) + ".." + std::to_string(kSchemaVersion) + "); " + fix);
  try {
    if (m.data.at("format") != "foresight-engines") throw ManifestError(mpath + " is not a foresight-engines manifest; " + fix);
    const json& parts = m.data.at("parts");
    m.stem = part_spec(parts.at("stem"));
    m.head = part_spec(parts.at("head"));
    for (const auto& l : parts.at("layers")) m.layers.push_back(part_spec(l));
    m.probes = m.data.at("flow").at("probes").get<std::vector<std::string>>();
    if (backend == "aoti" && (!m.data.contains("aoti") || m.data["aoti"].is_null()))
      throw ManifestError(m.root + " has no AOTInductor packages, the engines the C++ runtime runs: build them with "
                          "`foresight-export --backend aoti --out " + m.root + " --overwrite`");
    for (int k = 1; backend == "aoti" && k < m.num_experts(); ++k)
      if (!m.data["experts"][k - 1].contains("aoti") || m.data["experts"][k - 1]["aoti"].is_null())
        throw ManifestError(m.root + ": expert " + std::to_string(k) + " has no AOTInductor weights; " + fix);
  } catch (const json::exception& e) {
    throw ManifestError(mpath + " does not follow the engines format (" + e.what() + "); " + fix);
  }

  // Every listed file inside the folder, of its size and hash; every file a part uses listed.
  std::map<std::string, std::string> listed;  // resolved path -> relative
  for (const auto& [rel, entry] : m.data.at("files").items()) listed[m.path(rel)] = rel;
  std::vector<std::string> needed;
  const bool has_aoti = m.data.contains("aoti") && m.data["aoti"].is_object();
  try {
    if (has_aoti) {
      for (const auto& [name, program] : m.data["aoti"].at("programs").items()) needed.push_back(program.at("file"));
      for (int k = 0; backend == "aoti" && k < m.num_experts(); ++k)
        for (const auto& [name, part] : m.aoti_parts(k).items()) needed.push_back(part.at("weights"));
      const json compiled = m.data["aoti"].value("components", json::object());  // a local: items() does not own it
      for (const auto& [name, comp] : compiled.items()) needed.push_back(comp.at("weights"));
    }
    for (const auto& [name, rel] : m.data.at("components").items()) needed.push_back(rel);
    const json trt = m.data.value("tensorrt", json());
    if (backend == "tensorrt" && trt.is_object()) {
      const json engines = trt.value("engines", json::object());
      for (const auto& [name, engine] : engines.items()) needed.push_back(engine.at("file"));
    }
  } catch (const json::exception& e) {
    throw ManifestError(mpath + " does not follow the engines format (" + e.what() + "); " + fix);
  }
  for (const std::string& rel : needed) {
    const std::string p = m.path(rel);
    if (fs::is_directory(p)) {
      for (const auto& f : fs::recursive_directory_iterator(p))
        if (!f.is_directory() && !listed.count(m.path(fs::relative(f.path(), m.root).string())))
          throw ManifestError(f.path().string() + " is in the engines folder but not in its manifest (an unlisted file "
                              "a loader could read); remove it or " + fix);
    } else if (!listed.count(p)) {
      throw ManifestError(m.root + "/" + rel + " is used by the manifest but not listed with a hash in its files; " + fix);
    }
  }
  for (const auto& [p, rel] : listed) {
    const json& entry = m.data["files"][rel];
    if (!fs::is_regular_file(p)) throw ManifestError(m.root + "/" + rel + " listed in the manifest is missing; " + fix);
    const auto size = fs::file_size(p);
    if (size != entry.at("bytes").get<uintmax_t>())
      throw ManifestError(m.root + "/" + rel + " has " + std::to_string(size) + " bytes, the manifest says " +
                          entry.at("bytes").dump() + " (corrupt, truncated or replaced file); " + fix);
    if (verify_hashes && sha256_file(p) != entry.at("sha256").get<std::string>())
      throw ManifestError(m.root + "/" + rel + " does not match the sha256 recorded in the manifest (corrupt or replaced "
                          "file); " + fix);
  }
  return m;
}

// ------------------------------------------------------------------------------------ executors
namespace {

struct AOTIExecutor : detail::Executor {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& args) override { return loader->run(args); }
};

}  // namespace

namespace detail {

void check_tensorrt_section(const Manifest& m, const c10::Device& device) {
  const std::string fix = "re-export with `foresight-export --backend tensorrt --out " + m.root + " --overwrite` on this machine";
  const json& section = m.data.value("tensorrt", json());
  if (!section.is_object() || section.empty()) throw BackendError(m.root + " has no TensorRT engines: " + fix);
  if (m.num_experts() > 1)
    throw BackendError(m.root + " holds two experts, and TensorRT engines are not built for folders with experts yet: "
                       "run it with the aoti backend");
  const json engines = section.value("engines", json::object());
  for (const PartSpec* part : m.all_parts()) {
    if (!engines.contains(part->name) || !engines[part->name].contains("file"))
      throw BackendError("no TensorRT engine for " + part->name + ": " + fix);
    const std::string& file = part->file;
    if (engines[part->name].value("onnx_sha256", "") != m.data.at("files").at(file).at("sha256").get<std::string>())
      throw BackendError("the TensorRT engine of " + part->name + " was built from another " + file + ": rebuild with "
                         "`foresight-export --backend tensorrt --out " + m.root + " --overwrite`");
  }
  if (!device.is_cuda()) throw BackendError("the tensorrt backend runs on CUDA only: pass --device cuda");
}

}  // namespace detail

Runtime::Runtime(Manifest manifest, c10::Device device) : manifest_(std::move(manifest)), device_(device) {}

Runtime Runtime::load(const std::string& folder, const std::string& device_name, bool verify_hashes,
                      const std::string& backend) {
  c10::Device device(device_name);
  Manifest m = Manifest::load(folder, verify_hashes, backend);
  if (m.data.value("dtype", "float32") != "float32")
    throw ConfigError(m.root + " holds " + m.data["dtype"].get<std::string>() + " engines; the C++ runtime runs float32 "
                      "ones: re-export without --dtype, or run it with foresight-run");
  if (backend == "tensorrt") detail::check_tensorrt_section(m, device);
  const json aoti = m.data.value("aoti", json());
  const std::string fix = "re-export with `foresight-export --backend aoti --device " + device.str() + " --out " + m.root +
                          " --overwrite`";
  // Why the folder's AOTInductor packages cannot run here ("" if they can).
  auto aoti_refusal = [&]() -> std::string {
    if (!aoti.is_object()) return m.root + " has no AOTInductor packages; " + fix;
    const std::string built_device = aoti.at("device"), built_torch = aoti.at("torch");
    if (built_device != c10::DeviceTypeName(device.type(), true))
      return "the AOTInductor packages in " + m.root + " were built for " + built_device + ", not " + device.str() +
             ": run with --device " + built_device + ", or " + fix;
    if (built_torch.substr(0, built_torch.find('+')) != std::string(TORCH_VERSION))
      return "the AOTInductor packages in " + m.root + " were built with torch " + built_torch + ", this libtorch is " +
             TORCH_VERSION + " (compiled code runs only where it was built for); " + fix;
    if (device.is_cpu() && aoti.at("isa") != at::get_cpu_capability())
      return "the AOTInductor packages in " + m.root + " were built with instruction set " +
             aoti.at("isa").get<std::string>() + ", this machine has " + at::get_cpu_capability() + "; " + fix;
    return "";
  };
  const std::string aoti_unusable = aoti_refusal();
  if (backend == "aoti" && !aoti_unusable.empty()) throw BackendError(aoti_unusable);
  Runtime rt(std::move(m), device);
  rt.scheduler_ = json::parse(read_file(rt.manifest_.path(
      rt.manifest_.data.at("components").at("scheduler").get<std::string>() + "/scheduler_config.json")));
  // One compiled program instance with one part's (or component's) weights, its inputs checked.
  auto executor = [&](const json& entry, const std::vector<std::string>& want, const std::string& what) {
    const std::string program = rt.manifest_.path(aoti.at("programs").at(entry.at("program").get<std::string>()).at("file"));
    auto exec = std::make_shared<AOTIExecutor>();
    try {
      exec->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          program, "model", false, 1, device.has_index() ? device.index() : -1);
    } catch (const std::exception& e) {
      throw BackendError("could not load the AOTInductor package " + program + " (" + e.what() + "); " + fix);
    }
    auto meta = exec->loader->get_metadata();
    if (!meta.count("foresight.io")) throw BackendError(program + " is not a package foresight-export built (no I/O signature); " + fix);
    const json io = json::parse(meta["foresight.io"]);
    std::vector<std::string> got;
    for (const auto& t : io.at("inputs")) got.push_back(t.at(0));
    if (want != got) throw BackendError(program + " takes other inputs than " + what + "; " + fix);
    auto weights = load_safetensors(rt.manifest_.path(entry.at("weights")), device);
    std::set<std::string> fqns;
    for (const auto& n : exec->loader->get_constant_fqns()) fqns.insert(n);
    std::set<std::string> have;
    for (const auto& [n, t] : weights) have.insert(n);
    if (have != fqns)
      throw BackendError(entry.at("weights").get<std::string>() + " holds other weights than " + program + " takes; " + fix);
    std::unordered_map<std::string, at::Tensor> constants(weights.begin(), weights.end());
    exec->loader->load_constants(constants, false, true, false, false);
    return exec;
  };
  const std::vector<const PartSpec*> parts = rt.manifest_.all_parts();
  rt.executors_.resize(rt.manifest_.num_experts());
  for (const PartSpec* part : parts) rt.calls_[part->name] = 0;
  if (backend == "tensorrt") {
#ifdef FORESIGHT_HAVE_TENSORRT
    rt.engines_ = detail::load_tensorrt(rt.manifest_, device, parts, rt.executors_[0]);
#else
    throw BackendError("this libforesight_runtime was built without TensorRT (cmake found no NvInferRuntime.h, libnvinfer "
                       "and CUDA torch): install TensorRT and rebuild cpp/ with -DTENSORRT_ROOT=<its folder>, or run "
                       "the folder's AOTInductor packages (backend aoti)");
#endif
  } else {
    for (int k = 0; k < rt.manifest_.num_experts(); ++k) {
      for (const PartSpec* part : parts) {
        std::vector<std::string> want;
        for (const auto& t : part->inputs) want.push_back(t.name);
        rt.executors_[k][part->name] = executor(rt.manifest_.aoti_parts(k).at(part->name), want, "part " + part->name);
      }
    }
  }
  // The compiled text encoder and VAE decoder, and the tokenizer: what generate() needs. A TensorRT
  // folder takes them from its aoti section when it has one for this device.
  if (!aoti_unusable.empty()) {
    rt.no_generate_ = "generate() needs the folder's compiled text encoder and VAE decoder (its aoti section), "
                      "and " + aoti_unusable + ": encode the prompt elsewhere and call denoise(), or run foresight-run "
                      "--backend " + backend;
    return rt;
  }
  const json components = aoti.value("components", json::object());
  if (!components.contains("text_encoder") || !components.contains("vae_decoder")) {
    rt.no_generate_ = rt.manifest_.root + " has no compiled text encoder and VAE decoder (foresight-export --backend "
                      "aoti writes them): encode the prompt in Python and call denoise(), or run foresight-run "
                      "--backend aoti";
    return rt;
  }
  rt.text_encoder_ = executor(components["text_encoder"], {"input_ids", "attention_mask"}, "the text encoder");
  rt.vae_decoder_ = executor(components["vae_decoder"], {"latents"}, "the VAE decoder");
  const json& latents_shape = components["vae_decoder"].at("inputs").at(0).at("shape");
  if (latents_shape.size() == 5 && latents_shape[2].is_number_integer()) {  // a video VAE: one frame count
    rt.vae_latent_frames_ = latents_shape[2].get<int64_t>();
    rt.vae_frames_ = components["vae_decoder"].at("outputs").at(0).at("shape").at(2).get<int64_t>();
  }
  const json& names = rt.manifest_.data.at("components");
  const std::string component_dir = names.at("vae").get<std::string>();
  rt.vae_scaling_ = json::parse(read_file(rt.manifest_.path(component_dir + "/config.json"))).value("scaling_factor", 1.0);
  if (names.contains("null_caption")) {  // Open-Sora: what the unconditional row is encoded as
    auto null = load_safetensors(rt.manifest_.path(names.at("null_caption").get<std::string>()), device);
    if (!null.count("y_embedding")) throw ManifestError(rt.manifest_.root + ": the null caption file has no y_embedding");
    rt.null_caption_ = null.at("y_embedding");
  }
  try {
    rt.tokenizer_ = std::make_shared<Tokenizer>(Tokenizer::load(rt.manifest_.path(
        names.at("tokenizer").get<std::string>() + "/tokenizer.json")));
  } catch (const TokenizerError& e) {
    rt.no_generate_ = e.what();
  }
  return rt;
}

long Runtime::engine_calls(const std::string& part) const {
  std::lock_guard<std::mutex> guard(*lock_);
  auto it = calls_.find(part);
  return it == calls_.end() ? 0 : it->second;
}

std::vector<at::Tensor> Runtime::run(const PartSpec& part, const std::map<std::string, at::Tensor>& inputs,
                                     int expert) {
  std::vector<at::Tensor> args;
  for (const auto& spec : part.inputs) args.push_back(inputs.at(spec.name));
  ++calls_[part.name];
  return executors_.at(expert).at(part.name)->run(args);
}

// ------------------------------------------------------------------------------------ sampling
namespace {

// numpy.arange(start, stop, step) for floats: ceil((stop - start) / step) values start + i * delta,
// delta being (start + step) - start as numpy's fill computes it.
std::vector<double> np_arange(double start, double stop, double step) {
  const auto n = static_cast<int64_t>(std::ceil((stop - start) / step));
  const double delta = (start + step) - start;
  std::vector<double> out;
  for (int64_t i = 0; i < n; ++i) out.push_back(start + static_cast<double>(i) * delta);
  return out;
}

// numpy.linspace(start, stop, num) in float64, as numpy computes it (arange * step + start, the
// last value set to stop), so the schedules below match diffusers' bit for bit.
std::vector<double> np_linspace(double start, double stop, int num) {
  std::vector<double> out(num);
  const double step = num > 1 ? (stop - start) / (num - 1) : 0.0;
  for (int i = 0; i < num; ++i) out[i] = num > 1 ? static_cast<double>(i) * step + start : start;
  if (num > 1) out[num - 1] = stop;
  return out;
}

// The DDIM-family schedulers' set_timesteps (DDIMScheduler, CogVideoXDDIMScheduler): ``steps``
// timesteps out of ``num_train`` by the config's timestep_spacing, in numpy's arithmetic.
std::vector<int64_t> spaced_timesteps(const json& cfg, int num_train, int steps) {
  std::vector<int64_t> out;
  const std::string spacing = cfg.value("timestep_spacing", "leading");
  if (spacing == "leading") {
    const int64_t ratio = num_train / steps, offset = cfg.value("steps_offset", 0);
    for (int i = steps - 1; i >= 0; --i) out.push_back(i * ratio + offset);
  } else if (spacing == "trailing") {
    for (double t : np_arange(num_train, 0, -static_cast<double>(num_train) / steps))
      out.push_back(static_cast<int64_t>(std::nearbyint(t)) - 1);
  } else if (spacing == "linspace") {
    const auto v = np_linspace(0, num_train - 1.0, steps);
    for (int i = steps - 1; i >= 0; --i) out.push_back(static_cast<int64_t>(std::nearbyint(v[i])));
  } else {
    throw ConfigError("unknown timestep_spacing " + spacing);
  }
  return out;
}

// diffusers' DDIMScheduler at eta 0, op for op on the same float32 tensors (set_timesteps and step).
struct DDIM {
  json config;
  at::Tensor alphas_cumprod, final_alpha_cumprod;
  std::vector<int64_t> timesteps;
  int num_train, steps;

  DDIM(const json& cfg, int num_steps) : config(cfg), num_train(cfg.at("num_train_timesteps")), steps(num_steps) {
    const double b0 = cfg.at("beta_start"), b1 = cfg.at("beta_end");
    const std::string schedule = cfg.at("beta_schedule");
    at::Tensor betas;
    if (schedule == "linear") {
      betas = torch::linspace(b0, b1, num_train, torch::kFloat32);
    } else if (schedule == "scaled_linear") {
      betas = torch::pow(torch::linspace(std::sqrt(b0), std::sqrt(b1), num_train, torch::kFloat32), 2);
    } else {
      throw ConfigError("the C++ runtime's DDIM has no beta_schedule " + schedule + " yet; run foresight-run");
    }
    if (cfg.value("rescale_betas_zero_snr", false) || cfg.value("thresholding", false) || cfg.value("clip_sample", false))
      throw ConfigError("the C++ runtime's DDIM does not rescale, threshold or clip yet; run foresight-run");
    alphas_cumprod = torch::cumprod(1.0 - betas, 0);
    final_alpha_cumprod = cfg.value("set_alpha_to_one", true) ? torch::tensor(1.0, torch::kFloat32) : alphas_cumprod[0];
    timesteps = spaced_timesteps(cfg, num_train, steps);
  }

  at::Tensor step(const at::Tensor& model_output, int64_t t, const at::Tensor& sample) const {
    const int64_t prev_t = t - num_train / steps;
    at::Tensor a = alphas_cumprod[t];
    at::Tensor a_prev = prev_t >= 0 ? alphas_cumprod[prev_t] : final_alpha_cumprod;
    at::Tensor b = 1 - a;
    const std::string kind = config.value("prediction_type", "epsilon");
    at::Tensor x0, eps;
    if (kind == "epsilon") {
      x0 = (sample - torch::pow(b, 0.5) * model_output) / torch::pow(a, 0.5);
      eps = model_output;
    } else if (kind == "sample") {
      x0 = model_output;
      eps = (sample - torch::pow(a, 0.5) * x0) / torch::pow(b, 0.5);
    } else if (kind == "v_prediction") {
      x0 = torch::pow(a, 0.5) * sample - torch::pow(b, 0.5) * model_output;
      eps = torch::pow(a, 0.5) * model_output + torch::pow(b, 0.5) * sample;
    } else {
      throw ConfigError("unknown DDIM prediction_type " + kind);
    }
    // eta 0: std_dev_t is 0, and (1 - a_prev - 0) is (1 - a_prev) exactly.
    return torch::pow(a_prev, 0.5) * x0 + torch::pow(1 - a_prev, 0.5) * eps;
  }
};

// diffusers' FlowMatchEulerDiscreteScheduler without dynamic shifting, sigma conversions or noise:
// __init__'s float32 sigmas (for sigma_max and sigma_min), set_timesteps' float64 linspace and
// shift cast to float32, and step's ``sample + (sigma_next - sigma) * model_output`` in float32.
struct FlowMatchEuler {
  at::Tensor sigmas, timesteps;  // float32: steps + 1 sigmas (the last 0), steps timesteps

  FlowMatchEuler(const json& cfg, int steps) {
    for (const char* off : {"use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                            "stochastic_sampling", "invert_sigmas"})
      if (cfg.value(off, false))
        throw ConfigError(std::string("the C++ runtime's FlowMatchEulerDiscreteScheduler does not do ") + off +
                          " yet; run foresight-run --backend aoti");
    if (cfg.contains("shift_terminal") && !cfg["shift_terminal"].is_null())
      throw ConfigError("the C++ runtime's FlowMatchEulerDiscreteScheduler does not stretch to shift_terminal yet; "
                        "run foresight-run --backend aoti");
    const int n = cfg.value("num_train_timesteps", 1000);
    const double shift = cfg.value("shift", 1.0);
    // __init__: timesteps n..1 (exact in float32), sigmas = t / n, shifted, all float32 tensor ops.
    at::Tensor t = torch::arange(n, 0, -1, torch::kFloat32);
    at::Tensor init = t / n;
    init = shift * init / (1 + (shift - 1) * init);
    const double sigma_max = init[0].item<double>(), sigma_min = init[n - 1].item<double>();
    std::vector<double> s = np_linspace(sigma_max * n, sigma_min * n, steps);
    std::vector<float> shifted(steps);
    for (int i = 0; i < steps; ++i) {
      const double sigma = s[i] / n;
      shifted[i] = static_cast<float>(shift * sigma / (1 + (shift - 1) * sigma));
    }
    at::Tensor sig = torch::from_blob(shifted.data(), {steps}, torch::kFloat32).clone();
    timesteps = sig * n;
    sigmas = torch::cat({sig, torch::zeros({1}, torch::kFloat32)});
  }

  at::Tensor step(const at::Tensor& model_output, int i, const at::Tensor& sample) const {
    at::Tensor dt = sigmas[i + 1] - sigmas[i];
    return (sample.to(torch::kFloat32) + dt * model_output).to(model_output.scalar_type());
  }
};

// diffusers' UniPCMultistepScheduler with flow sigmas (what Wan's checkpoints name:
// prediction_type flow_prediction, use_flow_sigmas, flow_shift): set_timesteps' float64 schedule,
// then the predictor (multistep_uni_p_bh_update) and corrector (multistep_uni_c_bh_update) op for op
// on float32 tensors, torch.linalg.solve where diffusers solves, so the latents match bit for bit.
struct UniPC {
  at::Tensor sigmas, timesteps;  // float32 steps + 1 (the last 0), int64 steps
  int order;
  bool bh2, lower_order_final;
  std::set<int> disable_corrector;
  std::vector<at::Tensor> model_outputs;  // the last `order` converted outputs (x0 predictions)
  at::Tensor last_sample;
  int lower_order_nums = 0, this_order = 0, index = 0;
  c10::Device device{torch::kCPU};  // the solver's scalars live where the latents do, as in diffusers

  at::Tensor sigma(int i) const { return sigmas[i].to(device); }

  UniPC(const json& cfg, int steps)
      : order(cfg.value("solver_order", 2)), bh2(cfg.value("solver_type", "bh2") == "bh2"),
        lower_order_final(cfg.value("lower_order_final", true)) {
    auto need = [&](bool ok, const std::string& what) {
      if (!ok) throw ConfigError("the C++ runtime's UniPCMultistepScheduler runs Wan's configuration (" + what +
                                 "); this folder's differs: run foresight-run --backend aoti");
    };
    need(cfg.value("use_flow_sigmas", false) && cfg.value("prediction_type", "") == "flow_prediction",
         "use_flow_sigmas with flow_prediction");
    need(cfg.value("predict_x0", true) && !cfg.value("thresholding", false), "predict_x0, no thresholding");
    need(!cfg.value("use_dynamic_shifting", false) && !cfg.value("use_karras_sigmas", false) &&
             !cfg.value("use_exponential_sigmas", false) && !cfg.value("use_beta_sigmas", false),
         "no dynamic shifting, Karras, exponential or beta sigmas");
    need(!cfg.contains("shift_terminal") || cfg["shift_terminal"].is_null(), "no shift_terminal");
    need(!cfg.contains("solver_p") || cfg["solver_p"].is_null(), "no solver_p");
    need(cfg.value("final_sigmas_type", "zero") == "zero", "final_sigmas_type zero");
    const std::string solver = cfg.value("solver_type", "bh2");
    need(solver == "bh1" || solver == "bh2", "solver_type bh1 or bh2");
    need(order >= 1 && order <= 3, "solver_order 1..3");
    for (const auto& i : cfg.value("disable_corrector", json::array())) disable_corrector.insert(i.get<int>());
    const int n = cfg.value("num_train_timesteps", 1000);
    const double shift = cfg.value("flow_shift", 1.0);
    std::vector<double> s = np_linspace(1.0, 1.0 / n, steps + 1);
    s.pop_back();
    for (double& v : s) v = shift * v / (1 + (shift - 1) * v);
    if (std::fabs(s[0] - 1) < 1e-6) s[0] -= 1e-6;  // diffusers: avoids log(0) in the first updates
    std::vector<float> sig(steps + 1, 0.0f);
    std::vector<int64_t> ts(steps);
    for (int i = 0; i < steps; ++i) {
      sig[i] = static_cast<float>(s[i]);
      ts[i] = static_cast<int64_t>(s[i] * n);  // numpy's astype(int64): truncation
    }
    sigmas = torch::from_blob(sig.data(), {steps + 1}, torch::kFloat32).clone();
    timesteps = torch::from_blob(ts.data(), {steps}, torch::kInt64).clone();
    model_outputs.resize(order);
  }

  // With flow sigmas: alpha = 1 - sigma, sigma.
  static at::Tensor lambda(const at::Tensor& sigma) { return torch::log(1 - sigma) - torch::log(sigma); }

  // The solver's shared coefficients: rks, h_phi_1, B_h, R and b for `k` history entries.
  struct Coefficients {
    at::Tensor h_phi_1, B_h, R, b;
    std::vector<at::Tensor> D1s;
  };
  Coefficients coefficients(const at::Tensor& sigma_t, const at::Tensor& sigma_s0, int order_, int first_history,
                            const at::Tensor& m0) const {
    const at::Tensor lambda_s0 = lambda(sigma_s0);
    const at::Tensor h = lambda(sigma_t) - lambda_s0;
    Coefficients c;
    std::vector<at::Tensor> rks;
    for (int i = 1; i < order_; ++i) {
      const at::Tensor& mi = model_outputs[order - (i + 1)];
      const at::Tensor rk = (lambda(sigma(first_history - i)) - lambda_s0) / h;
      rks.push_back(rk);
      c.D1s.push_back((mi - m0) / rk);
    }
    rks.push_back(torch::ones({}, torch::TensorOptions().dtype(torch::kFloat32).device(device)));
    const at::Tensor rk = torch::stack(rks);
    const at::Tensor hh = -h;  // predict_x0
    c.h_phi_1 = torch::expm1(hh);
    at::Tensor h_phi_k = c.h_phi_1 / hh - 1;
    int64_t factorial = 1;
    c.B_h = bh2 ? torch::expm1(hh) : hh;
    std::vector<at::Tensor> R, b;
    for (int i = 1; i <= order_; ++i) {
      R.push_back(torch::pow(rk, static_cast<int64_t>(i - 1)));
      b.push_back(h_phi_k * factorial / c.B_h);
      factorial *= i + 1;
      h_phi_k = h_phi_k / hh - 1.0 / static_cast<double>(factorial);
    }
    c.R = torch::stack(R);
    c.b = torch::stack(b);
    return c;
  }

  at::Tensor predictor(const at::Tensor& x, int order_) const {
    const at::Tensor sigma_t = sigma(index + 1), sigma_s0 = sigma(index);
    const at::Tensor& m0 = model_outputs[order - 1];
    Coefficients c = coefficients(sigma_t, sigma_s0, order_, index, m0);
    const at::Tensor alpha_t = 1 - sigma_t;
    at::Tensor x_t_ = sigma_t / sigma_s0 * x - alpha_t * c.h_phi_1 * m0;
    at::Tensor x_t;
    if (!c.D1s.empty()) {
      const at::Tensor D1s = torch::stack(c.D1s, 1);
      const at::Tensor rhos = order_ == 2 ? torch::ones({1}, x.options()) * 0.5
                                          : at::linalg_solve(c.R.slice(0, 0, -1).slice(1, 0, -1), c.b.slice(0, 0, -1))
                                                .to(x.scalar_type());
      x_t = x_t_ - alpha_t * c.B_h * torch::einsum("k,bkc...->bc...", {rhos, D1s});
    } else {
      x_t = x_t_ - alpha_t * c.B_h * 0;
    }
    return x_t.to(x.scalar_type());
  }

  at::Tensor corrector(const at::Tensor& model_t, const at::Tensor& x, int order_) const {
    const at::Tensor sigma_t = sigma(index), sigma_s0 = sigma(index - 1);
    const at::Tensor& m0 = model_outputs[order - 1];
    Coefficients c = coefficients(sigma_t, sigma_s0, order_, index - 1, m0);
    const at::Tensor alpha_t = 1 - sigma_t;
    const at::Tensor rhos = order_ == 1 ? torch::ones({1}, x.options()) * 0.5
                                        : at::linalg_solve(c.R, c.b).to(x.scalar_type());
    at::Tensor x_t_ = sigma_t / sigma_s0 * x - alpha_t * c.h_phi_1 * m0;
    const at::Tensor D1_t = model_t - m0;
    at::Tensor corr = c.D1s.empty()
                          ? 0 + rhos[-1] * D1_t
                          : torch::einsum("k,bkc...->bc...", {rhos.slice(0, 0, -1), torch::stack(c.D1s, 1)}) +
                                rhos[-1] * D1_t;
    return (x_t_ - alpha_t * c.B_h * corr).to(x.scalar_type());
  }

  at::Tensor step(const at::Tensor& model_output, const at::Tensor& sample_in) {
    at::Tensor sample = sample_in;
    device = sample.device();
    const bool use_corrector = index > 0 && !disable_corrector.count(index - 1) && last_sample.defined();
    const at::Tensor converted = sample - sigmas[index] * model_output;  // flow_prediction's x0
    if (use_corrector) sample = corrector(converted, last_sample, this_order);
    for (int i = 0; i + 1 < order; ++i) model_outputs[i] = model_outputs[i + 1];
    model_outputs[order - 1] = converted;
    const int steps = static_cast<int>(timesteps.size(0));
    int next = lower_order_final ? std::min(order, steps - index) : order;
    this_order = std::min(next, lower_order_nums + 1);  // warmup for multistep
    last_sample = sample;
    at::Tensor prev = predictor(sample, this_order);
    if (lower_order_nums < order) ++lower_order_nums;
    ++index;
    return prev;
  }
};

// One generation's sampling, as the reference pipeline runs it: the model input and the stem's
// timestep for each step, which expert runs it, guidance and the scheduler step.
struct Sampler {
  std::vector<int> experts;  // per step
  at::Generator* generator = nullptr;  // the run's CPU generator (the starting noise's), for noise a step draws
  virtual ~Sampler() = default;
  virtual int steps() const = 0;
  virtual at::Tensor timestep(int i, int64_t batch, c10::Device device) const = 0;
  virtual at::Tensor step(at::Tensor noise_pred, int i, const at::Tensor& latents) = 0;
  std::vector<int> stages() const {
    std::vector<int> out{0};
    for (size_t i = 1; i < experts.size(); ++i)
      if (experts[i] != experts[i - 1]) out.push_back(static_cast<int>(i));
    return out;
  }
};

at::Tensor guide(const at::Tensor& noise_pred, double scale) {
  auto halves = noise_pred.chunk(2);
  return halves[0] + scale * (halves[1] - halves[0]);
}

// LattePipeline: DDIM (scale_model_input is the identity), batched CFG, the learned-sigma half dropped.
struct LatteSampler : Sampler {
  DDIM ddim;
  double guidance;  // <= 1: no CFG
  bool learned_sigma;
  LatteSampler(const json& sched, int n, double g)
      : ddim(sched, n), guidance(g),
        learned_sigma(sched.value("variance_type", json("")).is_string() &&
                      (sched.value("variance_type", "") == "learned" || sched.value("variance_type", "") == "learned_range")) {
    if (sched.at("_class_name") != "DDIMScheduler")
      throw ConfigError("the C++ runtime's latte sampler steps DDIMScheduler; this folder's scheduler is " +
                        sched.at("_class_name").get<std::string>());
    experts.assign(n, 0);
  }
  int steps() const override { return ddim.steps; }
  at::Tensor timestep(int i, int64_t batch, c10::Device device) const override {
    return torch::full({batch}, static_cast<double>(ddim.timesteps[i]),
                       torch::TensorOptions().dtype(torch::kFloat32).device(device));
  }
  at::Tensor step(at::Tensor noise_pred, int i, const at::Tensor& latents) override {
    if (guidance > 1.0) noise_pred = guide(noise_pred, guidance);
    if (!learned_sigma) noise_pred = noise_pred.chunk(2, 1)[0];
    return ddim.step(noise_pred, ddim.timesteps[i], latents);
  }
};

// WanPipeline: the scheduler the checkpoint names (FlowMatchEuler, or UniPC with flow sigmas) from
// index 0, the latents unscaled, ``t`` for every batch row; with two experts the first (guidance)
// while t >= boundary_ratio * num_train_timesteps, the second (guidance_2) below.
struct WanSampler : Sampler {
  std::unique_ptr<FlowMatchEuler> euler;
  std::unique_ptr<UniPC> unipc;
  at::Tensor timesteps;  // FlowMatchEuler's float32, UniPC's int64, as diffusers holds them
  double guidance, guidance_2;
  WanSampler(const json& sched, int n, double g, double g2, const json& pipeline) : guidance(g), guidance_2(g2) {
    const std::string name = sched.at("_class_name");
    if (name == "FlowMatchEulerDiscreteScheduler") {
      euler = std::make_unique<FlowMatchEuler>(sched, n);
      timesteps = euler->timesteps;
    } else if (name == "UniPCMultistepScheduler") {
      unipc = std::make_unique<UniPC>(sched, n);
      timesteps = unipc->timesteps;
    } else {
      throw ConfigError("the C++ runtime's wan sampler steps FlowMatchEulerDiscreteScheduler or "
                        "UniPCMultistepScheduler; this folder's scheduler is " + name + ": run foresight-run --backend aoti");
    }
    experts.assign(n, 0);
    if (pipeline.contains("boundary_ratio") && !pipeline["boundary_ratio"].is_null()) {
      const double boundary = pipeline["boundary_ratio"].get<double>() * sched.value("num_train_timesteps", 1000);
      for (int i = 0; i < n; ++i) experts[i] = timesteps[i].ge(boundary).item<bool>() ? 0 : 1;
    }
  }
  int steps() const override { return static_cast<int>(experts.size()); }
  at::Tensor timestep(int i, int64_t batch, c10::Device device) const override {
    return timesteps[i].expand({batch}).to(device, torch::kFloat32).contiguous();
  }
  at::Tensor step(at::Tensor noise_pred, int i, const at::Tensor& latents) override {
    if (guidance > 1.0) noise_pred = guide(noise_pred, experts[i] ? guidance_2 : guidance);
    return euler ? euler->step(noise_pred, i, latents) : unipc->step(noise_pred, latents);
  }
};

// diffusers' CogVideoXDDIMScheduler: float64 alphas_cumprod with the SNR shift (and the zero-terminal-
// SNR rescale), a float32 final alpha, and its step (v, epsilon or sample prediction) with the same
// mixed-precision scalar tensors, so the latents match bit for bit.
struct CogVideoXDDIM {
  at::Tensor alphas_cumprod, final_alpha_cumprod;
  std::vector<int64_t> timesteps;
  int num_train, steps;
  std::string prediction;

  CogVideoXDDIM(const json& cfg, int n) : num_train(cfg.value("num_train_timesteps", 1000)), steps(n),
                                          prediction(cfg.value("prediction_type", "epsilon")) {
    if (cfg.contains("trained_betas") && !cfg["trained_betas"].is_null())
      throw ConfigError("the C++ runtime's CogVideoXDDIMScheduler does not take trained_betas yet; run foresight-run");
    const double b0 = cfg.value("beta_start", 0.00085), b1 = cfg.value("beta_end", 0.012);
    const std::string schedule = cfg.value("beta_schedule", "scaled_linear");
    at::Tensor betas;
    if (schedule == "linear") betas = torch::linspace(b0, b1, num_train, torch::kFloat32);
    else if (schedule == "scaled_linear") betas = torch::pow(torch::linspace(std::pow(b0, 0.5), std::pow(b1, 0.5), num_train, torch::kFloat64), 2);
    else throw ConfigError("the C++ runtime's CogVideoXDDIMScheduler has no beta_schedule " + schedule + " yet");
    at::Tensor ac = torch::cumprod(1.0 - betas, 0);
    const double shift = cfg.value("snr_shift_scale", 3.0);
    ac = ac / (shift + (1 - shift) * ac);
    if (cfg.value("rescale_betas_zero_snr", false)) {  // diffusers' rescale_zero_terminal_snr
      at::Tensor root = ac.sqrt();
      const at::Tensor first = root[0].clone(), last = root[-1].clone();
      root -= last;
      root *= first / (first - last);
      ac = torch::pow(root, 2);
    }
    alphas_cumprod = ac;
    final_alpha_cumprod = cfg.value("set_alpha_to_one", true) ? torch::tensor(1.0, torch::kFloat32) : ac[0];
    timesteps = spaced_timesteps(cfg, num_train, steps);
  }

  // The predicted original sample at alpha_cumprod a (the DDIM and DPM steps compute it alike).
  at::Tensor predicted_x0(const at::Tensor& model_output, const at::Tensor& a, const at::Tensor& sample) const {
    const at::Tensor b = 1 - a;
    if (prediction == "epsilon") return (sample - torch::pow(b, 0.5) * model_output) / torch::pow(a, 0.5);
    if (prediction == "sample") return model_output;
    if (prediction == "v_prediction") return torch::pow(a, 0.5) * sample - torch::pow(b, 0.5) * model_output;
    throw ConfigError("unknown prediction_type " + prediction);
  }

  at::Tensor step(const at::Tensor& model_output, int64_t t, const at::Tensor& sample) const {
    const int64_t prev_t = t - num_train / steps;
    const at::Tensor a = alphas_cumprod[t];
    const at::Tensor a_prev = prev_t >= 0 ? alphas_cumprod[prev_t] : final_alpha_cumprod;
    const at::Tensor x0 = predicted_x0(model_output, a, sample);
    const at::Tensor a_t = torch::pow((1 - a_prev) / (1 - a), 0.5);
    const at::Tensor b_t = torch::pow(a_prev, 0.5) - torch::pow(a, 0.5) * a_t;
    return a_t * sample + b_t * x0;
  }
};

// diffusers' CogVideoXDPMScheduler.step (DPM-Solver++ 2M with its noise, CogVideoX 5B's scheduler) on
// CogVideoXDDIM's schedule (the two share __init__ and set_timesteps): the same 0-dim tensor ops in the
// same order, the noise drawn from the run's CPU generator as randn_tensor draws it (once, or twice
// when the second-order update runs). Returns the new sample and this step's predicted x0.
std::pair<at::Tensor, at::Tensor> dpm_step(const CogVideoXDDIM& s, const at::Tensor& model_output,
                                           const at::Tensor& old_x0, int64_t t, int64_t t_back,
                                           const at::Tensor& sample, at::Generator& gen) {
  const int64_t prev_t = t - s.num_train / s.steps;
  const at::Tensor a = s.alphas_cumprod[t];
  const at::Tensor a_prev = prev_t >= 0 ? s.alphas_cumprod[prev_t] : s.final_alpha_cumprod;
  const at::Tensor x0 = s.predicted_x0(model_output, a, sample);
  auto lambda = [](const at::Tensor& ac) { return torch::pow(ac / (1 - ac), 0.5).log(); };
  const at::Tensor lamb = lambda(a), h = lambda(a_prev) - lamb;
  const at::Tensor mult1 = torch::pow((1 - a_prev) / (1 - a), 0.5) * (-h).exp();
  const at::Tensor mult2 = (-2 * h).expm1() * torch::pow(a_prev, 0.5);
  const at::Tensor mult_noise = torch::pow(1 - a_prev, 0.5) * torch::pow(1 - (-2 * h).exp(), 0.5);
  auto noise = [&] { return torch::randn(sample.sizes(), gen, torch::TensorOptions().dtype(sample.scalar_type()))
                                .to(sample.device()); };
  at::Tensor prev = mult1 * sample - mult2 * x0 + mult_noise * noise();
  if (!old_x0.defined() || prev_t < 0) return {prev, x0};
  const at::Tensor r = (lamb - lambda(s.alphas_cumprod[t_back])) / h;
  const at::Tensor mult3 = 1 + 1 / (2 * r), mult4 = 1 / (2 * r);
  const at::Tensor denoised_d = mult3 * x0 - mult4 * old_x0;
  return {mult1 * sample - mult2 * denoised_d + mult_noise * noise(), x0};
}

// CogVideoXPipeline with CogVideoXDDIM or CogVideoXDPM: batched CFG, the optional dynamic scale
// 1 + s * (1 - cos(pi * ((N - t) / N) ** 5)) / 2, the DDIM-style step or the DPM one (which carries
// the previous step's x0 and looks back to the previous timestep).
struct CogVideoXSampler : Sampler {
  CogVideoXDDIM ddim;
  double guidance;
  bool dynamic, dpm;
  at::Tensor old_x0;
  CogVideoXSampler(const json& sched, int n, double g, bool dynamic_cfg)
      : ddim(check(sched), n), guidance(g), dynamic(dynamic_cfg),
        dpm(sched.at("_class_name") == "CogVideoXDPMScheduler") {
    experts.assign(n, 0);
  }
  static const json& check(const json& sched) {
    const std::string name = sched.at("_class_name");
    if (name != "CogVideoXDDIMScheduler" && name != "CogVideoXDPMScheduler")
      throw ConfigError("the C++ runtime's cogvideox sampler steps CogVideoXDDIMScheduler or CogVideoXDPMScheduler; "
                        "this folder's scheduler is " + name + ": run foresight-run --backend aoti");
    return sched;
  }
  int steps() const override { return ddim.steps; }
  at::Tensor timestep(int i, int64_t batch, c10::Device device) const override {
    return torch::full({batch}, static_cast<double>(ddim.timesteps[i]),
                       torch::TensorOptions().dtype(torch::kFloat32).device(device));
  }
  at::Tensor step(at::Tensor noise_pred, int i, const at::Tensor& latents) override {
    const int64_t t = ddim.timesteps[i];
    if (guidance > 1.0) {
      double scale = guidance;
      if (dynamic)
        scale = 1 + scale * (1 - std::cos(M_PI * std::pow((ddim.steps - static_cast<double>(t)) / ddim.steps, 5.0))) / 2;
      noise_pred = guide(noise_pred, scale);
    }
    if (!dpm) return ddim.step(noise_pred, t, latents);
    auto [next, x0] = dpm_step(ddim, noise_pred, old_x0, t, i > 0 ? ddim.timesteps[i - 1] : -1, latents, *generator);
    old_x0 = x0;
    return next;
  }
};

// Open-Sora 1.2's rectified flow (dit/rflow.py, the release's RFLOW): t_i = (1 - i / N) * T as float32,
// optionally shifted towards noise for larger videos (r t' / (1 + (r - 1) t'), r from the pixel size
// and frame count, in float32 as the release computes it); the CFG batch is [conditional,
// unconditional]; the first C output channels are the velocity; one Euler step per timestep.
struct RFlowSampler : Sampler {
  std::vector<at::Tensor> timesteps;  // (1,) float32 each
  double guidance;
  int64_t channels, num_timesteps;
  RFlowSampler(const json& cfg, int n, double g, int64_t c, int frames, int height, int width)
      : guidance(g), channels(c), num_timesteps(cfg.value("num_timesteps", 1000)) {
    if (cfg.value("_class_name", "") != "RFlowSampler")
      throw ConfigError("the C++ runtime's opensora sampler is RFlowSampler; this folder's scheduler is " +
                        cfg.value("_class_name", std::string("unnamed")));
    const bool transform = cfg.value("use_timestep_transform", true);
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
    const at::Tensor h = torch::tensor({static_cast<float>(height)}, f32), w = torch::tensor({static_cast<float>(width)}, f32),
                     fr = torch::tensor({static_cast<float>(frames)}, f32);
    for (int i = 0; i < n; ++i) {
      at::Tensor t = torch::full({1}, (1.0 - static_cast<double>(i) / n) * num_timesteps, f32);
      if (transform) {  // dit.rflow.timestep_transform
        t = t / num_timesteps;
        const at::Tensor ratio_space = (h * w / (512 * 512)).sqrt();
        const at::Tensor latent = fr.reshape(-1)[0].item<float>() == 1 ? torch::ones_like(fr) : torch::floor_divide(fr, 17) * 5;
        if (latent.eq(0).any().item<bool>())
          throw ShapeError("frames=" + std::to_string(frames) + ": Open-Sora 1.2 samples 1 frame or at least 17");
        const at::Tensor ratio = ratio_space * latent.sqrt();
        t = ratio * t / (1 + (ratio - 1) * t) * num_timesteps;
      }
      timesteps.push_back(t);
    }
    experts.assign(n, 0);
  }
  int steps() const override { return static_cast<int>(timesteps.size()); }
  at::Tensor timestep(int i, int64_t batch, c10::Device device) const override {
    return (batch == 2 ? torch::cat({timesteps[i], timesteps[i]}) : timesteps[i]).to(device);
  }
  at::Tensor step(at::Tensor out, int i, const at::Tensor& z) override {
    at::Tensor v = out.slice(1, 0, channels);
    if (guidance > 1.0) {
      auto halves = v.chunk(2);  // conditional first
      v = halves[1] + guidance * (halves[0] - halves[1]);
    }
    const at::Tensor& t = timesteps[i];
    const at::Tensor t_next = i + 1 < steps() ? timesteps[i + 1] : torch::zeros_like(t);
    const at::Tensor dt = (t - t_next) / num_timesteps;
    return z + v * dt.reshape({-1, 1, 1, 1, 1}).to(z.device());
  }
};

// diffusers' get_1d_rotary_pos_embed (use_real, repeat_interleave_real, float32 frequencies): cos and
// sin (N, dim) of the positions.
std::pair<at::Tensor, at::Tensor> rotary_1d(int64_t dim, const at::Tensor& pos, double theta = 10000.0) {
  const at::Tensor exps = torch::arange(0, dim, 2, torch::kFloat32).slice(0, 0, dim / 2) / dim;
  const at::Tensor freqs = torch::outer(pos, (1.0 / torch::pow(theta, exps)) / 1.0);
  return {freqs.cos().repeat_interleave(2, 1).to(torch::kFloat32), freqs.sin().repeat_interleave(2, 1).to(torch::kFloat32)};
}

// CogVideoX 5B's rotary tables for a token grid (CogVideoXPipeline._prepare_rotary_positional_embeddings
// with get_resize_crop_region_for_grid and get_3d_rotary_pos_embed, grid_type "linspace"): cos and sin
// (F, h, w, head_dim), a quarter of the channels for time and three eighths each for height and width.
std::pair<at::Tensor, at::Tensor> rotary_3d(int64_t head_dim, int64_t frames, int64_t h, int64_t w, int64_t base_h,
                                            int64_t base_w) {
  // get_resize_crop_region_for_grid((h, w), base_w, base_h), Python's round (half to even)
  double top = 0, left = 0, rh, rw;
  if (static_cast<double>(h) / w > static_cast<double>(base_h) / base_w) {
    rh = base_h;
    rw = std::nearbyint(static_cast<double>(base_h) / h * w);
  } else {
    rw = base_w;
    rh = std::nearbyint(static_cast<double>(base_w) / w * h);
  }
  top = std::nearbyint((base_h - rh) / 2.0);
  left = std::nearbyint((base_w - rw) / 2.0);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  const at::Tensor grid_h = torch::linspace(top, (top + rh) * (h - 1) / h, h, f32);
  const at::Tensor grid_w = torch::linspace(left, (left + rw) * (w - 1) / w, w, f32);
  const at::Tensor grid_t = torch::linspace(0, frames * (frames - 1.0) / frames, frames, f32);
  const int64_t dim_t = head_dim / 4, dim_hw = head_dim / 8 * 3;
  auto [t_cos, t_sin] = rotary_1d(dim_t, grid_t);
  auto [h_cos, h_sin] = rotary_1d(dim_hw, grid_h);
  auto [w_cos, w_sin] = rotary_1d(dim_hw, grid_w);
  auto combine = [&](const at::Tensor& ft, const at::Tensor& fh, const at::Tensor& fw) {
    return torch::cat({ft.index({torch::indexing::Slice(), torch::indexing::None, torch::indexing::None})
                           .expand({-1, h, w, -1}),
                       fh.index({torch::indexing::None, torch::indexing::Slice(), torch::indexing::None})
                           .expand({frames, -1, w, -1}),
                       fw.index({torch::indexing::None, torch::indexing::None}).expand({frames, h, -1, -1})},
                      -1)
        .contiguous();
  };
  return {combine(t_cos, h_cos, w_cos), combine(t_sin, h_sin, w_sin)};
}

// diffusers' get_3d_sincos_pos_embed (output_type "pt"), CogVideoX 2B's position table for a shape:
// (F, h * w, D), float32 grids and float64 frequencies as diffusers computes them on CPU.
at::Tensor sincos_1d(int64_t dim, const at::Tensor& pos) {
  at::Tensor omega = torch::arange(dim / 2, torch::kFloat64);
  omega /= dim / 2.0;
  omega = 1.0 / torch::pow(10000, omega);
  const at::Tensor out = torch::outer(pos.reshape(-1), omega);
  return torch::cat({torch::sin(out), torch::cos(out)}, 1);
}

at::Tensor sincos_3d(int64_t dim, int64_t w, int64_t h, int64_t frames, double spatial_scale, double temporal_scale) {
  const int64_t spatial = 3 * dim / 4, temporal = dim / 4;
  const at::Tensor grid_h = torch::arange(h, torch::kFloat32) / spatial_scale;
  const at::Tensor grid_w = torch::arange(w, torch::kFloat32) / spatial_scale;
  at::Tensor grid = torch::stack(torch::meshgrid({grid_w, grid_h}, "xy"), 0).reshape({2, 1, h, w});
  at::Tensor space = torch::cat({sincos_1d(spatial / 2, grid[0]), sincos_1d(spatial / 2, grid[1])}, 1);
  const at::Tensor grid_t = torch::arange(frames, torch::kFloat32) / temporal_scale;
  at::Tensor time = sincos_1d(temporal, grid_t);
  space = space.unsqueeze(0).repeat_interleave(frames, 0);
  time = time.unsqueeze(1).repeat_interleave(w * h, 1);
  return torch::cat({time, space}, -1);
}

int shape_value(const json& shapes, const char* name, int value) {  // runtime/engine.py's check_shape
  const json& s = shapes.at(name);
  if (value < 0) value = s.at("default");
  const int lo_bound = s.at("min"), hi_bound = s.at("max");
  if (value < lo_bound || value > hi_bound)
    throw ShapeError(std::string(name) + "=" + std::to_string(value) + " is outside the exported range [" +
                     std::to_string(lo_bound) + ", " + std::to_string(hi_bound) + "]: pass --" + name +
                     " within it, or re-export with a larger range (foresight-export --max-scale)");
  const int step = s.value("multiple_of", 1);
  if (value % step) {
    const int lo = value - value % step;
    throw ShapeError(std::string(name) + "=" + std::to_string(value) + " is not divisible by " + std::to_string(step) +
                     " (patch size x VAE factor): pass --" + name + " " + std::to_string(lo >= lo_bound ? lo : lo + step) +
                     " or " + std::to_string(lo + step));
  }
  return value;
}

}  // namespace

DenoiseResult Runtime::denoise(const DenoiseRequest& req) {
  std::lock_guard<std::mutex> guard(*lock_);
  return denoise_unlocked(req);
}

DenoiseResult Runtime::denoise_unlocked(const DenoiseRequest& req) {
  torch::NoGradGuard no_grad;
  const json& p = manifest_.pipeline();
  const std::string type = p.at("type");
  if (type != "latte" && type != "wan" && type != "cogvideox" && type != "opensora")
    throw ConfigError("the C++ runtime does not run the " + type + " pipeline; run foresight-run --backend aoti");
  const json& shapes = manifest_.data.at("shapes");
  const int frames = shape_value(shapes, "frames", req.frames), height = shape_value(shapes, "height", req.height),
            width = shape_value(shapes, "width", req.width);
  const int steps = req.steps < 0 ? p.at("default_steps").get<int>() : req.steps;
  if (steps < 1 || steps > p.at("max_steps").get<int>())
    throw ConfigError("steps must be a whole number in 1.." + p.at("max_steps").dump() + " (got " + std::to_string(steps) + ")");
  const double guidance = req.guidance < 0 ? p.at("default_guidance").get<double>() : req.guidance;
  const bool two = manifest_.num_experts() > 1;
  if (!two && req.guidance_2 >= 0)
    throw ConfigError("guidance_2 is the second expert's guidance; these engines have one transformer: drop it");
  const double guidance_2 = req.guidance_2 >= 0 ? req.guidance_2
                            : p.contains("default_guidance_2") && !p["default_guidance_2"].is_null()
                                ? p["default_guidance_2"].get<double>() : guidance;
  const bool cfg = guidance > 1.0;
  // The encoded prompt: the stem inputs the Python pipeline's encode_prompt returns, by name
  // (`text` is encoder_hidden_states).
  std::map<std::string, at::Tensor> conditions = req.inputs;
  if (req.text.defined()) conditions["encoder_hidden_states"] = req.text;
  const std::string order = type == "opensora" ? "the conditional row first (then the null caption)"
                                               : "the unconditional row first";
  for (const auto& spec : manifest_.stem.inputs) {
    if (spec.name == "latents" || spec.name == "timestep" || spec.name == "pos_embedding" ||
        (type == "opensora" && (spec.name == "fps" || spec.name == "height" || spec.name == "width")))
      continue;
    auto it = conditions.find(spec.name);
    if (it == conditions.end() || !it->second.defined() || it->second.dim() != static_cast<int64_t>(spec.shape.size()) ||
        it->second.size(0) != (cfg ? 2 : 1))
      throw ConfigError("the encoded prompt's " + spec.name + " must be (" + (cfg ? "2" : "1") + ", ...) with " +
                        std::to_string(spec.shape.size()) + " dimensions" + (cfg ? ", " + order : ""));
  }

  auto controller = Controller(make_policy(req.policy), static_cast<int>(manifest_.layers.size()),
                               static_cast<int>(manifest_.probes.size()));
  // TensorRT: the loop's torch work on the engines' stream (released at return, after a sync back).
  const std::shared_ptr<void> scope = engines_ ? engines_->loop_scope() : nullptr;
  // The latent frames, with the VAE's frame rule as the Python pipelines state it.
  const int temporal = p.value("vae_scale_factor_temporal", 1);
  int latent_frames = frames;
  if (type == "wan") {
    latent_frames = (frames - 1) / temporal + 1;
  } else if (type == "cogvideox") {  // CogVideoX's VAE gives back 8k + 1 or 8k frames
    auto decoded = [&](int n) { return n % 2 ? temporal * (n - 1) + 1 : temporal * n; };
    latent_frames = (frames - 1) / temporal + 1;
    if (decoded(latent_frames) != frames) {
      int below = -1, above = 1 << 30;
      for (int n = std::max(1, latent_frames - 2); n < latent_frames + 3; ++n) {
        if (decoded(n) < frames) below = std::max(below, decoded(n));
        if (decoded(n) > frames) above = std::min(above, decoded(n));
      }
      throw ShapeError("frames=" + std::to_string(frames) + ": CogVideoX's VAE makes " +
                       std::to_string(decoded(latent_frames)) + " frames from the " + std::to_string(latent_frames) +
                       " latent frames it would take; pass --frames " + std::to_string(below) + " or " +
                       std::to_string(above) + " (8k + 1 or 8k)");
    }
  }

  if (type == "opensora") {  // the VAE's chunks: 17 frames -> 5 latent frames, a remainder r -> ceil(r / 4)
    const int micro = p.at("micro_frame_size"), micro_latent = p.at("micro_latent_frames");
    if (frames < micro)
      throw ShapeError("frames=" + std::to_string(frames) + ": Open-Sora 1.2 makes videos of at least " +
                       std::to_string(micro) + " frames (its timestep transform needs one full VAE chunk); pass "
                       "--frames " + std::to_string(micro) + " or more");
    const int rest = frames % micro;
    latent_frames = frames / micro * micro_latent + (rest ? (rest + temporal - 1) / temporal : 0);
  }

  std::unique_ptr<Sampler> sampler;
  if (type == "opensora") sampler = std::make_unique<RFlowSampler>(scheduler_, steps, guidance,
                                                                   p.at("latent_channels").get<int64_t>(), frames,
                                                                   height, width);
  else if (type == "latte") sampler = std::make_unique<LatteSampler>(scheduler_, steps, guidance);
  else if (type == "cogvideox") sampler = std::make_unique<CogVideoXSampler>(scheduler_, steps, guidance,
                                                                              p.value("use_dynamic_cfg", false));
  else sampler = std::make_unique<WanSampler>(scheduler_, steps, guidance, guidance_2, p);
  const std::vector<int> stages = sampler->stages();
  // One stage per expert: nothing measured or cached under one expert is used under the other.
  controller.policy().check_run(controller.num_layers(), steps, &stages);
  controller.reset(stages);

  // The starting noise as diffusers' randn_tensor draws it: a CPU generator, float32. The DDIM
  // schedulers' init_noise_sigma is 1, and WanPipeline does not scale. CogVideoX's latents put the
  // frames before the channels.
  const int f = p.at("vae_scale_factor");
  const int64_t channels = p.at("latent_channels").get<int64_t>();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(req.seed);
  sampler->generator = &gen;
  const std::vector<int64_t> shape = type == "cogvideox"
                                         ? std::vector<int64_t>{1, latent_frames, channels, height / f, width / f}
                                         : std::vector<int64_t>{1, channels, latent_frames, height / f, width / f};
  at::Tensor latents = torch::randn(shape, gen, torch::TensorOptions().dtype(torch::kFloat32)).to(device_);
  // The stem's inputs that stay the same every step: the encoded prompt, tables the pipeline
  // computes once per shape (the flow's pipeline_inputs: CogVideoX 2B's positions), and Open-Sora's
  // fps and pixel size, as the release passes them.
  std::map<std::string, at::Tensor> constants;
  for (const auto& spec : manifest_.stem.inputs)
    if (conditions.count(spec.name)) constants[spec.name] = conditions.at(spec.name).to(device_, torch::kFloat32);
  if (type == "opensora") {
    const auto options = torch::TensorOptions().dtype(torch::kFloat32).device(device_);
    const int64_t b = cfg ? 2 : 1;
    constants["fps"] = torch::full({b}, p.at("fps").get<double>(), options);
    constants["height"] = torch::full({b}, static_cast<double>(height), options);
    constants["width"] = torch::full({b}, static_cast<double>(width), options);
  }
  const int64_t grid = f * p.value("patch_size", 1), h = height / grid, w = width / grid;  // the token grid
  if (type == "cogvideox" && p.value("positional", "sincos") == "rotary") {
    auto [cos, sin] = rotary_3d(p.at("head_dim").get<int64_t>(), latent_frames, h, w,
                                p.at("base_grid").at(0).get<int64_t>(), p.at("base_grid").at(1).get<int64_t>());
    constants["rotary_cos"] = cos.to(device_, torch::kFloat32);
    constants["rotary_sin"] = sin.to(device_, torch::kFloat32);
  } else if (type == "cogvideox") {
    constants["pos_embedding"] = sincos_3d(p.at("hidden_size").get<int64_t>(), w, h, latent_frames,
                                              p.value("spatial_interpolation_scale", 1.0),
                                              p.value("temporal_interpolation_scale", 1.0))
                                        .reshape({latent_frames, h, w, -1})
                                        .to(device_, torch::kFloat32)
                                        .contiguous();
  }

  const json& flow = manifest_.flow();
  const size_t L = manifest_.layers.size(), P = manifest_.probes.size();
  // CFG as one pass over the doubled batch, or (WanPipeline) as two batch-1 passes: the conditional
  // row, then the unconditional one. Each pass reads its row of every batch-leading tensor; both run
  // the same plan, and their outputs are put back together as [unconditional, conditional], so a
  // probe's mse is taken over both rows together (one decision per step), as the Python runtime does.
  const bool separate = cfg && p.value("cfg", "batched") == "separate";
  const std::vector<int> passes = separate ? std::vector<int>{1, 0} : std::vector<int>{-1};
  auto cut = [](const std::vector<TensorSpec>& specs, std::map<std::string, at::Tensor> tensors, int row) {
    if (row < 0) return tensors;
    for (const auto& t : specs)
      if (!t.shape.empty() && t.shape[0] == "B") tensors[t.name] = tensors.at(t.name).narrow(0, row, 1);
    return tensors;
  };
  // A package's compiled kernels assume contiguous inputs and do not check (a strided view reads as
  // garbage), and a package may return strided outputs (Latte's stem returns its hidden state as a
  // permuted view): each output is made contiguous once, as the Python runtime copies it into its
  // buffer, and is then fed and cached without further copies.
  auto named = [](const PartSpec& part, const std::vector<at::Tensor>& outs) {
    std::map<std::string, at::Tensor> m;
    for (size_t i = 0; i < part.outputs.size(); ++i) m[part.outputs[i].name] = outs.at(i).contiguous();
    return m;
  };
  // The passes' outputs of one part as one batch: [unconditional, conditional].
  auto joined = [&](const PartSpec& part, std::map<int, std::map<std::string, at::Tensor>>& by_row) {
    if (by_row.size() == 1) return by_row.begin()->second;
    std::map<std::string, at::Tensor> out;
    for (const auto& t : part.outputs) {
      const bool batched = !t.shape.empty() && t.shape[0] == "B";
      out[t.name] = batched ? torch::cat({by_row.at(0).at(t.name), by_row.at(1).at(t.name)}) : by_row.at(0).at(t.name);
    }
    return out;
  };

  const auto t_loop = std::chrono::steady_clock::now();
  std::vector<std::map<std::string, at::Tensor>> cache(L);  // each layer's outputs from the last step that ran it
  long engine_calls = 0;
  for (int i = 0; i < steps; ++i) {
    const int expert = sampler->experts[i];
    const int64_t batch = cfg ? 2 : 1;
    std::map<std::string, at::Tensor> stem_in{{"latents", cfg ? torch::cat({latents, latents}) : latents},
                                              {"timestep", sampler->timestep(i, batch, device_)}};
    stem_in.insert(constants.begin(), constants.end());
    const StepPlan plan = controller.plan(i);
    std::vector<std::map<int, std::map<std::string, at::Tensor>>> layer_out(L);
    std::map<int, std::map<std::string, at::Tensor>> head_out;
    for (const int row : passes) {
      const auto pass_in = cut(manifest_.stem.inputs, stem_in, row);
      const auto stem_out = named(manifest_.stem, run(manifest_.stem, pass_in, expert));
      auto resolve = [&](const std::string& source, const std::map<std::string, at::Tensor>& state) -> at::Tensor {
        const auto colon = source.find(':');
        const std::string kind = source.substr(0, colon), name = source.substr(colon + 1);
        if (kind == "state") return state.at(name);
        if (kind == "stem") return stem_out.at(name);
        if (kind == "input") return pass_in.at(name);
        if (kind == "pipeline") return constants.at(name);  // the per-shape tables (CogVideoX 5B's rotary ones)
        throw ConfigError("flow source " + source + " is not supported by the C++ runtime yet");
      };
      std::map<std::string, at::Tensor> state;
      if (!plan.source) {
        for (const auto& [s, o] : flow.at("state_init").items()) state[s] = stem_out.at(o.get<std::string>());
      } else {  // the reused layer's cached outputs (both rows), this pass's row of them
        const PartSpec& src = manifest_.layers[plan.source->first];
        const auto rows = cut(src.outputs, cache[plan.source->first], row);
        for (const auto& [s, o] : flow.at("layer_state_out").items()) state[s] = rows.at(o.get<std::string>());
      }
      for (int layer = plan.start; layer < static_cast<int>(L); ++layer) {
        const PartSpec& spec = manifest_.layers[layer];
        std::map<std::string, at::Tensor> inputs;
        for (const auto& in : spec.inputs) inputs[in.name] = resolve(flow.at("layer_inputs").at(in.name), state);
        auto out = named(spec, run(spec, inputs, expert));
        ++engine_calls;
        state.clear();
        for (const auto& [s, o] : flow.at("layer_state_out").items()) state[s] = out.at(o.get<std::string>());
        layer_out[layer][std::max(row, 0)] = std::move(out);
      }
      std::map<std::string, at::Tensor> head_in;
      for (const auto& in : manifest_.head.inputs) head_in[in.name] = resolve(flow.at("head_inputs").at(in.name), state);
      head_out[std::max(row, 0)] = named(manifest_.head, run(manifest_.head, head_in, expert));
    }
    std::vector<at::Tensor> mse;
    for (int layer = plan.start; layer < static_cast<int>(L); ++layer) {
      auto out = joined(manifest_.layers[layer], layer_out[layer]);
      if (plan.measure)
        for (const auto& probe : manifest_.probes)
          mse.push_back(torch::mean(torch::square(out.at(probe) - cache[layer].at(probe)), torch::kFloat32));
      cache[layer] = std::move(out);  // the new cache: the engines' own result tensors (one batch), no copy
    }
    at::Tensor noise_pred = joined(manifest_.head, head_out).at(flow.at("head_output").get<std::string>());
    mse.push_back(torch::isfinite(noise_pred).all().to(torch::kFloat32));
    at::Tensor host = torch::stack(mse).to(torch::kCPU);  // the step's one device-to-host transfer
    const float* values = host.data_ptr<float>();
    if (values[host.numel() - 1] == 0.0f)
      throw NumericsError("the head produced NaN/Inf at step " + std::to_string(i) + ": check the inputs and the engines");
    if (plan.measure) {
      std::vector<std::vector<double>> rows;
      for (size_t l = 0; l < L - plan.start; ++l) rows.emplace_back(values + l * P, values + (l + 1) * P);
      controller.observe(rows);
    }
    latents = sampler->step(noise_pred.to(torch::kFloat32), i, latents);
  }
  auto summary = controller.summary();
  const double denoise_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_loop).count();
  DenoiseResult result{latents, controller.trace(), json::object()};
  result.stats = {{"policy", controller.policy().name()}, {"steps", steps}, {"num_layers", L},
                  {"layer_calls", summary.layer_calls}, {"layer_calls_skipped", summary.layer_calls_skipped},
                  {"layer_engine_calls", engine_calls}, {"frames", frames}, {"height", height}, {"width", width},
                  {"guidance_scale", guidance}, {"seed", req.seed}, {"device", device_.str()},
                  {"denoise_seconds", denoise_seconds}};
  if (two) {
    result.stats["guidance_scale_2"] = cfg ? json(guidance_2) : json();
    result.stats["stages"] = stages;
    result.stats["experts"] = sampler->experts;
  }
  return result;
}

// ------------------------------------------------------------------------------------ prompt to frames
namespace {

// The ASCII characters Python's str.isspace() (and a regex's \s) is true for.
bool is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

// Python's str.strip() on ASCII.
std::string py_strip(const std::string& text) {
  size_t a = 0, b = text.size();
  while (a < b && is_space(text[a])) ++a;
  while (b > a && is_space(text[b - 1])) --b;
  return text.substr(a, b - a);
}

std::string ascii_lower(std::string text) {
  for (char& c : text)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
  return text;
}

}  // namespace

void Runtime::check_generate() const {
  if (!no_generate_.empty()) throw ConfigError(no_generate_);
}

namespace {

// WanPipeline's prompt_clean on ASCII text: runs of whitespace to one space, stripped. Its HTML
// unescaping and ftfy's control-character removal are not ported: prompts they would change are refused.
std::string wan_clean(const std::string& text) {
  for (size_t i = 0; i < text.size(); ++i) {
    const unsigned char c = text[i];
    if (c == '&' && i + 1 < text.size() && (std::isalnum(static_cast<unsigned char>(text[i + 1])) || text[i + 1] == '#'))
      throw ConfigError("the prompt has an HTML entity (" + text.substr(i, 8) + "...), which WanPipeline unescapes and "
                        "the C++ runtime does not: write the character itself or put a space after '&'");
    if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r' && c != '\f') || c == 0x7f)
      throw ConfigError("the prompt has control characters, which WanPipeline's ftfy cleaning removes and the C++ "
                        "runtime does not: remove them");
  }
  std::string out;
  for (unsigned char c : text) {
    if (is_space(c)) {
      if (!out.empty() && out.back() != ' ') out += ' ';
    } else {
      out += static_cast<char>(c);
    }
  }
  if (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

// diffusers' VideoProcessor.postprocess_video(output_type="np") and the runtime's rounding:
// (1, 3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3) on the CPU.
at::Tensor video_frames(const at::Tensor& video) {
  at::Tensor frames = video[0].permute({1, 0, 2, 3}).to(torch::kFloat32);  // (F, 3, H, W)
  frames = (frames * 0.5 + 0.5).clamp(0, 1).cpu().permute({0, 2, 3, 1});  // (F, H, W, 3) in [0, 1]
  return (frames * 255).round().to(torch::kUInt8).contiguous();
}

}  // namespace

std::map<std::string, at::Tensor> Runtime::encode_prompt(const std::string& prompt, const std::string& negative_prompt,
                                                         bool guidance) {
  std::lock_guard<std::mutex> guard(*lock_);
  return encode_unlocked(prompt, negative_prompt, guidance);
}

// Each pipeline's encode_prompt (runtime/pipelines/*.py): the text cleaned as it cleans it, padded to
// max_text_length, encoded; negative row first, but Open-Sora's [conditional, null caption].
std::map<std::string, at::Tensor> Runtime::encode_unlocked(const std::string& prompt,
                                                           const std::string& negative_prompt, bool guidance) {
  check_generate();
  torch::NoGradGuard no_grad;
  const json& p = manifest_.pipeline();
  const std::string type = p.at("type");
  const int max_length = p.at("max_text_length");
  // (1, max_length, C) and the mask (1, max_length) of one text; `mask` false: encoded as if unmasked.
  auto encode = [&](const std::string& text, bool mask_it) {
    const Encoding enc = tokenizer_->encode(text, max_length);
    if (enc.truncated) std::cerr << "warning: the prompt was truncated to " << max_length << " tokens\n";
    auto opts = torch::TensorOptions().dtype(torch::kInt64);
    at::Tensor ids = torch::tensor(enc.ids, opts).view({1, max_length}).to(device_);
    at::Tensor mask = torch::tensor(enc.mask, opts).view({1, max_length}).to(device_);
    at::Tensor embeds = text_encoder_->run({ids, mask_it ? mask : torch::ones_like(mask)}).at(0);
    return std::make_pair(embeds, mask);
  };
  // Python's lower(), strip() and prompt_clean follow Unicode rules; ported for ASCII text (a word-level
  // tokenizer refuses anything else itself).
  if ((type == "latte" || type == "wan") && tokenizer_->sentencepiece())
    for (const std::string* text : {&prompt, &negative_prompt})
      for (unsigned char c : *text)
        if (c >= 0x80)
          throw ConfigError("the prompt has non-ASCII characters: the C++ runtime cleans " + type +
                            " prompts (Python's Unicode lower-casing, stripping and whitespace rules) for ASCII "
                            "text only; write it in ASCII or run foresight-run");
  if (type == "latte") {  // lower-cased and stripped; cut to the prompt's tokens, the negative to as many
    auto [embeds, mask] = encode(ascii_lower(py_strip(prompt)), true);
    const int64_t keep = p.value("mask_text", true) ? mask.sum().item<int64_t>() : embeds.size(1);
    embeds = embeds.slice(1, 0, keep);
    if (guidance)
      embeds = torch::cat({encode(ascii_lower(py_strip(negative_prompt)), true).first.slice(1, 0, keep), embeds}, 0);
    return {{"encoder_hidden_states", embeds}};
  }
  if (type == "cogvideox") {  // the raw text at the full length, encoded without a mask
    at::Tensor embeds = encode(prompt, false).first;
    if (guidance) embeds = torch::cat({encode(negative_prompt, false).first, embeds}, 0);
    return {{"encoder_hidden_states", embeds}};
  }
  if (type == "wan") {  // cleaned; the prompt's tokens kept, the rest of the length zeros
    auto embed = [&](const std::string& text) {
      auto [embeds, mask] = encode(wan_clean(text), true);
      const int64_t length = mask.gt(0).sum().item<int64_t>();
      at::Tensor row = embeds[0];
      return torch::cat({row.slice(0, 0, length), row.new_zeros({max_length - length, row.size(1)})}).unsqueeze(0);
    };
    at::Tensor embeds = embed(prompt);
    if (guidance) embeds = torch::cat({embed(negative_prompt), embeds}, 0);
    return {{"encoder_hidden_states", embeds}};
  }
  if (type == "opensora") {  // the aesthetic-score suffix; guidance against the learned null caption
    if (!negative_prompt.empty())
      throw ShapeError("Open-Sora 1.2 guides against its learned null caption: --negative-prompt is not supported "
                       "for this model");
    std::string text = prompt;
    const json score = p.value("aesthetic_score", json());
    if (!score.is_null() && prompt.find("aesthetic score:") == std::string::npos) {
      char suffix[64];
      std::snprintf(suffix, sizeof suffix, " aesthetic score: %.1f.", score.get<double>());
      text += suffix;
    }
    auto [embeds, mask] = encode(text, true);
    at::Tensor fmask = mask.to(torch::kFloat32);
    if (!guidance) return {{"caption", embeds}, {"caption_mask", fmask}};
    at::Tensor null = null_caption_.slice(0, 0, embeds.size(1)).unsqueeze(0).to(embeds.scalar_type());
    return {{"caption", torch::cat({embeds, null})}, {"caption_mask", torch::cat({fmask, fmask})}};
  }
  throw ConfigError("Runtime::generate does not run the " + type + " pipeline: run foresight-run --backend aoti");
}

at::Tensor Runtime::decode(const at::Tensor& latents) {
  std::lock_guard<std::mutex> guard(*lock_);
  return decode_unlocked(latents);
}

// Each pipeline's decode: its latent scaling, the compiled VAE decoder, its conversion to uint8.
at::Tensor Runtime::decode_unlocked(const at::Tensor& latents) {
  check_generate();
  torch::NoGradGuard no_grad;
  const json& p = manifest_.pipeline();
  const std::string type = p.at("type");
  if (type == "latte") {  // 1/s * latents, frames first, decoded decode_chunk_size frames at a time
    const int64_t n = latents.size(2);
    at::Tensor x = (1 / vae_scaling_ * latents.permute({0, 2, 1, 3, 4}).flatten(0, 1)).contiguous();
    const int64_t chunk = p.value("decode_chunk_size", 14);
    std::vector<at::Tensor> pieces;
    for (int64_t i = 0; i < x.size(0); i += chunk)
      pieces.push_back(vae_decoder_->run({x.slice(0, i, std::min(i + chunk, x.size(0))).contiguous()}).at(0));
    at::Tensor video = torch::cat(pieces);
    video = video.reshape({-1, n, video.size(1), video.size(2), video.size(3)}).permute({0, 2, 1, 3, 4});
    return video_frames(video);
  }
  const int64_t frame_axis = type == "cogvideox" ? 1 : 2;
  if (vae_latent_frames_ > 0 && latents.size(frame_axis) != vae_latent_frames_)
    throw ShapeError("the compiled VAE decoder decodes " + std::to_string(vae_latent_frames_) + " latent frames (" +
                     std::to_string(vae_frames_) + " frames, the default video), not " +
                     std::to_string(latents.size(frame_axis)));
  auto run = [&](const at::Tensor& x) { return vae_decoder_->run({x.contiguous()}).at(0); };
  if (type == "cogvideox")  // 1/s * latents, channels before frames
    return video_frames(run(1 / vae_scaling_ * latents.permute({0, 2, 1, 3, 4})));
  if (type == "wan") {  // de-normalised with the VAE's per-channel mean and std
    const int64_t z = latents.size(1);
    const auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    at::Tensor mean = torch::tensor(p.at("latents_mean").get<std::vector<double>>(), opts).view({1, z, 1, 1, 1});
    at::Tensor inv_std = 1.0 / torch::tensor(p.at("latents_std").get<std::vector<double>>(), opts).view({1, z, 1, 1, 1});
    at::Tensor x = latents.to(torch::kFloat32);
    return video_frames(run(x / inv_std.to(x.device()) + mean.to(x.device())));
  }
  if (type == "opensora") {  // the release's save_sample: clamp, to [0, 1], * 255 + 0.5, truncated
    at::Tensor x = run(latents.to(torch::kFloat32))[0].to(torch::kFloat32).clamp(-1, 1);
    x = (x + 1) / 2;
    x = x.mul(255).add(0.5).clamp(0, 255).permute({1, 2, 3, 0});
    return x.to(torch::kUInt8).cpu().contiguous();
  }
  throw ConfigError("Runtime::generate does not run the " + type + " pipeline: run foresight-run --backend aoti");
}

Result Runtime::generate(const Request& req) {
  using clock = std::chrono::steady_clock;
  std::lock_guard<std::mutex> guard(*lock_);
  const auto t0 = clock::now();
  auto seconds = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
  check_generate();
  const json& p = manifest_.pipeline();
  const double guidance = req.guidance < 0 ? p.at("default_guidance").get<double>() : req.guidance;
  const json default_negative = p.value("default_negative_prompt", json());
  const std::string negative = !req.default_negative ? req.negative_prompt
                               : default_negative.is_string() ? default_negative.get<std::string>() : "";
  const int frames = req.frames < 0 ? manifest_.data.at("shapes").at("frames").at("default").get<int>() : req.frames;
  if (vae_frames_ > 0 && frames != vae_frames_)
    throw ShapeError("frames=" + std::to_string(frames) + ": the compiled VAE decoder makes " +
                     std::to_string(vae_frames_) + " frames (the default video's; foresight-export compiles it for "
                     "one frame count): pass --frames " + std::to_string(vae_frames_) + ", or call denoise() and "
                     "decode the latents yourself");
  DenoiseRequest d;
  d.frames = req.frames;
  d.height = req.height;
  d.width = req.width;
  d.steps = req.steps;
  d.guidance = guidance;
  d.seed = req.seed;
  d.policy = req.policy;
  d.inputs = encode_unlocked(req.prompt, negative, guidance > 1.0);
  const auto t1 = clock::now();
  DenoiseResult r = denoise_unlocked(d);
  const auto t2 = clock::now();
  at::Tensor frames_out = decode_unlocked(r.latents);
  const auto t3 = clock::now();
  r.stats["text_encode_seconds"] = seconds(t0, t1);
  r.stats["decode_seconds"] = seconds(t2, t3);
  r.stats["total_seconds"] = seconds(t0, t3);
  return Result{frames_out, r.latents, std::move(r.trace), std::move(r.stats)};
}

}  // namespace foresight

// foresight-run-cpp: a prompt to a video with the C++ runtime, the flags of foresight-run where they
// apply (docs/cpp.md). Frames go to .npy (uint8 F x H x W x 3, as foresight-run --save-frames writes
// them) or .mp4 (H.264 through an ffmpeg executable, with foresight-run's settings); every output is
// written to a temporary beside it and renamed into place, so a failed run leaves nothing behind.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include "foresight/runtime.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* kUsage =
    "usage: foresight-run-cpp --engines DIR --prompt P --out OUT.{mp4,npy} [--negative-prompt N] [--steps N]\n"
    "         [--guidance G] [--seed S] [--frames F] [--height H] [--width W] [--fps FPS]\n"
    "         [--policy none|static|foresight] [--warmup W] [--recalculate R] [--threshold T] [--reuse R]\n"
    "         [--period P] [--stats STATS.json] [--save-frames FRAMES.npy] [--device cpu|cuda] [--ffmpeg PATH]\n"
    "         [--backend aoti|tensorrt]\n";

const std::set<std::string> kOptions = {"engines", "prompt", "out", "negative-prompt", "steps", "guidance", "seed",
                                        "frames", "height", "width", "fps", "policy", "warmup", "recalculate",
                                        "threshold", "reuse", "period", "stats", "save-frames", "device", "ffmpeg",
                                        "backend"};

struct UsageError : foresight::Error {
  using Error::Error;
};

std::string lower_suffix(const fs::path& p) {
  std::string s = p.extension().string();
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Resolved; refused inside the engines folder, as a directory, in a missing folder, or with another suffix.
fs::path check_output(const std::string& flag, const std::string& value, const std::set<std::string>& suffixes,
                      const fs::path& engines) {
  fs::path p = fs::weakly_canonical(fs::absolute(value));
  const fs::path e = fs::weakly_canonical(fs::absolute(engines));
  const auto rel = p.lexically_relative(e);
  if (p == e || (!rel.empty() && *rel.begin() != ".."))
    throw UsageError(p.string() + " is inside the engines folder " + e.string() + ": write outputs elsewhere");
  if (fs::is_directory(p)) throw UsageError(p.string() + " is a directory; give a file name such as " + (p / "out.mp4").string());
  if (!suffixes.count(lower_suffix(p))) {
    std::string list;
    for (const auto& s : suffixes) list += (list.empty() ? "" : ", ") + s;
    throw UsageError(p.string() + ": unsupported extension " + (p.extension().empty() ? "(none)" : p.extension().string()) +
                     " for " + flag + "; use one of " + list);
  }
  if (!fs::is_directory(p.parent_path()))
    throw UsageError(p.string() + ": the folder " + p.parent_path().string() + " does not exist; create it first");
  return p;
}

// Outputs written to temporaries beside them, renamed into place together once all are written;
// on any failure every temporary is removed and no output appears.
class Staged {
 public:
  template <typename F>
  void add(const fs::path& path, F&& write) {
    const fs::path tmp = path.parent_path() / ("." + path.filename().string() + ".tmp-" + std::to_string(getpid()));
    files_.emplace_back(tmp, path);
    write(tmp);
  }
  void commit() {
    for (const auto& [tmp, path] : files_) fs::rename(tmp, path);
    files_.clear();
  }
  ~Staged() {
    std::error_code ignored;
    for (const auto& [tmp, path] : files_) fs::remove(tmp, ignored);
  }

 private:
  std::vector<std::pair<fs::path, fs::path>> files_;
};

void write_npy(const fs::path& path, const at::Tensor& frames) {
  std::string header = "{'descr': '|u1', 'fortran_order': False, 'shape': (";
  for (int64_t d : frames.sizes()) header += std::to_string(d) + ", ";
  header = header.substr(0, header.size() - 2) + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // magic + version + length + header + \n: a multiple of 64
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t n = static_cast<uint16_t>(header.size());
  out.put(static_cast<char>(n & 0xff)).put(static_cast<char>(n >> 8));
  out << header;
  out.write(static_cast<const char*>(frames.data_ptr()), static_cast<std::streamsize>(frames.numel()));
  if (!out) throw foresight::Error("could not write " + path.string());
}

std::string fps_argument(double fps) {  // as a reduced fraction, as imageio-ffmpeg passes it
  for (int den = 1; den <= 1001; ++den) {
    const double num = fps * den;
    if (std::abs(num - std::round(num)) < 1e-9) return std::to_string(static_cast<long>(std::round(num))) + "/" + std::to_string(den);
  }
  return std::to_string(fps);
}

// H.264 yuv420p at CRF 15 through ffmpeg, the settings runtime/video.py gives imageio-ffmpeg; odd sizes
// padded by repeating the last row or column.
void write_mp4(const fs::path& path, at::Tensor frames, double fps, const std::string& ffmpeg) {
  if (frames.size(1) % 2) frames = torch::cat({frames, frames.slice(1, -1)}, 1);
  if (frames.size(2) % 2) frames = torch::cat({frames, frames.slice(2, -1)}, 2);
  frames = frames.contiguous();
  const std::string size = std::to_string(frames.size(2)) + "x" + std::to_string(frames.size(1));
  const std::string cmd = "'" + ffmpeg + "' -y -f rawvideo -vcodec rawvideo -s " + size + " -pix_fmt rgb24 -r " +
                          fps_argument(fps) + " -i - -an -vcodec libx264 -pix_fmt yuv420p -crf 15 -v warning -f mp4 '" +
                          path.string() + "'";
  FILE* pipe = popen(cmd.c_str(), "w");
  if (!pipe) throw foresight::Error("could not start " + ffmpeg);
  const size_t n = static_cast<size_t>(frames.numel());
  const size_t written = std::fwrite(frames.data_ptr(), 1, n, pipe);
  const int status = pclose(pipe);
  if (written != n || status != 0) throw foresight::Error(ffmpeg + " could not write " + path.string());
}

std::string find_ffmpeg(const std::map<std::string, std::string>& args) {
  if (args.count("ffmpeg")) return args.at("ffmpeg");
  if (const char* env = std::getenv("FORESIGHT_FFMPEG")) return env;
  if (const char* path = std::getenv("PATH")) {
    std::string dirs = path;
    for (size_t a = 0; a <= dirs.size();) {
      const size_t b = std::min(dirs.find(':', a), dirs.size());
      const fs::path candidate = fs::path(dirs.substr(a, b - a)) / "ffmpeg";
      if (access(candidate.c_str(), X_OK) == 0) return candidate.string();
      a = b + 1;
    }
  }
  throw UsageError("writing .mp4 needs an ffmpeg executable: pass --ffmpeg PATH or set FORESIGHT_FFMPEG (pip install "
                   "imageio-ffmpeg ships one: python -c \"import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())\"), "
                   "or write .npy");
}

int number(const std::map<std::string, std::string>& args, const std::string& key, int fallback) {
  auto it = args.find(key);
  if (it == args.end()) return fallback;
  size_t used = 0;
  int v = 0;
  try {
    v = std::stoi(it->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != it->second.size()) throw UsageError("--" + key + " takes a whole number (got " + it->second + ")");
  return v;
}

double real(const std::map<std::string, std::string>& args, const std::string& key) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(args.at(key), &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != args.at(key).size()) throw UsageError("--" + key + " takes a number (got " + args.at(key) + ")");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string key = argv[i];
      if (key == "-h" || key == "--help") {
        std::cout << kUsage;
        return 0;
      }
      if (key.rfind("--", 0) != 0 || !kOptions.count(key.substr(2)))
        throw UsageError("unknown option " + key + "\n" + kUsage);
      if (i + 1 >= argc) throw UsageError(key + " takes a value");
      args[key.substr(2)] = argv[++i];
    }
    for (const char* required : {"engines", "prompt", "out"})
      if (!args.count(required)) throw UsageError(std::string("--") + required + " is required\n" + kUsage);
    const fs::path engines = args["engines"];
    const fs::path out = check_output("--out", args["out"], {".mp4", ".npy"}, engines);
    std::map<std::string, fs::path> extra;
    if (args.count("stats")) extra["--stats"] = check_output("--stats", args["stats"], {".json"}, engines);
    if (args.count("save-frames")) extra["--save-frames"] = check_output("--save-frames", args["save-frames"], {".npy"}, engines);
    for (const auto& [flag, p] : extra)
      if (p == out) throw UsageError(flag + " and --out name the same file " + p.string());
    const std::string ffmpeg = lower_suffix(out) == ".mp4" ? find_ffmpeg(args) : "";

    foresight::Request req;
    req.prompt = args["prompt"];
    if (args.count("negative-prompt")) {
      req.negative_prompt = args["negative-prompt"];
      req.default_negative = false;
    }
    req.steps = number(args, "steps", -1);
    req.frames = number(args, "frames", -1);
    req.height = number(args, "height", -1);
    req.width = number(args, "width", -1);
    req.seed = static_cast<uint64_t>(number(args, "seed", 0));
    if (args.count("guidance")) req.guidance = real(args, "guidance");
    const std::string policy = args.count("policy") ? args["policy"] : "foresight";
    req.policy = {{"policy", policy}};
    for (const char* k : {"warmup", "recalculate", "reuse", "period"})
      if (args.count(k)) req.policy[k] = number(args, k, 0);
    if (args.count("threshold")) req.policy["threshold"] = real(args, "threshold");

    const std::string backend = args.count("backend") ? args["backend"] : "aoti";
    if (backend != "aoti" && backend != "tensorrt")
      throw UsageError("--backend must be aoti or tensorrt (got " + backend + ")");
    auto rt = foresight::Runtime::load(args["engines"], args.count("device") ? args["device"] : "cpu", true, backend);
    if (policy == "foresight") {  // the manifest's defaults, then the flags, as foresight-run
      const json defaults = rt.manifest().data.value("foresight_defaults", json::object());  // items() needs it alive
      for (const auto& [k, v] : defaults.items())
        if (!req.policy.contains(k)) req.policy[k] = v;
    }
    const double fps = args.count("fps") ? real(args, "fps") : rt.manifest().pipeline().value("fps", 8.0);
    if (!(fps > 0 && fps < 1000)) throw UsageError("--fps must be in (0, 1000) (got " + args["fps"] + ")");
    foresight::Result res = rt.generate(req);

    Staged staged;
    if (ffmpeg.empty()) {
      staged.add(out, [&](const fs::path& tmp) { write_npy(tmp, res.frames); });
    } else {
      staged.add(out, [&](const fs::path& tmp) { write_mp4(tmp, res.frames, fps, ffmpeg); });
    }
    if (extra.count("--save-frames"))
      staged.add(extra["--save-frames"], [&](const fs::path& tmp) { write_npy(tmp, res.frames); });
    if (extra.count("--stats"))
      staged.add(extra["--stats"], [&](const fs::path& tmp) {
        json stats = res.stats;
        stats["trace"] = res.trace;
        std::ofstream(tmp) << stats.dump(1) << "\n";
      });
    staged.commit();
    std::cerr << out.string() << ": " << res.frames.size(0) << " frames " << res.frames.size(1) << "x"
              << res.frames.size(2) << ", policy " << policy << ", layer calls skipped "
              << res.stats.value("layer_calls_skipped", 0) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "foresight-run-cpp: error: " << e.what() << "\n";
    return dynamic_cast<const UsageError*>(&e) ? 2 : 1;
  }
  return 0;
}

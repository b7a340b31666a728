// foresight_denoise: the C++ runtime's denoising loop from the command line, for the conformance tests
// against the Python runtime (tests/cpp/test_runtime.py). The encoded prompt comes in, and the final
// latents go out, as torch.save files (torch::pickle_load / pickle_save): the prompt as one tensor
// (encoder_hidden_states) or a dict of the stem's text inputs by name.
//
//   foresight_denoise --engines DIR --text text.pt --out latents.pt [--trace trace.json] [--stats stats.json]
//                     [--steps N] [--seed S] [--guidance G] [--guidance-2 G2] [--frames F --height H --width W]
//                     [--policy '{"policy": "foresight", "warmup": 6}'] [--device cpu]
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include <torch/serialize.h>

#include "foresight/runtime.hpp"

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string key = argv[i];
    if (key.rfind("--", 0) != 0) {
      std::cerr << "error: expected --option value pairs, got " << key << "\n";
      return 2;
    }
    args[key.substr(2)] = argv[i + 1];
  }
  if (argc % 2 == 0 || !args.count("engines") || !(args.count("text") || args.count("prompt")) || !args.count("out")) {
    std::cerr << "usage: foresight_denoise --engines DIR (--text text.pt | --prompt P [--negative-prompt N] "
                 "[--frames-out frames.pt]) --out latents.pt [options]\n";
    return 2;
  }
  auto number = [&](const char* k, int fallback) { return args.count(k) ? std::stoi(args[k]) : fallback; };
  auto save = [](const at::Tensor& t, const std::string& path) {
    std::vector<char> out = torch::pickle_save(t.cpu());
    std::ofstream(path, std::ios::binary).write(out.data(), static_cast<std::streamsize>(out.size()));
  };
  auto fill = [&](auto& req) {  // what a Request and a DenoiseRequest share
    req.steps = number("steps", -1);
    req.frames = number("frames", -1);
    req.height = number("height", -1);
    req.width = number("width", -1);
    if (args.count("seed")) req.seed = std::stoull(args["seed"]);
    if (args.count("guidance")) req.guidance = std::stod(args["guidance"]);
    if (args.count("policy")) req.policy = nlohmann::json::parse(args["policy"]);
  };
  try {
    auto rt = foresight::Runtime::load(args["engines"], args.count("device") ? args["device"] : "cpu");
    if (args.count("prompt")) {  // prompt to frames: Runtime::generate
      foresight::Request req;
      req.prompt = args["prompt"];
      if (args.count("negative-prompt")) {
        req.negative_prompt = args["negative-prompt"];
        req.default_negative = false;
      }
      fill(req);
      foresight::Result res = rt.generate(req);
      save(res.latents, args["out"]);
      if (args.count("frames-out")) save(res.frames, args["frames-out"]);
      if (args.count("trace")) std::ofstream(args["trace"]) << res.trace.dump();
      if (args.count("stats")) std::ofstream(args["stats"]) << res.stats.dump();
      return 0;
    }
    std::ifstream in(args["text"], std::ios::binary);
    if (!in) throw foresight::Error("cannot read " + args["text"]);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    foresight::DenoiseRequest req;
    const c10::IValue text = torch::pickle_load(bytes);  // a tensor, or a dict of the stem's text inputs
    if (text.isTensor()) {
      req.text = text.toTensor();
    } else {
      for (const auto& item : text.toGenericDict()) req.inputs[item.key().toStringRef()] = item.value().toTensor();
    }
    fill(req);
    if (args.count("guidance-2")) req.guidance_2 = std::stod(args["guidance-2"]);
    foresight::DenoiseResult res = rt.denoise(req);
    save(res.latents, args["out"]);
    if (args.count("trace")) std::ofstream(args["trace"]) << res.trace.dump();
    if (args.count("stats")) std::ofstream(args["stats"]) << res.stats.dump();
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

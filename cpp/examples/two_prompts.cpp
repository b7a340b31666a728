// An example host: load an engines folder once, generate two prompts, write each video's frames as
// raw RGB (F x H x W x 3 bytes) and print what Foresight skipped.
//
//   two_prompts ENGINES_DIR OUT_PREFIX      ->  OUT_PREFIX0.rgb, OUT_PREFIX1.rgb
#include <fstream>
#include <iostream>
#include <string>

#include "foresight/runtime.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: two_prompts ENGINES_DIR OUT_PREFIX\n";
    return 2;
  }
  try {
    // Loading checks the folder (versions, every file's hash) and loads every compiled program once.
    foresight::Runtime rt = foresight::Runtime::load(argv[1], "cpu");
    const std::string prompts[] = {"a red square moving left on a gray background",
                                   "a blue circle moving up on a white background"};
    for (int i = 0; i < 2; ++i) {
      foresight::Request req;
      req.prompt = prompts[i];
      req.steps = 20;
      req.seed = 7;
      req.policy = {{"policy", "foresight"}, {"warmup", 4}, {"recalculate", 4}, {"threshold", 4.0}};
      foresight::Result res = rt.generate(req);  // frames: uint8 (F, H, W, 3) on the CPU
      const std::string path = std::string(argv[2]) + std::to_string(i) + ".rgb";
      std::ofstream(path, std::ios::binary)
          .write(static_cast<const char*>(res.frames.data_ptr()), static_cast<std::streamsize>(res.frames.numel()));
      std::cout << path << ": " << res.frames.size(0) << " frames of " << res.frames.size(1) << "x"
                << res.frames.size(2) << ", " << res.stats.value("layer_calls_skipped", 0) << " of "
                << res.stats.value("layer_calls_skipped", 0) + res.stats.value("layer_calls", 0)
                << " layer calls skipped\n";
    }
  } catch (const std::exception& e) {  // every runtime error is a foresight::Error with a message
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

// Thread safety of one foresight::Runtime: the same requests run one after another and then from
// several threads at once on the same Runtime must give the same frames, decisions and engine calls
// (calls are serialised by the Runtime's lock, as the Python runtime's generate calls are).
//
//   foresight_threads ENGINES_DIR THREADS PROMPT...     prints one JSON line; exit 0 when all equal
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "foresight/runtime.hpp"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: foresight_threads ENGINES_DIR THREADS PROMPT...\n";
    return 2;
  }
  try {
    foresight::Runtime rt = foresight::Runtime::load(argv[1], "cpu");
    const int threads = std::stoi(argv[2]);
    std::vector<foresight::Request> requests;
    for (int i = 0; i < threads; ++i) {
      foresight::Request req;
      req.prompt = argv[3 + i % (argc - 3)];
      req.steps = 6;
      req.seed = static_cast<uint64_t>(i);
      req.policy = {{"policy", "foresight"}, {"warmup", 2}, {"recalculate", 2}, {"threshold", 4.0}};
      requests.push_back(req);
    }
    std::vector<foresight::Result> sequential, concurrent(threads);
    for (const auto& req : requests) sequential.push_back(rt.generate(req));
    const long calls_before = rt.engine_calls("head");
    std::vector<std::string> errors(threads);
    std::vector<std::thread> pool;
    for (int i = 0; i < threads; ++i)
      pool.emplace_back([&, i] {
        try {
          concurrent[i] = rt.generate(requests[i]);
        } catch (const std::exception& e) {
          errors[i] = e.what();
        }
      });
    for (auto& t : pool) t.join();
    bool equal = true;
    for (int i = 0; i < threads; ++i) {
      if (!errors[i].empty()) {
        std::cerr << "error: thread " << i << ": " << errors[i] << "\n";
        return 1;
      }
      equal = equal && torch::equal(sequential[i].frames, concurrent[i].frames) &&
              sequential[i].trace == concurrent[i].trace &&
              sequential[i].stats["layer_engine_calls"] == concurrent[i].stats["layer_engine_calls"];
    }
    const bool differ = threads < 2 || !torch::equal(sequential[0].frames, sequential[1].frames);
    std::cout << "{\"threads\": " << threads << ", \"equal\": " << (equal ? "true" : "false")
              << ", \"seeds_differ\": " << (differ ? "true" : "false")
              << ", \"head_calls\": " << rt.engine_calls("head") - calls_before << "}\n";
    return equal && differ ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}

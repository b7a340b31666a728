// Replays golden traces through the C++ controller: a fresh controller built from each trace's
// header is fed the trace's recorded mse, and every step's computed layers, source, measure flag
// and thresholds, and at the end the whole trace, must equal the recorded ones (values compared
// as parsed JSON numbers, so bit for bit). Prints one line per trace; exit status 1 if any differs.
//
//   foresight_conformance tests/golden/*.json
#include <fstream>
#include <iostream>
#include <sstream>

#include "foresight/controller.hpp"

using nlohmann::json;

namespace {

std::string replay(const json& trace) {
  foresight::Controller c(foresight::make_policy(trace.at("config")), trace.at("num_layers").get<int>(),
                          trace.at("num_probes").get<int>());
  c.reset(trace.contains("stages") ? trace["stages"].get<std::vector<int>>() : std::vector<int>{0});
  for (const json& want : trace.at("steps")) {
    const int t = want.at("step").get<int>();
    foresight::StepPlan plan = c.plan(t);
    json computed = json::array();
    for (int l = plan.start; l < plan.num_layers; ++l) computed.push_back(l);
    json source = plan.source ? json{plan.source->first, plan.source->second} : json(nullptr);
    if (computed != want.at("computed") || source != want.at("source") || plan.measure != want.at("measure").get<bool>())
      return "step " + std::to_string(t) + ": decided computed " + computed.dump() + " source " + source.dump() +
             " measure " + (plan.measure ? "true" : "false") + ", the trace recorded otherwise";
    if (plan.measure) {
      std::vector<std::vector<double>> rows;
      const json& mse = want.at("mse");
      for (size_t l = plan.start; l < mse.size(); ++l) rows.push_back(mse[l].get<std::vector<double>>());
      c.observe(rows);
    }
  }
  json got = json::parse(c.trace().dump());
  for (size_t i = 0; i < got["steps"].size(); ++i)
    if (got["steps"][i]["thresholds"] != trace["steps"][i]["thresholds"])
      return "step " + std::to_string(i) + ": thresholds differ";
  if (got != trace) return "the trace differs from the recorded one (header or mse record)";
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: foresight_conformance TRACE.json...\n";
    return 2;
  }
  int failed = 0;
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i]);
    std::stringstream text;
    text << in.rdbuf();
    std::string problem;
    try {
      problem = in ? replay(json::parse(text.str())) : "cannot read the file";
    } catch (const std::exception& e) {
      problem = std::string("error: ") + e.what();
    }
    std::cout << (problem.empty() ? "ok   " : "FAIL ") << argv[i] << (problem.empty() ? "" : ": " + problem) << "\n";
    failed += !problem.empty();
  }
  return failed ? 1 : 0;
}

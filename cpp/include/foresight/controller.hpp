// The Foresight layer-reuse controller in C++: the same state machine as the Python package
// `foresight` (docs/foresight-algorithm.md), decision for decision and bit for bit.
//
// Per denoising step a host asks plan(step) before running any layer, runs layers
// plan.start .. num_layers-1 (layer `start` reads the cached output named by plan.source, or the
// stem's output when there is none), and, when plan.measure, hands back one mse per
// (computed layer, probe) with observe(). The controller never sees a tensor.
//
// Errors are exceptions derived from foresight::Error (ConfigError for a bad policy, StateError
// for calls out of order, ValueError for bad measurements); the C ABI (foresight.h) turns them
// into status codes.
#pragma once

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace foresight {

inline constexpr const char* kTraceSchema = "foresight-trace/2";

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ConfigError : Error {  // a policy option or a run the policy cannot follow
  using Error::Error;
};
struct StateError : Error {  // plan/observe called out of order
  using Error::Error;
};
struct ValueError : Error {  // a measurement of the wrong size, or not finite and >= 0
  using Error::Error;
};

// What the controller knows when it plans a step (read-only for policies).
struct ControllerState {
  int num_layers;
  int num_probes;
  const std::vector<std::optional<std::vector<double>>>& mse;  // latest measured, per layer
  const std::optional<std::vector<std::vector<double>>>& thresholds;
  int stage_start;
};

struct Decision {
  int start;
  bool measure;
};

// A reuse policy: its validated options and its rule. Steps are counted from the stage's start.
class Policy {
 public:
  virtual ~Policy() = default;
  virtual std::string name() const = 0;
  virtual Decision decide(int step, const ControllerState& state) const = 0;
  // gamma when the measurement of `step` sets the thresholds to gamma * mse.
  virtual std::optional<double> calibration(int /*step*/) const { return std::nullopt; }
  virtual void check_run(int /*num_layers*/, int /*steps*/, const std::vector<int>* /*stages*/) const {}
  // Policy.to_dict(): {"policy": name, options...}, in the Python field order.
  virtual nlohmann::ordered_json to_json() const = 0;
};

struct NonePolicy final : Policy {
  std::string name() const override { return "none"; }
  Decision decide(int, const ControllerState&) const override { return {0, false}; }
  nlohmann::ordered_json to_json() const override;
};

struct StaticPolicy final : Policy {
  int warmup = 4, reuse = 1, period = 2;
  StaticPolicy(int warmup, int reuse, int period);
  std::string name() const override { return "static"; }
  Decision decide(int step, const ControllerState& state) const override;
  nlohmann::ordered_json to_json() const override;
};

struct ForesightPolicy final : Policy {
  int warmup = 8, recalculate = 2;
  double threshold = 0.5;
  ForesightPolicy(int warmup, int recalculate, double threshold);
  std::string name() const override { return "foresight"; }
  Decision decide(int step, const ControllerState& state) const override;
  std::optional<double> calibration(int step) const override;
  nlohmann::ordered_json to_json() const override;
};

struct ReplayPolicy final : Policy {
  std::vector<Decision> decisions;
  int num_layers = 0;
  std::vector<int> stages{0};
  ReplayPolicy(std::vector<Decision> decisions, int num_layers, std::vector<int> stages);
  static ReplayPolicy from_trace(const nlohmann::json& trace);
  std::string name() const override { return "replay"; }
  Decision decide(int step, const ControllerState& state) const override;
  void check_run(int num_layers, int steps, const std::vector<int>* stages) const override;
  nlohmann::ordered_json to_json() const override;
};

// A policy from its to_dict() JSON ({"policy": "foresight", "warmup": 6, ...}); options left out keep
// their defaults, unknown ones are refused (ConfigError naming the options the policy takes).
std::shared_ptr<const Policy> make_policy(const nlohmann::json& config);

struct StepPlan {
  int step;
  int start;
  std::optional<std::pair<int, int>> source;  // (layer, probe) of the cached output feeding layer `start`
  bool measure;
  int num_layers;
};

struct Summary {
  long layer_calls;
  long layer_calls_skipped;
  long steps;
};

// Decides, step by step, which layers run. State belongs to one generation: reset() before each.
class Controller {
 public:
  Controller(std::shared_ptr<const Policy> policy, int num_layers, int num_probes);

  // A new generation; `stages`: the steps its stages begin at, ascending from 0 (one per expert).
  void reset(std::vector<int> stages = {0});
  StepPlan plan(int step);
  // One row of num_probes values per computed layer, in order start .. num_layers-1.
  void observe(const std::vector<std::vector<double>>& mse);
  nlohmann::ordered_json trace() const;
  Summary summary() const;

  const Policy& policy() const { return *policy_; }
  int num_layers() const { return num_layers_; }
  int num_probes() const { return num_probes_; }
  const std::vector<int>& stages() const { return stages_; }

 private:
  struct Record {
    StepPlan plan;
    std::vector<std::optional<std::vector<double>>> mse;
    std::optional<std::vector<std::vector<double>>> thresholds;
  };
  std::shared_ptr<const Policy> policy_;
  int num_layers_, num_probes_;
  std::vector<int> stages_{0};
  int stage_start_ = 0;
  bool awaiting_observe_ = false;
  std::vector<std::optional<std::vector<double>>> mse_;
  std::optional<std::vector<std::vector<double>>> thresholds_;
  std::vector<Record> steps_;
};

}  // namespace foresight

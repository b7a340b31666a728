// The controller and its policies; semantics in docs/foresight-algorithm.md, the Python original in
// foresight/controller.py and foresight/policies.py (messages kept the same).
#include "foresight/controller.hpp"

#include <algorithm>
#include <cmath>
#include <set>

namespace foresight {
namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

void check_int(const std::string& name, int value, int minimum, const std::string& why) {
  if (value < minimum)
    throw ConfigError(name + " must be >= " + std::to_string(minimum) + " (got " + std::to_string(value) + "): " + why +
                      "; pass --" + name + " " + std::to_string(minimum) + " or more");
}

int whole(const json& config, const char* name, int fallback) {
  if (!config.contains(name) || config[name].is_null()) return fallback;
  const json& v = config[name];
  if (!v.is_number_integer())
    throw ConfigError(std::string(name) + " must be a whole number (got " + v.dump() + "); pass e.g. --" + name + " " +
                      std::to_string(fallback));
  return v.get<int>();
}

bool ascending_from_zero(const std::vector<int>& stages) {
  if (stages.empty() || stages[0] != 0) return false;
  for (size_t i = 1; i < stages.size(); ++i)
    if (stages[i] <= stages[i - 1]) return false;
  return true;
}

// A number as Python's repr writes it (the messages are the Python controller's).
std::string repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return json(v).dump();
}

std::string list(const std::vector<int>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

}  // namespace

// ------------------------------------------------------------------------------------ policies
ordered_json NonePolicy::to_json() const { return {{"policy", "none"}}; }

StaticPolicy::StaticPolicy(int warmup_, int reuse_, int period_) : warmup(warmup_), reuse(reuse_), period(period_) {
  check_int("warmup", warmup, 1, "static reuse needs one computed step to fill the cache");
  check_int("reuse", reuse, 1, "a static policy that never reuses is --policy none");
  check_int("period", period, 2, "a period must hold one reused and one computed step");
  if (reuse >= period)
    throw ConfigError("reuse must be < period (got reuse=" + std::to_string(reuse) + ", period=" + std::to_string(period) +
                      "): every period needs a computed step to refresh the cache; pass --period " +
                      std::to_string(reuse + 1) + " or more, or a smaller --reuse");
}

Decision StaticPolicy::decide(int step, const ControllerState& state) const {
  // Each period opens with its computed steps, so every reuse follows a fresh cache.
  bool reused = step >= warmup && (step - warmup) % period >= period - reuse;
  return {reused ? state.num_layers : 0, false};
}

ordered_json StaticPolicy::to_json() const {
  return {{"policy", "static"}, {"warmup", warmup}, {"reuse", reuse}, {"period", period}};
}

ForesightPolicy::ForesightPolicy(int warmup_, int recalculate_, double threshold_)
    : warmup(warmup_), recalculate(recalculate_), threshold(threshold_) {
  check_int("warmup", warmup, 2, "Foresight calibrates at step warmup-1 against step warmup-2");
  check_int("recalculate", recalculate, 1, "steps with step % recalculate == 0 recompute every layer");
  if (!std::isfinite(threshold) || threshold < 0)
    throw ConfigError("threshold must be a finite number >= 0 (got " + repr(threshold) +
                      "): it scales the calibrated per-layer change; pass e.g. --threshold 0.5 (smaller is safer, "
                      "larger is faster)");
}

Decision ForesightPolicy::decide(int step, const ControllerState& state) const {
  if (step < warmup - 1) return {0, false};  // step warmup-2 fills the caches that warmup-1 measures against
  if (step == warmup - 1 || step % recalculate == 0) return {0, true};
  // A layer is reusable if ANY of its probes changed no more than its threshold; the deepest
  // reusable layer decides, since nothing before it feeds this step's output.
  int deepest = -1;
  for (int layer = 0; layer < state.num_layers; ++layer) {
    const auto& mse = state.mse[layer];
    const auto& thr = (*state.thresholds)[layer];
    for (int p = 0; p < state.num_probes; ++p)
      if ((*mse)[p] <= thr[p]) {
        deepest = layer;
        break;
      }
  }
  int start = deepest + 1;
  return {start, start < state.num_layers};
}

std::optional<double> ForesightPolicy::calibration(int step) const {
  if (step == warmup - 1) return threshold;
  return std::nullopt;
}

ordered_json ForesightPolicy::to_json() const {
  return {{"policy", "foresight"}, {"warmup", warmup}, {"recalculate", recalculate}, {"threshold", threshold}};
}

ReplayPolicy::ReplayPolicy(std::vector<Decision> decisions_, int num_layers_, std::vector<int> stages_)
    : decisions(std::move(decisions_)), num_layers(num_layers_), stages(std::move(stages_)) {
  if (decisions.empty())
    throw ConfigError("replay needs the decisions of a saved trace: pass --trace stats.json (written by foresight-run "
                      "--stats) or a saved foresight-trace/2 file");
  check_int("num_layers", num_layers, 1, "a trace describes at least one layer");
  for (size_t step = 0; step < decisions.size(); ++step) {
    const Decision& d = decisions[step];
    if (d.start < 0 || d.start > num_layers || (d.measure && d.start == num_layers))
      throw ConfigError("replay decision (" + std::to_string(d.start) + ", " + (d.measure ? "True" : "False") +
                        ") at step " + std::to_string(step) + " is not one of a " + std::to_string(num_layers) +
                        "-layer trace; regenerate the trace");
  }
  if (!ascending_from_zero(stages) || stages.back() >= static_cast<int>(decisions.size()))
    throw ConfigError("replay stages " + list(stages) +
                      " are not ascending steps of the trace starting at 0; regenerate the trace");
  for (int s : stages)
    if (decisions[s].start != 0 || decisions[s].measure)
      throw ConfigError("replay decision at step " + std::to_string(s) +
                        ", where a stage begins, reuses or measures: nothing of a new stage is cached yet; "
                        "regenerate the trace");
}

ReplayPolicy ReplayPolicy::from_trace(const json& trace) {
  int L = trace.at("num_layers").get<int>();
  std::vector<Decision> decisions;
  for (const auto& s : trace.at("steps"))
    decisions.push_back({L - static_cast<int>(s.at("computed").size()), s.at("measure").get<bool>()});
  std::vector<int> stages = trace.contains("stages") ? trace["stages"].get<std::vector<int>>() : std::vector<int>{0};
  return ReplayPolicy(std::move(decisions), L, std::move(stages));
}

void ReplayPolicy::check_run(int layers, int steps, const std::vector<int>* run_stages) const {
  if (layers != num_layers)
    throw ConfigError("the replayed trace is of a " + std::to_string(num_layers) + "-layer model and these engines have " +
                      std::to_string(layers) + " layers: record the trace on a model with as many layers");
  if (steps != static_cast<int>(decisions.size()))
    throw ConfigError("the replayed trace has " + std::to_string(decisions.size()) + " steps: pass --steps " +
                      std::to_string(decisions.size()));
  if (run_stages && *run_stages != stages)
    throw ConfigError("the replayed trace's stages (experts) begin at steps " + list(stages) + ", this run's at " +
                      list(*run_stages) + ": record the trace with the same model, steps and scheduler");
}

Decision ReplayPolicy::decide(int step, const ControllerState& state) const {
  step += state.stage_start;  // the trace numbers the run's steps
  if (state.num_layers != num_layers || step >= static_cast<int>(decisions.size()))
    check_run(state.num_layers, step + 1, &stages);
  return decisions[step];
}

ordered_json ReplayPolicy::to_json() const {
  ordered_json d = ordered_json::array();
  for (const Decision& x : decisions) d.push_back({x.start, x.measure});
  return {{"policy", "replay"}, {"decisions", d}, {"num_layers", num_layers}, {"stages", stages}};
}

std::shared_ptr<const Policy> make_policy(const json& config) {
  if (!config.is_object() || !config.contains("policy") || !config["policy"].is_string())
    throw ConfigError("a policy is a JSON object with its name under \"policy\", e.g. {\"policy\": \"foresight\", "
                      "\"warmup\": 6}");
  const std::string name = config["policy"].get<std::string>();
  static const std::vector<std::pair<std::string, std::vector<std::string>>> options = {
      {"none", {}},
      {"static", {"warmup", "reuse", "period"}},
      {"foresight", {"warmup", "recalculate", "threshold"}},
      {"replay", {"decisions", "num_layers", "stages"}},
  };
  auto known = std::find_if(options.begin(), options.end(), [&](const auto& o) { return o.first == name; });
  if (known == options.end()) throw ConfigError("unknown policy '" + name + "': pass one of none, static, foresight, replay");
  std::vector<std::string> extra;
  for (const auto& [key, value] : config.items())
    if (key != "policy" && !value.is_null() &&
        std::find(known->second.begin(), known->second.end(), key) == known->second.end())
      extra.push_back(key);
  if (!extra.empty()) {
    std::string keys, takes;
    for (const auto& k : extra) keys += (keys.empty() ? "" : ", ") + k;
    for (const auto& k : known->second) takes += (takes.empty() ? "" : ", ") + k;
    throw ConfigError(keys + " does not apply to policy '" + name + "' (" +
                      (takes.empty() ? "it takes no options" : "it takes " + takes) + "); drop it or pick another policy");
  }
  if (name == "none") return std::make_shared<NonePolicy>();
  if (name == "static")
    return std::make_shared<StaticPolicy>(whole(config, "warmup", 4), whole(config, "reuse", 1), whole(config, "period", 2));
  if (name == "foresight") {
    double threshold = 0.5;
    if (config.contains("threshold") && !config["threshold"].is_null()) {
      if (!config["threshold"].is_number() || config["threshold"].is_boolean())
        throw ConfigError("threshold must be a finite number >= 0 (got " + config["threshold"].dump() +
                          "): it scales the calibrated per-layer change; pass e.g. --threshold 0.5 (smaller is safer, "
                          "larger is faster)");
      threshold = config["threshold"].get<double>();
    }
    return std::make_shared<ForesightPolicy>(whole(config, "warmup", 8), whole(config, "recalculate", 2), threshold);
  }
  std::vector<Decision> decisions;
  for (const auto& d : config.value("decisions", json::array())) {
    if (!d.is_array() || d.size() != 2 || !d[0].is_number_integer() || !d[1].is_boolean())
      throw ConfigError("replay decision " + d.dump() + " is not [start, measure]; regenerate the trace");
    decisions.push_back({d[0].get<int>(), d[1].get<bool>()});
  }
  std::vector<int> stages{0};
  if (config.contains("stages")) stages = config["stages"].get<std::vector<int>>();
  return std::make_shared<ReplayPolicy>(std::move(decisions), whole(config, "num_layers", 0), std::move(stages));
}

// ---------------------------------------------------------------------------------- controller
Controller::Controller(std::shared_ptr<const Policy> policy, int num_layers, int num_probes)
    : policy_(std::move(policy)), num_layers_(num_layers), num_probes_(num_probes) {
  if (!policy_) throw ConfigError("a controller needs a policy; build one with make_policy()");
  if (num_layers < 1) throw ConfigError("num_layers must be an int >= 1 (got " + std::to_string(num_layers) +
                                        "); take it from the model's layer registry");
  if (num_probes < 1) throw ConfigError("num_probes must be an int >= 1 (got " + std::to_string(num_probes) +
                                        "); take it from the model's layer registry");
  reset();
}

void Controller::reset(std::vector<int> stages) {
  if (!ascending_from_zero(stages))
    throw ValueError("stages must be ascending whole steps starting at 0 (got " + list(stages) + ")");
  stages_ = std::move(stages);
  stage_start_ = 0;
  awaiting_observe_ = false;
  mse_.assign(num_layers_, std::nullopt);
  thresholds_.reset();
  steps_.clear();
}

StepPlan Controller::plan(int step) {
  const int expected = static_cast<int>(steps_.size());
  if (step != expected)
    throw StateError("plan(" + std::to_string(step) + ") out of order: expected step " + std::to_string(expected) +
                     "; call reset() before a new generation");
  if (awaiting_observe_)
    throw StateError("step " + std::to_string(steps_.back().plan.step) +
                     " asked for measurement but observe() was not called; pass its mse before planning step " +
                     std::to_string(step));
  const int L = num_layers_, P = num_probes_;
  if (step != 0 && std::find(stages_.begin(), stages_.end(), step) != stages_.end()) {
    stage_start_ = step;  // a new stage: nothing measured or calibrated before it applies
    mse_.assign(L, std::nullopt);
    thresholds_.reset();
  }
  const int local = step - stage_start_;
  Decision d = policy_->decide(local, ControllerState{L, P, mse_, thresholds_, stage_start_});
  if (d.start < 0 || d.start > L || (d.measure && d.start == L))
    throw ValueError("policy '" + policy_->name() + "' decided start=" + std::to_string(d.start) + " at step " +
                      std::to_string(step) + ": decide() must return (0.." + std::to_string(L) +
                      ", bool), measuring only when a layer runs");
  if (local == 0 && (d.start != 0 || d.measure))
    throw ValueError("policy '" + policy_->name() + "' decided start=" + std::to_string(d.start) +
                     " at step " + std::to_string(step) +
                      ", the first of its stage: it must compute every layer and measure nothing, since no output "
                      "of this stage is cached yet");
  StepPlan plan{step, d.start, std::nullopt, d.measure, L};
  if (d.start) plan.source = std::make_pair(d.start - 1, P - 1);  // layer start-1's last probe
  steps_.push_back({plan, std::vector<std::optional<std::vector<double>>>(L), thresholds_});
  awaiting_observe_ = plan.measure;
  return plan;
}

void Controller::observe(const std::vector<std::vector<double>>& rows) {
  if (!awaiting_observe_)
    throw StateError("observe() follows a plan with measure=True, once; this one has nothing to observe");
  Record& record = steps_.back();
  const StepPlan& plan = record.plan;
  const int computed = num_layers_ - plan.start;
  const std::string at = "step " + std::to_string(plan.step);
  if (static_cast<int>(rows.size()) != computed)
    throw ValueError(at + ": got mse for " + std::to_string(rows.size()) + " layers, expected " +
                     std::to_string(computed) + " (layers " + std::to_string(plan.start) + ".." +
                     std::to_string(num_layers_ - 1) + ")");
  for (int i = 0; i < computed; ++i) {
    const int layer = plan.start + i;
    if (static_cast<int>(rows[i].size()) != num_probes_)
      throw ValueError(at + ", layer " + std::to_string(layer) + ": got " + std::to_string(rows[i].size()) +
                       " probe mse values, expected " + std::to_string(num_probes_));
    for (int p = 0; p < num_probes_; ++p) {
      double v = rows[i][p];
      // An Inf would calibrate an infinite threshold: that layer would be reused forever.
      if (!std::isfinite(v) || v < 0)
        throw ValueError(at + ", layer " + std::to_string(layer) + ", probe " + std::to_string(p) +
                         ": mse must be a finite number >= 0 (got " + repr(v) +
                         "); the layer's output or its cache is corrupt");
    }
  }
  for (int i = 0; i < computed; ++i) {
    mse_[plan.start + i] = rows[i];
    record.mse[plan.start + i] = rows[i];
  }
  if (auto gamma = policy_->calibration(plan.step - stage_start_)) {
    if (plan.start != 0)
      throw ValueError("policy '" + policy_->name() + "' calibrates at step " + std::to_string(plan.step) +
                       ", which skipped layers: thresholds need every layer's mse");
    std::vector<std::vector<double>> thr(num_layers_);
    for (int l = 0; l < num_layers_; ++l)
      for (double m : *mse_[l]) thr[l].push_back(*gamma * m);
    thresholds_ = std::move(thr);
  }
  awaiting_observe_ = false;
}

ordered_json Controller::trace() const {
  ordered_json t;
  t["schema"] = kTraceSchema;
  t["policy"] = policy_->name();
  t["config"] = policy_->to_json();
  t["num_layers"] = num_layers_;
  t["num_probes"] = num_probes_;
  if (stages_.size() > 1) t["stages"] = stages_;
  ordered_json steps = ordered_json::array();
  for (const Record& r : steps_) {
    ordered_json s;
    s["step"] = r.plan.step;
    ordered_json computed = ordered_json::array();
    for (int l = r.plan.start; l < num_layers_; ++l) computed.push_back(l);
    s["computed"] = computed;
    s["source"] = r.plan.source ? ordered_json{r.plan.source->first, r.plan.source->second} : ordered_json(nullptr);
    s["measure"] = r.plan.measure;
    ordered_json mse = ordered_json::array();
    for (const auto& row : r.mse) {
      ordered_json out = ordered_json::array();
      for (int p = 0; p < num_probes_; ++p) out.push_back(row ? ordered_json((*row)[p]) : ordered_json(nullptr));
      mse.push_back(out);
    }
    s["mse"] = mse;
    s["thresholds"] = r.thresholds ? ordered_json(*r.thresholds) : ordered_json(nullptr);
    steps.push_back(s);
  }
  t["steps"] = steps;
  return t;
}

Summary Controller::summary() const {
  long calls = 0;
  for (const Record& r : steps_) calls += num_layers_ - r.plan.start;
  const long steps = static_cast<long>(steps_.size());
  return {calls, steps * num_layers_ - calls, steps};
}

}  // namespace foresight

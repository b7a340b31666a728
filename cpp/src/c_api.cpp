// The C ABI over foresight::Controller: every exception stops here and becomes a status code and a
// thread-local message.
#include "foresight/foresight.h"

#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "foresight/controller.hpp"
#include "foresight/tokenizer.hpp"

struct fs_controller {
  foresight::Controller controller;
};

struct fs_tokenizer {
  foresight::Tokenizer tokenizer;
};

namespace {

thread_local std::string last_error;

fs_status fail(fs_status status, const std::string& message) {
  last_error = message;
  return status;
}

template <typename F>
fs_status guarded(F&& body, fs_status tokenizer_status = FS_ERR_CONFIG) {
  try {
    last_error.clear();
    body();
    return FS_OK;
  } catch (const foresight::TokenizerError& e) {
    return fail(tokenizer_status, e.what());
  } catch (const foresight::ConfigError& e) {
    return fail(FS_ERR_CONFIG, e.what());
  } catch (const foresight::StateError& e) {
    return fail(FS_ERR_STATE, e.what());
  } catch (const foresight::ValueError& e) {
    return fail(FS_ERR_VALUE, e.what());
  } catch (const nlohmann::json::exception& e) {
    return fail(FS_ERR_ARGUMENT, std::string("malformed JSON argument: ") + e.what());
  } catch (const std::bad_alloc&) {
    return fail(FS_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return fail(FS_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(FS_ERR_INTERNAL, "internal error: unknown exception");
  }
}

std::vector<int> stage_list(const int* stages, size_t n) {
  if (!stages || n == 0) return {0};
  return std::vector<int>(stages, stages + n);
}

}  // namespace

extern "C" {

int fs_abi_version(void) { return FS_ABI_VERSION; }

const char* fs_last_error(void) { return last_error.c_str(); }

fs_status fs_controller_create(const char* policy_json, int num_layers, int num_probes, fs_controller** out) {
  if (!policy_json || !out) return fail(FS_ERR_ARGUMENT, "fs_controller_create: policy_json and out must not be NULL");
  *out = nullptr;
  return guarded([&] {
    auto policy = foresight::make_policy(nlohmann::json::parse(policy_json));
    *out = new fs_controller{foresight::Controller(policy, num_layers, num_probes)};
  });
}

void fs_controller_destroy(fs_controller* controller) { delete controller; }

fs_status fs_controller_reset(fs_controller* controller, const int* stages, size_t num_stages) {
  if (!controller) return fail(FS_ERR_ARGUMENT, "fs_controller_reset: controller is NULL");
  if (!stages && num_stages) return fail(FS_ERR_ARGUMENT, "fs_controller_reset: stages is NULL but num_stages > 0");
  return guarded([&] { controller->controller.reset(stage_list(stages, num_stages)); });
}

fs_status fs_controller_check_run(fs_controller* controller, int steps, const int* stages, size_t num_stages) {
  if (!controller) return fail(FS_ERR_ARGUMENT, "fs_controller_check_run: controller is NULL");
  return guarded([&] {
    std::vector<int> s = stage_list(stages, num_stages);
    controller->controller.policy().check_run(controller->controller.num_layers(), steps, stages ? &s : nullptr);
  });
}

fs_status fs_controller_plan(fs_controller* controller, int step, fs_plan* out) {
  if (!controller || !out) return fail(FS_ERR_ARGUMENT, "fs_controller_plan: controller and out must not be NULL");
  return guarded([&] {
    foresight::StepPlan p = controller->controller.plan(step);
    *out = fs_plan{p.step, p.start, p.source ? p.source->first : -1, p.source ? p.source->second : -1,
                   p.measure ? 1 : 0, p.num_layers};
  });
}

fs_status fs_controller_observe(fs_controller* controller, const double* mse, size_t rows, size_t probes) {
  if (!controller) return fail(FS_ERR_ARGUMENT, "fs_controller_observe: controller is NULL");
  if (!mse && rows != 0 && probes != 0) return fail(FS_ERR_ARGUMENT, "fs_controller_observe: mse is NULL");
  return guarded([&] {
    std::vector<std::vector<double>> table(rows);
    for (size_t r = 0; r < rows; ++r) table[r].assign(mse + r * probes, mse + (r + 1) * probes);
    controller->controller.observe(table);
  });
}

fs_status fs_controller_trace_json(const fs_controller* controller, char** out) {
  if (!controller || !out) return fail(FS_ERR_ARGUMENT, "fs_controller_trace_json: controller and out must not be NULL");
  *out = nullptr;
  return guarded([&] {
    std::string text = controller->controller.trace().dump();
    char* buffer = static_cast<char*>(std::malloc(text.size() + 1));
    if (!buffer) throw std::bad_alloc();
    std::memcpy(buffer, text.c_str(), text.size() + 1);
    *out = buffer;
  });
}

fs_status fs_controller_summary(const fs_controller* controller, long* layer_calls, long* layer_calls_skipped,
                                long* steps) {
  if (!controller) return fail(FS_ERR_ARGUMENT, "fs_controller_summary: controller is NULL");
  return guarded([&] {
    foresight::Summary s = controller->controller.summary();
    if (layer_calls) *layer_calls = s.layer_calls;
    if (layer_calls_skipped) *layer_calls_skipped = s.layer_calls_skipped;
    if (steps) *steps = s.steps;
  });
}

void fs_free(void* p) { std::free(p); }

fs_status fs_tokenizer_load(const char* path, fs_tokenizer** out) {
  if (!path || !out) return fail(FS_ERR_ARGUMENT, "fs_tokenizer_load: path and out must not be NULL");
  *out = nullptr;
  return guarded([&] { *out = new fs_tokenizer{foresight::Tokenizer::load(path)}; });
}

void fs_tokenizer_destroy(fs_tokenizer* tokenizer) { delete tokenizer; }

fs_status fs_tokenizer_encode(const fs_tokenizer* tokenizer, const char* text, int max_length, long long* ids,
                              long long* mask, int* truncated) {
  if (!tokenizer || !text || !ids || !mask)
    return fail(FS_ERR_ARGUMENT, "fs_tokenizer_encode: tokenizer, text, ids and mask must not be NULL");
  if (max_length < 1) return fail(FS_ERR_VALUE, "fs_tokenizer_encode: max_length must be >= 1");
  return guarded([&] {
    const foresight::Encoding enc = tokenizer->tokenizer.encode(text, max_length);
    std::copy(enc.ids.begin(), enc.ids.end(), ids);
    std::copy(enc.mask.begin(), enc.mask.end(), mask);
    if (truncated) *truncated = enc.truncated ? 1 : 0;
  }, FS_ERR_VALUE);
}

}  // extern "C"

/* libforesight's C ABI: the Foresight controller for hosts in any language.
 *
 * Opaque handles, status codes, no exceptions across the boundary. Every function returns
 * FS_OK or an error code; the message of the last error on the calling thread is
 * fs_last_error() (valid until that thread's next call). A handle is used by one thread at a
 * time; distinct handles are independent.
 *
 *   fs_controller* c;
 *   if (fs_controller_create("{\"policy\": \"foresight\", \"warmup\": 6}", 28, 1, &c) != FS_OK)
 *     fprintf(stderr, "error: %s\n", fs_last_error());
 *   for (int step = 0; step < steps; ++step) {
 *     fs_plan plan;
 *     fs_controller_plan(c, step, &plan);          // run layers plan.start .. num_layers-1
 *     if (plan.measure) fs_controller_observe(c, mse, plan.num_layers - plan.start, 1);
 *   }
 *   char* trace; fs_controller_trace_json(c, &trace); ...; fs_free(trace);
 *   fs_controller_destroy(c);
 *
 * Semantics: docs/foresight-algorithm.md (the same as the Python package `foresight`).
 */
#ifndef FORESIGHT_FORESIGHT_H
#define FORESIGHT_FORESIGHT_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FS_ABI_VERSION 2 /* 2: the tokenizer functions */

#if defined(__GNUC__)
#define FS_API __attribute__((visibility("default")))
#else
#define FS_API
#endif

typedef enum fs_status {
  FS_OK = 0,
  FS_ERR_ARGUMENT = 1, /* a null pointer or a malformed JSON argument */
  FS_ERR_CONFIG = 2,   /* a policy option, or a run the policy cannot follow */
  FS_ERR_STATE = 3,    /* plan/observe called out of order */
  FS_ERR_VALUE = 4,    /* a measurement of the wrong size or not finite and >= 0; bad stages */
  FS_ERR_INTERNAL = 5  /* out of memory or a bug: the message says which */
} fs_status;

typedef struct fs_controller fs_controller;

typedef struct fs_plan {
  int step;
  int start;        /* layers start .. num_layers-1 run */
  int source_layer; /* the cached output feeding layer `start`: (source_layer, source_probe); -1 = the stem's */
  int source_probe;
  int measure;      /* 1: hand the computed layers' mse to fs_controller_observe */
  int num_layers;
} fs_plan;

/* The ABI version this library implements (FS_ABI_VERSION of its header). */
FS_API int fs_abi_version(void);
/* The message of the calling thread's last error ("" if none). */
FS_API const char* fs_last_error(void);

/* policy_json: {"policy": "none" | "static" | "foresight" | "replay", options...}, the Python
 * Policy.to_dict(); options left out keep their defaults. */
FS_API fs_status fs_controller_create(const char* policy_json, int num_layers, int num_probes, fs_controller** out);
FS_API void fs_controller_destroy(fs_controller* controller);
/* A new generation; stages: the steps its stages begin at, ascending from 0 (NULL, 0: one stage). */
FS_API fs_status fs_controller_reset(fs_controller* controller, const int* stages, size_t num_stages);
/* Refuses (FS_ERR_CONFIG) a run of `steps` steps the policy cannot follow (a replayed trace's length). */
FS_API fs_status fs_controller_check_run(fs_controller* controller, int steps, const int* stages, size_t num_stages);
FS_API fs_status fs_controller_plan(fs_controller* controller, int step, fs_plan* out);
/* mse: rows x probes values, row-major, one row per computed layer in order start .. num_layers-1. */
FS_API fs_status fs_controller_observe(fs_controller* controller, const double* mse, size_t rows, size_t probes);
/* The generation's trace (foresight-trace/2) as a JSON string the caller releases with fs_free. */
FS_API fs_status fs_controller_trace_json(const fs_controller* controller, char** out);
FS_API fs_status fs_controller_summary(const fs_controller* controller, long* layer_calls, long* layer_calls_skipped,
                                long* steps);
FS_API void fs_free(void* p);

/* The prompt tokenizer of an engines folder (its tokenizer/tokenizer.json), encoding as the Python
 * runtime does: `tokenizer(text, padding="max_length", truncation=True, max_length=L)`. Reads the
 * shipped word-level tokenizers on ASCII text; other kinds are refused (FS_ERR_CONFIG) naming them. */
typedef struct fs_tokenizer fs_tokenizer;
FS_API fs_status fs_tokenizer_load(const char* path, fs_tokenizer** out);
FS_API void fs_tokenizer_destroy(fs_tokenizer* tokenizer);
/* ids, mask: arrays of max_length values the call fills (padding: the pad id, mask 0); truncated (may
 * be NULL): 1 if the text had more tokens than fit. Non-ASCII text: FS_ERR_VALUE. */
FS_API fs_status fs_tokenizer_encode(const fs_tokenizer* tokenizer, const char* text, int max_length, long long* ids,
                                     long long* mask, int* truncated);

#ifdef __cplusplus
}
#endif

#endif /* FORESIGHT_FORESIGHT_H */

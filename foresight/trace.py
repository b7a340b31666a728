"""The decision trace: every decision of one generation and the numbers behind it, as JSON.

The trace is the oracle for any port of the controller (tests/golden/ replays saved ones),
so its format is written down here, once, and checked on load. Format
``foresight-trace/2``, one step per line::

    {"schema": "foresight-trace/2", "policy": "foresight",
     "config": {"policy": "foresight", "warmup": 8, ...},  # Policy.to_dict(): name and options
     "num_layers": L, "num_probes": P,
     "steps": [
      {"step": 0, "computed": [0, ..., L-1], "source": null, "measure": false, "mse": [...], "thresholds": null},
      ...
     ]}

A run split into stages (a model that switches experts mid-run, ``Controller.reset``) also
has, between ``num_probes`` and ``steps``, ``"stages": [0, s1, ...]``: the steps at which
its stages begin. A trace without it has one stage.

Per step (written in this key order):

* ``step``: 0, 1, ... in order, counted from 0 for every generation;
* ``computed``: the layers run, ascending; always a suffix ``start..L-1``, empty when the
  whole stack is reused;
* ``source``: ``[layer, probe]`` of the cached output fed to the first computed layer (or
  to the head when none runs): always ``[start-1, P-1]``, the last probe of the layer
  before; null when ``start`` is 0 and the stem's output feeds layer 0;
* ``measure``: whether the runtime measured the computed layers and handed their mse back;
* ``mse``: L rows of P numbers, this step's measurement of each probe against its cache;
  a row of P nulls for every layer not measured at this step;
* ``thresholds``: L rows of P numbers in force when the step was planned; null before
  calibration and for policies without thresholds.

Version 2 drops version 1's per-step ``store`` flag: the runtime commits every computed
layer's output as the new cache (it ping-pongs buffers), so the flag described nothing.
"""

from __future__ import annotations

import json

TRACE_SCHEMA = "foresight-trace/2"
HEADER_FIELDS = ("schema", "policy", "config", "num_layers", "num_probes", "steps")
OPTIONAL_FIELDS = ("stages",)
STEP_FIELDS = ("step", "computed", "source", "measure", "mse", "thresholds")


def valid_stages(stages) -> bool:
    """Whether ``stages`` lists the steps a run's stages begin at: whole numbers, ascending without
    repeats, the first 0 (``Controller.reset``, traces and replayed decisions all take this form)."""
    stages = list(stages)
    return bool(stages) and stages[0] == 0 and all(isinstance(s, int) and not isinstance(s, bool) for s in stages) \
        and stages == sorted(set(stages))


def trace_to_json(trace: dict) -> str:
    """One step per line, so golden traces stay readable and diff step by step."""
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in trace.items() if k != "steps")
    steps = ",\n  ".join(json.dumps(s, allow_nan=False) for s in trace["steps"])
    return "{" + head + ',\n "steps": [\n  ' + steps + "\n]}\n"


def load_trace(text: str) -> dict:
    """Parse a saved trace, refusing one of another schema version or with other fields."""
    trace = json.loads(text)
    schema = trace.get("schema") if isinstance(trace, dict) else None
    if schema != TRACE_SCHEMA:
        raise ValueError(f"not a {TRACE_SCHEMA} trace (schema {schema!r}); "
                         "regenerate it with this version of foresight")
    if sorted(set(trace) - set(OPTIONAL_FIELDS)) != sorted(HEADER_FIELDS):
        raise ValueError(f"{TRACE_SCHEMA} trace has fields {sorted(trace)}, expected {sorted(HEADER_FIELDS)} "
                         f"(and optionally {', '.join(OPTIONAL_FIELDS)}); regenerate it with this version of foresight")
    stages = trace.get("stages", [0])
    if not isinstance(stages, list) or not valid_stages(stages):
        raise ValueError(f"{TRACE_SCHEMA} trace: stages {stages!r} is not a list of ascending steps from 0; "
                         "regenerate it with this version of foresight")
    steps = trace["steps"]
    for t, step in enumerate(steps if isinstance(steps, list) else [None]):
        if not isinstance(step, dict) or sorted(step) != sorted(STEP_FIELDS) or step["step"] != t:
            raise ValueError(f"{TRACE_SCHEMA} trace: steps[{t}] is not step {t} with fields {', '.join(STEP_FIELDS)}; "
                             "regenerate it with this version of foresight")
    return trace

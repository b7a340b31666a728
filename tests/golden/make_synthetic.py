"""Write the synthetic golden traces: ``python -m tests.golden.make_synthetic``.

For each shipped tiny model and each policy, a fresh controller is fed a synthetic mse and
its trace is written to ``tests/golden/synthetic-<model>-<policy>.json``. The shapes are
the presets': layers from ``exporter/presets/<model>-tiny/transformer/config.json``, probes
2 for the spatial+temporal models, 1 for CogVideoX, the paper's 50/50/30 steps; Foresight
runs at the preset's ``defaults.json`` values, the other policies at their defaults. One more,
``synthetic-latte-foresight-reference.json``, runs Foresight on Latte's shape at the reference
implementation's evaluation settings (``REFERENCE``: a small threshold, so free steps that recompute
everything appear too, whatever thresholds the presets' sweeps pick).

The mse of layer l, probe p at step t of T (values drawn in (t, l, p) order, seed 0)::

    mse = (l + 1) * (p + 1) / 1000 * (1 + 4 * l * t / T) / (1 - 0.97 * u),  u = random.Random(0).random()

Deeper layers drift further from their calibrated change as the run goes on, so suffixes of
every length run, and the jitter 1 / (1 - 0.97u), in [1, 33), puts in occasional spikes
that force recomputes. Only + * / are used, which IEEE 754 rounds exactly, so the values are
the same bits on every platform. The mse table does not depend on the decisions; a step
feeds the controller the rows of the layers it computed.
"""

from __future__ import annotations

import json
import pathlib
import random

from foresight import make_controller, trace_to_json

# The policies that decide from what they measure (replay only follows a trace, e.g. these).
DECIDING = ("none", "static", "foresight")

GOLDEN = pathlib.Path(__file__).resolve().parent
PRESETS = GOLDEN.parents[1] / "exporter" / "presets"
# model: (preset folder, config key holding the layer count, probes per layer, steps)
MODELS = {
    "latte": ("latte-tiny", "num_layers", 2, 50),
    "cogvideox": ("cogvideox-tiny", "num_layers", 1, 50),
    "opensora": ("opensora-tiny", "depth", 2, 30),
}
SEED = 0
REFERENCE = {"warmup": 8, "recalculate": 2, "threshold": 0.5}  # the paper's code, its evaluation scripts


def synthetic_mse(steps: int, num_layers: int, num_probes: int, seed: int = SEED) -> list[list[list[float]]]:
    """The mse table [step][layer][probe] described in the module docstring."""
    rng = random.Random(seed)
    return [[[(l + 1) * (p + 1) / 1000 * (1 + 4 * l * t / steps) / (1 - 0.97 * rng.random())
              for p in range(num_probes)] for l in range(num_layers)] for t in range(steps)]


def record(policy: str, num_layers: int, num_probes: int, mse: list, **options) -> dict:
    """The trace of one generation whose measurements are `mse` (one table row per step)."""
    ctrl = make_controller(policy, num_layers, num_probes, **options)
    for t, table in enumerate(mse):
        plan = ctrl.plan(t)
        if plan.measure:
            ctrl.observe(table[plan.start:])
    return ctrl.trace


def traces() -> dict[str, str]:
    """File name -> text of every synthetic golden trace."""
    out = {}
    for model, (preset, layers_key, num_probes, steps) in MODELS.items():
        num_layers = json.loads((PRESETS / preset / "transformer" / "config.json").read_text())[layers_key]
        defaults = PRESETS / preset / "defaults.json"
        foresight = json.loads(defaults.read_text()).get("foresight", {}) if defaults.exists() else {}
        mse = synthetic_mse(steps, num_layers, num_probes)
        for policy in DECIDING:
            options = foresight if policy == "foresight" else {}
            trace = record(policy, num_layers, num_probes, mse, **options)
            out[f"synthetic-{model}-{policy}.json"] = trace_to_json(trace)
        if model == "latte":
            trace = record("foresight", num_layers, num_probes, mse, **REFERENCE)
            out["synthetic-latte-foresight-reference.json"] = trace_to_json(trace)
    return out


def main() -> None:
    for name, text in traces().items():
        (GOLDEN / name).write_text(text)
        print(f"wrote tests/golden/{name}")


if __name__ == "__main__":
    main()

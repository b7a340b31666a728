"""Record the real-run golden traces ``<model>-<policy>.json`` from exported engines folders.

    foresight-export --model latte --preset tiny --out /tmp/g/latte
    python -m tests.golden.record --engines /tmp/g/latte --model latte

Each trace is one generation on the torch (reference) backend on CPU with the settings in
``SETTINGS`` below; ``tests/runtime/test_golden_runs.py`` reruns them and requires the same
decisions, and ``tests/foresight/test_golden.py`` replays their mse through the controller.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from foresight import trace_to_json

HERE = Path(__file__).resolve().parent
PROMPT = "a red square moving left on a gray background"
STEPS = 12
# Per policy: options on top of the engines' defaults, chosen so that every kind of step
# (full, partial suffix, whole stack reused) appears within STEPS.
POLICIES = {"none": {}, "static": {"warmup": 3, "reuse": 1, "period": 2},
            "foresight": {"warmup": 4, "recalculate": 3}}
SETTINGS = dict(num_inference_steps=STEPS, seed=0, decode=False)


def record(engines: Path, policy: str):
    from runtime import Runtime

    rt = Runtime.load(engines, backend="torch", device="cpu")
    return rt.generate(PROMPT, policy=policy, **POLICIES[policy], **SETTINGS).trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    for policy in POLICIES:
        path = HERE / f"{args.model}-{policy}.json"
        path.write_text(trace_to_json(record(args.engines, policy)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

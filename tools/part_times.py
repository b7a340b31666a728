"""Per-part milliseconds of each backend on one engines folder, interleaved in one process.

    python -m tools.part_times --engines engines/latte-tiny-aoti --backends onnxruntime,torch,aoti

Every part (stem, each layer, head) runs on random inputs at the manifest's opt shape with the CFG
batch; each round calls every backend once per part in turn, so load drift spreads over all of
them. Reported: the median over rounds of the stem, the mean layer and the head, per backend, and
the bytes each backend copied per call (results it returned itself and copied into the buffers).
The layer column says where a denoising step's time goes: ``layers x mean layer`` is most of it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tools import common

log = common.logger("part_times")


def main(argv=None) -> dict:
    import torch

    from runtime.backends import make_backend
    from runtime.manifest import load_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, required=True)
    ap.add_argument("--backends", default="onnxruntime,torch,aoti")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    manifest = load_manifest(args.engines)
    backends = {name: make_backend(name, manifest, "cpu") for name in args.backends.split(",")}
    dims = manifest.dims.bind(**{s: r.opt for s, r in manifest.dims.ranges.items()})
    g = torch.Generator().manual_seed(0)
    inputs = {p.name: {io.name: torch.randn(io.shape_at(dims), generator=g).to(getattr(torch, io.dtype))
                       for io in p.inputs} for p in manifest.all_parts}
    for p in manifest.all_parts:
        if "timestep" in inputs[p.name]:
            inputs[p.name]["timestep"].uniform_(0, 999)
    outputs = {p.name: {io.name: torch.empty(io.shape_at(dims), dtype=getattr(torch, io.dtype)) for io in p.outputs}
               for p in manifest.all_parts}
    samples = {b: {p.name: [] for p in manifest.all_parts} for b in backends}
    for engine in backends.values():  # warm-up
        for p in manifest.all_parts:
            engine.run(p.name, inputs[p.name], outputs[p.name])
    copied = {b: e.bytes_copied for b, e in backends.items()}
    threads = torch.get_num_threads()
    for _ in range(args.rounds):
        for p in manifest.all_parts:
            for b, engine in backends.items():
                with engine.denoise_context():  # the thread setting each backend runs the loop with
                    t = time.perf_counter()
                    engine.run(p.name, inputs[p.name], outputs[p.name])
                    samples[b][p.name].append(1e3 * (time.perf_counter() - t))
    assert torch.get_num_threads() == threads
    calls = args.rounds * len(manifest.all_parts)
    report = {"engines": str(args.engines), "dims": dict(dims), "rounds": args.rounds, "backends": {}}
    rows = []
    for b in backends:
        med = {p: statistics.median(v) for p, v in samples[b].items()}
        layer = statistics.mean(med[p.name] for p in manifest.layers)
        per_call = (backends[b].bytes_copied - copied[b]) / calls
        step = med["stem"] + layer * manifest.num_layers + med["head"]
        report["backends"][b] = {"part_ms": med, "layer_ms": layer, "step_ms_all_layers": step,
                                 "bytes_copied_per_call": per_call}
        rows.append([b, f"{med['stem']:.2f}", f"{layer:.2f}", f"{med['head']:.2f}", f"{step:.2f}",
                     f"{per_call / 1024:.0f}"])
    table = common.markdown_table(["backend", "stem ms", "layer ms (mean)", "head ms", "stem + L layers + head ms",
                                   "KiB copied per call"], rows)
    print(f"{manifest.name}: {manifest.num_layers} layers at {dict(dims)}, median of {args.rounds} rounds\n")
    print(table)
    report["table"] = table
    if args.json:
        common.write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()

"""Export time against the number of layers: ONNX (one file per part) and AOTInductor (shared programs).

    python -m tools.export_time --layers 6,28 --json /tmp/export_time.json

The shipped tiny Latte's configuration with ``num_layers`` set to each value and random weights:
every part exported to ONNX and validated (as ``foresight-export`` does), then every part
compiled with AOTInductor for the CPU and validated (as ``--backend aoti`` does). Inductor's
on-disk caches are off, so the larger model cannot profit from the smaller one's compiles: what
is measured is what a first export costs. Reported per layer count: seconds for ONNX, for
AOTInductor (and how many programs it compiled), and the AOTInductor seconds per layer.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # before torch is imported

from tools import common  # noqa: E402

log = common.logger("export_time")


def model_with(num_layers: int, seed: int = 0):
    import torch
    from diffusers import LatteTransformer3DModel

    from exporter.families import get_family

    preset = Path(get_family("latte").presets["tiny"]) / "transformer"
    config = dict(LatteTransformer3DModel.load_config(str(preset)))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["num_layers"] = num_layers
    torch.manual_seed(seed)
    return LatteTransformer3DModel(**config).eval()


def measure(num_layers: int, folder: Path) -> dict:
    import torch

    from exporter import aoti_build
    from exporter.export import export_part, validate_part
    from exporter.families import get_family

    family = get_family("latte")
    model = model_with(num_layers)
    parts = family.parts(model)
    dims = family.dims(model, 8)
    generator = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for part in parts:
        file = folder / f"{part.name}.onnx"
        export_part(part, dims, file, generator)
        validate_part(part, file, dims, generator)
    onnx_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    section = aoti_build.build(folder, parts, dims, "cpu", "float32", generator=generator, progress=False)
    aoti_seconds = time.perf_counter() - t0
    compiled = [p for p in section["programs"].values() if p["built"] == "compiled"]
    return {"layers": num_layers, "parts": len(parts), "onnx_seconds": onnx_seconds, "aoti_seconds": aoti_seconds,
            "aoti_programs": len(compiled), "aoti_compile_seconds": sum(p["seconds"] for p in compiled),
            "aoti_seconds_per_layer": aoti_seconds / num_layers}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="6,28", help="comma-separated layer counts (default 6,28)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows")
    args = ap.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            log(f"exporting a {n}-layer Latte ...")
            rows.append(measure(n, Path(tmp)))
            log(f"{rows[-1]}")
    table = common.markdown_table(
        ["layers", "parts", "ONNX s", "AOTI s", "AOTI programs compiled", "AOTI compile s", "AOTI s/layer"],
        [[str(r["layers"]), str(r["parts"]), f"{r['onnx_seconds']:.1f}", f"{r['aoti_seconds']:.1f}", str(r["aoti_programs"]),
          f"{r['aoti_compile_seconds']:.1f}", f"{r['aoti_seconds_per_layer']:.2f}"] for r in rows])
    print(table)
    if args.json:
        common.write_report({"rows": rows, "table": table}, args.json)
    return rows


if __name__ == "__main__":
    main()

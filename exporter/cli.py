"""``foresight-export``: build an engines folder from a model checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import ForesightError

from .families import families


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="foresight-export",
        description="Split a text-to-video DiT into stem, layers and head, export each to ONNX, "
        "validate it against PyTorch and write an engines folder with a manifest.",
    )
    ap.add_argument("--model", required=True, help=f"model family: {', '.join(families())}")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="diffusers-format checkpoint folder (or hub id when the hub is reachable)")
    src.add_argument("--preset", help="a small checkpoint shipped with the package, e.g. 'tiny'")
    ap.add_argument("--out", type=Path, help="engines folder to write (default engines/<model>-<preset or folder name>)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an engines folder (anything else is refused)")
    ap.add_argument("--link-components", action="store_true",
                    help="hard-link component files (text encoder, VAE, ...) from a checkpoint folder instead of "
                         "copying them: saves disk, but editing one then edits the other")
    ap.add_argument("--max-scale", type=int, default=2,
                    help="largest supported resolution as a multiple of the model's training size (default 2)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="weights and activations of the exported parts (timesteps stay fp32); bfloat16 files are "
                         "validated on ONNX's reference implementation (ONNX Runtime has no CPU bf16 kernels) and "
                         "run on the torch, aoti and tensorrt backends")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max relative error ONNX vs PyTorch in the same dtype (default fp32 1e-4, fp16 1e-2, bf16 4e-2)")
    ap.add_argument("--backend", choices=["onnxruntime", "aoti", "tensorrt"], default="onnxruntime",
                    help="onnxruntime runs the ONNX files directly; aoti also compiles every part with AOTInductor "
                         "for --device (layers built alike share one program; unchanged programs of an existing "
                         "--out are reused); tensorrt also builds one engine per file (needs tensorrt and an NVIDIA "
                         "GPU; an existing --out is updated, unchanged engines reused)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="with --backend aoti: the device the packages are compiled for and run on (default cpu)")
    ap.add_argument("--workspace", type=int, default=None, help="TensorRT workspace limit in MiB")
    ap.add_argument("--validate", action="store_true",
                    help="with --backend tensorrt: compare every engine with ONNX Runtime (Polygraphy) and print "
                         "a per-layer error table")
    return ap


def main(argv: list[str] | None = None) -> int:
    from runtime.outputs import terminate_as_interrupt

    args = build_parser().parse_args(argv)
    with terminate_as_interrupt():  # SIGTERM cleans up the temporary folder like Ctrl-C does
        return _main(args)


def _main(args) -> int:
    from .export import ExportOptions, export

    out = args.out
    if out is None:
        tag = args.preset or Path(args.model_path.rstrip("/")).name
        out = Path("engines") / f"{args.model}-{tag}"
    try:
        if args.device != "cpu" and args.backend != "aoti":
            raise ForesightError("--device applies to --backend aoti (TensorRT engines are always built for the GPU)")
        if args.backend == "tensorrt":
            from .tensorrt_build import require_tensorrt

            require_tensorrt()  # say what to install before spending minutes on ONNX export
        folder = export(ExportOptions(model=args.model, out=out, model_path=args.model_path, preset=args.preset,
                                      overwrite=args.overwrite, tolerance=args.tolerance, max_scale=args.max_scale,
                                      link_components=args.link_components, dtype=args.dtype,
                                      backend="aoti" if args.backend == "aoti" else "onnxruntime",
                                      device=args.device))
        if args.backend == "tensorrt":
            from .tensorrt_build import build_engines

            build_engines(folder, workspace=args.workspace and args.workspace << 20)
            if args.validate:
                from .tensorrt_build import validate_engines

                if not all(row["passed"] for row in validate_engines(folder)):
                    raise ForesightError(f"some TensorRT engines in {folder} disagree with ONNX Runtime (table above)")
    except ForesightError as exc:
        print(f"foresight-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("foresight-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {folder}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check: a Latte-sized model through the runtime's torch CUDA backend, side by side with
diffusers eager on the same GPU. One script, one process, results under ``--out``.

    python -m tools.gpu_check --out "$OUT"                       # H100/H200: < 8 minutes
    python -m tools.gpu_check --out /tmp/gc --size tiny --device cpu --steps 3   # CPU smoke run

The model has Latte-1's transformer configuration (hidden 1152 = 16 heads x 72, 28 layers,
patch 2, 16 frames) with random weights, a one-layer T5 with Latte-1's 4096-wide caption
embeddings, a tiny 8x VAE and Latte-1's DDIM scheduler; 256x256 pixels (latent 32x32), bf16.
Nothing is downloaded or written besides the results: the engines folder is described in
memory (the same manifest an export would write, without files) and the torch backend runs
the exporter's own part modules.

Reported: per-part time (CUDA events, mean over the timed steps), step time, the runtime's
overhead over diffusers' transformer call per step, denoising seconds and speedup for
none / static / foresight (manifest defaults and a looser threshold), the effect of CUDA
graphs, peak memory of each configuration; ``gpu_check.json`` and ``gpu_check.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tools import common
from tools.harness import DEFAULT_PROMPT, DiffusersRunner, PeakMemory, Stopwatch

SIZES = {
    # Latte-1 (maxin-cn/Latte-1 transformer/config.json), 256x256: latent 32x32.
    "latte": dict(heads=16, head_dim=72, layers=28, sample_size=32, patch=2, frames=16, caption=4096, vae_levels=4),
    "tiny": dict(heads=2, head_dim=16, layers=3, sample_size=8, patch=2, frames=4, caption=64, vae_levels=2),
}


def build(size: dict, device, dtype, seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, LatteTransformer3DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = LatteTransformer3DModel(
            num_attention_heads=size["heads"], attention_head_dim=size["head_dim"], in_channels=4, out_channels=8,
            num_layers=size["layers"], cross_attention_dim=size["heads"] * size["head_dim"], attention_bias=True,
            sample_size=size["sample_size"], patch_size=size["patch"], activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            caption_channels=size["caption"], video_length=size["frames"],
        ).to(dtype).eval()
        text_encoder = T5EncoderModel(T5Config(vocab_size=384, d_model=size["caption"], d_kv=64, d_ff=256,
                                               num_layers=1, num_heads=1, is_encoder_decoder=False)).to(dtype).eval()
        levels = size["vae_levels"]
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(16,) * levels,
                            layers_per_block=1, latent_channels=4, norm_num_groups=8).to(dtype).eval()
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    return {"transformer": transformer, "text_encoder": text_encoder, "tokenizer": ByT5Tokenizer(), "vae": vae,
            "scheduler": scheduler}


def in_memory_runtime(components: dict, device, dtype, cuda_graphs: bool = False, backend: str = "torch",
                      aoti_dir: Path | None = None):
    """The runtime over an engines description held in memory (no ONNX files). ``backend="aoti"``
    compiles every part with AOTInductor into ``aoti_dir`` first (or reuses the programs already
    there with unchanged keys), as ``foresight-export --backend aoti`` would."""
    from exporter.export import describe
    from exporter.families import get_family
    from exporter.inputs import cast_specs
    from dit.latte import part_modules
    from runtime.backends import make_backend
    from runtime.engine import Runtime
    from runtime.manifest import describe_in_memory, sha256_file
    from runtime.pipelines import make_pipeline

    family = get_family("latte")
    model = components["transformer"]
    parts = family.parts(model)
    name = str(dtype).removeprefix("torch.")
    cast_specs(parts, name)
    entries = [{"name": p.name, "file": f"{p.name}.onnx", "inputs": [s.to_dict() for s in p.inputs],
                "outputs": [s.to_dict() for s in p.outputs]} for p in parts]  # files never read
    vae_config = dict(components["vae"].config)
    dims = family.dims(model, 2 ** (len(vae_config["block_out_channels"]) - 1))
    description = describe(family, model, vae_config, dims, entries, name="in-memory", source="in-memory")
    description["pipeline"]["max_steps"] = int(components["scheduler"].config.num_train_timesteps)
    description["dtype"] = name  # the parts' I/O in the run's dtype, as an export with --dtype writes it
    for spec in description["flow"].get("pipeline_inputs", []):
        spec["dtype"] = name
    if backend == "aoti":
        from exporter import aoti_build

        aoti_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        section = aoti_build.build(aoti_dir, parts, dims, device, name, previous=aoti_dir, progress=False)
        section["wall_seconds"] = time.perf_counter() - t0
        # What a later build reads to reuse these programs (exporter/aoti_build.previous_programs).
        files = [e["file"] for e in section["programs"].values()]
        (aoti_dir / "manifest.json").write_text(json.dumps({"aoti": section, "files": {
            f: {"sha256": sha256_file(aoti_dir / f)} for f in files}}))
        description["aoti"] = section
        manifest = describe_in_memory(description, root=aoti_dir)
        engine = make_backend("aoti", manifest, device, cuda_graphs=cuda_graphs)
    else:
        manifest = describe_in_memory(description)
        engine = make_backend("torch", manifest, device, modules=part_modules(model), dtype=dtype,
                              cuda_graphs=cuda_graphs)
    return Runtime(manifest, engine, make_pipeline(manifest, torch.device(device), components), torch.device(device))


def stretched_replay(stats_file: Path, num_layers: int, steps: int):
    """The decisions of a ``foresight-run --stats`` file of a smaller trained model, stretched to
    ``num_layers``: a step that started computing at layer s of L starts at round(s * num_layers / L)
    (all-reuse and all-compute steps stay so). The step count must be the run's."""
    from foresight import ReplayPolicy
    from runtime.cli import replay_policy

    source = replay_policy(stats_file)
    if len(source.decisions) != steps:
        raise SystemExit(f"--replay {stats_file} has {len(source.decisions)} steps; pass --steps {len(source.decisions)}")
    L = source.num_layers
    return ReplayPolicy(tuple((round(s * num_layers / L), m) for s, m in source.decisions), num_layers)


class PartTimer:
    """Times every backend call (CUDA events on GPU, perf_counter on CPU)."""

    def __init__(self, backend, device):
        self.backend, self.cuda = backend, torch.device(device).type == "cuda"
        self.samples: dict[str, list[float]] = {}
        self._orig = backend.run

    def __enter__(self):
        def run(part, inputs, outputs):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                self._orig(part, inputs, outputs)
                b.record()
                b.synchronize()
                ms = a.elapsed_time(b)
            else:
                t = time.perf_counter()
                self._orig(part, inputs, outputs)
                ms = (time.perf_counter() - t) * 1e3
            self.samples.setdefault(part, []).append(ms)

        self.backend.run = run
        return self

    def __exit__(self, *exc):
        del self.backend.run


def diffusers_denoise(components, device, steps, frames, height, width, seed, transformer=None):
    """Seconds of LattePipeline's denoising loop (the harness's window), the mean of its transformer calls,
    and its final latents. ``transformer``: another transformer to call (the torch.compile'd one)."""
    from diffusers import LattePipeline

    parts = {k: components[k] for k in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
    if transformer is not None:
        parts["transformer"] = transformer
    pipe = LattePipeline(**parts)
    runner = DiffusersRunner(pipe, dict(video_length=frames, height=height, width=width, clean_caption=False), device)
    calls = Stopwatch(device)
    forward = pipe.transformer.forward

    def timed_forward(*a, **k):
        with calls.window():
            return forward(*a, **k)

    own = "forward" in vars(pipe.transformer)  # torch.compile's OptimizedModule sets forward on the instance
    pipe.transformer.forward = timed_forward
    try:
        out = runner(DEFAULT_PROMPT, seed, steps, decode=False)
    finally:
        if own:
            pipe.transformer.forward = forward
        else:
            del pipe.transformer.forward
    return out.seconds, statistics.mean(calls.seconds), out.latents


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="latte")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default="torch,aoti", help="runtime backends to compare (torch, aoti)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time diffusers with torch.compile on its transformer (default on)")
    ap.add_argument("--replay", type=Path, default=None,
                    help="a foresight-run --stats file of the trained preset at --steps steps: its Foresight decisions "
                         "are replayed, stretched to this model's layers")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = args.device, getattr(torch, args.dtype)
    size = SIZES[args.size]
    px = size["sample_size"] * 2 ** (size["vae_levels"] - 1)
    t0 = time.perf_counter()
    components = build(size, device, dtype, args.seed)
    rt = in_memory_runtime(components, device, dtype)
    cuda = torch.device(device).type == "cuda"
    rt_graphs = in_memory_runtime(components, device, dtype, cuda_graphs=True) if cuda else None
    backends = args.backends.split(",")
    compile_seconds = {}
    aoti_error = None
    if "aoti" in backends:
        from runtime.errors import ForesightError

        aoti_dir = args.out / "aoti-programs"
        try:
            rt_aoti = in_memory_runtime(components, device, dtype, backend="aoti", aoti_dir=aoti_dir)
            compile_seconds["aoti"] = rt_aoti.manifest.aoti["wall_seconds"]
            rt_aoti_graphs = in_memory_runtime(components, device, dtype, cuda_graphs=True, backend="aoti",
                                               aoti_dir=aoti_dir) if cuda else None
        except ForesightError as exc:  # reported, and the other configurations still run
            aoti_error = str(exc)
            print(f"aoti: {exc}")
            backends.remove("aoti")
    compiled = None
    if args.compile:
        compiled = torch.compile(components["transformer"], fullgraph=True)
    gen = dict(num_frames=size["frames"], height=px, width=px, num_inference_steps=args.steps, seed=args.seed,
               decode=False)
    configs = {
        "none": (rt, dict(policy="none")),
        "static": (rt, dict(policy="static")),
        "foresight": (rt, dict(policy="foresight")),
        "foresight-loose": (rt, dict(policy="foresight", threshold=4.0)),
    }
    if rt_graphs is not None:
        configs["none+cudagraphs"] = (rt_graphs, dict(policy="none"))
        configs["foresight+cudagraphs"] = (rt_graphs, dict(policy="foresight"))
    replay = stretched_replay(args.replay, size["layers"], args.steps) if args.replay else None
    if replay is not None:
        configs["replay"] = (rt, dict(policy=replay))
        if rt_graphs is not None:
            configs["replay+cudagraphs"] = (rt_graphs, dict(policy=replay))
    if "aoti" in backends:
        configs["aoti none"] = (rt_aoti, dict(policy="none"))
        configs["aoti foresight"] = (rt_aoti, dict(policy="foresight"))
        if replay is not None:
            configs["aoti replay"] = (rt_aoti, dict(policy=replay))
        if rt_aoti_graphs is not None:
            configs["aoti none+cudagraphs"] = (rt_aoti_graphs, dict(policy="none"))
            if replay is not None:
                configs["aoti replay+cudagraphs"] = (rt_aoti_graphs, dict(policy=replay))
    baselines = ["diffusers"] + (["diffusers+compile"] if compiled is not None else [])
    samples = {name: [] for name in [*baselines, *configs]}
    memory, skipped, transformer_call = {}, {}, []
    peak = PeakMemory(device)

    def peak_gib() -> float | None:  # on CPU memory is left out: every run shares the one process's RSS
        return peak.mib / 1024 if cuda else None

    for name, (runtime, kw) in configs.items():  # warm-up (and CUDA graph capture)
        runtime.generate(DEFAULT_PROMPT, **gen, **kw)
    diffusers_denoise(components, device, 2, size["frames"], px, px, args.seed)
    if compiled is not None:  # the first call compiles
        t_compile = time.perf_counter()
        diffusers_denoise(components, device, 2, size["frames"], px, px, args.seed, transformer=compiled)
        compile_seconds["diffusers+compile"] = time.perf_counter() - t_compile
    latents = {}
    for _ in range(args.repeats):  # interleaved rounds
        with peak:
            seconds, per_call, latents["diffusers"] = diffusers_denoise(components, device, args.steps,
                                                                        size["frames"], px, px, args.seed)
        samples["diffusers"].append(seconds)
        transformer_call.append(per_call)
        memory["diffusers"] = peak_gib()
        if compiled is not None:
            with peak:
                seconds, _, latents["diffusers+compile"] = diffusers_denoise(
                    components, device, args.steps, size["frames"], px, px, args.seed, transformer=compiled)
            samples["diffusers+compile"].append(seconds)
            memory["diffusers+compile"] = peak_gib()
        for name, (runtime, kw) in configs.items():
            with peak:
                r = runtime.generate(DEFAULT_PROMPT, **gen, **kw)
            samples[name].append(r.stats["denoise_seconds"])
            latents[name] = r.latents
            skipped[name] = r.stats["skipped_share"]
            memory[name] = peak_gib()
    with PartTimer(rt.backend, device) as timer:
        rt.generate(DEFAULT_PROMPT, **gen, policy="none")
    part_ms = {part: statistics.mean(v) for part, v in timer.samples.items()}
    aoti_part_ms = {}
    if "aoti" in backends:
        with PartTimer(rt_aoti.backend, device) as timer:
            rt_aoti.generate(DEFAULT_PROMPT, **gen, policy="none")
        aoti_part_ms = {part: statistics.mean(v) for part, v in timer.samples.items()}
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["diffusers"]
    step_ms = {k: 1e3 * v / args.steps for k, v in med.items()}
    def rel(a: str, b: str) -> float | None:
        if a not in latents or b not in latents:
            return None
        x, y = latents[a].float(), latents[b].float()
        return float((x - y).abs().max() / y.abs().max())

    # Agreement of final latents: the runtime's full compute vs diffusers (same seed, same dtype), and
    # CUDA graph replay (with ping-pong buffers) vs eager on the runtime.
    agreement = {"none_vs_diffusers": rel("none", "diffusers"),
                 "none+cudagraphs_vs_none": rel("none+cudagraphs", "none"),
                 "foresight+cudagraphs_vs_foresight": rel("foresight+cudagraphs", "foresight"),
                 "foresight_vs_none": rel("foresight", "none"),
                 "aoti_none_vs_none": rel("aoti none", "none"),
                 "diffusers+compile_vs_diffusers": rel("diffusers+compile", "diffusers")}
    # One denoising step in the run's dtype: one forward's worth of rounding, before a random-weight
    # model's 20 steps amplify it (its latents grow to hundreds), and the whole run in float32.
    _, _, latents["diffusers_1_step"] = diffusers_denoise(components, device, 1, size["frames"], px, px, args.seed)
    latents["none_1_step"] = rt.generate(DEFAULT_PROMPT, **{**gen, "num_inference_steps": 1}, policy="none").latents
    agreement["none_vs_diffusers_1_step"] = rel("none_1_step", "diffusers_1_step")
    if dtype != torch.float32:
        del rt_graphs, configs
        components = build(size, device, torch.float32, args.seed)  # same seed: the same weights, in fp32
        rt32 = in_memory_runtime(components, device, torch.float32)
        _, _, latents["diffusers_float32"] = diffusers_denoise(components, device, args.steps, size["frames"], px,
                                                               px, args.seed)
        latents["none_float32"] = rt32.generate(DEFAULT_PROMPT, **gen, policy="none").latents
        agreement["none_vs_diffusers_float32"] = rel("none_float32", "diffusers_float32")
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "size": args.size, "config": size,
        "frames": size["frames"], "height": px, "width": px, "steps": args.steps, "repeats": args.repeats,
        "denoise_seconds_median": med, "samples": samples, "speedup_vs_diffusers": {k: base / v for k, v in med.items()},
        "step_ms": step_ms, "skipped_share": skipped, "peak_memory_gib": memory,
        "diffusers_transformer_call_ms": 1e3 * statistics.median(transformer_call),
        "runtime_overhead_ms_per_step": step_ms["none"] - 1e3 * statistics.median(transformer_call),
        "part_ms": part_ms, "aoti_part_ms": aoti_part_ms, "aoti_error": aoti_error, "compile_seconds": compile_seconds,
        "latents_rel_err": agreement,
        "diffusers_latents_max_abs": float(latents["diffusers"].float().abs().max()),
        "layer_ms_mean": statistics.mean(v for k, v in part_ms.items() if k.startswith("layer")),
        "cuda_graphs_speedup": (med["none"] / med["none+cudagraphs"]) if "none+cudagraphs" in med else None,
        "seconds": time.perf_counter() - t0,
    }
    lines = [f"GPU check on {report['device']}: Latte-{args.size} {size['layers']} layers, {size['frames']} frames "
             f"{px}x{px}, {args.dtype}, {args.steps} steps, median of {args.repeats}", "",
             common.markdown_table(
                 ["config", "denoise s", "ms/step", "speedup vs diffusers", "layers skipped", "peak GiB"],
                 [[k, f"{med[k]:.3f}", f"{step_ms[k]:.1f}", f"{base / med[k]:.2f}x", f"{100 * skipped.get(k, 0):.1f}%",
                   common.fmt(memory.get(k), ".2f")] for k in samples])]
    lines += ["", f"diffusers transformer call: {report['diffusers_transformer_call_ms']:.1f} ms/step; "
                  f"runtime overhead: {report['runtime_overhead_ms_per_step']:.1f} ms/step; "
                  f"mean layer: {report['layer_ms_mean']:.2f} ms; stem {part_ms['stem']:.2f} ms, "
                  f"head {part_ms['head']:.2f} ms"]
    lines.append("final latents, max abs diff / max abs: " + ", ".join(
        f"{k} {v:.2e}" for k, v in agreement.items() if v is not None))
    if aoti_part_ms:
        lines.append(f"aoti: mean layer {statistics.mean(v for k, v in aoti_part_ms.items() if k.startswith('layer')):.2f} "
                     f"ms, stem {aoti_part_ms['stem']:.2f} ms, head {aoti_part_ms['head']:.2f} ms")
    if "diffusers+compile" in med:
        lines.append(f"aoti none vs diffusers+compile: {med['diffusers+compile'] / med['aoti none']:.2f}x"
                     if "aoti none" in med else "")
    lines.append("compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in compile_seconds.items()))
    if report["cuda_graphs_speedup"]:
        lines.append(f"CUDA graphs: {report['cuda_graphs_speedup']:.2f}x on none")
    text = "\n".join(lines)
    print(text)
    (args.out / "gpu_check.md").write_text(text + "\n")
    common.write_json(report, args.out / "gpu_check.json")
    return report


if __name__ == "__main__":
    main()

"""The runtime on a CUDA GPU (torch backend): same results as on the CPU, CUDA graphs replaying
with ping-pong buffers, one device-to-host transfer per step. Skipped without a GPU; run on the
lent GPU machine by ``tools/gpu_checks.sh``."""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU (runs on a GPU machine: tools/gpu_checks.sh)")

PROMPT = "a red square moving left on a black background"
KW = dict(num_inference_steps=12, seed=0, decode=False)


@pytest.fixture(scope="module")
def rt_cuda(engines_dir):
    from runtime import Runtime

    return Runtime.load(engines_dir, backend="torch", device="cuda")


@pytest.fixture(scope="module")
def rt_graphs(engines_dir):
    from runtime import Runtime

    return Runtime.load(engines_dir, backend="torch", device="cuda", cuda_graphs=True)


def decisions(result) -> list[list[int]]:
    return [s["computed"] for s in result.trace["steps"]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


def test_cuda_matches_cpu(runtime_torch, rt_cuda):
    ref = runtime_torch.generate(PROMPT, policy="none", **KW)
    got = rt_cuda.generate(PROMPT, policy="none", **KW)
    assert got.latents.device.type == "cuda"
    assert rel_err(got.latents, ref.latents) < 1e-3


@pytest.mark.parametrize("policy", ["none", "foresight"])
def test_cuda_graphs_replay_like_eager(rt_cuda, rt_graphs, policy):
    eager = rt_cuda.generate(PROMPT, policy=policy, **KW)
    graphs = rt_graphs.generate(PROMPT, policy=policy, **KW)
    assert graphs.stats["skipped_share"] == eager.stats["skipped_share"]
    assert decisions(graphs) == decisions(eager)
    assert rel_err(graphs.latents, eager.latents) < 1e-5
    captured = len(rt_graphs.backend._graphs)
    assert captured > 0
    again = rt_graphs.generate(PROMPT, policy=policy, **KW)  # ping-pong buffers: the same graphs replay
    assert len(rt_graphs.backend._graphs) == captured
    assert torch.equal(again.latents, graphs.latents)


def test_one_device_to_host_transfer_per_step(rt_cuda, monkeypatch):
    """Every synchronising CUDA call inside a step is recorded with the Python line that made it: the
    runtime's own code makes exactly one per step (the stats transfer), whatever the layer count, and
    nothing else syncs after the first step (a one-off sync in the first step is allowed: lazy set-up
    in a library)."""
    per_step = []
    inner = rt_cuda._run_step

    def counted(plan, pool, controller, step):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = inner(plan, pool, controller, step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        per_step.append([f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)])
        return out

    monkeypatch.setattr(rt_cuda, "_run_step", counted)
    rt_cuda.generate(PROMPT, policy="foresight", **KW)
    assert len(per_step) == KW["num_inference_steps"]
    print("syncs per step:", per_step)
    ours = [[s for s in step if "runtime/" in s.replace("\\", "/")] for step in per_step]
    assert all(len(step) == 1 for step in ours), ours
    others = [[s for s in step if s not in o] for step, o in zip(per_step, ours)]
    assert all(not o for o in others[1:]) and len(others[0]) <= 1, others


def test_bfloat16_on_cuda_stays_close(engines_dir, rt_cuda):
    from runtime import Runtime

    low = Runtime.load(engines_dir, backend="torch", device="cuda", dtype="bfloat16")
    a = low.generate(PROMPT, policy="none", **KW)
    b = rt_cuda.generate(PROMPT, policy="none", **KW)
    assert next(iter(low._pools.values())).layer_sets[0][0]["hidden_out"].dtype == torch.bfloat16
    assert 0 < rel_err(a.latents, b.latents) < 0.1


@pytest.mark.parametrize("model, preset", [("cogvideox", "tiny"), ("cogvideox", "tiny-5b"), ("opensora", "tiny")])
def test_other_models_on_cuda_match_their_reference_on_cuda(tmp_path, model, preset):
    """CogVideoX (vs diffusers' CogVideoXPipeline) and Open-Sora (vs our eager reference), both on
    the GPU in fp32, with CUDA graphs: within TF32 convolution rounding."""
    from exporter.export import ExportOptions, export
    from exporter.families import get_family
    from runtime import Runtime

    out = tmp_path / "engines"
    export(ExportOptions(model=model, preset=preset, out=out), progress=False)
    rt = Runtime.load(out, backend="torch", device="cuda", cuda_graphs=True)
    shapes = rt.manifest.shapes
    size = dict(num_frames=shapes["frames"]["default"], height=shapes["height"]["default"],
                width=shapes["width"]["default"])
    got = rt.generate(PROMPT, num_inference_steps=6, seed=0, policy="none", decode=False, **size)
    folder = get_family(model).presets[preset]
    if model == "opensora":
        from dit.opensora_pipeline import OpenSoraPipeline

        pipe = OpenSoraPipeline.from_pretrained(folder).to("cuda")
        want = pipe(PROMPT, num_inference_steps=6, seed=0, output_type="latent", **size)
    else:
        from diffusers import CogVideoXPipeline

        pipe = CogVideoXPipeline.from_pretrained(folder).to("cuda")
        want = pipe(PROMPT, num_inference_steps=6, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="latent", guidance_scale=rt.parts.config["default_guidance"],
                    max_sequence_length=rt.parts.config["max_text_length"], **size).frames
    assert rel_err(got.latents, want) < 1e-3

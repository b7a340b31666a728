"""Wan 2.2 T2V-A14B's two experts end to end, on the random-weight tiny preset in the A14B layout
(``transformer`` + ``transformer_2``, ``boundary_ratio`` 0.875, UniPC with flow shift 12, guidance
4.0 / 3.0): with policy none the torch backend is bit-identical to diffusers' WanPipeline at two
sizes, ONNX Runtime within 1e-4, the AOTInductor packages share their programs between the experts;
each step runs the expert WanPipeline picks; Foresight runs one stage per expert (nothing measured or
cached under one expert is used under the other)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from exporter.families import get_family

PROMPT = "a red square moving left on a black background"
STEPS = 10
PRESET = get_family("wan").presets["tiny-random-a14b"]


@pytest.fixture(scope="module")
def a14b_engines(preset_engines):
    """ONNX files and AOTInductor packages of both experts, in one export."""
    return preset_engines("wan", "tiny-random-a14b", backend="aoti")


@pytest.fixture(scope="module")
def runtimes(a14b_engines):
    from runtime import Runtime

    return {b: Runtime.load(a14b_engines, backend=b, device="cpu") for b in ("torch", "onnxruntime", "aoti")}


def reference(frames, height, width, steps=STEPS, guidance=4.0, guidance_2=3.0):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(PRESET)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                guidance_scale=guidance, guidance_scale_2=guidance_2, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


def test_the_folder_has_two_experts_sharing_programs(a14b_engines):
    from runtime.manifest import load_manifest

    m = load_manifest(a14b_engines)
    raw = m.raw
    assert raw["schema_version"] == 3 and m.num_experts == 2 and m.pipeline["boundary_ratio"] == 0.875
    assert m.pipeline["default_guidance"] == 4.0 and m.pipeline["default_guidance_2"] == 3.0
    expert = m.experts[0]
    assert expert.name == expert.component == "transformer_2"
    assert list(expert.files) == [p.name for p in m.all_parts]
    assert all(f.startswith("expert_1/") and f in m.files for f in expert.files.values())
    # the second expert compiles nothing: its parts name the first expert's programs, with their own weights
    parts_programs = {k for k in raw["aoti"]["programs"] if not k.startswith("components_")}
    assert parts_programs == {e["program"] for e in raw["aoti"]["parts"].values()}
    assert {e["program"] for e in raw["aoti"]["components"].values()} == {"components_text_encoder",
                                                                            "components_vae_decoder"}
    assert {e["program"] for e in expert.aoti.values()} <= set(raw["aoti"]["programs"])
    assert {e["weights"] for e in expert.aoti.values()}.isdisjoint(e["weights"] for e in raw["aoti"]["parts"].values())
    view = m.expert(1)
    assert view.layers[1].file == "expert_1/layer_001.onnx" and view.components["transformer"] == "transformer_2"
    assert view.aoti["parts"]["head"]["weights"] == expert.aoti["head"]["weights"]


@pytest.mark.parametrize("size", [(9, 64, 64), (5, 48, 80)], ids=["default size", "other size"])
def test_torch_backend_is_bit_identical_to_wan_pipeline(runtimes, size):
    latents = reference(*size)
    frames, height, width = size
    result = runtimes["torch"].generate(PROMPT, num_frames=frames, height=height, width=width,
                                        num_inference_steps=STEPS, seed=0, policy="none", decode=False)
    assert torch.equal(result.latents, latents)
    stats = result.stats
    # UniPC with shift 12: t >= 875 for the first 7 of 10 steps
    assert stats["experts"] == [0] * 7 + [1] * 3 and stats["stages"] == [0, 7] and result.trace["stages"] == [0, 7]
    assert (stats["guidance_scale"], stats["guidance_scale_2"]) == (4.0, 3.0)


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_compiled_backends_match_wan_pipeline(runtimes, backend):
    latents = reference(9, 64, 64)
    result = runtimes[backend].generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none", decode=False)
    assert float((result.latents - latents).abs().max() / latents.abs().max()) < 1e-4


def test_guidance_2_is_the_low_noise_experts(runtimes):
    latents = reference(9, 64, 64, guidance_2=6.0)
    result = runtimes["torch"].generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none", decode=False,
                                        guidance_scale_2=6.0)
    assert torch.equal(result.latents, latents)
    assert not torch.equal(latents, reference(9, 64, 64))


def test_each_step_runs_its_experts_engines(runtimes):
    rt = runtimes["onnxruntime"]
    used = []
    for k, backend in enumerate(rt.backends):
        real = backend.run

        def spy(part, inputs, outputs, k=k, real=real):
            if part == "stem":
                used.append(k)
            real(part, inputs, outputs)

        backend.run = spy
    try:
        result = rt.generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none", decode=False)
    finally:
        for backend in rt.backends:
            del backend.run
    assert used == [e for e in result.stats["experts"] for _ in range(2)]  # two CFG passes per step
    assert result.stats["layer_engine_calls"] == 2 * STEPS * rt.num_layers


def test_foresight_starts_afresh_under_the_second_expert(runtimes):
    result = runtimes["onnxruntime"].generate(PROMPT, num_inference_steps=20, seed=0, policy="foresight", warmup=3,
                                              recalculate=2, threshold=5.0, decode=False)
    trace = result.trace
    boundary = trace["stages"][1]
    assert result.stats["experts"].index(1) == boundary
    steps = trace["steps"]
    assert result.stats["layer_calls_skipped"] > 0
    # the second expert's first steps compute everything, the first of them measures nothing, and its
    # thresholds come from its own calibration (none in force until then)
    for s in steps[boundary:boundary + 3]:
        assert s["computed"] == list(range(runtimes["onnxruntime"].num_layers)) and s["thresholds"] is None
    assert not steps[boundary]["measure"] and not steps[boundary + 1]["measure"] and steps[boundary + 2]["measure"]
    assert steps[boundary + 3]["thresholds"] is not None
    assert steps[boundary + 3]["thresholds"] != steps[boundary - 1]["thresholds"]


def test_runtime_reproduces_the_wan_a14b_golden_traces(runtimes):
    from tests.runtime.test_golden_runs import check_model

    check_model(runtimes["torch"], "wan-a14b")


def test_replaying_a_trace_needs_the_same_stages(runtimes):
    from foresight import ReplayPolicy
    from runtime.errors import ConfigError

    rt = runtimes["onnxruntime"]
    recorded = rt.generate(PROMPT, num_inference_steps=12, seed=0, policy="static", warmup=2, decode=False)
    again = rt.generate(PROMPT, num_inference_steps=12, seed=0, policy=ReplayPolicy.from_trace(recorded.trace),
                        decode=False)
    assert torch.equal(again.latents, recorded.latents)
    one_stage = {**recorded.trace}
    del one_stage["stages"]
    with pytest.raises(ConfigError, match="stages"):
        rt.generate(PROMPT, num_inference_steps=12, seed=0, policy=ReplayPolicy.from_trace(one_stage), decode=False)


def test_guidance_2_is_refused_for_one_transformer_models(runtime_torch):
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="one transformer"):
        runtime_torch.generate(PROMPT, guidance_scale_2=2.0, num_inference_steps=2, decode=False)


def test_cli_runs_both_experts_and_checks_guidance_2(a14b_engines, tmp_path, capsys):
    import runtime.cli as cli

    stats = tmp_path / "s.json"
    code = cli.main(["--engines", str(a14b_engines), "--prompt", PROMPT, "--out", str(tmp_path / "o.mp4"), "--steps",
                     str(STEPS), "--guidance-2", "6", "--policy", "none", "--backend", "aoti", "--stats", str(stats),
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(stats.read_text())
    assert data["guidance_scale_2"] == 6.0 and data["stages"] == [0, 7] and (tmp_path / "o.mp4").stat().st_size > 0
    code = cli.main(["--engines", str(a14b_engines), "--prompt", PROMPT, "--out", str(tmp_path / "p.mp4"),
                     "--guidance-2", "nan"])
    err = capsys.readouterr().err
    assert code == 2 and "--guidance-2" in err and "Traceback" not in err and not (tmp_path / "p.mp4").exists()


def test_tensorrt_is_refused_by_name_for_two_experts(a14b_engines):
    from runtime import Runtime
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="two-expert folders"):
        Runtime.load(a14b_engines, backend="tensorrt", device="cpu")


def test_a_second_expert_of_another_architecture_is_refused(tmp_path):
    from dit.errors import ModelError

    folder = tmp_path / "ckpt"
    shutil.copytree(PRESET, folder)
    config = json.loads((folder / "transformer_2" / "config.json").read_text())
    config["num_layers"] = 3
    (folder / "transformer_2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="differ in num_layers"):
        get_family("wan").load(str(folder))


def test_a_boundary_without_transformer_2_is_refused(tmp_path):
    from dit.errors import ModelError

    folder = tmp_path / "ckpt"
    shutil.copytree(PRESET, folder)
    shutil.rmtree(folder / "transformer_2")
    with pytest.raises(ModelError, match="no transformer_2"):
        get_family("wan").load(str(folder))


def test_manifest_checks_the_experts(a14b_engines, tmp_path):
    from runtime.errors import ManifestError
    from runtime.manifest import load_manifest

    def broken(edit):
        folder = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        shutil.copytree(a14b_engines, folder)
        data = json.loads((folder / "manifest.json").read_text())
        edit(data)
        (folder / "manifest.json").write_text(json.dumps(data))
        return folder

    cases = [
        (lambda d: d.__setitem__("schema_version", 2), "schema_version"),
        (lambda d: d["experts"][0]["files"].pop("head"), "must list every part"),
        (lambda d: d["experts"][0]["files"].__setitem__("head", "head.onnx"), "same file"),
        (lambda d: d["experts"][0].__setitem__("component", "vae"), "component"),
        (lambda d: d["experts"][0]["aoti"]["stem"].__setitem__("program", "nope"), "programs"),
        (lambda d: d["files"].pop("expert_1/layer_001.onnx"), "not listed"),
    ]
    for edit, words in cases:
        with pytest.raises(ManifestError, match=words):
            load_manifest(broken(edit))

"""The C++ runtime on libtorch (cpp/src/runtime.cpp) against the Python runtime on the same engines.

Oracle: on the shipped Latte exported with AOTInductor packages, ``foresight_denoise`` and
``Runtime.load(..., backend="aoti")`` given the same encoded prompt, seed and policy end with
bit-identical latents and the same decision trace (every mse bit for bit), at the default size and
at another without guidance. Refusals: the Python runtime's, for the same broken folders.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from runtime import Runtime
from runtime.errors import ManifestError, ShapeError
from tests.runtime.test_aoti import edit_manifest

PROMPT = "a red square moving left on a gray background"


@pytest.fixture(scope="module")
def latte_aoti(preset_engines):
    return preset_engines("latte", "tiny", backend="aoti")


@pytest.fixture(scope="module")
def python_runtime(latte_aoti):
    return Runtime.load(latte_aoti, backend="aoti", device="cpu")


def encoded(runtime, tmp_path, guidance=True):
    path = tmp_path / ("text.pt" if guidance else "text1.pt")
    torch.save(runtime.parts.encode_prompt(PROMPT, "", guidance)["encoder_hidden_states"], path)
    return path


def run_cpp(cpp_build, engines, text, tmp_path, **options):
    out, trace, stats = tmp_path / "latents.pt", tmp_path / "trace.json", tmp_path / "stats.json"
    for p in (out, trace, stats):
        p.unlink(missing_ok=True)
    args = [str(cpp_build / "foresight_denoise"), "--engines", str(engines), "--text", str(text), "--out", str(out),
            "--trace", str(trace), "--stats", str(stats)]
    for k, v in options.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if done.returncode:
        return done, None, None, None
    return done, torch.load(out), json.loads(trace.read_text()), json.loads(stats.read_text())


POLICIES = [{"policy": "none"}, {"policy": "static"},
            {"policy": "foresight", "warmup": 6, "recalculate": 4, "threshold": 4.0}]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["policy"])
def test_cpp_runtime_equals_the_python_aoti_backend(cpp_build, latte_aoti, python_runtime, tmp_path, policy):
    options = {k: v for k, v in policy.items() if k != "policy"}
    ref = python_runtime.generate(PROMPT, num_inference_steps=20, seed=3, policy=policy["policy"], decode=False,
                                  **options)
    done, latents, trace, stats = run_cpp(cpp_build, latte_aoti, encoded(python_runtime, tmp_path), tmp_path,
                                          steps=20, seed=3, policy=policy)
    assert done.returncode == 0, done.stderr
    assert torch.equal(latents, ref.latents)
    assert trace == json.loads(json.dumps(ref.trace))
    assert stats["layer_calls_skipped"] == ref.stats["layer_calls_skipped"]
    assert stats["layer_engine_calls"] == ref.stats["layer_engine_calls"]  # reused layers' engines never ran
    if policy["policy"] != "none":
        assert stats["layer_calls_skipped"] > 0


def test_cpp_runtime_at_another_size_without_guidance(cpp_build, latte_aoti, python_runtime, tmp_path):
    ref = python_runtime.generate(PROMPT, num_frames=5, height=24, width=40, num_inference_steps=8, seed=11,
                                  guidance_scale=1.0, policy="foresight", warmup=3, recalculate=2, threshold=4.0,
                                  decode=False)
    done, latents, trace, _ = run_cpp(cpp_build, latte_aoti, encoded(python_runtime, tmp_path, guidance=False), tmp_path,
                                      frames=5, height=24, width=40, steps=8, seed=11, guidance=1.0,
                                      policy={"policy": "foresight", "warmup": 3, "recalculate": 2, "threshold": 4.0})
    assert done.returncode == 0, done.stderr
    assert latents.shape == ref.latents.shape == (1, 4, 5, 6, 10)
    assert torch.equal(latents, ref.latents) and trace == json.loads(json.dumps(ref.trace))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_cpp_runtime_spaces_ddim_timesteps_as_diffusers(cpp_build, latte_aoti, tmp_path, spacing):
    """DDIMScheduler's other timestep spacings (the preset uses "leading"), through the one C++
    spacing function the DDIM-family samplers share."""
    from runtime.manifest import sha256_file

    folder = tmp_path / "engines"
    shutil.copytree(latte_aoti, folder, symlinks=True)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "timestep_spacing": spacing}))
    edit_manifest(folder, lambda d: d["files"]["scheduler/scheduler_config.json"].update(
        sha256=sha256_file(config), bytes=config.stat().st_size))
    rt = Runtime.load(folder, backend="aoti", device="cpu")
    policy = {"policy": "foresight", "warmup": 3, "recalculate": 2, "threshold": 4.0}
    ref = rt.generate(PROMPT, num_inference_steps=7, seed=5, decode=False, **policy)
    done, latents, trace, stats = run_cpp(cpp_build, folder, encoded(rt, tmp_path), tmp_path, steps=7, seed=5,
                                          policy=policy)
    assert_equal_runs(done, latents, trace, stats, ref, policy, ref.latents.shape)


def run_generate(cpp_build, engines, tmp_path, prompt, **options):
    """foresight_denoise --prompt: Runtime::generate (tokenizer, compiled text encoder, denoising, compiled
    VAE decoder); returns the process, the latents, the uint8 frames, the trace and the stats."""
    out, frames, trace, stats = (tmp_path / n for n in ("latents.pt", "frames.pt", "trace.json", "stats.json"))
    for f in (out, frames, trace, stats):
        f.unlink(missing_ok=True)
    args = [str(cpp_build / "foresight_denoise"), "--engines", str(engines), "--prompt", prompt, "--out", str(out),
            "--frames-out", str(frames), "--trace", str(trace), "--stats", str(stats)]
    for k, v in options.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if done.returncode:
        return done, None, None, None, None
    return done, torch.load(out), torch.load(frames), json.loads(trace.read_text()), json.loads(stats.read_text())


@pytest.fixture(scope="module")
def compiled_runtime(latte_aoti):
    return Runtime.load(latte_aoti, backend="aoti", device="cpu", compiled_components=True)


@pytest.mark.parametrize("case", [
    {"prompt": "  A Red Square moving LEFT on a gray background ", "steps": 8, "seed": 7,
     "policy": {"policy": "foresight", "warmup": 3, "recalculate": 2, "threshold": 4.0}},
    {"prompt": "a blue circle, moving up!", "negative": "a red square", "steps": 5, "seed": 1, "guidance": 4.0,
     "frames": 5, "height": 24, "width": 40, "policy": {"policy": "none"}},
    {"prompt": "a green triangle moving down", "steps": 8, "seed": 2, "guidance": 1.0, "policy": {"policy": "static"}},
], ids=["foresight-defaults", "negative-other-size", "no-guidance"])
def test_cpp_generate_makes_the_python_runtimes_frames(cpp_build, latte_aoti, compiled_runtime, tmp_path, case):
    """A prompt to frames in C++ (foresight::Runtime::generate) equals Runtime.generate with the same
    compiled text encoder and VAE decoder: latents, frames and decisions bit for bit."""
    policy = case["policy"]
    ref = compiled_runtime.generate(case["prompt"], negative_prompt=case.get("negative"),
                                    num_frames=case.get("frames"), height=case.get("height"), width=case.get("width"),
                                    num_inference_steps=case["steps"], guidance_scale=case.get("guidance"),
                                    seed=case["seed"], policy=policy["policy"],
                                    **{k: v for k, v in policy.items() if k != "policy"})
    options = {k: case[k] for k in ("steps", "seed", "guidance", "frames", "height", "width") if k in case}
    if "negative" in case:
        options["negative-prompt"] = case["negative"]
    done, latents, frames, trace, stats = run_generate(cpp_build, latte_aoti, tmp_path, case["prompt"],
                                                       policy=policy, **options)
    assert_equal_runs(done, latents, trace, stats, ref, policy, ref.latents.shape)
    assert frames.dtype == torch.uint8 and torch.equal(frames, torch.from_numpy(ref.frames))


def without_components(folder, dest):
    """``folder`` copied with its manifest's compiled text encoder and VAE decoder taken out."""
    shutil.copytree(folder, dest, symlinks=True)
    edit_manifest(dest, lambda d: d["aoti"].pop("components"))
    return dest


def test_cpp_generate_refusals(cpp_build, latte_aoti, tmp_path):
    done, *_ = run_generate(cpp_build, latte_aoti, tmp_path, "a red caf\u00e9 square", steps=2)
    assert done.returncode == 1 and "error: the prompt has non-ASCII characters" in done.stderr, done.stderr
    bare = without_components(latte_aoti, tmp_path / "bare")
    done, *_ = run_generate(cpp_build, bare, tmp_path, "a red square", steps=2)
    assert done.returncode == 1 and "has no compiled text encoder and VAE decoder" in done.stderr, done.stderr
    assert not (tmp_path / "frames.pt").exists()


@pytest.fixture(scope="module")
def pipeline_folders(preset_engines, aoti_engines_dir):
    """Every other pipeline's AOTI folder with its compiled text encoder and video VAE decoder."""
    return {"cogvideox": aoti_engines_dir, "opensora": preset_engines("opensora", "tiny", backend="aoti"),
            "wan": preset_engines("wan", "tiny-random-a14b", backend="aoti"),
            "cogvideox-5b": preset_engines("cogvideox", "tiny-5b", backend="aoti")}


FOLD = {"policy": "foresight", "warmup": 2, "recalculate": 2, "threshold": 4.0}


@pytest.mark.parametrize("family, prompt, options", [
    # the raw text (no cleaning), a negative prompt, encoded without a mask
    ("cogvideox", "  A yellow Triangle moving down ", {"negative-prompt": "a blue circle", "steps": 6, "seed": 3}),
    ("cogvideox", "a yellow triangle moving down", {"guidance": 1.0, "steps": 5, "seed": 1, "policy": FOLD}),
    # CogVideoX 5B's layout: the rotary tables per shape, CogVideoXDPMScheduler (noise from the run's generator)
    ("cogvideox-5b", "a yellow triangle moving down", {"steps": 7, "seed": 5, "policy": FOLD}),
    ("cogvideox-5b", "a yellow triangle moving down", {"guidance": 1.0, "steps": 6, "seed": 2}),
    # the aesthetic-score suffix and the learned null caption
    ("opensora", "a green square moving up on a black background", {"steps": 6, "seed": 4, "policy": FOLD}),
    ("opensora", "a green square aesthetic score: 5.0.", {"guidance": 1.0, "steps": 4, "seed": 2}),
    # prompt_clean (whitespace runs, a bare '&'), tokens kept and zero-padded, two experts with UniPC
    ("wan", " a blue   circle\tmoving right & fast ", {"negative-prompt": " blurry ", "steps": 8, "seed": 5,
                                                        "policy": FOLD}),
    ("wan", "a blue circle moving right", {"guidance": 1.0, "steps": 4, "seed": 6}),
], ids=["cogvideox", "cogvideox-no-guidance", "cogvideox-5b", "cogvideox-5b-no-guidance", "opensora", "opensora-scored", "wan", "wan-no-guidance"])
def test_cpp_generate_makes_the_python_runtimes_frames_for_every_pipeline(cpp_build, pipeline_folders, tmp_path,
                                                                         family, prompt, options):
    """Runtime::generate of CogVideoX (2B and 5B layouts), Open-Sora and Wan (each prompt encoded as its pipeline encodes it,
    its latents scaled and decoded as it decodes them) equals Runtime.generate with the same compiled
    text encoder and VAE decoder: latents, uint8 frames and decisions bit for bit."""
    folder = pipeline_folders[family]
    policy = options.get("policy", {"policy": "none"})
    rt = Runtime.load(folder, backend="aoti", device="cpu", compiled_components=True)
    ref = rt.generate(prompt, negative_prompt=options.get("negative-prompt"), num_inference_steps=options["steps"],
                      guidance_scale=options.get("guidance"), seed=options["seed"], policy=policy["policy"],
                      **{k: v for k, v in policy.items() if k != "policy"})
    done, latents, frames, trace, stats = run_generate(cpp_build, folder, tmp_path, prompt,
                                                       **{**options, "policy": policy})
    assert_equal_runs(done, latents, trace, stats, ref, policy, ref.latents.shape)
    assert frames.dtype == torch.uint8 and frames.shape == ref.frames.shape
    assert torch.equal(frames, torch.from_numpy(ref.frames))


@pytest.mark.parametrize("family, prompt, options, message", [
    ("wan", "a blue circle", {"frames": 13}, "frames=13: the compiled VAE decoder makes 9 frames (the default "
                                             "video's; foresight-export compiles it for one frame count): pass "
                                             "--frames 9"),
    ("wan", "fish &amp; chips", {}, "the prompt has an HTML entity (&amp; ch...), which WanPipeline unescapes"),
    ("wan", "a blue\x01circle", {}, "the prompt has control characters"),
    ("opensora", "a green square", {"negative-prompt": "red"}, "guides against its learned null caption"),
], ids=["other-frames", "html-entity", "control-character", "opensora-negative"])
def test_cpp_generate_refuses_what_it_cannot_make_as_python_does(cpp_build, pipeline_folders, tmp_path, family,
                                                                  prompt, options, message):
    done, *_ = run_generate(cpp_build, pipeline_folders[family], tmp_path, prompt, steps=2, **options)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "frames.pt").exists()


def tamper_weights(folder):
    path = folder / "aoti" / "layer_002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def link_outside(folder):
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / "aoti" / "head.safetensors", outside)
    (folder / "aoti" / "head.safetensors").unlink()
    (folder / "aoti" / "head.safetensors").symlink_to(outside)


BROKEN = {
    "newer schema": (lambda f: edit_manifest(f, lambda d: d.update(schema_version=99)), "newer than this runtime's 3"),
    "old schema": (lambda f: edit_manifest(f, lambda d: d.update(schema_version=1)), "old schema version 1"),
    "tampered weights": (tamper_weights, "does not match the sha256 recorded in the manifest"),
    "missing file": (lambda f: (f / "aoti" / "head.pt2").unlink(), "listed in the manifest is missing"),
    "wrong size": (lambda f: (f / "aoti" / "head.safetensors").write_bytes(b"x"), "bytes, the manifest says"),
    "outside the folder": (link_outside, "outside the engines folder: the folder is refused"),
    "unlisted file": (lambda f: (f / "vae" / "extra.bin").write_bytes(b"x"), "is in the engines folder but not in its "
                                                                              "manifest"),
    "not json": (lambda f: (f / "manifest.json").write_text("{"), "is not valid JSON"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_cpp_runtime_refuses_what_the_python_runtime_refuses(cpp_build, latte_aoti, python_runtime, tmp_path, name):
    folder = tmp_path / "engines"
    shutil.copytree(latte_aoti, folder, symlinks=True)
    breaks, message = BROKEN[name]
    breaks(folder)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        Runtime.load(folder, backend="aoti", device="cpu")
    done, *_ = run_cpp(cpp_build, folder, encoded(python_runtime, tmp_path), tmp_path, steps=2)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert not (tmp_path / "latents.pt").exists()


@pytest.mark.parametrize("options, message", [
    ({"height": 30}, "height=30 is not divisible by 4"),
    ({"width": 128}, "width=128 is outside the exported range [8, 64]"),
    ({"guidance": 1.0}, "the encoded prompt's encoder_hidden_states must be (1, ...) with 3 dimensions"),
    ({"policy": {"policy": "foresight", "warmup": 1}}, "warmup must be >= 2"),
    ({"steps": 0}, "steps must be a whole number in 1..1000"),
])
def test_cpp_runtime_bad_requests(cpp_build, latte_aoti, python_runtime, tmp_path, options, message):
    done, *_ = run_cpp(cpp_build, latte_aoti, encoded(python_runtime, tmp_path), tmp_path, **options)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    missing = run_cpp(cpp_build, tmp_path / "nowhere", encoded(python_runtime, tmp_path), tmp_path)[0]
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def assert_equal_runs(done, latents, trace, stats, ref, policy, shape):
    """The C++ run ended as the Python one did: latents of ``shape`` bit for bit, the same decisions,
    the same engine calls (reused layers' engines never ran)."""
    assert done.returncode == 0, done.stderr
    assert latents.shape == ref.latents.shape == shape
    assert torch.equal(latents, ref.latents) and trace == json.loads(json.dumps(ref.trace))
    assert stats["layer_engine_calls"] == ref.stats["layer_engine_calls"]
    if policy["policy"] != "none":
        assert stats["layer_calls_skipped"] > 0


# ------------------------------------------------------------------------------------ CogVideoX
COG_PROMPT = "a yellow triangle moving down on a white background"


@pytest.fixture(scope="module")
def cog_runtime(aoti_engines_dir):
    return Runtime.load(aoti_engines_dir, backend="aoti", device="cpu")


def cog_text(rt, tmp_path, guidance=True):
    text = tmp_path / "cog-text.pt"
    torch.save(rt.parts.encode_prompt(COG_PROMPT, "", guidance)["encoder_hidden_states"], text)
    return text


COG_POLICIES = [{"policy": "none"}, {"policy": "foresight", "warmup": 2, "recalculate": 2, "threshold": 4.0}]


@pytest.mark.parametrize("policy", COG_POLICIES, ids=lambda p: p["policy"])
def test_cpp_runtime_runs_cogvideox_as_the_python_aoti_backend(cpp_build, aoti_engines_dir, cog_runtime, tmp_path,
                                                              policy):
    """The shipped CogVideoX (2B-style): CogVideoXDDIM's zero-terminal-SNR schedule, its sin-cos
    position table computed per shape, latents frames-first: bit for bit."""
    options = {k: v for k, v in policy.items() if k != "policy"}
    ref = cog_runtime.generate(COG_PROMPT, num_inference_steps=12, seed=2, policy=policy["policy"], decode=False,
                               **options)
    done, latents, trace, stats = run_cpp(cpp_build, aoti_engines_dir, cog_text(cog_runtime, tmp_path), tmp_path,
                                          steps=12, seed=2, policy=policy)
    assert_equal_runs(done, latents, trace, stats, ref, policy, (1, 3, 4, 8, 8))


def test_cpp_runtime_runs_cogvideox_at_another_shape_and_refuses_frames_its_vae_cannot_make(
        cpp_build, aoti_engines_dir, cog_runtime, tmp_path):
    ref = cog_runtime.generate(COG_PROMPT, num_frames=8, height=24, width=40, num_inference_steps=6, seed=9,
                               guidance_scale=1.0, decode=False)
    done, latents, *_ = run_cpp(cpp_build, aoti_engines_dir, cog_text(cog_runtime, tmp_path, guidance=False),
                                tmp_path, frames=8, height=24, width=40, steps=6, seed=9, guidance=1.0)
    assert done.returncode == 0, done.stderr
    assert latents.shape == (1, 2, 4, 6, 10) and torch.equal(latents, ref.latents)
    with pytest.raises(ShapeError) as python:
        cog_runtime.generate(COG_PROMPT, num_frames=10, num_inference_steps=2, decode=False)
    done, *_ = run_cpp(cpp_build, aoti_engines_dir, cog_text(cog_runtime, tmp_path), tmp_path, frames=10, steps=2)
    assert done.returncode == 1 and str(python.value) in done.stderr, (done.stderr, str(python.value))


# ------------------------------------------------------------------------------------ Open-Sora
OS_PROMPT = "a green square moving up on a black background"


@pytest.fixture(scope="module")
def opensora_aoti(preset_engines, tmp_path_factory):
    """The shipped Open-Sora 1.2 (rectified flow without the timestep transform, as trained) and a
    copy with the release's transform on."""
    shipped = preset_engines("opensora", "tiny", backend="aoti")
    shifted = tmp_path_factory.mktemp("opensora-shift") / "engines"
    shutil.copytree(shipped, shifted, symlinks=True)
    config = shifted / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_timestep_transform": True}))
    from runtime.manifest import sha256_file

    edit_manifest(shifted, lambda d: d["files"]["scheduler/scheduler_config.json"].update(
        sha256=sha256_file(config), bytes=config.stat().st_size))
    return {"shipped": shipped, "transform": shifted}


@pytest.mark.parametrize("variant, policy", [("shipped", {"policy": "none"}),
                                             ("shipped", {"policy": "foresight", "warmup": 2, "recalculate": 2,
                                                          "threshold": 4.0}),
                                             ("transform", {"policy": "none"})])
def test_cpp_runtime_runs_opensora_as_the_python_aoti_backend(cpp_build, opensora_aoti, tmp_path, variant, policy):
    """Rectified flow (with and without the timestep transform), the [conditional, null caption]
    batch with its mask, fps and the pixel size as stem inputs: bit for bit."""
    folder = opensora_aoti[variant]
    rt = Runtime.load(folder, backend="aoti", device="cpu")
    options = {k: v for k, v in policy.items() if k != "policy"}
    ref = rt.generate(OS_PROMPT, num_inference_steps=8, seed=4, policy=policy["policy"], decode=False, **options)
    text = tmp_path / "os-text.pt"
    torch.save(rt.parts.encode_prompt(OS_PROMPT, None, True), text)  # {"caption", "caption_mask"}
    done, latents, trace, stats = run_cpp(cpp_build, folder, text, tmp_path, steps=8, seed=4, policy=policy)
    assert_equal_runs(done, latents, trace, stats, ref, policy, (1, 4, 5, 8, 8))
    if variant == "shipped" and policy["policy"] == "none":
        with pytest.raises(ShapeError) as python:
            rt.generate(OS_PROMPT, num_frames=9, num_inference_steps=2, decode=False)
        done, *_ = run_cpp(cpp_build, folder, text, tmp_path, frames=9, steps=2)
        assert done.returncode == 1 and str(python.value) in done.stderr, done.stderr


# ------------------------------------------------------------------------------------ Wan
WAN_PROMPT = "a blue circle moving right"


def with_scheduler(folder, dest, scheduler):
    """``folder`` copied with ``scheduler``'s config in place of its own, the manifest's file table updated."""
    from runtime.manifest import sha256_file

    shutil.copytree(folder, dest, symlinks=True)
    scheduler.save_config(dest / "scheduler")
    config = dest / "scheduler" / "scheduler_config.json"
    edit_manifest(dest, lambda d: d["files"]["scheduler/scheduler_config.json"].update(
        sha256=sha256_file(config), bytes=config.stat().st_size))
    return dest


@pytest.fixture(scope="module")
def wan_experts(preset_engines, tmp_path_factory):
    """The random-weight Wan 2.2 A14B (two experts switched at boundary_ratio, CFG as two passes) with
    the release's UniPC (flow sigmas, flow_shift 12), and a copy with FlowMatchEuler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    release = preset_engines("wan", "tiny-random-a14b", backend="aoti")
    euler = with_scheduler(release, tmp_path_factory.mktemp("wan-euler") / "engines",
                           FlowMatchEulerDiscreteScheduler(shift=3.0))
    return {"unipc": release, "euler": euler}


WAN_POLICIES = [{"policy": "none"}, {"policy": "foresight", "warmup": 2, "recalculate": 2, "threshold": 4.0}]


def wan_text(rt, tmp_path):
    text = tmp_path / "wan-text.pt"
    torch.save(rt.parts.encode_prompt(WAN_PROMPT, "", True)["encoder_hidden_states"], text)
    return text


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
@pytest.mark.parametrize("policy", WAN_POLICIES, ids=lambda p: p["policy"])
def test_cpp_runtime_runs_wan_experts_as_the_python_aoti_backend(cpp_build, wan_experts, tmp_path, policy, scheduler):
    """UniPC's predictor and corrector or FlowMatchEuler, the two CFG passes (conditional, then
    unconditional), the switch to the second expert (its own guidance, a fresh controller stage):
    latents and decisions bit for bit."""
    rt = Runtime.load(wan_experts[scheduler], backend="aoti", device="cpu")
    options = {k: v for k, v in policy.items() if k != "policy"}
    ref = rt.generate(WAN_PROMPT, num_inference_steps=10, seed=5, policy=policy["policy"], decode=False, **options)
    assert len(ref.stats["stages"]) == 2 and set(ref.stats["experts"]) == {0, 1}  # both experts ran
    text = wan_text(rt, tmp_path)
    done, latents, trace, stats = run_cpp(cpp_build, wan_experts[scheduler], text, tmp_path, steps=10, seed=5,
                                          policy=policy)
    assert done.returncode == 0, done.stderr
    assert torch.equal(latents, ref.latents)
    assert trace == json.loads(json.dumps(ref.trace))
    for key in ("stages", "experts", "guidance_scale_2", "layer_calls_skipped", "layer_engine_calls"):
        assert stats[key] == ref.stats[key], key
    if policy["policy"] != "none":
        assert stats["layer_calls_skipped"] > 0
        return
    # the second expert's guidance given: it changes the result as in Python
    ref2 = rt.generate(WAN_PROMPT, num_inference_steps=10, seed=5, guidance_scale_2=1.5, decode=False)
    done, latents2, *_ = run_cpp(cpp_build, wan_experts[scheduler], text, tmp_path, steps=10, seed=5,
                                 **{"guidance-2": 1.5})
    assert done.returncode == 0, done.stderr
    assert torch.equal(latents2, ref2.latents) and not torch.equal(latents2, ref.latents)


def test_cpp_runtime_refuses_what_it_has_not_ported(cpp_build, latte_aoti, wan_experts, tmp_path):
    from diffusers import UniPCMultistepScheduler

    release = wan_experts["unipc"]
    text = wan_text(Runtime.load(release, backend="aoti", device="cpu"), tmp_path)
    config = json.loads((release / "scheduler" / "scheduler_config.json").read_text())
    karras = with_scheduler(release, tmp_path / "karras",
                            UniPCMultistepScheduler.from_config({**config, "use_karras_sigmas": True}))
    done, *_ = run_cpp(cpp_build, karras, text, tmp_path, steps=4)
    assert done.returncode == 1 and "UniPCMultistepScheduler runs Wan's configuration (no dynamic" in done.stderr, \
        done.stderr
    done, *_ = run_cpp(cpp_build, latte_aoti, text, tmp_path, steps=4, **{"guidance-2": 2.0})
    assert done.returncode == 1 and "these engines have one transformer" in done.stderr, done.stderr


def with_tokenizer(folder, dest, tokenizer):
    """``folder`` copied with ``tokenizer`` (a folder) as its tokenizer component, the file table updated."""
    from runtime.manifest import sha256_file

    shutil.copytree(folder, dest, symlinks=True)
    shutil.rmtree(dest / "tokenizer")
    shutil.copytree(tokenizer, dest / "tokenizer")

    def change(d):
        d["files"] = {k: v for k, v in d["files"].items() if not k.startswith("tokenizer/")}
        for f in sorted((dest / "tokenizer").iterdir()):
            d["files"][f"tokenizer/{f.name}"] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    edit_manifest(dest, change)
    return dest


def test_cpp_generate_with_a_sentencepiece_tokenizer_makes_the_python_runtimes_frames(cpp_build, pipeline_folders,
                                                                                       tmp_path):
    """A released checkpoint's kind of tokenizer (T5 SentencePiece: tokenizer.json converted from the
    spiece.model next to it, both hashed in the manifest) in the Open-Sora folder: the C++ runtime
    tokenizes UTF-8 prompts as transformers does, so generate gives the Python runtime's frames."""
    from tests.cpp.test_tokenizer import make_t5_tokenizer

    tokenizer = make_t5_tokenizer(tmp_path / "t5", vocab_size=38, extra_ids=0)  # ids < the encoder's 38
    folder = with_tokenizer(pipeline_folders["opensora"], tmp_path / "engines", tokenizer)
    rt = Runtime.load(folder, backend="aoti", device="cpu", compiled_components=True)
    for prompt in ("a green square moving up on a black background", "un carré vert, naïve été \u65e5\u672c"):
        ref = rt.generate(prompt, num_inference_steps=4, seed=3, policy="none")
        done, latents, frames, trace, stats = run_generate(cpp_build, folder, tmp_path, prompt, steps=4, seed=3)
        assert_equal_runs(done, latents, trace, stats, ref, {"policy": "none"}, ref.latents.shape)
        assert torch.equal(frames, torch.from_numpy(ref.frames))
    model = folder / "tokenizer" / "spiece.model"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 1
    model.write_bytes(bytes(data))  # the manifest's hash refuses an edited model
    done, *_ = run_generate(cpp_build, folder, tmp_path, "a green square", steps=2)
    assert done.returncode == 1 and "spiece.model does not match the sha256 recorded in the manifest" in done.stderr


def test_one_cpp_runtime_serves_concurrent_threads_as_sequential_calls(cpp_build, latte_aoti):
    """Three threads call generate on one Runtime at once: each gets the frames, decisions and engine
    calls it gets alone (the calls are serialised, as the Python runtime's are), and different seeds
    still give different videos."""
    done = subprocess.run([str(cpp_build / "foresight_threads"), str(latte_aoti), "3", PROMPT,
                           "a blue circle moving up on a white background"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report == {"threads": 3, "equal": True, "seeds_differ": True, "head_calls": 3 * 6}

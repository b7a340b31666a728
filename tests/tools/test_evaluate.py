"""The adherence scorer on clips drawn by tools/synthetic.py, and evaluate() on a fake runtime."""

import dataclasses
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

import tools.evaluate as ev
from foresight import ConfigError
from tools.synthetic import (
    BACKGROUNDS, COLORS, DIRECTIONS, MOTION, SHAPES, ClipSpec, held_out_prompts, parse_prompt, render,
)

FRAMES = 8


def centred_spec(prompt: str, size: float = 10.0, speed: float = 1.5, side: int = 32) -> ClipSpec:
    """The prompt's clip, placed so that its path is centred in a side x side frame (sizes at 32 px)."""
    p = parse_prompt(prompt)
    s = side / 32
    dx, dy = MOTION[p["direction"]]
    half = speed * s * (FRAMES - 1) / 2
    return ClipSpec(p["shape"], p["color"], p["direction"], p["background"], size=size * s, speed=speed * s,
                    x0=side / 2 - dx * half, y0=side / 2 - dy * half)


def prompt_of(color, direction, i) -> str:
    # Shapes and backgrounds cycle at other periods than colours and directions: every pair meets several.
    return (f"a {color} {SHAPES[i % len(SHAPES)]} moving {direction} "
            f"on a {tuple(BACKGROUNDS)[i % len(BACKGROUNDS)]} background")


# ------------------------------------------------------------------ score_clip
@pytest.mark.parametrize("side", [32, 64])
def test_scorer_reads_every_colour_and_direction(side):
    for i, (color, direction) in enumerate(itertools.product(COLORS, DIRECTIONS)):
        prompt = prompt_of(color, direction, i)
        for size, speed in ((8.0, 1.2), (12.0, 2.0)):
            s = ev.score_clip(render(centred_spec(prompt, size, speed, side), FRAMES, side, side), prompt)
            assert (s["detected_color"], s["detected_direction"]) == (color, direction), (prompt, size, speed, s)
            assert s["color_ok"] and s["direction_ok"] and s["background_ok"]
            assert s["object_rgb"] == list(map(float, COLORS[color]))  # the core is the pure object colour
            assert s["displacement_px"] == pytest.approx(speed * side / 32 * (FRAMES - 1), abs=0.5 * side / 32)


def test_scorer_reads_the_colour_of_small_objects_whose_edges_dominate():
    # 4 px objects in 16x16 frames: most object pixels are edge blends with the background, whose
    # median would be a darker colour (white on black reads as purple); the object's core is not.
    for color, background, shape, direction, x_offset in itertools.product(
            COLORS, BACKGROUNDS, SHAPES, DIRECTIONS, (0.0, 0.5)):
        prompt = f"a {color} {shape} moving {direction} on a {background} background"
        spec = centred_spec(prompt, 8.0, 1.5, side=16)
        spec = dataclasses.replace(spec, x0=spec.x0 + x_offset)  # a half-pixel offset blurs a square's sides
        s = ev.score_clip(render(spec, FRAMES, 16, 16), prompt)
        assert s["color_ok"] and s["direction_ok"], (prompt, s)


def test_scorer_tolerates_noise_like_a_generated_clip():
    rng = np.random.default_rng(0)
    for i, (color, direction) in enumerate(itertools.product(COLORS, DIRECTIONS)):
        prompt = prompt_of(color, direction, i + 1)
        clip = render(centred_spec(prompt)).astype(np.float64)
        noisy = np.clip(clip + rng.normal(0, 12, clip.shape), 0, 255).round().astype(np.uint8)
        s = ev.score_clip(noisy, prompt)
        assert s["color_ok"] and s["direction_ok"], (prompt, s)


def test_static_clip_has_no_direction():
    prompt = "a red square moving left on a black background"
    s = ev.score_clip(render(centred_spec(prompt, speed=0.0)), prompt)
    assert s["detected_direction"] == "none" and not s["direction_ok"]
    assert s["color_ok"]  # the colour is still read


def test_motion_below_the_threshold_is_none_and_above_it_counts():
    prompt = "a blue circle moving down on a gray background"
    slow = ev.score_clip(render(centred_spec(prompt, speed=0.15)), prompt)  # 1.05 px over the clip
    assert slow["detected_direction"] == "none" and not slow["direction_ok"]
    visible = ev.score_clip(render(centred_spec(prompt, speed=0.4)), prompt)  # 2.8 px
    assert visible["detected_direction"] == "down" and visible["direction_ok"]


def test_recoloured_clip_fails_colour_only():
    names = list(COLORS)
    for i, color in enumerate(names):
        prompt = prompt_of(color, DIRECTIONS[i % 4], i)
        other = names[(i + 1) % len(names)]
        s = ev.score_clip(render(dataclasses.replace(centred_spec(prompt), color=other)), prompt)
        assert s["detected_color"] == other and not s["color_ok"]
        assert s["direction_ok"]


def test_empty_clip_fails_both():
    prompt = "a white triangle moving up on a navy background"
    empty = np.broadcast_to(np.array(BACKGROUNDS["navy"], np.uint8), (FRAMES, 32, 32, 3)).copy()
    s = ev.score_clip(empty, prompt)
    assert not s["color_ok"] and not s["direction_ok"] and s["background_ok"]
    assert s["detected_color"] is None and s["detected_direction"] == "none" and s["object_frames"] == 0
    assert s["object_rgb"] is None


def test_object_missing_in_most_frames_has_no_direction():
    prompt = "a yellow circle moving right on a brown background"
    clip = render(centred_spec(prompt, speed=2.0))
    clip[:5] = BACKGROUNDS["brown"]  # shown in 3 of 8 frames only
    s = ev.score_clip(clip, prompt)
    assert s["object_frames"] == 3 and s["detected_direction"] == "none"
    assert s["color_ok"]


def test_scorer_rejects_foreign_prompts_and_float_frames():
    clip = render(centred_spec("a red square moving left on a black background"))
    with pytest.raises(ValueError, match="not a prompt of this domain"):
        ev.score_clip(clip, "a red panda eating bamboo")
    with pytest.raises(ValueError, match="uint8"):
        ev.score_clip(clip.astype(np.float32), "a red square moving left on a black background")


# ------------------------------------------------------------------ evaluate() on a fake runtime
class FakeRuntime:
    """``generate`` draws the prompt's clip; ``noisy`` policies add fixed noise. Seconds and skipped
    shares per policy are fixed, so the aggregates have known values."""

    SECONDS = {"none": 2.0, "static": 1.6, "foresight": 1.0}
    SKIPPED = {"none": 0.0, "static": 0.25, "foresight": 0.5}

    def __init__(self, noisy=()):
        self.noisy, self.calls = set(noisy), []

    def generate(self, prompt, seed=0, policy=None, num_inference_steps=None, **options):
        self.calls.append({"prompt": prompt, "seed": seed, "policy": policy, "steps": num_inference_steps,
                           "options": options})
        frames = render(centred_spec(prompt))
        if policy in self.noisy:
            noise = np.random.default_rng(seed).normal(0, 8, frames.shape)
            frames = np.clip(frames + noise, 0, 255).round().astype(np.uint8)
        stats = {"denoise_seconds": self.SECONDS[policy], "skipped_share": self.SKIPPED[policy],
                 "layer_calls_skipped": int(40 * self.SKIPPED[policy]), "policy_config": {"policy": policy, **options}}
        return SimpleNamespace(frames=frames, stats=stats)


@pytest.fixture()
def fake(monkeypatch):
    rt = FakeRuntime(noisy={"static"})
    loads = []

    def load(engines_dir, backend):
        loads.append((engines_dir, backend))
        return rt

    monkeypatch.setattr(ev, "load_runtime", load)
    rt.loads = loads
    return rt


def test_evaluate_aggregates_on_a_fake_runtime(fake):
    prompts = held_out_prompts(6)
    report = ev.evaluate("engines/x", prompts, seed=10, policies=("none", "static", "foresight"), steps=3,
                         threshold=0.3, warmup=3)
    assert fake.loads == [("engines/x", "onnxruntime")]
    agg = {a["policy"]: a for a in report["aggregates"]}
    assert list(agg) == ["none", "static", "foresight"]

    assert agg["none"]["color_adherence"] == agg["none"]["direction_adherence"] == 100.0
    assert agg["none"]["both_adherence"] == 100.0
    assert math.isinf(agg["none"]["mean_psnr_vs_none"]) and agg["none"]["mean_ssim_vs_none"] == pytest.approx(1.0)
    # foresight returns none's frames: identical
    assert math.isinf(agg["foresight"]["mean_psnr_vs_none"]) and agg["foresight"]["identical_to_none"] == 6
    assert agg["foresight"]["mean_ssim_vs_none"] == pytest.approx(1.0)
    # static adds noise of sigma 8 (clipped): about 30 dB, still adherent
    assert 25 < agg["static"]["mean_psnr_vs_none"] < 35 and agg["static"]["identical_to_none"] == 0
    assert agg["static"]["mean_ssim_vs_none"] < 0.99
    assert agg["static"]["color_adherence"] == 100.0

    assert agg["foresight"]["speedup_vs_none"] == pytest.approx(2.0)
    assert agg["static"]["speedup_vs_none"] == pytest.approx(1.25)
    assert agg["none"]["speedup_vs_none"] == pytest.approx(1.0)
    assert agg["foresight"]["mean_skipped_share"] == pytest.approx(0.5)
    assert agg["static"]["median_denoise_seconds"] == pytest.approx(1.6)

    # One warm-up, then every prompt with every policy from seed + i; options go where they apply.
    assert len(fake.calls) == 1 + 6 * 3
    for i, prompt in enumerate(prompts):
        calls = [c for c in fake.calls[1:] if c["prompt"] == prompt]
        assert sorted(c["policy"] for c in calls) == ["foresight", "none", "static"]
        assert all(c["seed"] == 10 + i and c["steps"] == 3 for c in calls)
    for c in fake.calls:
        want = {"none": {}, "static": {"warmup": 3}, "foresight": {"threshold": 0.3, "warmup": 3}}[c["policy"]]
        assert c["options"] == want
    assert agg["foresight"]["policy_config"] == {"policy": "foresight", "threshold": 0.3, "warmup": 3}
    # The policy order rotates from prompt to prompt (drift spreads over all of them).
    firsts = [fake.calls[1 + 3 * i]["policy"] for i in range(3)]
    assert firsts == ["none", "static", "foresight"]

    rows = report["rows"]
    assert len(rows) == 18 and {r["policy"] for r in rows} == {"none", "static", "foresight"}
    assert all(r["color_ok"] and r["direction_ok"] for r in rows)


def test_evaluate_adds_the_reference_policy_and_counts_wrong_answers(monkeypatch):
    class Recolouring(FakeRuntime):
        def generate(self, prompt, seed=0, policy=None, **kw):
            out = super().generate(prompt, seed=seed, policy=policy, **kw)
            if policy == "foresight" and seed % 2:  # every other prompt: a green object whatever was asked
                p = parse_prompt(prompt)
                wrong = "green" if p["color"] != "green" else "red"
                out.frames = render(dataclasses.replace(centred_spec(prompt), color=wrong))
            return out

    rt = Recolouring()
    monkeypatch.setattr(ev, "load_runtime", lambda engines_dir, backend: rt)
    report = ev.evaluate("e", held_out_prompts(4), seed=0, policies=("foresight",))
    agg = {a["policy"]: a for a in report["aggregates"]}
    assert list(agg) == ["none", "foresight"]
    assert agg["foresight"]["color_adherence"] == 50.0 and agg["foresight"]["direction_adherence"] == 100.0
    assert agg["foresight"]["both_adherence"] == 50.0
    assert agg["foresight"]["identical_to_none"] == 2 and math.isfinite(agg["foresight"]["mean_psnr_vs_none"])


def test_evaluate_rejects_bad_options_before_loading(fake):
    with pytest.raises(ConfigError, match="recalculate"):
        ev.evaluate("e", held_out_prompts(2), policies=("none", "static"), recalculate=2)
    with pytest.raises(ConfigError, match="threshold"):
        ev.evaluate("e", held_out_prompts(2), policies=("none", "foresight"), threshold=-1.0)
    with pytest.raises(ValueError, match="not a prompt of this domain"):
        ev.evaluate("e", ["a red panda eating bamboo"])
    assert fake.loads == []


def table_rows(text: str) -> dict[str, dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return {cells[0]: dict(zip(split[0], cells)) for cells in split[2:]}


def test_cli_prints_the_table_and_writes_json(fake, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["--engines", str(tmp_path), "--prompts", "3", "--policies", "none,foresight", "--steps", "2",
            "--threshold", "0.4", "--json", str(out)]
    assert ev.main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"none", "foresight"}
    assert rows["none"]["colour %"] == rows["none"]["direction %"] == "100.0"
    assert rows["foresight"]["PSNR vs none (dB)"] == "inf" and rows["foresight"]["SSIM vs none"] == "1.0000"
    assert rows["foresight"]["speedup"] == "2.00x" and rows["foresight"]["layers skipped"] == "50.0%"

    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m tools.evaluate --engines")
    assert report["config"]["steps"] == 2 and report["config"]["overrides"] == {"threshold": 0.4}
    assert len(report["rows"]) == 6 and report["rows"][0]["psnr_vs_none"] == "inf"
    assert [a["policy"] for a in report["aggregates"]] == ["none", "foresight"]


def test_cli_reports_a_bad_option_as_an_error(fake, tmp_path, capsys):
    assert ev.main(["--engines", str(tmp_path), "--policies", "none", "--threshold", "0.4"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert fake.loads == []

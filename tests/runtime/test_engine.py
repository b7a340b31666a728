"""The executor follows the controller's plan: counters, buffer identity, probes, NaN, reset."""

from __future__ import annotations

import pytest
import torch

from dataclasses import dataclass
from typing import ClassVar

from foresight import Policy
from runtime.errors import NumericsError, ShapeError

PROMPT = "a red square moving left on a black background"


class Spy:
    """Wraps a backend: records each call's step, part and the buffers it was handed."""

    def __init__(self, backend):
        self.backend, self.records, self.step = backend, [], -1
        self._orig = backend.run

    def __enter__(self):
        def run(part, inputs, outputs):
            if part == "stem":
                self.step += 1
            self.records.append({
                "step": self.step, "part": part,
                "in_ptr": {k: v.data_ptr() for k, v in inputs.items()},
                "out_ptr": {k: v.data_ptr() for k, v in outputs.items()},
                "outputs": {k: v.clone() for k, v in outputs.items()} if part != "stem" else {},
            })
            self._orig(part, inputs, outputs)
            for k, v in outputs.items():
                self.records[-1]["outputs"][k] = v.clone()

        self.backend.run = run
        return self

    def __exit__(self, *exc):
        del self.backend.run  # back to the class method


@dataclass(frozen=True)
class Scripted(Policy):
    """A policy whose decisions are given: (start, measure) per step, handed to generate() as an object."""

    script: tuple = ()
    name: ClassVar[str] = "scripted"

    def decide(self, step, state):
        return self.script[step]


def run_scripted(rt, script, **kw):
    with Spy(rt.backend) as spy:
        result = rt.generate(PROMPT, num_inference_steps=len(script), seed=0, decode=False,
                             policy=Scripted(script=tuple(script)), **kw)
    return result, spy


def test_plan_is_followed_and_reuse_binds_cached_buffers(runtime_ort):
    L = runtime_ort.num_layers
    script = [
        (0, False),   # step 0: everything
        (0, True),    # step 1: everything, measured
        (2, True),    # step 2: layers 0-1 reused, start from layer 1's cache
        (L, False),   # step 3: whole stack reused
        (0, True),    # step 4: everything again
    ]
    result, spy = run_scripted(runtime_ort, script)
    calls = {(r["step"], r["part"]) for r in spy.records}
    layer = lambda i: f"layer_{i:03d}"
    # Skipped layers' engines were never called; computed ones exactly once.
    assert {p for s, p in calls if s == 2 and p.startswith("layer")} == {layer(i) for i in range(2, L)}
    assert {p for s, p in calls if s == 3 and p.startswith("layer")} == set()
    assert sum(1 for r in spy.records if r["part"].startswith("layer")) == result.stats["layer_engine_calls"]
    assert result.stats["layer_calls"] == 5 * L - L - 2
    assert result.stats["layer_calls_skipped"] == L + 2
    assert result.stats["bytes_copied"] == 0
    # Step 2: layer 2's hidden input IS layer 1's step-1 output buffer (bound, not copied).
    l1_step1 = next(r for r in spy.records if r["step"] == 1 and r["part"] == layer(1))
    l2_step2 = next(r for r in spy.records if r["step"] == 2 and r["part"] == layer(2))
    assert l2_step2["in_ptr"]["hidden"] == l1_step1["out_ptr"]["hidden_out"]
    # Step 3: the head reads the last layer's step-2 output buffer.
    last_step2 = next(r for r in spy.records if r["step"] == 2 and r["part"] == layer(L - 1))
    head_step3 = next(r for r in spy.records if r["step"] == 3 and r["part"] == "head")
    assert head_step3["in_ptr"]["hidden"] == last_step2["out_ptr"]["hidden_out"]
    # Ping-pong: a layer computed at consecutive steps alternates between two buffers.
    l0 = [r["out_ptr"]["hidden_out"] for r in spy.records if r["part"] == layer(0)]
    assert l0[0] != l0[1] and l0[0] == l0[2]


def test_probe_mse_compares_like_with_like(runtime_ort):
    """Each probe's mse is against that probe's own previous output (the reference compared
    the temporal output with the spatial cache)."""
    script = [(0, False), (0, True), (0, True)]
    result, spy = run_scripted(runtime_ort, script)
    for step in (1, 2):
        for layer in range(runtime_ort.num_layers):
            name = f"layer_{layer:03d}"
            now = next(r for r in spy.records if r["step"] == step and r["part"] == name)["outputs"]
            before = next(r for r in spy.records if r["step"] == step - 1 and r["part"] == name)["outputs"]
            got = result.trace["steps"][step]["mse"][layer]
            for k, probe in enumerate(("spatial", "hidden_out")):
                want = float(torch.mean((now[probe] - before[probe]) ** 2))
                assert got[k] == pytest.approx(want, rel=1e-6)
            # The reference's bug (temporal output vs the spatial cache) gives a different number.
            cross = float(torch.mean((now["hidden_out"] - before["spatial"]) ** 2))
            like = float(torch.mean((now["hidden_out"] - before["hidden_out"]) ** 2))
            assert abs(got[1] - like) < abs(got[1] - cross) / 10


def test_foresight_counters_match_trace(runtime_ort):
    with Spy(runtime_ort.backend) as spy:
        result = runtime_ort.generate(PROMPT, num_inference_steps=20, seed=0, policy="foresight",
                                      warmup=4, threshold=20.0, decode=False)
    steps = result.trace["steps"]
    assert result.stats["layer_calls_skipped"] > 0
    for s in steps:
        called = sorted(r["part"] for r in spy.records if r["step"] == s["step"] and r["part"].startswith("layer"))
        assert called == [f"layer_{i:03d}" for i in s["computed"]]
    assert result.stats["layer_engine_calls"] == sum(len(s["computed"]) for s in steps)
    assert result.stats["bytes_copied"] == 0


def test_static_policy_skips_whole_stack(runtime_ort):
    r = runtime_ort.generate(PROMPT, num_inference_steps=10, seed=0, policy="static", warmup=2, reuse=1, period=2,
                             decode=False)
    computed = [len(s["computed"]) for s in r.trace["steps"]]
    L = runtime_ort.num_layers
    assert computed == [L, L, L, 0, L, 0, L, 0, L, 0]
    assert r.stats["layer_engine_calls"] == sum(computed)


def test_second_generation_behaves_like_the_first(runtime_ort):
    kw = dict(num_inference_steps=12, seed=3, policy="foresight", warmup=4, threshold=20.0, decode=False)
    a = runtime_ort.generate(PROMPT, **kw)
    runtime_ort.generate("something else entirely", num_inference_steps=7, seed=9, policy="static")
    b = runtime_ort.generate(PROMPT, **kw)
    assert torch.equal(a.latents, b.latents)
    assert a.trace["steps"] == b.trace["steps"]


def test_backends_make_identical_decisions_under_foresight(runtime_ort, runtime_torch):
    kw = dict(num_inference_steps=20, seed=0, policy="foresight", warmup=4, threshold=20.0)
    a = runtime_ort.generate(PROMPT, **kw)
    b = runtime_torch.generate(PROMPT, **kw)
    assert [s["computed"] for s in a.trace["steps"]] == [s["computed"] for s in b.trace["steps"]]
    assert a.stats["layer_calls_skipped"] > 0
    rel = float((a.latents - b.latents).abs().max() / b.latents.abs().max())
    assert rel < 1e-4
    assert abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1


def test_nan_in_a_layer_names_layer_and_step(monkeypatch, runtime_ort):
    backend = runtime_ort.backend
    orig = backend.run
    state = {"step": -1}

    def poisoned(part, inputs, outputs):
        if part == "stem":
            state["step"] += 1
        orig(part, inputs, outputs)
        if part == "layer_002" and state["step"] == 3:
            outputs["hidden_out"][0, 0, 0, 0, 0] = float("nan")

    monkeypatch.setattr(backend, "run", poisoned)
    with pytest.raises(NumericsError, match=r"layer 2 .*step 3"):
        runtime_ort.generate(PROMPT, num_inference_steps=6, seed=0, policy="none", decode=False)


@pytest.fixture(scope="module")
def shapes(runtime_ort):
    return runtime_ort.manifest.shapes


@pytest.mark.parametrize("case", ["frames-above", "frames-one", "height-indivisible", "width-below", "height-above"])
def test_shapes_outside_the_built_profile(runtime_ort, shapes, case):
    fr, hs, ws = shapes["frames"], shapes["height"], shapes["width"]
    kw, match = {
        "frames-above": (dict(num_frames=fr["max"] + 1), rf"frames={fr['max'] + 1} is outside .*\[{fr['min']}, {fr['max']}\]"),
        "frames-one": (dict(num_frames=1), r"frames=1 is outside"),
        "height-indivisible": (dict(height=hs["default"] + 2),
                               rf"height={hs['default'] + 2} is not divisible by {hs['multiple_of']}"),
        "width-below": (dict(width=ws["min"] - ws["multiple_of"]), r"is outside"),
        "height-above": (dict(height=hs["max"] + hs["multiple_of"]), r"is outside"),
    }[case]
    with pytest.raises(ShapeError, match=match):
        runtime_ort.generate(PROMPT, num_inference_steps=2, **kw)


def test_non_default_shape_runs(runtime_ort, shapes):
    m = shapes["height"]["multiple_of"]
    frames, height, width = shapes["frames"]["max"] // 2, shapes["height"]["default"] - 2 * m, \
        shapes["width"]["default"] + 2 * m
    r = runtime_ort.generate(PROMPT, num_inference_steps=2, num_frames=frames, height=height, width=width, seed=0)
    assert r.frames.shape == (frames, height, width, 3)


def test_torch_backend_in_bfloat16(engines_dir, runtime_torch):
    """Reduced precision on the reference backend: buffers in bf16 except the timestep, which
    the manifest pins to fp32; the result stays close to fp32."""
    from runtime import Runtime

    rt = Runtime.load(engines_dir, backend="torch", device="cpu", dtype="bfloat16")
    kw = dict(num_inference_steps=4, seed=0, policy="none", decode=False)
    low = rt.generate(PROMPT, **kw)
    pool = next(iter(rt._pools.values()))
    assert pool.stem_in["latents"].dtype == torch.bfloat16
    assert pool.stem_in["timestep"].dtype == torch.float32
    assert pool.layer_sets[0][0]["hidden_out"].dtype == torch.bfloat16
    ref = runtime_torch.generate(PROMPT, **kw)
    rel = float((low.latents - ref.latents).abs().max() / ref.latents.abs().max())
    assert 0 < rel < 0.1


def test_policy_configs_and_overrides(runtime_ort):
    from foresight import ConfigError, ForesightConfig, StaticConfig

    assert runtime_ort.make_policy() == ForesightConfig(**runtime_ort.manifest.foresight_defaults)
    assert runtime_ort.make_policy("foresight", threshold=9.0).threshold == 9.0
    cfg = runtime_ort.make_policy(ForesightConfig(warmup=3, recalculate=5, threshold=0.1), threshold=2.0)
    assert cfg == ForesightConfig(warmup=3, recalculate=5, threshold=2.0)
    assert runtime_ort.make_policy(StaticConfig(warmup=2), reuse=None) == StaticConfig(warmup=2)
    with pytest.raises(ConfigError):
        runtime_ort.make_policy(StaticConfig(), threshold=1.0)
    r = runtime_ort.generate(PROMPT, num_inference_steps=6, policy=ForesightConfig(warmup=2, recalculate=3),
                             threshold=50.0, decode=False)
    assert r.stats["policy_config"] == {"policy": "foresight", "warmup": 2, "recalculate": 3, "threshold": 50.0}


def test_on_step_reports_every_step_and_an_exception_stops_between_steps(runtime_ort):
    kw = dict(num_frames=4, height=16, width=16, num_inference_steps=8, seed=3, policy="foresight", warmup=2,
              recalculate=3)
    seen = []
    full = runtime_ort.generate("a red ball moving right", on_step=seen.append, **kw)
    assert [i.step for i in seen] == list(range(1, 9)) and {i.steps for i in seen} == {8}
    assert [i.layers_computed for i in seen] == [len(s["computed"]) for s in full.trace["steps"]]
    assert seen[-1].layers_skipped == full.stats["layer_calls_skipped"] > 0
    assert {i.layers_total for i in seen} == {8 * runtime_ort.num_layers} and all(i.seconds > 0 for i in seen)

    class Stop(Exception):
        pass

    def stop_at_3(info):
        if info.step == 3:
            raise Stop()

    calls_before = runtime_ort.layer_engine_calls()
    with pytest.raises(Stop):
        runtime_ort.generate("a red ball moving right", on_step=stop_at_3, **kw)
    assert runtime_ort.layer_engine_calls() - calls_before == sum(i.layers_computed for i in seen[:3])
    again = runtime_ort.generate("a red ball moving right", **kw)  # fresh state after the stop
    assert torch.equal(again.latents, full.latents) and again.trace["steps"] == full.trace["steps"]

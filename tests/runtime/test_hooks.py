"""``apply_foresight`` on stock diffusers pipelines.

Oracle: on the shipped Latte loaded as a LattePipeline, the hooks give the runtime's torch backend's
decision trace (mse included, bit for bit) and its frames and latents. Every supported pipeline:
with ``none`` the hooks change nothing (bit-identical to plain diffusers), with Foresight the blocks
of reused layers are not called at all (counted by a diffusers hook of our own under Foresight's),
a second call repeats the first, also after an exception inside a call, and ``remove()`` gives
plain diffusers back. Wan runs CFG as two passes: one decision per step, on the mean of the two
passes' mse, checked against mse computed here from the blocks' outputs and against the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from foresight import ForesightConfig
from runtime import apply_foresight
from runtime.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[2] / "exporter" / "presets"
PROMPT = "a red square moving left on a black background"
FORESIGHT = dict(warmup=4, recalculate=3, threshold=1.0)


def counting_hooks(blocks):
    """A diffusers hook on each block counting the calls that reach its forward (registered before
    Foresight's, so it sits under it: a block Foresight skips is not counted)."""
    from diffusers.hooks import HookRegistry, ModelHook

    calls = [0] * len(blocks)

    class Count(ModelHook):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def pre_forward(self, module, *args, **kwargs):
            calls[self.i] += 1
            return args, kwargs

    for i, block in enumerate(blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(Count(i), "count")
    return calls


def remove_counting(blocks):
    for block in blocks:
        block._diffusers_hook.remove_hook("count", recurse=False)


def decisions(trace):
    return [(s["computed"], s["measure"]) for s in trace["steps"]]


# ---------------------------------------------------------------- Latte: the oracle
@pytest.fixture(scope="module")
def latte():
    from diffusers import LattePipeline

    pipe = LattePipeline.from_pretrained(PRESETS / "latte-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latte_kwargs(runtime, steps=20):
    s, p = runtime.manifest.shapes, runtime.manifest.pipeline
    return dict(num_inference_steps=steps, height=s["height"]["default"], width=s["width"]["default"],
                video_length=s["frames"]["default"], guidance_scale=p["default_guidance"], negative_prompt="",
                clean_caption=False)


def run_latte(pipe, kwargs, seed=0, output_type="np", raise_at=None):
    """Frames (uint8, as the runtime writes them) and the final latents."""
    final = {}

    def on_step_end(pipe, i, t, tensors):
        if raise_at == i:
            raise RuntimeError("stop")
        final["latents"] = tensors["latents"]
        return {}

    out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
               callback_on_step_end=on_step_end, **kwargs).frames
    frames = (out[0] * 255).round().astype(np.uint8) if output_type == "np" else None
    return frames, final["latents"]


@pytest.mark.parametrize("policy", [ForesightConfig(**FORESIGHT), "static"], ids=["foresight", "static"])
def test_latte_hooks_equal_the_runtime_torch_backend(latte, runtime_torch, policy):
    kwargs = latte_kwargs(runtime_torch)
    ref = runtime_torch.generate(PROMPT, num_inference_steps=kwargs["num_inference_steps"], seed=0, policy=policy)
    assert ref.stats["layer_calls_skipped"] > 0
    blocks = [b for pair in zip(latte.transformer.transformer_blocks, latte.transformer.temporal_transformer_blocks)
              for b in pair]
    calls = counting_hooks(blocks)
    try:
        with apply_foresight(latte, policy) as handle:
            frames, latents = run_latte(latte, kwargs)
            assert handle.trace == ref.trace  # every decision and every mse, bit for bit
            stats = handle.stats
    finally:
        remove_counting(blocks)
    assert torch.equal(latents, ref.latents)
    assert np.array_equal(frames, ref.frames)
    assert stats["layer_calls_skipped"] == ref.stats["layer_calls_skipped"]
    # Reuse is a suffix, and a reused layer's blocks are not called at all.
    expected = [sum(layer in s["computed"] for s in ref.trace["steps"]) for layer in range(runtime_torch.num_layers)]
    assert calls == [n for n in expected for _ in range(2)]
    assert stats["block_calls"] == sum(calls)


def test_latte_second_call_and_after_exceptions_repeat_the_first(latte, runtime_torch):
    kwargs = latte_kwargs(runtime_torch, steps=12)
    with apply_foresight(latte, **FORESIGHT) as handle:
        _, first = run_latte(latte, kwargs, output_type="latent")
        trace = handle.trace
        assert handle.stats["layer_calls_skipped"] > 0
        _, again = run_latte(latte, kwargs, output_type="latent")
        assert torch.equal(again, first) and handle.trace == trace
        with pytest.raises(RuntimeError, match="stop"):  # between steps (a callback)
            run_latte(latte, kwargs, output_type="latent", raise_at=6)
        _, again = run_latte(latte, kwargs, output_type="latent")
        assert torch.equal(again, first) and handle.trace == trace

        # Inside a pass: a block raises halfway through the stack.
        from diffusers.hooks import HookRegistry, ModelHook

        class Fail(ModelHook):
            armed = True

            def pre_forward(self, module, *args, **kwargs):
                if Fail.armed and handle.stats["steps"] == 7:
                    Fail.armed = False
                    raise RuntimeError("block failed")
                return args, kwargs

        block = latte.transformer.temporal_transformer_blocks[1]
        HookRegistry.check_if_exists_or_initialize(block).register_hook(Fail(), "fail")
        try:
            with pytest.raises(RuntimeError, match="block failed"):
                run_latte(latte, kwargs, output_type="latent")
            _, again = run_latte(latte, kwargs, output_type="latent")
        finally:
            block._diffusers_hook.remove_hook("fail", recurse=False)
        assert torch.equal(again, first) and handle.trace == trace
        assert handle.stats["generations"] == 6


def test_remove_gives_plain_diffusers_back(latte, runtime_torch):
    kwargs = latte_kwargs(runtime_torch, steps=6)
    _, plain = run_latte(latte, kwargs, output_type="latent")
    handle = apply_foresight(latte, warmup=2, recalculate=2, threshold=5.0)
    _, cached = run_latte(latte, kwargs, output_type="latent")
    assert handle.stats["layer_calls_skipped"] > 0 and not torch.equal(cached, plain)
    handle.remove()
    handle.remove()  # idempotent
    assert "set_timesteps" not in vars(latte.scheduler) and "step" not in vars(latte.scheduler)
    for module in latte.transformer.modules():
        assert "foresight" not in getattr(module, "_diffusers_hook", type("", (), {"hooks": {}})).hooks
    _, after = run_latte(latte, kwargs, output_type="latent")
    assert torch.equal(after, plain)
    with apply_foresight(latte, policy="none"):  # applicable again, and `none` changes nothing
        _, none = run_latte(latte, kwargs, output_type="latent")
    assert torch.equal(none, plain)


def test_transformer_driven_directly_detects_new_generations(latte, runtime_torch):
    kwargs = latte_kwargs(runtime_torch, steps=10)
    with apply_foresight(latte, **FORESIGHT) as handle:
        _, expected = run_latte(latte, kwargs, output_type="latent")
        trace = handle.trace
    with apply_foresight(latte.transformer, **FORESIGHT) as handle:  # no scheduler: steps from the calls
        for _ in range(2):  # the second video is told apart by its timesteps starting over
            _, latents = run_latte(latte, kwargs, output_type="latent")
            assert torch.equal(latents, expected) and handle.trace == trace
        assert handle.stats["generations"] == 2


def test_a_replaced_scheduler_is_followed(latte, runtime_torch):
    from diffusers import DDIMScheduler

    kwargs = latte_kwargs(runtime_torch, steps=10)
    original = latte.scheduler
    with apply_foresight(latte, **FORESIGHT) as handle:
        _, expected = run_latte(latte, kwargs, output_type="latent")
        trace = handle.trace
        latte.scheduler = DDIMScheduler.from_config(original.config)
        try:
            _, latents = run_latte(latte, kwargs, output_type="latent")
            assert torch.equal(latents, expected) and handle.trace == trace
            assert "step" not in vars(original)
        finally:
            latte.scheduler = original
    assert "step" not in vars(original)


def test_compile_true_compiles_the_blocks_and_keeps_the_decisions(latte, runtime_torch):
    kwargs = latte_kwargs(runtime_torch, steps=8)
    config = dict(warmup=3, recalculate=3, threshold=1.0)
    with apply_foresight(latte, **config) as handle:
        _, eager = run_latte(latte, kwargs, output_type="latent")
        trace = handle.trace
    with apply_foresight(latte, compile=True, **config) as handle:
        _, compiled = run_latte(latte, kwargs, output_type="latent")
        assert decisions(handle.trace) == decisions(trace)
    # Inductor's fused kernels round differently; measured ~2e-6 of the largest value.
    assert float((compiled - eager).abs().max()) <= 1e-4 * float(eager.abs().max())


def test_user_compiled_modules_are_refused(latte, runtime_torch):
    with pytest.raises(ConfigError, match="OptimizedModule|torch.compile"):
        apply_foresight(torch.compile(latte.transformer))
    block = latte.transformer.transformer_blocks[0]
    block.compile()
    try:
        with pytest.raises(ConfigError, match="BasicTransformerBlock is compiled with torch.compile.*compile=True"):
            apply_foresight(latte)
    finally:
        block._compiled_call_impl = None
    with apply_foresight(latte):
        block.compile()  # after apply_foresight: refused at the next call
        try:
            with pytest.raises(ConfigError, match="compiled with torch.compile after apply_foresight"):
                run_latte(latte, latte_kwargs(runtime_torch, steps=2), output_type="latent")
        finally:
            block._compiled_call_impl = None


def test_bad_arguments_are_refused(latte):
    with pytest.raises(ConfigError, match="does not know Linear's layers; it supports LattePipeline"):
        apply_foresight(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="takes a diffusers pipeline or its transformer"):
        apply_foresight("latte")
    with pytest.raises(ConfigError, match="threshold must be a finite number"):
        apply_foresight(latte, threshold=-1.0)
    with pytest.raises(ConfigError, match="unknown policy|policy"):
        apply_foresight(latte, policy="sometimes")
    with pytest.raises(ConfigError, match="passes_per_step must be a whole number"):
        apply_foresight(latte.transformer, passes_per_step=0)
    with pytest.raises(ConfigError, match="passes_per_step is for a transformer driven directly"):
        apply_foresight(latte, passes_per_step=2)
    with pytest.raises(ConfigError, match="compile must be"):
        apply_foresight(latte, compile="yes")
    with apply_foresight(latte):
        with pytest.raises(ConfigError, match="already applied.*handle.remove"):
            apply_foresight(latte)
    from diffusers import FirstBlockCacheConfig

    latte.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    try:
        with pytest.raises(ConfigError, match="diffusers cache is enabled.*disable_cache"):
            apply_foresight(latte)
    finally:
        latte.transformer.disable_cache()


def test_composes_with_diffusers_layerwise_casting(runtime_torch):
    from diffusers import LattePipeline

    pipe = LattePipeline.from_pretrained(PRESETS / "latte-tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    kwargs = latte_kwargs(runtime_torch, steps=6)
    _, plain = run_latte(pipe, kwargs, output_type="latent")
    with apply_foresight(pipe, policy="none") as handle:
        _, none = run_latte(pipe, kwargs, output_type="latent")
        assert handle.stats["layer_calls"] == 6 * runtime_torch.num_layers
    assert torch.equal(none, plain)


# ---------------------------------------------------------------- Wan: two passes per step, two experts
def wan_pipe(preset):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(PRESETS / preset)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_wan(pipe, steps=10, **extra):
    return pipe(PROMPT, num_frames=5, height=32, width=32, num_inference_steps=steps, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="latent", **extra).frames


def test_wan_separate_cfg_passes_get_one_decision_on_their_mean_mse():
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = wan_pipe("wan-tiny-random")
    blocks = list(pipe.transformer.blocks)
    outputs = []  # (call, block) -> output, every call of every block

    class Keep(ModelHook):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def post_forward(self, module, output):
            outputs.append((self.i, output.clone()))
            return output

    for i, block in enumerate(blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(Keep(i), "keep")
    try:
        plain = run_wan(pipe)
        with apply_foresight(pipe, warmup=3, recalculate=3, threshold=0.0) as handle:  # measures, never reuses
            hooked = run_wan(pipe)
            trace = handle.trace
    finally:
        for block in blocks:
            block._diffusers_hook.remove_hook("keep", recurse=False)
    assert torch.equal(hooked, plain)
    L, steps = len(blocks), 10
    per_call = [[out for i, out in outputs[c * L:(c + 1) * L]] for c in range(len(outputs) // L)]
    hooked_calls = per_call[2 * steps:]  # the calls under Foresight: conditional then unconditional, per step
    assert len(hooked_calls) == 2 * steps
    measured = [s for s in trace["steps"] if s["measure"]]
    assert [s["step"] for s in measured] == list(range(2, 10))  # threshold 0: every step after warmup measures
    for s in measured:
        i = s["step"]
        for layer in range(L):
            passes = [float(torch.mean(torch.square(hooked_calls[2 * i + p][layer] - hooked_calls[2 * (i - 1) + p][layer])))
                      for p in (0, 1)]
            assert s["mse"][layer][0] == pytest.approx((passes[0] + passes[1]) / 2, rel=1e-5)


def test_wan_hooks_decide_as_the_runtime(wan_engines_dir):
    from runtime import Runtime

    runtime = Runtime.load(wan_engines_dir, backend="torch", device="cpu")
    config = ForesightConfig(warmup=3, recalculate=3, threshold=1.0)
    ref = runtime.generate(PROMPT, num_frames=5, height=32, width=32, num_inference_steps=10, seed=0, policy=config,
                           decode=False)
    assert ref.stats["layer_calls_skipped"] > 0
    pipe = wan_pipe("wan-tiny-random")
    with apply_foresight(pipe, config) as handle:
        latents = run_wan(pipe, guidance_scale=runtime.manifest.pipeline["default_guidance"])
        trace = handle.trace
    assert decisions(trace) == decisions(ref.trace)
    for ours, theirs in zip(trace["steps"], ref.trace["steps"]):  # the runtime measures both rows at once
        for a, b in zip(ours["mse"], theirs["mse"]):
            assert a == pytest.approx(b, rel=1e-4) if b[0] is not None else a == b
    assert torch.allclose(latents, ref.latents, rtol=0, atol=1e-4 * float(ref.latents.abs().max()))

    # The transformer driven directly, two calls per step: the same decisions.
    with apply_foresight(pipe.transformer, config, passes_per_step=2) as handle:
        again = run_wan(pipe, guidance_scale=runtime.manifest.pipeline["default_guidance"])
        assert handle.trace == trace
    assert torch.equal(again, latents)


def test_wan22_two_experts_run_one_stage_each(preset_engines):
    from runtime import Runtime

    runtime = Runtime.load(preset_engines("wan", "tiny-random-a14b", backend="aoti"), backend="torch", device="cpu")
    config = ForesightConfig(warmup=2, recalculate=3, threshold=1.0)
    ref = runtime.generate(PROMPT, num_frames=5, height=32, width=32, num_inference_steps=12, seed=0, policy=config,
                           decode=False)
    pipe = wan_pipe("wan-tiny-random-a14b")
    first = counting_hooks(list(pipe.transformer.blocks))
    second = counting_hooks(list(pipe.transformer_2.blocks))
    with apply_foresight(pipe, config) as handle:
        latents = run_wan(pipe, steps=12, guidance_scale=4.0, guidance_scale_2=3.0)
        stats = handle.stats
    switch = ref.stats["stages"][1]
    assert stats["stages"] == ref.stats["stages"] == [0, switch] and stats["experts"] == ref.stats["experts"]
    assert decisions(handle.trace) == decisions(ref.trace)
    steps = handle.trace["steps"]
    assert steps[switch]["computed"] == list(range(runtime.num_layers)) and not steps[switch]["measure"]
    computed = [len(s["computed"]) for s in steps]
    assert sum(first) == 2 * sum(computed[:switch]) and sum(second) == 2 * sum(computed[switch:])
    assert stats["layer_calls_skipped"] > 0
    assert torch.allclose(latents, ref.latents, rtol=0, atol=1e-4 * float(ref.latents.abs().max()))


# ---------------------------------------------------------------- every other supported pipeline
def tiny(name):
    """A random-weight tiny pipeline of ``name`` and call arguments with prompt embeddings given (no text
    encoder, latents out: the hooks see only the transformer)."""
    import diffusers

    torch.manual_seed(0)
    e = dict(prompt_embeds=torch.randn(1, 6, 16), prompt_attention_mask=torch.ones(1, 6, dtype=torch.long))
    neg = dict(negative_prompt_embeds=torch.randn(1, 6, 16),
               negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    if name == "HunyuanVideoPipeline":
        model = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
        kwargs = dict(**e, pooled_prompt_embeds=torch.randn(1, 8), height=32, width=32, num_frames=9)
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        components = dict(text_encoder_2=None, tokenizer_2=None)
    elif name == "LTXPipeline":
        model = diffusers.LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
            cross_attention_dim=32, num_layers=3, caption_channels=16)
        kwargs = dict(**e, **neg, height=64, width=64, num_frames=9)
        blocks, components = list(model.transformer_blocks), {}
    else:
        model = diffusers.MochiTransformer3DModel(
            patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3, pooled_projection_dim=16,
            in_channels=12, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16)
        kwargs = dict(**e, **neg, height=32, width=32, num_frames=7)
        blocks, components = list(model.transformer_blocks), {}
    pipe = getattr(diffusers, name)(transformer=model.eval(), scheduler=scheduler, vae=None, text_encoder=None,
                                    tokenizer=None, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, blocks, dict(kwargs, num_inference_steps=10, output_type="latent")


@pytest.mark.filterwarnings("ignore:CPU Autocast")
@pytest.mark.parametrize("name", ["HunyuanVideoPipeline", "LTXPipeline", "MochiPipeline"])
def test_other_pipelines(name):
    pipe, blocks, kwargs = tiny(name)

    def run():
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames

    plain = run()
    with apply_foresight(pipe, policy="none") as handle:
        assert torch.equal(run(), plain)
        assert handle.stats["layer_calls"] == 10 * len(blocks)
    calls = counting_hooks(blocks)
    with apply_foresight(pipe, warmup=3, recalculate=3, threshold=1e6) as handle:  # reuses whatever it can
        first = run()
        trace = handle.trace
        assert torch.equal(run(), first) and handle.trace == trace
    remove_counting(blocks)
    skipped = handle.stats["layer_calls_skipped"]
    assert skipped > 0 and not torch.equal(first, plain)
    assert sum(calls) == 2 * (10 * len(blocks) - skipped)  # two generations
    computed = [sum(layer in s["computed"] for s in trace["steps"]) for layer in range(len(blocks))]
    assert calls == [2 * n for n in computed]
    assert torch.equal(run(), plain)


# ---------------------------------------------------------------- CogVideoX
def test_cogvideox_hooks_equal_the_runtime_torch_backend(aoti_engines_dir):
    from diffusers import CogVideoXPipeline

    from runtime import Runtime

    runtime = Runtime.load(aoti_engines_dir, backend="torch", device="cpu")
    config = ForesightConfig(warmup=3, recalculate=3, threshold=1.0)
    ref = runtime.generate(PROMPT, num_inference_steps=10, seed=0, policy=config, decode=False)
    assert ref.stats["layer_calls_skipped"] > 0
    pipe = CogVideoXPipeline.from_pretrained(PRESETS / "cogvideox-tiny")
    pipe.set_progress_bar_config(disable=True)
    s, p = runtime.manifest.shapes, runtime.manifest.pipeline
    with apply_foresight(pipe, config) as handle:
        latents = pipe(PROMPT, num_frames=s["frames"]["default"], height=s["height"]["default"],
                       width=s["width"]["default"], num_inference_steps=10, guidance_scale=p["default_guidance"],
                       max_sequence_length=p["max_text_length"], generator=torch.Generator().manual_seed(0),
                       output_type="latent").frames
        assert handle.trace == ref.trace
    assert torch.equal(latents, ref.latents)

"""Foresight inside stock diffusers pipelines: :func:`apply_foresight`.

    from diffusers import WanPipeline
    from runtime import apply_foresight
    pipe = WanPipeline.from_pretrained(...)
    handle = apply_foresight(pipe, warmup=6, recalculate=4, threshold=2.0)   # or a ForesightConfig
    video = pipe(prompt).frames[0]
    print(handle.stats)        # layer calls run/skipped, the decision trace
    handle.remove()            # back to plain diffusers

The same :class:`foresight.Controller`, the same semantics and the same trace as the runtime's
engines, on diffusers' own modules through its hook machinery (``HookRegistry`` /
``ModelHook``), so the hooks compose with diffusers' others (layerwise casting, offloading) and
come off cleanly. What differs from the runtime is only where the decisions are carried out:

- **Layers and probes.** A layer is what the runtime exports as one layer part: one block
  (``WanTransformerBlock``, ``CogVideoXBlock``...; HunyuanVideo's dual-stream blocks, then its
  single-stream ones), or Latte's spatial block with the temporal block after it. Each block of
  a layer is one probe: its hidden-states output (Latte: two probes, as in the runtime).
- **Reuse is a suffix.** When the plan starts at layer ``k``, the blocks of layers ``0..k-1``
  are not run at all: each returns its cached output of the last step it ran, so the model's
  own code between blocks stays shape-correct, and block ``k-1``'s cached output is what layer
  ``k`` receives, exactly as the runtime binds that cached buffer.
- **The step clock.** On a pipeline, a generation starts when the pipeline calls its scheduler's
  ``set_timesteps`` and a step ends at each ``scheduler.step``; every transformer call in
  between is one pass of that step. So nothing depends on ``cache_context`` (LattePipeline has
  none), a second ``pipe(...)`` starts from scratch like the first, also after an exception
  inside a call, and a replaced ``pipe.scheduler`` is picked up at the next call. On a
  transformer called directly, every call is a step (``passes_per_step`` calls with CFG run as
  separate passes), and a step whose timestep is not below the previous step's starts a new
  generation (or call ``handle.reset()``).
- **One decision per step for the whole CFG batch.** Pipelines that batch the conditional and
  unconditional halves (Latte, CogVideoX, LTX, Mochi) measure over the batch, as the runtime
  does. Pipelines that run them as separate passes (Wan, HunyuanVideo with true CFG) plan once
  at the step's first pass, run every pass on that plan with one cache per pass, and hand the
  controller, per probe, the mean of the passes' mse: the mse over both passes' outputs taken
  together, which is what the runtime measures on its two-row batch.
- **Two experts** (Wan 2.2 A14B, ``transformer`` and ``transformer_2`` switched at
  ``boundary_ratio``): one stage per expert as in the runtime (docs/foresight-algorithm.md,
  "Stages"); each expert has its own caches; the step at which the pipeline switches is taken
  from its scheduler's timesteps with WanPipeline's own rule.

One generation at a time per pipeline, as diffusers' pipelines themselves. The caches (every layer's
last outputs, per pass and expert, like the runtime's buffers) are freed after the scheduler's last
step and by ``remove()``.

``torch.compile``: a transformer or block compiled by the user is refused (the compiled graph
would bake one step's decision in); ``apply_foresight(..., compile=True)`` compiles each
block's own computation instead, with the decisions made outside the graph (blocks alike share
their compiled graphs: 3 graphs for the tiny Latte's 12 blocks).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from foresight import Controller, Policy, make_config

from .errors import ConfigError, NumericsError

HOOK_NAME = "foresight"


@dataclass(frozen=True)
class ModelLayout:
    """Which blocks of a diffusers transformer form each Foresight layer."""

    pipeline: str  # the pipeline it runs in, for messages
    layers: Callable[[torch.nn.Module], list[tuple[torch.nn.Module, ...]]]  # blocks per layer, in run order
    probes: tuple[str, ...]  # one per block of a layer (the runtime's probe names)
    # The probe tensor laid out as the runtime measures it (same values; the same summation order).
    probe_view: Callable[[int, torch.Tensor, int], torch.Tensor] | None = None


def _latte_layers(model):
    return list(zip(model.transformer_blocks, model.temporal_transformer_blocks))


def _latte_view(probe: int, x: torch.Tensor, batch: int) -> torch.Tensor:
    if probe == 0:  # the spatial block's (B*F, N, D) already has the runtime's (B, F, h, w, D) order
        return x
    # The temporal block's (B*N, F, D) output; the runtime measures it frame-major, as the model returns it.
    return x.reshape(batch, -1, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3).contiguous()


def _blocks(*names):
    return lambda model: [(block,) for name in names for block in getattr(model, name)]


LAYOUTS: dict[str, ModelLayout] = {
    "LatteTransformer3DModel": ModelLayout("LattePipeline", _latte_layers, ("spatial", "hidden_out"), _latte_view),
    "CogVideoXTransformer3DModel": ModelLayout("CogVideoXPipeline", _blocks("transformer_blocks"), ("hidden_out",)),
    "WanTransformer3DModel": ModelLayout("WanPipeline", _blocks("blocks"), ("hidden_out",)),
    "HunyuanVideoTransformer3DModel": ModelLayout(
        "HunyuanVideoPipeline", _blocks("transformer_blocks", "single_transformer_blocks"), ("hidden_out",)),
    "LTXVideoTransformer3DModel": ModelLayout("LTXPipeline", _blocks("transformer_blocks"), ("hidden_out",)),
    "MochiTransformer3DModel": ModelLayout("MochiPipeline", _blocks("transformer_blocks"), ("hidden_out",)),
}


def supported() -> str:
    return ", ".join(f"{layout.pipeline} ({name})" for name, layout in LAYOUTS.items())


def _layout(transformer) -> ModelLayout:
    name = type(transformer).__name__
    if name == "OptimizedModule":
        raise ConfigError("the transformer is wrapped by torch.compile: apply_foresight needs the eager modules "
                          "(its decisions change from step to step); apply it before compiling nothing, and pass "
                          "compile=True to compile each block's computation instead")
    if name not in LAYOUTS:
        raise ConfigError(f"apply_foresight does not know {name}'s layers; it supports {supported()}")
    return LAYOUTS[name]


def _compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None or type(module).__name__ == "OptimizedModule"


def _hidden_index(block) -> int | None:
    """Where a block's hidden states are in its output tuple (diffusers' block registry), None for a tensor."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        return TransformerBlockRegistry.get(type(block)).return_hidden_states_index
    except ValueError:
        return None


def _hook_classes():
    """The two diffusers ``ModelHook`` classes (made on first use: importing runtime must not import diffusers)."""
    from diffusers.hooks import ModelHook

    class BlockHook(ModelHook):
        """Runs one block, or returns its cached output, as its layer's place in the step's plan says."""

        def __init__(self, session, expert: int, layer: int, probe: int, hidden_index, compile_options):
            super().__init__()
            self.session, self.expert, self.layer, self.probe = session, expert, layer, probe
            self.hidden_index = hidden_index
            self.compile_options = compile_options
            self._run = None

        def new_forward(self, module, *args, **kwargs):
            if self._run is None:
                forward = self.fn_ref.original_forward
                self._run = forward if self.compile_options is None else torch.compile(forward, **self.compile_options)
            return self.session.block(self, args, kwargs)

    class TransformerHook(ModelHook):
        """Marks the start and the end of each pass of the transformer."""

        def __init__(self, session, expert: int):
            super().__init__()
            self.session, self.expert = session, expert

        def pre_forward(self, module, *args, **kwargs):
            self.session.begin_pass(self.expert, module, args, kwargs)
            return args, kwargs

        def post_forward(self, module, output):
            self.session.end_pass()
            return output

    return BlockHook, TransformerHook


class _Session:
    """The state of one applied Foresight: the controller, the caches and the step clock."""

    def __init__(self, controller: Controller, layout, experts_layers, pipe, boundary_ratio, passes_per_step):
        self.controller = controller
        self.config = controller.config
        self.layout = layout
        self.experts_layers = experts_layers  # per expert: list of layers, each a tuple of blocks
        self.pipe = pipe
        self.boundary_ratio = boundary_ratio
        self.passes_per_step = passes_per_step
        self.block_calls = 0  # block forwards actually run, every generation together (tests prove skipping by it)
        self.generations = 0
        self._active = False  # a generation is running
        self._stats = None
        self._blocks_checked = set()  # experts whose blocks were checked for torch.compile this generation

    # ---------------------------------------------------------------- generation and step clock
    def new_generation(self, timesteps=None) -> None:
        """Start from scratch: called when the pipeline sets its scheduler's timesteps."""
        experts = [0] * (len(timesteps) if timesteps is not None else 0)
        if timesteps is not None and self.boundary_ratio is not None:
            boundary = self.boundary_ratio * self.pipe.scheduler.config.num_train_timesteps
            experts = [0 if float(t) >= boundary else 1 for t in timesteps]  # WanPipeline's rule
        stages = [0] + [i for i in range(1, len(experts)) if experts[i] != experts[i - 1]]
        if timesteps is not None:
            self.config.check_run(self.controller.num_layers, len(experts), tuple(stages))
        self.controller.reset(stages=stages)
        self.experts = experts
        self.caches = {}  # (expert, pass) -> [layer][probe] -> the block's whole output
        self.step = 0
        self.plan = None
        self.pass_index = -1
        self.in_pass = False
        self.last_timestep = None
        self.pending = []  # per pass: {(layer, probe): mse tensor}, while the step measures
        self._blocks_checked = set()
        self.generations += 1
        self._active = True

    def reset(self) -> None:
        self._active = False

    def _timestep(self, module, args, kwargs):
        if "timestep" in kwargs:
            t = kwargs["timestep"]
        else:
            params = list(inspect.signature(type(module).forward).parameters)[1:]
            t = args[params.index("timestep")] if "timestep" in params and params.index("timestep") < len(args) else None
        if t is None:
            return None
        return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)

    def begin_pass(self, expert: int, module, args, kwargs) -> None:
        # The transformer every pass; its blocks (compiled, if at all, between calls) once per generation.
        blocks = () if expert in self._blocks_checked else (b for layer in self.experts_layers[expert] for b in layer)
        for m in (module, *blocks):
            if _compiled(m):
                raise ConfigError(f"{type(m).__name__} was compiled with torch.compile after apply_foresight: the "
                                  f"compiled graph would bake one step's decision in; remove the compile and pass "
                                  f"compile=True to apply_foresight, which compiles each block's computation instead")
        self._blocks_checked.add(expert)
        if self.pipe is not None:
            self._check_scheduler()
            # No set_timesteps seen (the scheduler was set up before the hooks), or the last pass raised.
            if not self._active or self.in_pass:
                self.new_generation(self.pipe.scheduler.timesteps)
        else:
            t = self._timestep(module, args, kwargs)
            if not self._active or self.in_pass:
                self.new_generation()
            elif self.plan is None and self.step > 0 and None not in (t, self.last_timestep) \
                    and t >= self.last_timestep:  # denoising runs down the timesteps: this is a new video
                self.new_generation()
            if self.plan is None:
                self.last_timestep = t
        if self.plan is None:
            if self.experts and self.step < len(self.experts) and self.experts[self.step] != expert:
                names = ("transformer", "transformer_2")
                raise ConfigError(f"the pipeline ran {names[expert]} at step {self.step}, where its boundary_ratio "
                                  f"{self.boundary_ratio} gives {names[self.experts[self.step]]}: Foresight cannot tell "
                                  f"the experts' stages apart; call the pipeline as WanPipeline does")
            self.plan = self.controller.plan(self.step)
            self.pass_index = 0
        else:
            self.pass_index += 1
        self.expert = expert
        self.batch = self._batch(module, args, kwargs)
        self.in_pass = True
        self.pending.append({})
        self.seen = 0

    def _batch(self, module, args, kwargs) -> int:
        x = kwargs.get("hidden_states", args[0] if args else None)
        return int(x.shape[0]) if isinstance(x, torch.Tensor) else 1

    def end_pass(self) -> None:
        expected = len(self.plan.computed) * len(self.layout.probes)
        if self.seen != expected:
            raise ConfigError(f"step {self.step}: {self.seen} of the {expected} blocks the plan runs were called; "
                              f"apply_foresight needs every block to run in order on each call (Latte: keep "
                              f"enable_temporal_attentions=True)")
        self.in_pass = False
        if self.pipe is None and self.pass_index + 1 >= self.passes_per_step:
            self.end_step()

    def end_step(self) -> None:
        """The scheduler steps: observe the step's mse (the mean over its passes), advance."""
        if self.plan is None or self.in_pass:
            return
        plan, self.plan = self.plan, None
        if plan.measure:
            keys = [(layer, probe) for layer in plan.computed for probe in range(len(self.layout.probes))]
            per_pass = [torch.stack([p[k] for k in keys]) for p in self.pending]
            # Separate CFG passes: the mean of their mse, i.e. the mse over both passes' outputs together.
            values = per_pass[0] if len(per_pass) == 1 else torch.stack(per_pass).mean(dim=0)
            host = values.tolist()  # the step's one device-to-host transfer
            P = len(self.layout.probes)
            rows = [host[i * P:(i + 1) * P] for i in range(len(plan.computed))]
            for layer, row in zip(plan.computed, rows):
                if not all(v == v and abs(v) != float("inf") for v in row):
                    raise NumericsError(f"step {plan.step}, layer {layer}: the change of its output is not finite: "
                                        f"the model produced NaN/Inf (check its dtype and inputs)")
            self.controller.observe(rows)
        self.pending = []
        self.step += 1
        if self.experts and self.step >= len(self.experts):  # the pipeline's last step: free the caches
            self.caches = {}

    def _check_scheduler(self) -> None:
        if self.pipe.scheduler is not self.scheduler:  # replaced since apply_foresight: follow the new one
            _unwrap_scheduler(self.scheduler)
            self.scheduler = self.pipe.scheduler
            _wrap_scheduler(self.scheduler, self)
            self._active = False

    # ---------------------------------------------------------------- one block
    def block(self, hook, args, kwargs):
        plan = self.plan
        if plan is None:
            raise RuntimeError("a Foresight-hooked block ran outside its transformer's forward; call the transformer")
        layer, probe = hook.layer, hook.probe
        cache = self.caches.setdefault((self.expert, self.pass_index), [[None] * len(self.layout.probes)
                                                                        for _ in range(self.controller.num_layers)])
        if layer < plan.start:
            cached = cache[layer][probe]
            if cached is None:
                raise RuntimeError(f"step {plan.step}: layer {layer} is reused but pass {self.pass_index} has no "
                                   f"cached output (the pipeline changed its number of passes per step)")
            return cached
        output = hook._run(*args, **kwargs)
        self.block_calls += 1
        self.seen += 1
        if plan.measure:
            old = cache[layer][probe]
            if old is None:
                raise RuntimeError(f"step {plan.step}: layer {layer} is measured before it ran (the policy's plan)")
            self.pending[-1][(layer, probe)] = self._mse(hook, output, old)
        cache[layer][probe] = output
        return output

    def _mse(self, hook, new, old) -> torch.Tensor:
        from .engine import probe_mse

        if hook.hidden_index is not None and isinstance(new, tuple):
            new, old = new[hook.hidden_index], old[hook.hidden_index]
        view = self.layout.probe_view
        if view is not None:
            new, old = view(hook.probe, new, self.batch), view(hook.probe, old, self.batch)
        return probe_mse(new, old)

    # ---------------------------------------------------------------- results
    def stats(self) -> dict:
        summary = self.controller.summary()
        steps, L = summary["steps"], self.controller.num_layers
        out = {"policy": self.config.name, "policy_config": self.config.to_dict(), "num_layers": L,
               "steps": steps, "layer_calls": summary["layer_calls"],
               "layer_calls_skipped": summary["layer_calls_skipped"],
               "skipped_share": summary["layer_calls_skipped"] / max(1, steps * L),
               "block_calls": self.block_calls, "generations": self.generations}
        if self.boundary_ratio is not None:
            out["stages"] = list(self.controller.stages)
            out["experts"] = list(getattr(self, "experts", []))
        out["trace"] = self.controller.trace
        return out


def _wrap_scheduler(scheduler, session: _Session) -> None:
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    # functools.wraps: pipelines read these methods' signatures (retrieve_timesteps: sigmas; the step's eta).
    @functools.wraps(set_timesteps)
    def foresight_set_timesteps(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        session.new_generation(scheduler.timesteps)
        return out

    @functools.wraps(step)
    def foresight_step(*args, **kwargs):
        session.end_step()
        return step(*args, **kwargs)

    foresight_set_timesteps.__foresight__ = foresight_step.__foresight__ = True
    scheduler.set_timesteps, scheduler.step = foresight_set_timesteps, foresight_step


def _unwrap_scheduler(scheduler) -> None:
    for name in ("set_timesteps", "step"):
        if getattr(scheduler.__dict__.get(name), "__foresight__", False):
            del scheduler.__dict__[name]


class ForesightHandle:
    """What :func:`apply_foresight` returns: the statistics of the latest generation and ``remove()``."""

    def __init__(self, session: _Session, registries: list):
        self._session = session
        self._registries = registries
        self.removed = False

    @property
    def controller(self) -> Controller:
        return self._session.controller

    @property
    def stats(self) -> dict:
        """The latest (or running) generation: policy, steps, layer calls run and skipped, the trace."""
        return self._session.stats()

    @property
    def trace(self) -> dict:
        return self._session.controller.trace

    def reset(self) -> None:
        """The next transformer call starts a new generation (a transformer driven directly)."""
        self._session.reset()

    def remove(self) -> None:
        """Take every hook off: the pipeline is plain diffusers again."""
        if self.removed:
            return
        for registry in self._registries:
            registry.remove_hook(HOOK_NAME, recurse=False)
            registry.invalidate_child_registries_cache()
        self._session.caches = {}
        if self._session.pipe is not None:
            _unwrap_scheduler(self._session.scheduler)
        for module in self._session.transformers:
            module.__dict__.pop("_foresight_applied", None)
        self.removed = True

    def __enter__(self) -> ForesightHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_foresight(target, policy: str | Policy | None = None, *, warmup: int | None = None,
                    recalculate: int | None = None, threshold: float | None = None, passes_per_step: int = 1,
                    compile: bool | dict = False, **policy_options) -> ForesightHandle:
    """Foresight on a diffusers pipeline (``LattePipeline``, ``CogVideoXPipeline``, ``WanPipeline``
    2.1 and 2.2, ``HunyuanVideoPipeline``, ``LTXPipeline``, ``MochiPipeline``) or on one of their
    transformers passed directly.

    ``policy``: a name (``foresight``, the default, ``static``, ``none``) or a policy object such as
    ``ForesightConfig(warmup=6, recalculate=4, threshold=2.0)``; ``warmup``, ``recalculate``,
    ``threshold`` and ``policy_options`` override its options. ``passes_per_step``: transformer calls
    per denoising step when a transformer is driven directly with CFG as separate passes.
    ``compile``: True (or ``torch.compile`` options) compiles each block's computation.
    """
    overrides = {k: v for k, v in dict(warmup=warmup, recalculate=recalculate, threshold=threshold,
                                       **policy_options).items() if v is not None}
    if isinstance(policy, Policy):
        config = policy
        if overrides:
            config = make_config(policy.name, **{**{k: v for k, v in policy.to_dict().items() if k != "policy"},
                                                 **overrides})
    elif policy is None or isinstance(policy, str):
        config = make_config(policy or "foresight", **overrides)
    else:
        raise ConfigError(f"policy must be a name or a Policy such as ForesightConfig (got {type(policy).__name__})")
    if isinstance(passes_per_step, bool) or not isinstance(passes_per_step, int) or passes_per_step < 1:
        raise ConfigError(f"passes_per_step must be a whole number >= 1 (got {passes_per_step!r}): 2 when the "
                          f"conditional and unconditional halves run as separate calls")
    if compile is True:
        compile_options = {}
    elif compile is False or compile is None:
        compile_options = None
    elif isinstance(compile, dict):
        compile_options = dict(compile)
    else:
        raise ConfigError(f"compile must be True, False or a dict of torch.compile options (got {compile!r})")

    if isinstance(target, torch.nn.Module):
        pipe, transformers, boundary = None, [target], None
    elif hasattr(target, "transformer") and hasattr(target, "scheduler"):
        pipe = target
        if passes_per_step != 1:
            raise ConfigError("passes_per_step is for a transformer driven directly; on a pipeline the steps are "
                              "taken from its scheduler")
        boundary = getattr(pipe.config, "boundary_ratio", None) if hasattr(pipe, "config") else None
        second = getattr(pipe, "transformer_2", None)
        if boundary is not None and (pipe.transformer is None or second is None):
            raise ConfigError("the pipeline has a boundary_ratio but not both transformer and transformer_2: "
                              "load both experts")
        transformers = [pipe.transformer] + ([second] if boundary is not None else [])
        if pipe.transformer is None:
            raise ConfigError("the pipeline has no transformer")
        if not (callable(getattr(pipe.scheduler, "set_timesteps", None)) and callable(getattr(pipe.scheduler, "step",
                                                                                               None))):
            raise ConfigError("the pipeline's scheduler has no set_timesteps/step: Foresight takes its steps from them")
    else:
        raise ConfigError(f"apply_foresight takes a diffusers pipeline or its transformer (got {type(target).__name__}); "
                          f"it supports {supported()}")

    if len({type(t).__name__ for t in transformers}) != 1:
        raise ConfigError("the two experts are different models")
    layout = _layout(transformers[0])  # one class, so one layout for every expert
    experts_layers = [layout.layers(t) for t in transformers]
    if len({len(layers) for layers in experts_layers}) != 1:
        raise ConfigError(f"the experts have {[len(x) for x in experts_layers]} layers: Foresight needs as many in each")
    for t, layers in zip(transformers, experts_layers):
        if t.__dict__.get("_foresight_applied"):
            raise ConfigError(f"Foresight is already applied to this {type(t).__name__}: call handle.remove() first")
        if getattr(t, "is_cache_enabled", False):
            raise ConfigError(f"a diffusers cache is enabled on this {type(t).__name__}: Foresight would cache on top "
                              f"of it; call transformer.disable_cache() first")
        for m in (t, *(b for layer in layers for b in layer)):
            if _compiled(m):
                raise ConfigError(f"{type(m).__name__} is compiled with torch.compile: apply_foresight needs the eager "
                                  f"blocks (a compiled graph would bake one step's decision in); load it without "
                                  f"compiling and pass compile=True, which compiles each block's computation instead")

    from diffusers.hooks import HookRegistry

    controller = Controller(config, len(experts_layers[0]), len(layout.probes))
    session = _Session(controller, layout, experts_layers, pipe, boundary, passes_per_step)
    session.transformers = transformers
    BlockHook, TransformerHook = _hook_classes()
    registries = []
    for expert, (t, layers) in enumerate(zip(transformers, experts_layers)):
        for layer, blocks in enumerate(layers):
            for probe, block in enumerate(blocks):
                registry = HookRegistry.check_if_exists_or_initialize(block)
                registry.register_hook(BlockHook(session, expert, layer, probe, _hidden_index(block),
                                                 compile_options), HOOK_NAME)
                registries.append(registry)
        registry = HookRegistry.check_if_exists_or_initialize(t)
        registry.register_hook(TransformerHook(session, expert), HOOK_NAME)
        registry.invalidate_child_registries_cache()
        registries.append(registry)
        t.__dict__["_foresight_applied"] = True
    if pipe is not None:
        session.scheduler = pipe.scheduler
        _wrap_scheduler(pipe.scheduler, session)
    return ForesightHandle(session, registries)

"""Foresight runtime: loads an engines folder and generates videos.

    from runtime import Runtime
    rt = Runtime.load("engines/latte-tiny", backend="onnxruntime")
    result = rt.generate("a red ball bouncing", seed=0, policy="foresight")

    from runtime import apply_foresight      # Foresight on a stock diffusers pipeline
    handle = apply_foresight(pipe, warmup=6, recalculate=4, threshold=2.0)
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("foresight-dit")
except _metadata.PackageNotFoundError:  # running from a source checkout
    __version__ = "0.1.0+source"


def __getattr__(name):
    # Lazy: importing runtime.errors or runtime.manifest must not pull in torch.
    if name in ("Runtime", "GenerationResult"):
        from . import engine

        return getattr(engine, name)
    if name in ("apply_foresight", "ForesightHandle"):
        from . import hooks

        return getattr(hooks, name)
    raise AttributeError(name)

"""Foresight runtime: loads an engines folder and generates videos.

    from runtime import Runtime
    rt = Runtime.load("engines/latte-tiny", backend="onnxruntime")
    result = rt.generate("a red ball bouncing", seed=0, policy="foresight")
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
    raise AttributeError(name)

"""The non-transformer parts of each pipeline type: one module per ``pipeline.type``; see :mod:`.base`."""

from .base import PipelineParts, Sampler, make_pipeline

__all__ = ["PipelineParts", "Sampler", "make_pipeline"]

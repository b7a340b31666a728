"""Foresight layer-reuse controller: decides, step by step, which DiT layers run.

Standard library only; it knows nothing about tensors. See
shared/reference/foresight-algorithm.md for the algorithm and the reference bugs avoided.
"""

from .config import POLICIES, ConfigError, ForesightConfig, NoneConfig, StaticConfig, make_config
from .controller import Controller, StepPlan, load_trace, make_controller, trace_to_json

__all__ = [
    "POLICIES", "ConfigError", "NoneConfig", "StaticConfig", "ForesightConfig", "make_config",
    "StepPlan", "Controller", "make_controller", "trace_to_json", "load_trace",
]

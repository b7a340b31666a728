"""Foresight layer-reuse controller: decides, step by step, which DiT layers run.

Standard library only; it knows nothing about tensors. ``policies`` holds each reuse
policy (its options and its decision rule in one class), ``controller`` the per-generation
state machine that applies one, and ``trace`` the versioned JSON format its decisions are
recorded in (``foresight-trace/2``, documented there). See
docs/foresight-algorithm.md for the algorithm and where this project differs from the
paper's reference implementation.
"""

from .controller import Controller, StepPlan, make_controller
from .errors import ConfigError
from .policies import (
    POLICIES,
    ControllerState,
    ForesightConfig,
    NoneConfig,
    Policy,
    ReplayPolicy,
    StaticConfig,
    make_config,
    policy_options,
)
from .trace import TRACE_SCHEMA, load_trace, trace_to_json

__all__ = [
    "POLICIES", "ConfigError", "Policy", "ReplayPolicy", "ControllerState", "NoneConfig", "StaticConfig", "ForesightConfig",
    "make_config", "policy_options", "StepPlan", "Controller", "make_controller",
    "TRACE_SCHEMA", "trace_to_json", "load_trace",
]

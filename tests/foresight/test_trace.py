"""The trace format (foresight-trace/2): written one step per line, read back exactly, checked on load."""

import json
import math

import pytest

from foresight import TRACE_SCHEMA, load_trace, make_controller, trace_to_json

from .test_controller import run, scripted


def test_trace_header_and_json_round_trip():
    ctrl, _ = scripted()
    trace = ctrl.trace
    assert {k: trace[k] for k in ("schema", "policy", "config", "num_layers", "num_probes")} == {
        "schema": "foresight-trace/2",
        "policy": "foresight",
        "config": {"policy": "foresight", "warmup": 3, "recalculate": 2, "threshold": 0.5},
        "num_layers": 4,
        "num_probes": 2,
    }
    assert list(trace["steps"][0]) == ["step", "computed", "source", "measure", "mse", "thresholds"]
    text = trace_to_json(trace)
    assert load_trace(text) == trace == json.loads(text)
    assert len(text.splitlines()) == 2 + len(trace["steps"]) + 1  # one line per step


def test_trace_round_trip_keeps_floats_exact():
    ctrl = make_controller("foresight", 1, 1, warmup=2, threshold=0.1)
    run(ctrl, [None, [[1 / 3]], [[math.pi]]])
    trace = load_trace(trace_to_json(ctrl.trace))
    assert trace["steps"][2]["thresholds"] == [[0.1 * (1 / 3)]] and trace["steps"][2]["mse"] == [[math.pi]]


def test_empty_trace_round_trips():
    ctrl = make_controller("static", 2, 1)
    assert load_trace(trace_to_json(ctrl.trace)) == ctrl.trace


def test_trace_is_a_copy():
    ctrl, _ = scripted()
    ctrl.trace["steps"][3]["thresholds"][0][0] = 123.0
    ctrl.trace["steps"].clear()
    assert ctrl.trace == scripted()[0].trace


@pytest.mark.parametrize("text", [
    '{"schema": "foresight-trace/0", "steps": []}',
    '{"schema": "foresight-trace/1", "steps": []}',  # version 1 had a per-step "store" flag
    '{"steps": []}',
    "[]",
])
def test_load_trace_checks_schema(text):
    with pytest.raises(ValueError, match=r"not a foresight-trace/2 trace .*; regenerate it"):
        load_trace(text)


def _saved(edit):
    trace = scripted()[0].trace
    edit(trace)
    return json.dumps(trace)


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.pop("num_probes"), "trace has fields"),
    (lambda t: t.update(extra=1), "trace has fields"),
    (lambda t: t["steps"][3].update(store=True), r"steps\[3\] is not step 3 with fields"),
    (lambda t: t["steps"][3].pop("mse"), r"steps\[3\] is not step 3"),
    (lambda t: t["steps"].pop(2), r"steps\[2\] is not step 2"),
    (lambda t: t.update(steps={}), r"steps\[0\]"),
])
def test_load_trace_checks_fields(edit, needle):
    with pytest.raises(ValueError, match=needle + ".*regenerate it"):
        load_trace(_saved(edit))


def test_schema_constant_is_the_written_one():
    assert TRACE_SCHEMA == "foresight-trace/2" == make_controller("none", 1, 1).trace["schema"]

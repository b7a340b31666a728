"""libforesight (cpp/): the C++ controller and its C ABI against the Python controller.

- The C++ conformance program replays every golden trace (ctest's test).
- Through ctypes, the C ABI replays every golden trace and every hand-computed case of
  tests/foresight/test_golden.py, decision for decision, and gives their traces back as JSON equal
  to the recorded ones (every mse and threshold bit for bit).
- On random measurements (several policies, stages, layer and probe counts) its decisions and
  traces equal the Python controller's.
- Errors come back as status codes with the Python controller's own messages; a rejected call
  changes nothing and can be retried.
"""

from __future__ import annotations

import ctypes
import json
import random
import subprocess
import threading
from pathlib import Path

import pytest

from foresight import POLICIES, make_controller
from foresight.errors import ConfigError
from tests.foresight.test_golden import FILES, HAND

OK, ARGUMENT, CONFIG, STATE, VALUE = 0, 1, 2, 3, 4


class Plan(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                ("step", "start", "source_layer", "source_probe", "measure", "num_layers")]


@pytest.fixture(scope="module")
def lib(cpp_build):
    lib = ctypes.CDLL(str(cpp_build / "libforesight.so"))
    c_int_p, handle = ctypes.POINTER(ctypes.c_int), ctypes.c_void_p
    lib.fs_last_error.restype = ctypes.c_char_p
    lib.fs_controller_create.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(handle)]
    lib.fs_controller_destroy.argtypes = [handle]
    lib.fs_controller_reset.argtypes = [handle, c_int_p, ctypes.c_size_t]
    lib.fs_controller_check_run.argtypes = [handle, ctypes.c_int, c_int_p, ctypes.c_size_t]
    lib.fs_controller_plan.argtypes = [handle, ctypes.c_int, ctypes.POINTER(Plan)]
    lib.fs_controller_observe.argtypes = [handle, ctypes.POINTER(ctypes.c_double), ctypes.c_size_t, ctypes.c_size_t]
    lib.fs_controller_trace_json.argtypes = [handle, ctypes.POINTER(ctypes.c_void_p)]
    lib.fs_controller_summary.argtypes = [handle] + [ctypes.POINTER(ctypes.c_long)] * 3
    lib.fs_free.argtypes = [ctypes.c_void_p]
    return lib


class CController:
    """The C ABI wrapped like foresight.Controller (plan/observe/reset/trace), raising on an error status."""

    def __init__(self, lib, config: dict, num_layers: int, num_probes: int):
        self.lib, self.h = lib, ctypes.c_void_p()
        self.check(lib.fs_controller_create(json.dumps(config).encode(), num_layers, num_probes, ctypes.byref(self.h)))

    def check(self, status):
        if status != OK:
            raise CError(status, self.lib.fs_last_error().decode())

    def reset(self, stages=(0,)):
        arr = (ctypes.c_int * len(stages))(*stages)
        self.check(self.lib.fs_controller_reset(self.h, arr, len(stages)))

    def plan(self, step):
        p = Plan()
        self.check(self.lib.fs_controller_plan(self.h, step, ctypes.byref(p)))
        return p

    def observe(self, rows):
        rows = [list(r) for r in rows]
        probes = len(rows[0]) if rows else 0
        flat = [v for r in rows for v in r]
        self.check(self.lib.fs_controller_observe(self.h, (ctypes.c_double * len(flat))(*flat), len(rows), probes))

    def trace(self):
        out = ctypes.c_void_p()
        self.check(self.lib.fs_controller_trace_json(self.h, ctypes.byref(out)))
        try:
            return json.loads(ctypes.string_at(out.value).decode())
        finally:
            self.lib.fs_free(out)

    def summary(self):
        values = [ctypes.c_long() for _ in range(3)]
        self.check(self.lib.fs_controller_summary(self.h, *map(ctypes.byref, values)))
        return dict(zip(("layer_calls", "layer_calls_skipped", "steps"), (v.value for v in values)))

    def close(self):
        self.lib.fs_controller_destroy(self.h)


class CError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def replay_through_c(lib, trace: dict) -> dict:
    c = CController(lib, trace["config"], trace["num_layers"], trace["num_probes"])
    try:
        c.reset(trace.get("stages", [0]))
        for want in trace["steps"]:
            p = c.plan(want["step"])
            got = {"computed": list(range(p.start, p.num_layers)),
                   "source": None if p.source_layer < 0 else [p.source_layer, p.source_probe], "measure": bool(p.measure)}
            assert got == {k: want[k] for k in got}, f"step {want['step']}: {got}"
            if p.measure:
                c.observe(want["mse"][p.start:])
        return c.trace()
    finally:
        c.close()


def test_conformance_program_replays_every_golden_trace(cpp_build):
    done = subprocess.run(["ctest", "--test-dir", str(cpp_build), "--output-on-failure"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    out = subprocess.run([str(cpp_build / "foresight_conformance"), *map(str, FILES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert out.stdout.splitlines() == [f"ok   {f}" for f in FILES] and len(FILES) >= 28


def test_conformance_program_reports_a_changed_trace(cpp_build, tmp_path):
    trace = json.loads(FILES[0].read_text())
    changed = next(s for s in trace["steps"] if s["measure"])
    changed["computed"] = changed["computed"][1:]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(trace))
    out = subprocess.run([str(cpp_build / "foresight_conformance"), str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout.startswith(f"FAIL {bad}: step {changed['step']}: decided")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_c_abi_replays_every_golden_trace(lib, path):
    trace = json.loads(path.read_text())
    assert replay_through_c(lib, trace) == trace


@pytest.mark.parametrize("name", HAND)
def test_c_abi_replays_the_hand_computed_cases(lib, name):
    assert replay_through_c(lib, HAND[name]) == HAND[name]


CONFIGS = [{"policy": "none"}, {"policy": "static"}, {"policy": "static", "warmup": 2, "reuse": 2, "period": 3},
           {"policy": "foresight"}, {"policy": "foresight", "warmup": 3, "recalculate": 4, "threshold": 1.5},
           {"policy": "foresight", "warmup": 2, "recalculate": 1, "threshold": 0.0}]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_c_abi_decides_as_python_on_random_measurements(lib, config):
    rng = random.Random(json.dumps(config))
    for _ in range(20):
        L, P, steps = rng.randint(1, 6), rng.randint(1, 3), rng.randint(1, 30)
        stages = [0] + sorted(rng.sample(range(1, steps), rng.randint(0, min(2, steps - 1)))) if steps > 1 else [0]
        options = {k: v for k, v in config.items() if k != "policy"}
        py = make_controller(config["policy"], L, P, **options)
        py.reset(stages=stages)
        c = CController(lib, config, L, P)
        c.reset(stages)
        for t in range(steps):
            want, got = py.plan(t), c.plan(t)
            assert (got.start, bool(got.measure)) == (want.start, want.measure)
            if want.measure:
                # Changes near the thresholds, and exact ties, so `<=` is exercised on both sides.
                rows = [[rng.choice([rng.uniform(0, 2), 1.0, 0.5, 0.0]) for _ in range(P)] for _ in want.computed]
                py.observe(rows)
                c.observe(rows)
        assert c.trace() == json.loads(json.dumps(py.trace))
        assert c.summary() == py.summary()
        c.close()


def python_error(fn):
    try:
        fn()
    except (ConfigError, ValueError, RuntimeError) as e:
        return str(e)
    raise AssertionError("Python accepted it")


def test_bad_policies_are_refused_with_the_python_message(lib):
    for config, status in [({"policy": "sometimes"}, CONFIG), ({"policy": "foresight", "warmup": 1}, CONFIG),
                           ({"policy": "foresight", "threshold": -1.0}, CONFIG),
                           ({"policy": "static", "reuse": 2, "period": 2}, CONFIG),
                           ({"policy": "none", "warmup": 3}, CONFIG),
                           ({"policy": "foresight", "recalculate": 0}, CONFIG)]:
        with pytest.raises(CError) as caught:
            CController(lib, config, 4, 1)
        options = {k: v for k, v in config.items() if k != "policy"}
        expected = python_error(lambda: make_controller(config["policy"], 4, 1, **options))
        if config["policy"] == "sometimes":  # Python lists every registered policy, tests' own included
            expected = f"unknown policy 'sometimes': pass one of {', '.join(POLICIES)}"
        assert caught.value.status == status and str(caught.value) == expected
    h = ctypes.c_void_p()
    assert lib.fs_controller_create(b"{not json", 4, 1, ctypes.byref(h)) == ARGUMENT
    assert b"malformed JSON" in lib.fs_last_error() and not h.value
    assert lib.fs_controller_create(b'{"policy": "none"}', 0, 1, ctypes.byref(h)) == CONFIG
    assert lib.fs_controller_create(None, 4, 1, ctypes.byref(h)) == ARGUMENT
    assert lib.fs_controller_plan(None, 0, None) == ARGUMENT


def test_calls_out_of_order_and_bad_measurements(lib):
    config = {"policy": "foresight", "warmup": 2, "recalculate": 2, "threshold": 0.5}
    c, py = CController(lib, config, 3, 1), make_controller("foresight", 3, 1, warmup=2, recalculate=2, threshold=0.5)
    for t in range(2):
        c.plan(t), py.plan(t)
    for bad in ([[0.1], [0.2]], [[0.1], [float("nan")], [0.3]], [[0.1], [-1.0], [0.3]], [[0.1, 0.2], [0.1], [0.1]]):
        with pytest.raises(CError) as caught:
            c.observe(bad)
        assert caught.value.status == VALUE and str(caught.value) == python_error(lambda: py.observe(bad))
    with pytest.raises(CError) as caught:
        c.plan(2)  # step 1 still waits for its measurement
    assert caught.value.status == STATE and str(caught.value) == python_error(lambda: py.plan(2))
    c.observe([[0.1], [0.2], [0.3]])  # the rejected calls changed nothing: this one is taken
    py.observe([[0.1], [0.2], [0.3]])
    with pytest.raises(CError) as caught:
        c.observe([[0.1], [0.2], [0.3]])
    assert caught.value.status == STATE
    with pytest.raises(CError) as caught:
        c.plan(5)
    assert caught.value.status == STATE and str(caught.value) == python_error(lambda: py.plan(5))
    with pytest.raises(CError) as caught:
        c.reset([1, 2])
    assert caught.value.status == VALUE and "stages must be ascending whole steps starting at 0" in str(caught.value)
    assert c.trace() == json.loads(json.dumps(py.trace))
    c.close()


def test_replay_policy_checks_the_run(lib):
    trace = json.loads(next(f for f in FILES if f.stem == "wan-a14b-foresight").read_text())
    decisions = [[trace["num_layers"] - len(s["computed"]), s["measure"]] for s in trace["steps"]]
    config = {"policy": "replay", "decisions": decisions, "num_layers": trace["num_layers"], "stages": trace["stages"]}
    c = CController(lib, config, trace["num_layers"], trace["num_probes"])
    stages = (ctypes.c_int * len(trace["stages"]))(*trace["stages"])
    assert lib.fs_controller_check_run(c.h, len(decisions), stages, len(trace["stages"])) == OK
    assert lib.fs_controller_check_run(c.h, len(decisions) + 1, None, 0) == CONFIG
    assert f"pass --steps {len(decisions)}" in lib.fs_last_error().decode()
    c.close()


def test_errors_are_per_thread(lib):
    seen = {}

    def fail():
        h = ctypes.c_void_p()
        lib.fs_controller_create(b'{"policy": "nope"}', 2, 1, ctypes.byref(h))
        seen["thread"] = lib.fs_last_error().decode()

    h = ctypes.c_void_p()
    assert lib.fs_controller_create(b'{"policy": "none"}', 2, 1, ctypes.byref(h)) == OK
    worker = threading.Thread(target=fail)
    worker.start()
    worker.join()
    assert "unknown policy" in seen["thread"] and lib.fs_last_error() == b""
    lib.fs_controller_destroy(h)


def test_public_header_is_c(cpp_build, tmp_path):
    # The C ABI header compiles as C (no C++ in it), and a C program links against the library.
    source = tmp_path / "host.c"
    source.write_text('#include <foresight/foresight.h>\n#include <stdio.h>\nint main(void) {\n'
                      '  fs_controller* c; fs_plan p;\n'
                      '  if (fs_controller_create("{\\"policy\\": \\"static\\"}", 3, 1, &c) != FS_OK) return 1;\n'
                      '  for (int t = 0; t < 6; ++t) { fs_controller_plan(c, t, &p); printf("%d ", p.start); }\n'
                      '  fs_controller_destroy(c); return fs_abi_version() == FS_ABI_VERSION ? 0 : 2;\n}\n')
    include = Path(__file__).resolve().parents[2] / "cpp" / "include"
    subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", f"-I{include}", str(source), f"-L{cpp_build}", "-lforesight",
                    f"-Wl,-rpath,{cpp_build}", "-o", str(tmp_path / "host")], check=True)
    out = subprocess.run([str(tmp_path / "host")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "0", "0", "0", "3"]  # static: warmup 4, then reuse 1 of every 2

"""foresight-serve --ray --autoscale 1:2: Serve starts one replica and adds a second under a burst,
which then runs jobs. Its own module (its own server and Ray cluster), so it never runs beside
test_ray.py's two replicas."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from .conftest import Server

pytest.importorskip("ray.serve")

JOB = {"prompt": "a red square moving left", "steps": 40, "size": "16x16", "frames": 4, "policy": "none"}


@pytest.fixture(scope="module")
def autoscaled(engines_dir, tmp_path_factory, run_exclusively):
    with run_exclusively("ray"):  # the other Ray module's cluster is down before this one starts
        s = Server(engines_dir, tmp_path_factory.mktemp("serve-autoscale"), "--ray", "--autoscale", "1:2", timeout=600)
        yield s
        s.close()


def test_a_burst_scales_up_to_a_second_replica_that_runs_jobs(autoscaled):
    assert autoscaled.get("/health").json()["replicas"] == {"RUNNING": 1}  # initial_replicas = MIN
    # Keep four jobs queued (two running, one per dispatcher: Serve's autoscaler sees 2 ongoing requests against
    # a target of 1 per replica) until Serve reports two running replicas and a job ran in a second process.
    ids: list[str] = []
    states: list[dict] = []
    deadline = time.monotonic() + 300
    while True:
        views = [autoscaled.get(f"/v1/videos/{i}").json() for i in ids]
        workers = {v["foresight"]["worker"] for v in views if v["foresight"]["worker"]}
        states.append(autoscaled.get("/health").json()["replicas"])
        if states[-1].get("RUNNING") == 2 and len(workers) == 2:
            break
        assert time.monotonic() < deadline, (f"after 300 s: replica states {states[::10]}, workers {workers}\n"
                                             + "".join(autoscaled.log[-40:]))
        for _ in range(4 - sum(v["status"] == "queued" for v in views)):
            ids.append(autoscaled.submit(seed=len(ids), **JOB)["id"])
        time.sleep(1.0)
    done = [autoscaled.wait(i, timeout=300) for i in ids]
    assert all(v["status"] == "completed" and v["foresight"]["attempts"] == 1 for v in done), done
    assert all(v["foresight"]["worker"].endswith("(ray replica)") for v in done)
    assert 'foresight_replicas{state="RUNNING"} 2.0' in autoscaled.get("/metrics").text


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        out += kids
        stack += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_ray_cluster_the_server_started(autoscaled):
    """Nothing outlives the server: the Ray processes it started (GCS, raylet, agents, replica workers)
    are gone within a minute of its graceful shutdown."""
    procs = _descendants(autoscaled.proc.pid)
    assert len(procs) >= 4, procs  # Ray's GCS and raylet, at least the two replicas' workers
    # uvicorn re-raises the SIGTERM after its shutdown; the handler Ray installs makes that exit status 15
    assert autoscaled.stop(timeout=120) in (0, signal.SIGTERM, -signal.SIGTERM)
    assert any("stopped;" in line for line in autoscaled.log), autoscaled.log
    deadline = time.monotonic() + 60
    while alive := [p for p in procs if _alive(p)]:
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in alive if _alive(p)}
        assert time.monotonic() < deadline, f"still running a minute after SIGTERM: {names}"
        time.sleep(0.5)

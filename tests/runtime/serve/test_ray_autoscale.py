"""foresight-serve --ray --autoscale 1:2: Serve starts one replica and adds a second under a burst.

Its own module (its own server and Ray cluster), so it never runs beside test_ray.py's two replicas.
"""

from __future__ import annotations

import time

import pytest

from .conftest import Server

pytest.importorskip("ray.serve")

PROMPT = "a red square moving left"
JOB = {"prompt": PROMPT, "steps": 40, "size": "16x16", "frames": 4, "policy": "none"}


@pytest.fixture(scope="module")
def autoscaled(engines_dir, tmp_path_factory):
    s = Server(engines_dir, tmp_path_factory.mktemp("serve-autoscale"), "--ray", "--autoscale", "1:2", timeout=600)
    yield s
    s.kill()


def _workers(server, ids) -> dict[str, str]:
    out = {}
    for i in ids:
        v = server.get(f"/v1/videos/{i}").json()
        if v["foresight"]["worker"]:
            out[i] = v["foresight"]["worker"]
    return out


def test_a_burst_scales_up_to_a_second_replica(autoscaled):
    first = autoscaled.wait(autoscaled.submit(seed=0, **JOB)["id"], timeout=180)
    assert first["status"] == "completed", first["error"]
    one = first["foresight"]["worker"]
    # Keep four jobs queued (two running: Serve's autoscaler sees 2 ongoing requests against a target of 1 per
    # replica) until a job runs in another process; a replica takes 20-60 s to start on a 2-core machine.
    ids: list[str] = []
    deadline = time.monotonic() + 420
    while len(set(_workers(autoscaled, ids).values()) | {one}) < 2:
        assert time.monotonic() < deadline, "no second replica after 420 s:\n" + "".join(autoscaled.log[-40:])
        queued = sum(autoscaled.get(f"/v1/videos/{i}").json()["status"] == "queued" for i in ids)
        if queued < 4:
            ids.append(autoscaled.submit(seed=len(ids) + 1, **JOB)["id"])
        time.sleep(0.5)
    done = [autoscaled.wait(i, timeout=300) for i in ids]
    assert all(v["status"] == "completed" and v["foresight"]["attempts"] == 1 for v in done), done
    workers = {v["foresight"]["worker"] for v in done} | {one}
    assert len(workers) == 2 and all(w.endswith("(ray replica)") for w in workers), workers
    assert autoscaled.get("/health").json()["runner"] == "ray"

"""foresight-serve --ray: two Ray Serve replicas behind Serve's router, the job store in the server.
Results equal a single-process generation; a killed replica's job finishes on a live one."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .conftest import Server

pytest.importorskip("ray.serve")

PROMPT = "a green circle moving up"
FAST = {"steps": 4, "size": "16x16", "frames": 4, "policy": "foresight", "warmup": 2, "recalculate": 2}


@pytest.fixture(scope="module")
def ray_server(engines_dir, tmp_path_factory, run_exclusively):
    with run_exclusively("ray"):  # the other Ray module's cluster is down before this one starts
        s = Server(engines_dir, tmp_path_factory.mktemp("serve-ray"), "--ray", "--replicas", "2", timeout=600)
        yield s
        s.close()


@pytest.fixture(scope="module")
def reference(engines_dir):
    """The mp4 a single process makes for a request (the server's own code, in this process)."""
    from runtime.serve.generator import Generator

    gen = Generator({"latte-tiny": str(engines_dir)}, backend="onnxruntime", device="cpu")

    def make(**body) -> bytes:
        # One torch thread, as the replicas run (Ray gives a 1-CPU replica OMP_NUM_THREADS=1): a reduction split
        # over another thread count can round differently and flip a Foresight decision near its threshold.
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            params = gen.check("latte-tiny", body)
            return gen.mp4_bytes(params, gen.generate(params).frames)
        finally:
            torch.set_num_threads(threads)

    return make


def test_jobs_spread_over_both_replicas_and_equal_one_process(ray_server, reference):
    jobs = [ray_server.submit(prompt=PROMPT, seed=s, **FAST) for s in range(10)]
    done = [ray_server.wait(j["id"], timeout=180) for j in jobs]
    assert all(v["status"] == "completed" for v in done), [v["error"] for v in done]
    workers = {v["foresight"]["worker"] for v in done}
    assert len(workers) == 2 and all(w.endswith("(ray replica)") for w in workers), workers
    for s, v in zip(range(10), done):
        assert ray_server.get(f"/v1/videos/{v['id']}/content").content == reference(prompt=PROMPT, seed=s, **FAST)
    health = ray_server.get("/health").json()
    assert health["runner"] == "ray" and health["replicas"] == {"RUNNING": 2}
    assert 'foresight_replicas{state="RUNNING"} 2.0' in ray_server.get("/metrics").text


def test_bad_requests_are_refused_by_the_replicas_rules(ray_server):
    r = ray_server.post("/v1/videos", json={"prompt": PROMPT, "frames": 100})
    assert r.status_code == 400 and "frames=100" in r.json()["error"]["message"]


def test_a_running_job_is_cancelled_on_its_replica(ray_server):
    job = ray_server.submit(prompt=PROMPT, seed=1, steps=400, size="16x16", frames=4, policy="none")
    ray_server.wait(job["id"], until=("in_progress",), timeout=60)
    while ray_server.get(f"/v1/videos/{job['id']}").json()["foresight"]["step"] < 1:
        time.sleep(0.02)
    ray_server.delete(f"/v1/videos/{job['id']}")
    v = ray_server.wait(job["id"], timeout=60)
    assert v["status"] == "cancelled" and v["foresight"]["step"] < 400


def test_a_killed_replica_s_job_finishes_on_a_live_one(ray_server, reference):
    body = {"prompt": PROMPT, "seed": 5, "steps": 80, "size": "16x16", "frames": 4, "policy": "none"}
    job = ray_server.submit(**body)
    deadline = time.monotonic() + 60
    while (v := ray_server.get(f"/v1/videos/{job['id']}").json())["foresight"]["step"] < 1:
        assert time.monotonic() < deadline and v["status"] in ("queued", "in_progress"), v
        time.sleep(0.02)
    pid = int(v["foresight"]["worker"].split()[1])
    os.kill(pid, signal.SIGKILL)
    v = ray_server.wait(job["id"], timeout=240)
    assert v["status"] == "completed" and v["foresight"]["attempts"] == 2, v
    assert v["foresight"]["worker"] != f"pid {pid} (ray replica)"
    assert ray_server.get(f"/v1/videos/{job['id']}/content").content == reference(**body)


def test_deployment_options_and_autoscale_flag():
    from runtime.errors import ConfigError
    from runtime.serve.ray_runner import deployment_options, parse_autoscale

    fixed = deployment_options(3, None, gpus=1)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 1}
    auto = deployment_options(1, parse_autoscale("0:4"), gpus=0)
    assert "num_replicas" not in auto and auto["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}
    cfg = auto["autoscaling_config"]
    assert (cfg["min_replicas"], cfg["max_replicas"], cfg["initial_replicas"], cfg["target_ongoing_requests"]) == \
        (0, 4, 1, 1)
    for bad in ("4", "3:1", "a:b", "0:0"):
        with pytest.raises(ConfigError, match="--autoscale takes MIN:MAX"):
            parse_autoscale(bad)


def test_sigterm_shuts_ray_down(ray_server):
    # uvicorn re-raises the SIGTERM after its shutdown; the handler Ray installs makes that exit status 15
    assert ray_server.stop(signal.SIGTERM, timeout=120) in (0, signal.SIGTERM, -signal.SIGTERM)
    assert any("stopped;" in line for line in ray_server.log), ray_server.log

"""foresight-serve as a real process on loopback: results equal foresight-run's, progress,
cancellation, persistence across kills, shutdown, limits, auth, metrics and bad requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from .conftest import REPO, Server, requests

PROMPT = "a red ball moving right"
FAST = {"steps": 4, "size": "16x16", "frames": 4}  # a short job: ~0.1-0.3 s here


@pytest.fixture(scope="module")
def server(engines_dir, tmp_path_factory):
    s = Server(engines_dir, tmp_path_factory.mktemp("serve"))
    yield s
    s.close()


def run_cli(engines_dir, out, **kw) -> bytes:
    cmd = [sys.executable, "-m", "runtime.cli", "--engines", str(engines_dir), "--out", str(out), "--quiet"]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    # One torch thread, as the server runs (Server sets OMP_NUM_THREADS=1): a reduction split over another
    # thread count can round differently, flip a Foresight decision near its threshold and change the video.
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out.read_bytes()


def test_a_job_polled_and_downloaded_equals_foresight_run(server, engines_dir, tmp_path):
    job = server.submit(prompt=PROMPT, seed=7, steps=8, policy="foresight", warmup=2, recalculate=3, threshold=4.0)
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["foresight"]["seed"] == 7
    done = server.wait(job["id"])
    assert done["status"] == "completed" and done["progress"] == 100, done
    assert done["foresight"]["step"] == 8 and done["foresight"]["layers_total"] == 8 * 6
    stats = done["foresight"]["stats"]
    assert done["foresight"]["layers_skipped"] == stats["layer_calls_skipped"] > 0  # Foresight skipped layers
    video = server.get(f"/v1/videos/{job['id']}/content")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    expected = run_cli(engines_dir, tmp_path / "cli.mp4", prompt=PROMPT, seed=7, steps=8, policy="foresight",
                       warmup=2, recalculate=3, threshold=4.0)
    assert video.content == expected  # byte for byte


def test_the_sync_endpoint_answers_with_the_mp4(server):
    body = {"prompt": PROMPT, "seed": 1, "policy": "none", **FAST}
    r = server.post("/v1/videos/sync", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert server.get(f"/v1/videos/{r.headers['x-video-id']}").json()["status"] == "completed"
    queued = server.wait(server.submit(**body)["id"])  # the same request through the queue: the same bytes
    assert r.content == server.get(f"/v1/videos/{queued['id']}/content").content


def test_a_seedless_request_records_its_seed_and_seconds_map_to_frames(server):
    job = server.wait(server.submit(prompt=PROMPT, seconds="0.5", steps=2, size="16x16")["id"])
    assert job["status"] == "completed" and job["foresight"]["frames"] == 4 and job["seconds"] == "0.5"
    assert isinstance(job["foresight"]["seed"], int)


def test_progress_is_reported_and_a_running_job_is_cancelled(server):
    job = server.submit(prompt=PROMPT, seed=0, steps=400, policy="none", size="16x16", frames=4)
    deadline = time.monotonic() + 60
    while (v := server.get(f"/v1/videos/{job['id']}").json())["foresight"]["step"] < 2:
        assert time.monotonic() < deadline, v
        time.sleep(0.02)
    assert v["status"] == "in_progress" and 0 <= v["progress"] < 100 and v["foresight"]["steps"] == 400
    r = server.delete(f"/v1/videos/{job['id']}")
    assert r.status_code == 200 and r.json()["foresight"]["cancel_requested"] is True
    done = server.wait(job["id"])
    assert done["status"] == "cancelled" and done["foresight"]["step"] < 400
    assert server.get(f"/v1/videos/{job['id']}/content").status_code == 409
    # the worker goes on with the next job, from fresh state
    after = server.wait(server.submit(prompt=PROMPT, seed=1, policy="none", **FAST)["id"])
    assert after["status"] == "completed"
    # deleting a finished job removes it and its video
    assert server.delete(f"/v1/videos/{after['id']}").json() == {"id": after["id"], "object": "video.deleted",
                                                                 "deleted": True}
    assert server.get(f"/v1/videos/{after['id']}").status_code == 404


def test_list_and_models(server):
    ids = [server.submit(prompt=PROMPT, seed=i, **FAST)["id"] for i in range(3)]
    page = server.get("/v1/videos", params={"limit": 2}).json()
    assert [v["id"] for v in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    nxt = server.get("/v1/videos", params={"limit": 1, "after": page["last_id"]}).json()
    assert nxt["data"][0]["id"] == ids[0]
    models = server.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["latte-tiny"] and models[0]["layers"] == 6
    for i in ids:
        server.wait(i)


def test_metrics(server):
    server.wait(server.submit(prompt=PROMPT, seed=5, steps=8, warmup=2, recalculate=3, size="16x16", frames=4)["id"])
    text = server.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("foresight_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['foresight_replicas{state="RUNNING"}'] == 1.0  # the in-process runtime
    assert server.get("/health").json() == {"status": "ok", "runner": "local", "models": ["latte-tiny"],
                                            "replicas": {"RUNNING": 1}}
    assert values['foresight_jobs{state="completed"}'] >= 1
    assert values["foresight_queue_depth"] >= 0
    assert values['foresight_step_seconds_count{model="latte-tiny"}'] >= 8
    assert 0 < values['foresight_layers_skipped_share{model="latte-tiny"}'] < 1
    assert values['foresight_layers_skipped_total{model="latte-tiny"}'] > 0


def test_a_killed_server_loses_no_job(engines_dir, tmp_path, start_server):
    data = tmp_path / "data"
    s = start_server(engines_dir, data)
    first = s.wait(s.submit(prompt=PROMPT, seed=0, policy="none", **FAST)["id"])
    long = s.submit(prompt=PROMPT, seed=1, policy="none", steps=60, size="16x16", frames=4)
    queued = [s.submit(prompt=PROMPT, seed=2 + i, policy="none", **FAST) for i in range(3)]
    s.wait(long["id"], until=("in_progress",))
    s.stop(signal.SIGKILL)

    s2 = start_server(engines_dir, data)
    assert s2.get(f"/v1/videos/{first['id']}/content").status_code == 200  # finished work is still there
    for job in (long, *queued):
        v = s2.wait(job["id"])
        assert v["status"] == "completed", v
    assert s2.get(f"/v1/videos/{long['id']}").json()["foresight"]["attempts"] == 2
    # the interrupted job's video equals a clean run's
    ref = s2.post("/v1/videos/sync", json={"prompt": PROMPT, "seed": 1, "policy": "none", "steps": 60,
                                           "size": "16x16", "frames": 4})
    assert s2.get(f"/v1/videos/{long['id']}/content").content == ref.content
    assert not [p for p in (data / "videos").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_sigterm_stops_gracefully_and_requeues_the_running_job(engines_dir, tmp_path, start_server):
    data = tmp_path / "data"
    s = start_server(engines_dir, data)
    job = s.submit(prompt=PROMPT, seed=3, policy="none", steps=400, size="16x16", frames=4)
    s.wait(job["id"], until=("in_progress",))
    t0 = time.monotonic()
    # uvicorn shuts down, then re-raises the SIGTERM it caught (the exit status of a process ended by it)
    assert s.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert time.monotonic() - t0 < 30
    assert any("1 running job(s) back in the queue" in line for line in s.log), s.log
    s2 = start_server(engines_dir, data)
    v = s2.get(f"/v1/videos/{job['id']}").json()
    assert v["status"] in ("queued", "in_progress") and v["foresight"]["attempts"] <= 1  # not used up
    s2.delete(f"/v1/videos/{job['id']}")
    assert s2.wait(job["id"])["status"] == "cancelled"


def test_a_full_queue_answers_429_with_retry_after(engines_dir, tmp_path, start_server):
    s = start_server(engines_dir, tmp_path / "data", "--max-queue", "1")
    running = s.submit(prompt=PROMPT, policy="none", steps=400, size="16x16", frames=4)
    s.wait(running["id"], until=("in_progress",))
    s.submit(prompt=PROMPT, **FAST)
    r = s.post("/v1/videos", json={"prompt": PROMPT, **FAST})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "queue is full" in r.json()["error"]["message"]
    s.delete(f"/v1/videos/{running['id']}")


def test_the_api_key_guards_every_endpoint_but_health(engines_dir, tmp_path, start_server):
    s = start_server(engines_dir, tmp_path / "data", "--api-key", "sekrit-key-123")
    assert s.get("/health").status_code == 200
    for path in ("/v1/models", "/v1/videos", "/metrics", "/v1/videos/video_x"):
        r = s.get(path)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"], path
        assert s.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert s.post("/v1/videos", json={"prompt": PROMPT}).status_code == 401
    ok = {"Authorization": "Bearer sekrit-key-123"}
    assert s.get("/v1/models", headers=ok).status_code == 200
    r = s.post("/v1/videos", json={"prompt": PROMPT, **FAST}, headers=ok)
    assert s.wait(r.json()["id"], headers=ok)["status"] == "completed"


def test_clients_that_disconnect_leave_the_server_whole(server):
    job = server.wait(server.submit(prompt=PROMPT, seed=9, **FAST)["id"])
    url = f"/v1/videos/{job['id']}/content"
    whole = server.get(url).content
    host, port = "127.0.0.1", server.port
    for _ in range(5):  # ask for the video and hang up after the first bytes
        with socket.create_connection((host, port)) as c:
            c.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert c.recv(16)
    with socket.create_connection((host, port)) as c:  # half a request body, then gone
        c.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"prompt\": \"a red")
    before = server.get("/v1/videos", params={"limit": 1}).json()["data"][0]["id"]
    assert server.get(url).content == whole
    assert server.get("/health").status_code == 200
    assert server.get("/v1/videos", params={"limit": 1}).json()["data"][0]["id"] == before  # no job from it
    # A download cut mid-way: the tiny videos fit in the socket buffers, so this job's file is
    # replaced by 24 MB (in the test's own data folder) and the client hangs up after 64 KB.
    big = server.wait(server.submit(prompt=PROMPT, seed=10, **FAST)["id"])
    payload = bytes(range(256)) * (24 * 4096)
    (server.data_dir / "videos" / f"{big['id']}.mp4").write_bytes(payload)
    for _ in range(3):
        with socket.create_connection((host, port)) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.sendall(f"GET /v1/videos/{big['id']}/content HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            got = 0
            while got < 65536:
                chunk = c.recv(65536)
                assert chunk, "the server closed the download early"
                got += len(chunk)
    assert server.get(f"/v1/videos/{big['id']}/content").content == payload  # the file and the server intact


BAD = [
    # (what, request kwargs, status, code, message fragment)
    ("unknown model", {"json": {"prompt": PROMPT, "model": "sora-2"}}, 404, "model_not_found", "pass one of latte-tiny"),
    ("no prompt", {"json": {"seed": 1}}, 400, "invalid_parameter", "prompt is required"),
    ("empty prompt", {"json": {"prompt": ""}}, 400, "invalid_parameter", "at least 1 character"),
    ("prompt not a string", {"json": {"prompt": 12}}, 400, "invalid_parameter", "prompt: input should be a valid string"),
    ("unknown field", {"json": {"prompt": PROMPT, "duration": 4}}, 400, "invalid_parameter", "unknown field 'duration'"),
    ("not JSON", {"data": b"{prompt: x", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json",
     "not valid JSON"),
    ("a JSON array", {"json": [PROMPT]}, 400, "invalid_parameter", "must be a JSON object"),
    ("form body", {"data": {"prompt": PROMPT}}, 415, "unsupported_media_type", "Content-Type: application/json"),
    ("oversize body", {"json": {"prompt": "x" * 70_000}}, 413, "body_too_large", "the limit is 65536"),
    ("oversize chunked body", {"data": iter([b'{"prompt": "' + b"x" * 40_000, b"x" * 40_000 + b'"}']),
                               "headers": {"Content-Type": "application/json"}}, 413, "body_too_large", "over 65536"),
    ("malformed size", {"json": {"prompt": PROMPT, "size": "big"}}, 400, "invalid_parameter", "WIDTHxHEIGHT"),
    ("size too large", {"json": {"prompt": PROMPT, "size": "1280x720"}}, 400, "invalid_parameter",
     "outside the exported range"),
    ("size not a multiple", {"json": {"prompt": PROMPT, "size": "30x32"}}, 400, "invalid_parameter",
     "not divisible by 4"),
    ("too many frames", {"json": {"prompt": PROMPT, "frames": 100}}, 400, "invalid_parameter", "frames=100"),
    ("seconds and frames", {"json": {"prompt": PROMPT, "frames": 4, "seconds": "1"}}, 400, "invalid_parameter",
     "not both"),
    ("seconds between frames", {"json": {"prompt": PROMPT, "seconds": "0.3"}}, 400, "invalid_parameter",
     "not a whole number of frames"),
    ("seconds not a number", {"json": {"prompt": PROMPT, "seconds": "four"}}, 400, "invalid_parameter",
     "seconds must be a number"),
    ("zero steps", {"json": {"prompt": PROMPT, "steps": 0}}, 400, "invalid_parameter", "steps must be a whole number"),
    ("steps as a string", {"json": {"prompt": PROMPT, "steps": "10"}}, 400, "invalid_parameter",
     "steps: input should be a valid integer"),
    ("negative guidance", {"json": {"prompt": PROMPT, "guidance": -1.0}}, 400, "invalid_parameter",
     "finite number >= 0"),
    ("guidance_2 on one transformer", {"json": {"prompt": PROMPT, "guidance_2": 3.0}}, 400, "invalid_parameter",
     "one transformer"),
    ("negative seed", {"json": {"prompt": PROMPT, "seed": -1}}, 400, "invalid_parameter", "0..2**64-1"),
    ("unknown policy", {"json": {"prompt": PROMPT, "policy": "teacache"}}, 400, "invalid_parameter",
     "pass one of none, static, foresight"),
    ("replay policy", {"json": {"prompt": PROMPT, "policy": "replay"}}, 400, "invalid_parameter", "not served"),
    ("option of another policy", {"json": {"prompt": PROMPT, "policy": "none", "warmup": 3}}, 400,
     "invalid_parameter", "warmup do(es) not apply to policy none"),
    ("warmup below 2", {"json": {"prompt": PROMPT, "warmup": 1}}, 400, "invalid_parameter", "warmup"),
    ("negative threshold", {"json": {"prompt": PROMPT, "threshold": -2.0}}, 400, "invalid_parameter", "threshold"),
    ("static reuse not below its period", {"json": {"prompt": PROMPT, "policy": "static", "reuse": 3, "period": 2}},
     400, "invalid_parameter", "reuse must be < period"),
    ("recalculate 0", {"json": {"prompt": PROMPT, "recalculate": 0}}, 400, "invalid_parameter",
     "recalculate must be >= 1"),
]


@pytest.mark.parametrize("what,kw,status,code,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_naming_the_fix(server, what, kw, status, code, fragment):
    before = server.get("/v1/videos", params={"limit": 1}).json()["data"]
    r = server.post("/v1/videos", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and fragment in err["message"], err
    assert server.get("/v1/videos", params={"limit": 1}).json()["data"] == before  # no job was made


@pytest.mark.parametrize("method,path,params,status,fragment", [
    ("get", "/v1/videos/video_nope", None, 404, "no video 'video_nope'"),
    ("get", "/v1/videos/video_nope/content", None, 404, "no video"),
    ("delete", "/v1/videos/video_nope", None, 404, "no video"),
    ("get", "/v1/videos", {"limit": 0}, 400, "limit must be in 1..100"),
    ("get", "/v1/videos", {"limit": "many"}, 400, "limit"),
    ("get", "/v1/videos", {"order": "up"}, 400, "order must be asc or desc"),
    ("get", "/v1/nothing", None, 404, "the API is under /v1/videos"),
    ("put", "/v1/videos", None, 405, "PUT is not allowed"),
])
def test_bad_paths_and_queries(server, method, path, params, status, fragment):
    r = getattr(requests, method)(server.url + path, params=params, timeout=30)
    assert r.status_code == status and fragment in r.json()["error"]["message"], r.text


def test_content_of_an_unknown_variant_is_refused(server):
    job = server.wait(server.submit(prompt=PROMPT, **FAST)["id"])
    r = server.get(f"/v1/videos/{job['id']}/content", params={"variant": "thumbnail"})
    assert r.status_code == 400 and "variant=video" in r.json()["error"]["message"]


@pytest.mark.parametrize("args,fragment", [
    (["--engines", "/nonexistent/engines"], "does not exist: build it with"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--replicas", "2"], "apply with --ray"),
    (["--port", "70000"], "--port must be in 0..65535"),
])
def test_bad_command_lines_exit_2_with_an_error(engines_dir, tmp_path, args, fragment):
    base = ["--data-dir", str(tmp_path / "data")]
    if "--engines" not in args:
        base += ["--engines", str(engines_dir)]
    r = subprocess.run([sys.executable, "-m", "runtime.serve.cli", *base, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "foresight-serve: error:" in r.stderr and fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()  # nothing written


def test_a_busy_port_and_a_foreign_store_are_refused(engines_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "runtime.serve.cli", "--engines", str(engines_dir), "--port",
                            str(port), "--data-dir", str(tmp_path / "d")], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and "--port" in r.stderr
    data = tmp_path / "foreign"
    data.mkdir()
    (data / "jobs.sqlite3").write_text(json.dumps({"mine": True}) * 100)
    r = subprocess.run([sys.executable, "-m", "runtime.serve.cli", "--engines", str(engines_dir), "--port", "0",
                        "--data-dir", str(data)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a foresight-serve job store" in r.stderr and "Traceback" not in r.stderr
    assert (data / "jobs.sqlite3").read_text() == json.dumps({"mine": True}) * 100

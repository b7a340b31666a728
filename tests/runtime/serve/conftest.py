"""A real ``foresight-serve`` process on 127.0.0.1 (port chosen by the OS) and an HTTP client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[3]
READY = re.compile(r"serving .* on http://127\.0\.0\.1:(\d+)")


class Server:
    """``python -m runtime.serve.cli ...`` as a child process; stderr is collected in ``log``."""

    def __init__(self, engines, data_dir, *extra: str, timeout: float = 180.0):
        engines = engines if isinstance(engines, (list, tuple)) else [engines]
        self.data_dir = Path(data_dir)
        cmd = [sys.executable, "-m", "runtime.serve.cli", "--port", "0", "--data-dir", str(data_dir), *extra]
        for e in engines:
            cmd += ["--engines", str(e)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env=env)
        self.log: list[str] = []
        self._port = threading.Event()
        self.port = None
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._port.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("foresight-serve did not start:\n" + "".join(self.log))
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_healthy()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)
            m = READY.search(line)
            if m and self.port is None:
                self.port = int(m[1])
                self._port.set()

    def wait_healthy(self, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("foresight-serve is not healthy:\n" + "".join(self.log))
            time.sleep(0.1)

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path, **kw):
        return requests.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def delete(self, path, **kw):
        return requests.delete(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def submit(self, **body) -> dict:
        r = self.post("/v1/videos", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, video_id: str, until=("completed", "failed", "cancelled"), timeout: float = 120.0, **kw) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            v = self.get(f"/v1/videos/{video_id}", **kw).json()
            if v["status"] in until:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"{video_id} still {v['status']} after {timeout} s:\n" + "".join(self.log))
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def close(self):
        """The end of a test's server: SIGTERM (the graceful shutdown, which stops a Ray cluster it started,
        so none of its processes outlive it), SIGKILL if that takes over a minute."""
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture()
def start_server():
    """``start_server(engines, data_dir, *flags)`` -> a running Server; every one is stopped at the end."""
    started: list[Server] = []

    def start(*args, **kw) -> Server:
        s = Server(*args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()

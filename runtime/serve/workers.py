"""Who runs the jobs: :class:`LocalRunner` (runtimes in the server process, a worker thread per
model) and, in ``ray_runner``, Ray Serve replicas. Both take jobs from the store, report
progress into it, honour cancellation between steps and write each video atomically under
the data folder.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from pathlib import Path

from ..errors import ForesightError
from ..outputs import clean_stale
from .generator import Generator, public_stats
from .store import Job, JobStore

log = logging.getLogger("foresight.serve")


class JobCancelled(Exception):
    """A client cancelled the running job (DELETE); raised from the step callback."""


class Stopping(Exception):
    """The server is shutting down; the running job goes back to the queue."""


class Metrics:
    """Prometheus metrics of one server (their own registry, so two apps in a process do not clash)."""

    def __init__(self, store: JobStore):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("foresight_queue_depth", "Jobs waiting to run", registry=self.registry)
        self.queue_depth.set_function(lambda: store.counts()["queued"])
        self.jobs = Gauge("foresight_jobs", "Jobs in the store by state", ["state"], registry=self.registry)
        self._store = store
        self.step_seconds = Histogram("foresight_step_seconds", "Wall time of one denoising step", ["model"],
                                      buckets=(.001, .003, .01, .03, .1, .3, 1, 3, 10, 30), registry=self.registry)
        self.job_seconds = Histogram("foresight_job_seconds", "Wall time of a job from start to its video",
                                     ["model"], buckets=(.1, .3, 1, 3, 10, 30, 100, 300, 1000), registry=self.registry)
        self.layers_skipped = Counter("foresight_layers_skipped", "Layer calls reused instead of computed",
                                      ["model"], registry=self.registry)
        self.layers_total = Counter("foresight_layers", "Layer calls planned (computed + reused)", ["model"],
                                    registry=self.registry)
        self.skipped_share = Gauge("foresight_layers_skipped_share", "Share of layer calls skipped, every finished "
                                   "job together", ["model"], registry=self.registry)
        self.rejected = Counter("foresight_requests_rejected", "Requests refused", ["reason"], registry=self.registry)
        self.replicas = Gauge("foresight_replicas", "Runtime replicas by state (Ray Serve's, or this process's one)",
                              ["state"], registry=self.registry)
        self._replica_states: set[str] = set()
        self._lock = threading.Lock()
        self._sums: dict[str, list[int]] = {}

    def job_done(self, model: str, seconds: float, skipped: int, total: int) -> None:
        self.job_seconds.labels(model).observe(seconds)
        self.layers_skipped.labels(model).inc(skipped)
        self.layers_total.labels(model).inc(total)
        with self._lock:
            s = self._sums.setdefault(model, [0, 0])
            s[0] += skipped
            s[1] += total
            self.skipped_share.labels(model).set(s[0] / max(1, s[1]))

    def render(self, replicas: dict[str, int] | None = None) -> bytes:
        from prometheus_client import generate_latest

        for state, n in self._store.counts().items():
            self.jobs.labels(state).set(n)
        if replicas is not None:
            self._replica_states |= set(replicas)
            for state in self._replica_states:  # a state seen before and now empty reads 0, not its old count
                self.replicas.labels(state).set(replicas.get(state, 0))
        return generate_latest(self.registry)

    def mean_job_seconds(self) -> float | None:
        total = count = 0.0
        for metric in self.job_seconds.collect():
            for s in metric.samples:
                if s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
        return total / count if count else None


def video_path(data_dir: Path, job_id: str) -> Path:
    return data_dir / "videos" / f"{job_id}.mp4"


class ThreadedRunner:
    """Worker threads that claim jobs from the store until :meth:`stop`; subclasses say which models a
    thread claims and how it runs a job (``_run``, returning the job's new state)."""

    def __init__(self):
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self.requeued = 0  # running jobs put back in the queue by stop()

    def _spawn(self, name: str, models: list[str], store: JobStore, data_dir: Path, metrics: Metrics) -> None:
        t = threading.Thread(target=self._loop, args=(models, store, data_dir, metrics), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def stop(self, timeout: float = 30.0) -> int:
        """Stop at the running jobs' next step; they go back to the queue. Returns how many did."""
        self._stop.set()
        self.notify()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._shutdown()
        return self.requeued

    def _shutdown(self) -> None:
        pass

    def replicas(self) -> dict[str, int]:
        """Runtime replicas by state (``RUNNING``, ``STARTING``, ...): this process's one by default."""
        return {"RUNNING": 1}

    def _loop(self, models: list[str], store: JobStore, data_dir: Path, metrics: Metrics) -> None:
        while not self._stop.is_set():
            job = store.claim(models)
            if job is None:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            if self._run(job, store, data_dir, metrics) == "queued":
                self.requeued += 1

    def _run(self, job: Job, store: JobStore, data_dir: Path, metrics: Metrics) -> str:
        raise NotImplementedError


class LocalRunner(ThreadedRunner):
    """Runtimes loaded in this process; one worker thread per model claims that model's jobs in
    submission order (a Runtime runs one generation at a time; different models run side by side)."""

    kind = "local"

    def __init__(self, engines: dict[str, str], backend: str, device: str | None):
        super().__init__()
        self.generator = Generator(engines, backend=backend, device=device)

    @property
    def workers(self) -> int:
        return len(self.generator.runtimes)

    def models(self) -> dict[str, dict]:
        return self.generator.models()

    def check(self, model: str, params: dict) -> dict:
        return self.generator.check(model, params)

    def start(self, store: JobStore, data_dir: Path, metrics: Metrics) -> None:
        for model in self.generator.runtimes:
            self._spawn(f"foresight-worker-{model}", [model], store, data_dir, metrics)

    def _run(self, job, store, data_dir, metrics) -> str:
        return run_job(job, store, data_dir, metrics, self.generator, self._stop)


def run_job(job: Job, store: JobStore, data_dir: Path, metrics: Metrics, generator: Generator,
            stop: threading.Event) -> str:
    """One claimed job to its end state (completed, failed, cancelled, or back in the queue); returns it."""
    model, t0 = job.model, time.perf_counter()
    store.set_worker(job.id, f"pid {os.getpid()}")

    def on_step(info):
        metrics.step_seconds.labels(model).observe(info.seconds)
        if store.progress(job.id, info.step, info.steps, info.layers_skipped, info.layers_total):
            raise JobCancelled()
        if stop.is_set():
            raise Stopping()

    try:
        result = generator.generate(job.params, on_step=on_step)
        write_result(job, store, data_dir, metrics, lambda path: generator.write_mp4(job.params, result.frames, path),
                     public_stats(result.stats), time.perf_counter() - t0)
        return "completed"
    except JobCancelled:
        store.finish_cancelled(job.id)
        return "cancelled"
    except Stopping:
        return store.requeue(job.id, "the server stopped", counts=False)
    except ForesightError as exc:
        store.fail(job.id, "generation_failed", str(exc))
    except Exception as exc:  # a bug: the job says so, the worker goes on
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        store.fail(job.id, "internal_error", f"{type(exc).__name__}: {exc}")
    return "failed"


def write_result(job: Job, store: JobStore, data_dir: Path, metrics: Metrics, write, stats: dict,
                 seconds: float) -> None:
    """The finished job's mp4 written under ``videos/`` by ``write(path)`` (atomically: a temporary
    renamed into place), then the job marked completed."""
    path = video_path(data_dir, job.id)
    write(path)
    store.complete(job.id, path.name, stats)
    metrics.job_done(job.model, seconds, stats["layer_calls_skipped"], stats["steps"] * stats["num_layers"])


def recover(store: JobStore, data_dir: Path) -> dict:
    """Start-up: jobs a killed server left running are re-queued (or failed after too many tries);
    half-written videos of dead processes are removed."""
    out = store.recover()
    for job_id in out["queued"] + out["failed"]:
        clean_stale(video_path(data_dir, job_id))
    return out

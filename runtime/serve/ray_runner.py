"""``foresight-serve --ray``: the runtimes run as Ray Serve replicas; the server keeps the API and
the job store.

The server process owns the SQLite store (one writer, no shared database to run) and one
dispatcher thread per replica slot. A dispatcher claims a job and calls the deployment through
a ``DeploymentHandle``, so Ray Serve's router picks the replica (the less loaded of two, and
autoscaling on ongoing requests when ``--autoscale`` is given). The call streams: the replica
yields its pid, then one event per denoising step, then the mp4 bytes and stats; the dispatcher
records progress, cancels the call when the client cancels (the replica stops at its next step),
and writes the video atomically. A replica that dies mid-job (its process killed, its node lost)
surfaces as an actor error: the job goes back to the queue, runs again on a live replica (Ray
Serve restarts the dead one), and fails with the reason once it has been started
``--max-attempts`` times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

from ..errors import ConfigError, ForesightError, ShapeError
from ..outputs import atomic_write
from .generator import Generator, public_stats
from .workers import JobCancelled, Metrics, ThreadedRunner, write_result

log = logging.getLogger("foresight.serve")


def parse_autoscale(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 0 <= int(lo) <= int(hi) or int(hi) < 1:
        raise ConfigError(f"--autoscale takes MIN:MAX with 0 <= MIN <= MAX, MAX >= 1 (got {value!r}), e.g. 1:4")
    return int(lo), int(hi)


def deployment_options(replicas: int, autoscale: tuple[int, int] | None, gpus: int) -> dict:
    """The Ray Serve deployment options: one GPU per replica on GPU machines (one CPU otherwise), a
    fixed count or Serve's autoscaling on ongoing requests (one job per replica is the target)."""
    options = {"name": "foresight_replica", "max_ongoing_requests": 4,  # a run plus quick check() calls
               "ray_actor_options": {"num_cpus": 0 if gpus else 1, "num_gpus": gpus},
               "health_check_period_s": 2, "health_check_timeout_s": 30}
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "initial_replicas": max(1, autoscale[0]), "target_ongoing_requests": 1,
                                         "upscale_delay_s": 2, "downscale_delay_s": 60}
    else:
        options["num_replicas"] = replicas
    return options


class ForesightReplica:
    """One Ray Serve replica: the models loaded once, requests checked and generated here."""

    def __init__(self, engines: dict[str, str], backend: str, device: str | None):
        self.generator = Generator(engines, backend=backend, device=device)

    def models(self) -> dict:
        return self.generator.models()

    def check(self, model: str, params: dict) -> dict:
        try:
            return {"ok": self.generator.check(model, params)}
        except ForesightError as exc:  # sent back as data: the ingress answers 400 with the message
            return {"error": str(exc), "kind": type(exc).__name__}

    async def run(self, params: dict):
        """Stream ``("started", pid)``, ``("step", StepInfo fields)``..., then one of ``("done", {video,
        stats})``, ``("cancelled", None)``, ``("failed", message)``, ``("error", message)``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        def on_step(info):
            put(("step", dataclasses.asdict(info)))
            if cancel.is_set():
                raise JobCancelled()

        def work():
            try:
                result = self.generator.generate(params, on_step=on_step)
                put(("done", {"video": self.generator.mp4_bytes(params, result.frames),
                              "stats": public_stats(result.stats)}))
            except JobCancelled:
                put(("cancelled", None))
            except ForesightError as exc:
                put(("failed", str(exc)))
            except Exception as exc:  # a bug: reported, the replica stays up
                put(("error", f"{type(exc).__name__}: {exc}"))

        thread = threading.Thread(target=work, name="foresight-generate", daemon=True)
        thread.start()
        yield ("started", os.getpid())
        try:
            while True:
                event = await events.get()
                yield event
                if event[0] != "step":
                    return
        finally:  # also when the caller cancelled the call: stop at the next step
            cancel.set()


class RayRunner(ThreadedRunner):
    kind = "ray"

    def __init__(self, engines: dict[str, str], backend: str, device: str | None, replicas: int = 1,
                 autoscale: tuple[int, int] | None = None, address: str | None = None):
        super().__init__()
        try:
            import ray
            from ray import serve
        except ImportError:
            raise ConfigError("--ray needs Ray Serve: pip install 'foresight-dit[ray]'") from None
        self._ray, self._serve = ray, serve
        self._started_ray = not ray.is_initialized() and address is None
        # Nothing leaves this machine at run time: Ray's usage statistics report home unless told not to.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Without --ray-address, a cluster of this server's own: ray.init() alone would join whichever cluster
        # was started last on this machine (/tmp/ray/ray_current_cluster), another server's included.
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 configure_logging=False)
        serve.start(proxy_location="Disabled")  # the API is this server's; Serve routes handle calls only
        gpus = 1 if (device or "").startswith("cuda") or (device is None and _cuda()) else 0
        options = deployment_options(replicas, autoscale, gpus)
        self.workers = autoscale[1] if autoscale else replicas  # dispatchers: at most one job per replica
        deployment = serve.deployment(ForesightReplica, **options)
        self.handle = serve.run(deployment.bind(engines, backend, device), name="foresight", route_prefix=None)
        self._models = self.handle.models.remote().result()

    def models(self) -> dict:
        return self._models

    def check(self, model: str, params: dict) -> dict:
        out = self.handle.check.remote(model, params).result()
        if "error" in out:
            raise (ShapeError if out["kind"] == "ShapeError" else ConfigError)(out["error"])
        return out["ok"]

    def start(self, store, data_dir, metrics: Metrics) -> None:
        for i in range(self.workers):
            self._spawn(f"foresight-dispatch-{i}", list(self._models), store, data_dir, metrics)

    def replicas(self) -> dict[str, int]:
        """Serve's replicas of the deployment by state (``RUNNING``, ``STARTING``, ``STOPPING``, ...)."""
        try:
            app = self._serve.status().applications["foresight"]
            states = app.deployments["foresight_replica"].replica_states
        except Exception as exc:  # the controller busy or gone: the endpoint still answers
            log.warning("Serve's status is unavailable: %s", exc)
            return {}
        return {str(getattr(k, "value", k)): int(v) for k, v in states.items()}

    def _shutdown(self) -> None:
        try:
            self._serve.shutdown()
        finally:
            if self._started_ray:
                self._ray.shutdown()

    def _run(self, job, store, data_dir, metrics) -> str:
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import RequestCancelledError

        t0 = time.perf_counter()
        stream = self.handle.options(stream=True).run.remote(job.params)
        why = None  # "cancel" or "stop" once this side ended the call
        try:
            for kind, payload in stream:
                if kind == "started":
                    store.set_worker(job.id, f"pid {payload} (ray replica)")
                elif kind == "step":
                    metrics.step_seconds.labels(job.model).observe(payload["seconds"])
                    cancel = store.progress(job.id, payload["step"], payload["steps"], payload["layers_skipped"],
                                            payload["layers_total"])
                    if why is None and (cancel or self._stop.is_set()):
                        why = "cancel" if cancel else "stop"
                        stream.cancel()
                elif kind == "done":
                    video = payload["video"]
                    write_result(job, store, data_dir, metrics,
                                 lambda path: atomic_write(path, lambda tmp: Path(tmp).write_bytes(video)),
                                 payload["stats"], time.perf_counter() - t0)
                    return "completed"
                elif kind == "cancelled":
                    break
                else:
                    store.fail(job.id, "generation_failed" if kind == "failed" else "internal_error", payload)
                    return "failed"
        except (RequestCancelledError, asyncio.CancelledError):
            pass  # the cancel above took effect
        except (RayActorError, RayTaskError, self._serve.exceptions.RayServeException) as exc:
            if why is None:  # the replica died under the job
                log.warning("job %s: replica lost (%s); re-queued", job.id, type(exc).__name__)
                return store.requeue(job.id, f"the Ray Serve replica running it died ({type(exc).__name__})")
        if why == "stop":
            return store.requeue(job.id, "the server stopped", counts=False)
        store.finish_cancelled(job.id)
        return "cancelled"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False

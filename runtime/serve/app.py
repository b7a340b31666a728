"""The HTTP API of ``foresight-serve`` (FastAPI): OpenAI's video endpoints plus Foresight's fields.

    POST   /v1/videos               a job (queued) -> the video object
    POST   /v1/videos/sync          a job, answered with its mp4 once done
    GET    /v1/videos               the jobs, newest first (limit, after, order)
    GET    /v1/videos/{id}          the video object: status, progress (step i of n, layers skipped)
    GET    /v1/videos/{id}/content  the mp4
    DELETE /v1/videos/{id}          cancel (queued or running) or delete (finished) a job
    GET    /v1/models               the models served
    GET    /health                  liveness (never needs the API key)
    GET    /metrics                 Prometheus metrics

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status and a
message that names the fix.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ForesightError
from .schema import FIELDS, error_body, parse_video_request
from .store import FINISHED, Job, JobStore
from .workers import Metrics, recover, video_path

STATUS = {"queued": "queued", "running": "in_progress", "completed": "completed", "failed": "failed",
          "cancelled": "cancelled"}


@dataclass
class ServeConfig:
    data_dir: Path
    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = 64 * 1024
    sync_timeout: float = 600.0
    max_attempts: int = 2
    extra: dict = field(default_factory=dict)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def video_object(job: Job, store: JobStore | None = None) -> dict:
    """A job as OpenAI's video object, with what Foresight adds under ``foresight``."""
    p = job.params
    done = job.state == "completed"
    progress = 100 if done else (int(100 * job.step / job.steps) if job.steps else 0)
    fps = (job.stats or {}).get("fps") or p.get("fps") or 8
    extra = {"step": job.step, "steps": job.steps or p.get("steps"), "layers_skipped": job.layers_skipped,
             "layers_total": job.layers_total, "attempts": job.attempts, "seed": p.get("seed"),
             "frames": p.get("frames"), "policy": p.get("policy"), "cancel_requested": job.cancel_requested,
             "worker": job.worker}
    if job.state == "queued" and store is not None:
        extra["queue_position"] = store.queue_position(job)
    if job.stats:
        extra["stats"] = job.stats
    return {
        "id": job.id, "object": "video", "model": job.model, "status": STATUS[job.state], "progress": progress,
        "created_at": int(job.created_at), "completed_at": int(job.finished_at) if job.finished_at else None,
        "size": f"{p.get('width')}x{p.get('height')}", "seconds": f"{p.get('frames', 0) / fps:g}",
        "error": {"code": job.error_code, "message": job.error} if job.error else None,
        "foresight": extra,
    }


def create_app(config: ServeConfig, runner) -> FastAPI:
    """The app over ``runner`` (LocalRunner or RayRunner); jobs persist under ``config.data_dir``."""
    data_dir = Path(config.data_dir)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        (data_dir / "videos").mkdir(parents=True, exist_ok=True)
        store = JobStore(data_dir / "jobs.sqlite3", max_attempts=config.max_attempts)
        recovered = recover(store, data_dir)
        metrics = Metrics(store)
        state.update(store=store, metrics=metrics, models=runner.models(), recovered=recovered)
        runner.start(store, data_dir, metrics)
        app.state.foresight = state
        try:
            yield
        finally:
            requeued = runner.stop()
            store.close()
            print(f"foresight-serve: stopped; {requeued} running job(s) back in the queue", file=sys.stderr,
                  flush=True)

    app = FastAPI(title="foresight-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status in (400, 413, 415, 429):
            state["metrics"].rejected.labels(exc.code).inc()
        return JSONResponse(error_body(exc.message, exc.code, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no endpoint {request.url.path}: the API is under /v1/videos, /v1/models, /health and /metrics"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return JSONResponse(error_body(msg, "not_found" if exc.status_code == 404 else "method_not_allowed"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0])
        return JSONResponse(error_body(f"{where}: {err['msg']}", "invalid_parameter", where), status_code=400)

    # ------------------------------------------------------------------ middleware: size, auth
    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = request.url.path
        if config.api_key and path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
                what = "a wrong API key" if given else "no API key"
                return JSONResponse(error_body(f"{what}: send the header 'Authorization: Bearer <key>' with the "
                                               f"server's --api-key", "invalid_api_key", kind="authentication_error"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            state["metrics"].rejected.labels("body_too_large").inc()
            return JSONResponse(error_body(f"the body is {length} bytes; the limit is {config.max_body_bytes}: send a "
                                           f"shorter request", "body_too_large"), status_code=413)
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the body must be JSON: send Content-Type: application/json (got {kind or 'none'!r})",
                           "unsupported_media_type")
        body = bytearray()
        async for chunk in request.stream():  # chunked bodies have no Content-Length: count them
            body += chunk
            if len(body) > config.max_body_bytes:
                raise ApiError(413, f"the body is over {config.max_body_bytes} bytes: send a shorter request",
                               "body_too_large")
        try:
            data = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON ({exc}): send a JSON object such as "
                                f"{{\"prompt\": \"a red ball\"}}", "invalid_json") from None
        try:
            return parse_video_request(data)
        except ValueError as exc:
            field_name = next((f for f in FIELDS if str(exc).startswith((f + ":", f"unknown field '{f}"))), None)
            raise ApiError(400, str(exc), "invalid_parameter", field_name) from None

    def store() -> JobStore:
        return state["store"]

    def job_or_404(video_id: str) -> Job:
        job = store().get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r}: list the videos with GET /v1/videos", "video_not_found",
                           "video_id")
        return job

    async def submit(request: Request) -> Job:
        params = await read_json(request)
        models = state["models"]
        model = params.pop("model", None)
        if model is None:
            if len(models) != 1:
                raise ApiError(400, f"model is required: this server has {', '.join(models)}", "invalid_parameter",
                               "model")
            model = next(iter(models))
        if model not in models:
            raise ApiError(404, f"model {model!r} is not served here: pass one of {', '.join(models)} "
                                f"(GET /v1/models)", "model_not_found", "model")
        try:
            checked = await asyncio.to_thread(runner.check, model, params)
        except ForesightError as exc:
            raise ApiError(400, str(exc), "invalid_parameter") from None
        checked["fps"] = models[model]["fps"]
        job = store().submit(model, checked, max_queue=config.max_queue)
        if job is None:
            mean = state["metrics"].mean_job_seconds() or 1.0
            wait = max(1, math.ceil(mean * config.max_queue / max(1, runner.workers)))
            raise ApiError(429, f"the queue is full ({config.max_queue} jobs waiting): retry after {wait} s",
                           "queue_full", headers={"Retry-After": str(wait)})
        runner.notify()
        return job

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    def health():
        return {"status": "ok", "runner": runner.kind, "models": list(state["models"]), "replicas": runner.replicas()}

    @app.get("/metrics")
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state["metrics"].render(runner.replicas()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": list(state["models"].values())}

    @app.post("/v1/videos")
    async def create_video(request: Request):
        return video_object(await submit(request), store())

    @app.post("/v1/videos/sync")
    async def create_video_sync(request: Request):
        job = await submit(request)
        deadline = time.monotonic() + config.sync_timeout
        while job.state not in FINISHED:
            if time.monotonic() > deadline:
                raise ApiError(504, f"{job.id} did not finish in {config.sync_timeout:g} s; it goes on: poll GET "
                                    f"/v1/videos/{job.id}", "timeout", headers={"X-Video-Id": job.id})
            await asyncio.sleep(0.05)
            job = await asyncio.to_thread(store().get, job.id)
            if job is None:
                raise ApiError(410, "the job was deleted while it ran", "video_deleted")
        if job.state != "completed":
            raise ApiError(422 if job.state == "failed" else 409, f"{job.id} {job.state}: {job.error or 'cancelled'}",
                           job.error_code or job.state, headers={"X-Video-Id": job.id})
        return FileResponse(video_path(data_dir, job.id), media_type="video/mp4", headers={"X-Video-Id": job.id})

    @app.get("/v1/videos")
    def list_videos(limit: int = 20, after: str | None = None, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be in 1..100 (got {limit})", "invalid_parameter", "limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be asc or desc (got {order!r})", "invalid_parameter", "order")
        jobs = store().list(limit + 1, after, newest_first=order == "desc")
        data = [video_object(j, store()) for j in jobs[:limit]]
        return {"object": "list", "data": data, "has_more": len(jobs) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}")
    def get_video(video_id: str):
        return video_object(job_or_404(video_id), store())

    @app.get("/v1/videos/{video_id}/content")
    def get_content(video_id: str, variant: str = "video"):
        job = job_or_404(video_id)
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not made here: pass variant=video", "invalid_parameter",
                           "variant")
        if job.state != "completed":
            raise ApiError(409, f"{video_id} is {STATUS[job.state]}, not completed: poll GET /v1/videos/{video_id} "
                                f"until its status is completed", "video_not_ready")
        return FileResponse(video_path(data_dir, job.id), media_type="video/mp4",
                            filename=f"{job.id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str):
        job = job_or_404(video_id)
        if job.state in FINISHED:
            if store().delete(video_id):
                video_path(data_dir, video_id).unlink(missing_ok=True)
            return {"id": video_id, "object": "video.deleted", "deleted": True}
        job = store().cancel(video_id)
        runner.notify()
        return video_object(job, store())

    return app

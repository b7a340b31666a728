"""``foresight-serve``: the video API over one or more engines folders (see ``runtime.serve.app``)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from ..errors import ConfigError, ForesightError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="foresight-serve",
        description="Serve an OpenAI-style video API (POST /v1/videos ...) over engines folders; jobs persist in "
                    "SQLite under --data-dir.")
    ap.add_argument("--engines", action="append", required=True, metavar="[NAME=]DIR",
                    help="engines folder to serve (repeatable); the model id is NAME, else the manifest's name")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    ap.add_argument("--max-queue", type=int, default=64, help="queued jobs beyond which POST answers 429")
    ap.add_argument("--data-dir", type=Path, default=Path("foresight-serve-data"),
                    help="where the job store (jobs.sqlite3) and the videos live (default: ./foresight-serve-data)")
    ap.add_argument("--backend", choices=["onnxruntime", "torch", "aoti", "tensorrt"], default="onnxruntime")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    ap.add_argument("--sync-timeout", type=float, default=600.0, help="seconds POST /v1/videos/sync waits")
    ap.add_argument("--max-attempts", type=int, default=2,
                    help="times a job is started before a crash or a dead replica fails it instead of re-queuing it")
    r = ap.add_argument_group("scale-out on Ray Serve (pip install 'foresight-dit[ray]')")
    r.add_argument("--ray", action="store_true", help="run the runtimes as Ray Serve replicas behind Serve's router")
    r.add_argument("--replicas", type=int, default=1, help="replicas (one per GPU on GPU machines)")
    r.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="let Ray Serve scale the replicas between MIN and MAX on the number of running jobs")
    r.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start one here)")
    return ap


def engines_map(values: list[str]) -> dict[str, str]:
    from ..manifest import load_manifest

    out: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = None, value
        manifest = load_manifest(folder)  # refused here, before anything listens, if broken
        name = name or manifest.name
        if name in out:
            raise ConfigError(f"two --engines are both named {name!r}: name them, e.g. --engines a={folder}")
        out[name] = folder
    return out


def check_args(args) -> None:
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port, printed at start; got {args.port})")
    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1 (got {args.max_queue})")
    if args.max_attempts < 1:
        raise ConfigError(f"--max-attempts must be at least 1 (got {args.max_attempts})")
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1 (got {args.replicas})")
    if (args.replicas != 1 or args.autoscale or args.ray_address) and not args.ray:
        raise ConfigError("--replicas, --autoscale and --ray-address apply with --ray")
    if args.api_key is not None and len(args.api_key) < 8:
        raise ConfigError("--api-key must be at least 8 characters")
    try:
        if not ipaddress.ip_address(args.host).is_loopback and args.api_key is None:
            print(f"foresight-serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    except ValueError:
        pass  # a host name
    if args.data_dir.exists() and not args.data_dir.is_dir():
        raise ConfigError(f"--data-dir {args.data_dir} is a file: pass a folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        engines = engines_map(args.engines)
        sock = listen(args.host, args.port)
        from .app import ServeConfig, create_app
        from .store import JobStore, StoreError

        try:
            args.data_dir.mkdir(parents=True, exist_ok=True)
            JobStore(args.data_dir / "jobs.sqlite3").close()  # refused here if it is not our store
        except OSError as exc:
            raise ConfigError(f"--data-dir {args.data_dir}: {exc.strerror}: pass a folder this user can write") from None
        except StoreError as exc:
            raise ConfigError(str(exc)) from None

        if args.ray:
            from .ray_runner import RayRunner, parse_autoscale

            runner = RayRunner(engines, args.backend, args.device, replicas=args.replicas,
                               autoscale=parse_autoscale(args.autoscale), address=args.ray_address)
        else:
            from .workers import LocalRunner

            runner = LocalRunner(engines, args.backend, args.device)
        config = ServeConfig(data_dir=args.data_dir, api_key=args.api_key, max_queue=args.max_queue,
                             max_body_bytes=args.max_body_bytes, sync_timeout=args.sync_timeout,
                             max_attempts=args.max_attempts)
        app = create_app(config, runner)
    except ForesightError as exc:
        print(f"foresight-serve: error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown: no new requests, running jobs stop at
    # their next step and go back to the queue, the store is closed.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    print(f"foresight-serve: serving {', '.join(engines)} on http://{args.host}:{sock.getsockname()[1]} "
          f"({runner.kind}, data in {args.data_dir})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0


def listen(host: str, port: int):
    """The bound listening socket (so a busy port is an error: ... before anything loads)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())

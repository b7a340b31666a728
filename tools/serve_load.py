"""Load on foresight-serve: N requests from C concurrent clients, each submitted, polled and
downloaded over real HTTP. Checks that no request is lost or duplicated and that every video
equals the single-process generation of its request; prints p50/p99 latency and throughput.

    python -m tools.serve_load --engines engines/latte-tiny --requests 200 --clients 16
    python -m tools.serve_load --engines engines/latte-tiny --requests 200 --clients 16 --ray --replicas 2

Without ``--url`` a server is started here (``--port 0``, a temporary data folder) and stopped
at the end. The requests cycle over ``--distinct`` seeds, so each reference is made once.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"serving .* on (http://\S+)")


def start_server(engines: Path, data_dir: Path, extra: list[str], timeout: float = 600.0):
    cmd = [sys.executable, "-m", "runtime.serve.cli", "--engines", str(engines), "--port", "0", "--data-dir",
           str(data_dir), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found: list[str] = []
    ready = threading.Event()

    def drain():
        for line in proc.stderr:
            m = READY.search(line)
            if m and not found:
                found.append(m[1])
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        raise RuntimeError("foresight-serve did not start")
    return proc, found[0]


def run_load(url: str, bodies: list[dict], clients: int, poll: float = 0.1, timeout: float = 600.0) -> dict:
    """Every body submitted once from a pool of ``clients`` threads; returns per-request results."""
    import requests

    session = threading.local()

    def one(i_body):
        i, body = i_body
        s = getattr(session, "s", None) or requests.Session()
        session.s = s
        t0 = time.perf_counter()
        r = s.post(url + "/v1/videos", json=body, timeout=60)
        r.raise_for_status()
        vid = r.json()["id"]
        deadline = time.monotonic() + timeout
        while True:
            v = s.get(f"{url}/v1/videos/{vid}", timeout=60).json()
            if v["status"] in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(vid)
            time.sleep(poll)
        content = s.get(f"{url}/v1/videos/{vid}/content", timeout=60).content if v["status"] == "completed" else b""
        return {"i": i, "id": vid, "status": v["status"], "seconds": time.perf_counter() - t0, "video": content,
                "worker": v["foresight"].get("worker")}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, enumerate(bodies)))
    return {"results": results, "wall": time.perf_counter() - t0}


def summarise(load: dict, references: dict, bodies: list[dict], key) -> dict:
    results = load["results"]
    lat = sorted(r["seconds"] for r in results)
    ids = [r["id"] for r in results]
    mismatched = [r["i"] for r in results if r["video"] != references[key(bodies[r["i"]])]]
    return {
        "requests": len(results),
        "completed": sum(r["status"] == "completed" for r in results),
        "lost": sum(r["status"] != "completed" for r in results),
        "duplicated": len(ids) - len(set(ids)),
        "mismatched": len(mismatched),
        "workers": len({r["worker"] for r in results}),
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
        "throughput_per_s": len(results) / load["wall"],
        "wall_s": load["wall"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=Path, required=True)
    ap.add_argument("--url", default=None, help="a running server (default: start one here)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--distinct", type=int, default=8, help="distinct seeds the requests cycle over")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", default="16x16")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "aoti"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args(argv)

    from runtime.manifest import load_manifest
    from runtime.serve.generator import Generator

    model = load_manifest(args.engines).name
    bodies = [{"prompt": "a red ball moving right", "seed": i % args.distinct, "steps": args.steps,
               "size": args.size, "frames": args.frames, "policy": "foresight", "warmup": 2, "recalculate": 2}
              for i in range(args.requests)]
    key = lambda b: b["seed"]  # noqa: E731 (the only field that varies)
    gen = Generator({model: str(args.engines)}, backend=args.backend, device=args.device)
    references = {}
    for b in bodies[:args.distinct]:
        params = gen.check(model, dict(b))
        references[key(b)] = gen.mp4_bytes(params, gen.generate(params).frames)
    del gen

    proc = None
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        url = args.url
        if url is None:
            extra = ["--max-queue", str(args.requests), "--backend", args.backend, "--device", args.device]
            extra += ["--ray", "--replicas", str(args.replicas)] if args.ray else []
            proc, url = start_server(args.engines, Path(tmp) / "data", extra)
        try:
            load = run_load(url, bodies, args.clients)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(120)
    summary = {"mode": f"ray, {args.replicas} replica(s)" if args.ray else "local", "backend": args.backend,
               "device": args.device, "clients": args.clients,
               "steps": args.steps, "size": args.size, "frames": args.frames,
               **summarise(load, references, bodies, key)}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    ok = summary["lost"] == summary["duplicated"] == summary["mismatched"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

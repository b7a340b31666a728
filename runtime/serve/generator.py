"""What a serving replica does: holds one ``Runtime`` per model, checks requests with the
runtime's own rules, and turns an accepted request into an mp4.

The same class runs inside the server process (``foresight-serve``) and inside each Ray Serve
replica (``foresight-serve --ray``), so both check and generate identically.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

from foresight import POLICIES, policy_options

from ..errors import ConfigError, ShapeError

#: Request fields of POST /v1/videos that set the Foresight policy (the policy says which apply).
POLICY_FIELDS = ("warmup", "recalculate", "threshold", "reuse", "period")
SERVED_POLICIES = tuple(p for p in POLICIES if p != "replay")  # replay takes a trace file


def model_card(name: str, manifest) -> dict:
    """The ``GET /v1/models`` entry of one engines folder."""
    s, p = manifest.shapes, manifest.pipeline
    return {
        "id": name, "object": "model", "owned_by": "foresight", "family": manifest.family,
        "layers": manifest.num_layers, "experts": manifest.num_experts,
        "frames": {k: s["frames"][k] for k in ("min", "max", "default")},
        "height": dict(s["height"]), "width": dict(s["width"]),
        "fps": p.get("fps", 8), "default_steps": p["default_steps"], "max_steps": p["max_steps"],
        "default_guidance": p["default_guidance"], "policies": list(SERVED_POLICIES),
        "foresight_defaults": dict(manifest.foresight_defaults),
    }


class Generator:
    """``engines``: ``{model id: engines folder}``; every folder is loaded (hashes verified) here."""

    def __init__(self, engines: dict[str, str], backend: str = "onnxruntime", device: str | None = None):
        from ..engine import Runtime

        self.runtimes = {name: Runtime.load(path, backend=backend, device=device) for name, path in engines.items()}
        self.backend = backend

    def models(self) -> dict[str, dict]:
        return {name: model_card(name, rt.manifest) for name, rt in self.runtimes.items()}

    def check(self, model: str, params: dict) -> dict:
        """``params`` (a parsed request, field names as in the API) checked against ``model``'s engines
        and completed with its defaults and a seed; raises ConfigError/ShapeError naming the fix."""
        from ..engine import check_request

        rt = self.runtimes[model]
        card = model_card(model, rt.manifest)
        frames = params.get("frames")
        if params.get("seconds") is not None:
            if frames is not None:
                raise ConfigError("give seconds or frames, not both")
            exact = float(params["seconds"]) * card["fps"]
            frames = round(exact)
            if abs(exact - frames) > 1e-6 or frames < 1:
                raise ShapeError(f"seconds={params['seconds']} is not a whole number of frames at {card['fps']} fps: "
                                 f"pass frames (valid: {card['frames']['min']}..{card['frames']['max']}) instead")
        width = height = None
        if params.get("size") is not None:
            width, height = parse_size(params["size"])
        seed = params.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**63)  # recorded in the job, so the video can be made again
        req = check_request(rt.manifest, params["prompt"], params.get("negative_prompt"), frames, height, width,
                            params.get("steps"), params.get("guidance"), seed, params.get("guidance_2"))
        rt.parts.latent_frames(req["frames"])  # the VAE's frame rule, naming valid counts
        policy = params.get("policy") or "foresight"
        if policy not in SERVED_POLICIES:
            raise ConfigError(f"policy {policy!r} is not served: pass one of {', '.join(SERVED_POLICIES)}")
        given = {k: params[k] for k in POLICY_FIELDS if params.get(k) is not None}
        wrong = sorted(set(given) - set(policy_options(policy)))
        if wrong:
            takes = ", ".join(policy_options(policy)) or "no options"
            raise ConfigError(f"{', '.join(wrong)} do(es) not apply to policy {policy}; it takes {takes}")
        rt.make_policy(policy, **given).check_run(rt.num_layers, req["steps"])  # the manifest's defaults + given
        return {"model": model, "prompt": req["prompt"], "negative_prompt": params.get("negative_prompt"),
                "frames": req["frames"], "height": req["height"], "width": req["width"], "steps": req["steps"],
                "guidance": req["guidance_scale"], "guidance_2": params.get("guidance_2"), "seed": req["seed"],
                "policy": policy, **given}

    def generate(self, params: dict, on_step=None):
        """A checked request -> the GenerationResult (frames, stats)."""
        rt = self.runtimes[params["model"]]
        policy_kw = {k: params[k] for k in POLICY_FIELDS if params.get(k) is not None}
        return rt.generate(params["prompt"], negative_prompt=params.get("negative_prompt"),
                           num_frames=params["frames"], height=params["height"], width=params["width"],
                           num_inference_steps=params["steps"], guidance_scale=params["guidance"],
                           guidance_scale_2=params.get("guidance_2"), seed=params["seed"], policy=params["policy"],
                           on_step=on_step, **policy_kw)

    def write_mp4(self, params: dict, frames, path) -> Path:
        """The video written atomically at ``path`` exactly as ``foresight-run --out x.mp4`` writes it."""
        from ..video import write_video

        return write_video(frames, path, fps=self.runtimes[params["model"]].parts.config.get("fps", 8))

    def mp4_bytes(self, params: dict, frames) -> bytes:
        """The same video as bytes (a Ray replica sends it to the server)."""
        with tempfile.TemporaryDirectory(prefix="foresight-serve-") as tmp:
            return self.write_mp4(params, frames, Path(tmp) / "video.mp4").read_bytes()


def parse_size(size) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (OpenAI's order) -> (width, height)."""
    parts = size.lower().split("x") if isinstance(size, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"size must be WIDTHxHEIGHT, e.g. \"32x32\" (got {size!r})")
    return int(parts[0]), int(parts[1])


def public_stats(stats: dict) -> dict:
    """The stats a client sees: everything but the decision trace (kept in the stats file)."""
    return {k: v for k, v in stats.items() if k != "trace"}

"""The request body of ``POST /v1/videos`` (pydantic, strict: no silent coercion) and the
error bodies the server answers with (OpenAI's ``{"error": {...}}`` shape)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_PROMPT_CHARS = 10_000


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None  # required when the server has more than one model
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    size: str | None = None  # "WIDTHxHEIGHT"
    seconds: str | int | float | None = None  # OpenAI sends a string ("4")
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_2: float | None = None
    seed: int | None = None
    policy: str | None = None
    warmup: int | None = None
    recalculate: int | None = None
    threshold: float | None = None
    reuse: int | None = None
    period: int | None = None


FIELDS = tuple(VideoRequest.model_fields)


def parse_video_request(data) -> dict:
    """A decoded JSON body -> the request's given fields; ValueError naming the fix."""
    if not isinstance(data, dict):
        raise ValueError(f"the body must be a JSON object with a prompt, e.g. {{\"prompt\": \"a red ball\"}} "
                         f"(got a JSON {type(data).__name__})")
    try:
        req = VideoRequest.model_validate(data)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None
    params = req.model_dump(exclude_none=True)
    if isinstance(params.get("seconds"), str):
        try:
            params["seconds"] = float(params["seconds"])
        except ValueError:
            raise ValueError(f"seconds must be a number (got {data['seconds']!r})") from None
    return params


def describe(exc: ValidationError) -> str:
    """The first problem of a pydantic error, in words naming the field and the fix."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "body"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown field {field!r}: the fields are {', '.join(FIELDS)}"
    if kind == "missing":
        return f"{field} is required"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"{field}: {err['msg'][0].lower()}{err['msg'][1:]} (got {shown})"


def error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

"""A procedural text-to-video domain: one coloured shape moving in a straight line.

    spec = sample_spec(random.Random(0))       # what to draw, and its prompt
    video = render(spec)                       # uint8 (F, H, W, 3)
    spec.prompt == "a red circle moving left on a gray background"

Every prompt names four factors (colour, shape, direction, background) and each can be
read back from the pixels (tools/evaluate.py does), so a model trained on this domain
can be scored for prompt adherence without a learned judge. Numpy and the standard
library only: the training script imports this.

Geometry is in pixels of the frames being rendered: ``sample_spec(..., height, width)``
scales its 32x32 ranges (size 8-12 px, speed 1.2-2.0 px/frame) by ``min(H, W) / 32``, and a
spec must be rendered at the size it was sampled for (``dataset`` does this).

Two layouts (``LAYOUTS``): ``anywhere`` starts the object anywhere it can make its trip at a
speed of 1.2-2.0 px/frame; ``cross`` makes it cross the frame: it travels 60-100% of the room
its motion axis leaves it (so it enters near the edge it moves away from), whatever the clip's
length. In ``anywhere`` clips the direction moves the object by a few pixels against a start
position spread over most of the frame, and models trained on them learned colour but not
direction; in ``cross`` clips the direction decides which half of the frame the object is in at
the start and at the end.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

# Object colours: pairwise RGB distance >= 116 (blue-purple the closest pair).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "white": (245, 245, 245),
    "purple": (160, 60, 200),
}
# Backgrounds: each at RGB distance >= 104 from every object colour (gray-purple the closest),
# so an object pixel is never mistaken for background. Asserted in tests.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "navy": (20, 20, 80),
    "brown": (100, 60, 30),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# Unit motion per direction as (dx, dy); image y grows downward.
MOTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

REFERENCE_SIZE = 32  # the frame side the size and speed ranges below are stated for
SIZE_RANGE = (8.0, 12.0)  # px at 32x32: diameter of a circle, side of a square or triangle
SPEED_RANGE = (1.2, 2.0)  # px per frame at 32x32 (layout "anywhere")
CROSS_RANGE = (0.6, 1.0)  # share of the room along the motion that a "cross" clip travels
LAYOUTS = ("anywhere", "cross")
MARGIN = 1.0  # px between the object and the frame edge: the outermost pixels stay pure background
#               (tools/evaluate.py estimates the background from them)
SUPERSAMPLE = 4  # sub-pixels per pixel side: anti-aliased edges, so sub-pixel motion shows

_PROMPT = re.compile(r"a (\w+) (\w+) moving (\w+) on a (\w+) background")


@dataclass(frozen=True)
class ClipSpec:
    shape: str
    color: str
    direction: str
    background: str
    size: float  # px: circle diameter, square side, triangle base and height
    speed: float  # px per frame, along `direction`
    x0: float  # px: centre of the object's bounding box in frame 0 (x right, y down; pixel i spans [i, i+1))
    y0: float

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, tuple(COLORS)),
                                     ("direction", self.direction, DIRECTIONS),
                                     ("background", self.background, tuple(BACKGROUNDS))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not in the domain: pass one of {', '.join(allowed)}")
        if not self.size > 0 or not self.speed >= 0:
            raise ValueError(f"size must be > 0 and speed >= 0 (got size={self.size}, speed={self.speed})")

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} on a {self.background} background"

    def centre(self, t: int) -> tuple[float, float]:
        """Centre of the bounding box in frame ``t``."""
        dx, dy = MOTION[self.direction]
        return self.x0 + dx * self.speed * t, self.y0 + dy * self.speed * t


def vocabulary() -> list[str]:
    """Every word a prompt of this domain can hold, in a fixed order."""
    words = ["a", "moving", "on", "background", *COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS]
    return list(dict.fromkeys(words))


def parse_prompt(prompt: str) -> dict:
    """The inverse of ``ClipSpec.prompt``: {"shape", "color", "direction", "background"}."""
    m = _PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
    if m is None:
        raise ValueError(f"{prompt!r} is not a prompt of this domain: expected "
                         "'a <color> <shape> moving <direction> on a <background> background'")
    out = dict(zip(("color", "shape", "direction", "background"), m.groups()))
    for name, allowed in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS),
                          ("background", BACKGROUNDS)):
        if out[name] not in allowed:
            raise ValueError(f"{prompt!r}: {name} {out[name]!r} is not one of {', '.join(allowed)}")
    return out


def _check_dims(frames: int, height: int, width: int) -> None:
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need frames >= 1 and height, width >= 8 (got {frames}, {height}, {width})")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not known: pass one of {', '.join(LAYOUTS)}")


def sample_spec(rng: random.Random, frames: int = 8, height: int = 32, width: int = 32,
                layout: str = "anywhere") -> ClipSpec:
    """A random clip whose object stays fully inside the frame (plus MARGIN) in every frame.

    ``anywhere``: the speed is drawn from SPEED_RANGE, capped at what the frame allows for ``frames``
    frames (so long clips move slower). ``cross``: the trip is drawn as a share (CROSS_RANGE) of the
    room along the motion and the speed follows from it. Either way the start is uniform over the
    positions that keep the whole trip inside the frame.
    """
    _check_dims(frames, height, width)
    _check_layout(layout)
    scale = min(height, width) / REFERENCE_SIZE
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    direction, background = rng.choice(DIRECTIONS), rng.choice(tuple(BACKGROUNDS))
    size = rng.uniform(*SIZE_RANGE) * scale
    dx, dy = MOTION[direction]
    extent = width if dx else height  # along the motion
    room = extent - size - 2 * MARGIN
    if layout == "cross" and frames > 1:
        speed = rng.uniform(*CROSS_RANGE) * room / (frames - 1)
    else:
        speed = min(rng.uniform(*SPEED_RANGE) * scale, room / max(1, frames - 1))
    travel = speed * (frames - 1)

    def start(length: float, sign: int, travel: float) -> float:
        lo, hi = size / 2 + MARGIN, length - size / 2 - MARGIN - travel  # centre range with the motion going +
        c = rng.uniform(lo, hi)
        return length - c if sign < 0 else c  # mirrored for a motion going -

    x0 = start(width, dx, travel if dx else 0.0)
    y0 = start(height, dy, travel if dy else 0.0)
    return ClipSpec(shape, color, direction, background, size, speed, x0, y0)


def _coverage(shape: str, cx: float, cy: float, size: float, height: int, width: int) -> np.ndarray:
    """Share of each pixel the object covers, (H, W) float in [0, 1]: SUPERSAMPLE^2 point samples per pixel."""
    s = SUPERSAMPLE
    ys = (np.arange(height * s) + 0.5) / s  # sub-pixel centres, px
    xs = (np.arange(width * s) + 0.5) / s
    x, y = xs[None, :] - cx, ys[:, None] - cy  # (H*s, W*s) offsets from the centre, by broadcasting
    r = size / 2
    if shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "triangle":  # apex up: apex (0, -r), base corners (+-r, r)
        inside = (y <= r) & (np.abs(x) <= (y + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}: pass one of {', '.join(SHAPES)}")
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))  # box-downsample to (H, W)


def render(spec: ClipSpec, frames: int = 8, height: int = 32, width: int = 32) -> np.ndarray:
    """The clip as uint8 (F, H, W, 3): flat background, the object blended by its pixel coverage."""
    _check_dims(frames, height, width)
    bg = np.asarray(BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.asarray(COLORS[spec.color], dtype=np.float64)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        cover = _coverage(spec.shape, *spec.centre(t), spec.size, height, width)[..., None]  # (H, W, 1)
        video[t] = np.rint(bg + cover * (fg - bg)).astype(np.uint8)
    return video


def dataset(n: int, seed: int, frames: int = 8, height: int = 32, width: int = 32,
            layout: str = "anywhere") -> list[tuple[ClipSpec, np.ndarray]]:
    """``n`` (spec, video) pairs; the same (n, seed, layout) gives the same pairs, and a longer ``n`` extends a
    shorter one."""
    _check_layout(layout)
    rng = random.Random(seed)
    specs = [sample_spec(rng, frames, height, width, layout) for _ in range(n)]
    return [(spec, render(spec, frames, height, width)) for spec in specs]


def held_out_prompts(n: int, seed: int = 12345) -> list[str]:
    """``n`` evaluation prompts. Colours and directions are cycled, not drawn, so their counts differ
    by at most one; each block of 24 (prompts 0-23, 24-47, ...) holds every colour x direction pair once. Shape and
    background are drawn from ``seed``."""
    rng = random.Random(seed)
    colors = tuple(COLORS)
    out = []
    for i in range(n):
        # i % 6 and i % 4 share their parity, so alone they meet only half the pairs; the shift by
        # i // 12 gives the other half in the next 12 prompts.
        color = colors[i % len(colors)]
        direction = DIRECTIONS[(i + i // 12) % len(DIRECTIONS)]
        shape, background = rng.choice(SHAPES), rng.choice(tuple(BACKGROUNDS))
        out.append(f"a {color} {shape} moving {direction} on a {background} background")
    return out

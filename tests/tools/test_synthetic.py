"""The synthetic domain: deterministic, and every label in a prompt is true of its pixels."""

import itertools
import random

import numpy as np
import pytest

from tools.synthetic import (
    BACKGROUNDS, COLORS, DIRECTIONS, LAYOUTS, MOTION, SHAPES, ClipSpec, dataset, held_out_prompts, parse_prompt,
    render, sample_spec,
)


def rgb_distance(p, q) -> float:
    return float(np.linalg.norm(np.subtract(p, q, dtype=np.float64)))


def coverage(video: np.ndarray, spec: ClipSpec) -> np.ndarray:
    """Per-pixel object coverage in [0, 1], recovered from the blend bg + c * (fg - bg): (F, H, W)."""
    bg, fg = np.array(BACKGROUNDS[spec.background], float), np.array(COLORS[spec.color], float)
    return (video.astype(float) - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))


def centroids(video: np.ndarray, spec: ClipSpec) -> np.ndarray:
    """Coverage-weighted centre of the object per frame, (F, 2) as (x, y) in px (pixel i spans [i, i+1))."""
    c = coverage(video, spec)
    _, h, w = c.shape
    total = c.sum(axis=(1, 2))
    x = (c.sum(axis=1) * (np.arange(w) + 0.5)).sum(axis=1) / total
    y = (c.sum(axis=2) * (np.arange(h) + 0.5)).sum(axis=1) / total
    return np.stack([x, y], axis=1)


# ------------------------------------------------------------------ palette
def test_palette_is_well_separated():
    assert len(COLORS) == 6 and 3 <= len(BACKGROUNDS) <= 4
    assert min(rgb_distance(p, q) for p, q in itertools.combinations(COLORS.values(), 2)) >= 100
    assert min(rgb_distance(c, b) for c in COLORS.values() for b in BACKGROUNDS.values()) >= 90


# ------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_clips_and_another_seed_different_ones():
    a, b, c = dataset(6, seed=3), dataset(6, seed=3), dataset(6, seed=4)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert [s for s, _ in a] != [s for s, _ in c]
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, c))


def test_dataset_shapes_and_a_longer_dataset_extends_a_shorter_one():
    short, long = dataset(3, seed=9, frames=6, height=24, width=40), dataset(5, seed=9, frames=6, height=24, width=40)
    assert [s for s, _ in long[:3]] == [s for s, _ in short]
    for _, video in long:
        assert video.dtype == np.uint8 and video.shape == (6, 24, 40, 3)


# ------------------------------------------------------------------ prompts
def test_prompt_round_trips_for_every_combination():
    seen = set()
    for shape, color, direction, background in itertools.product(SHAPES, COLORS, DIRECTIONS, BACKGROUNDS):
        spec = ClipSpec(shape, color, direction, background, size=10.0, speed=1.5, x0=16.0, y0=16.0)
        assert spec.prompt == f"a {color} {shape} moving {direction} on a {background} background"
        assert parse_prompt(spec.prompt) == {"shape": shape, "color": color, "direction": direction,
                                             "background": background}
        seen.add(spec.prompt)
    assert len(seen) == len(SHAPES) * len(COLORS) * len(DIRECTIONS) * len(BACKGROUNDS)


@pytest.mark.parametrize("prompt", [
    "a red panda eating bamboo in a sunny forest",
    "a orange square moving left on a black background",  # colour not in the palette
    "a red hexagon moving left on a black background",
    "a red square moving sideways on a black background",
    "a red square moving left on a pink background",
    "a red square moving left on a black background.",  # trailing text
    "A red square moving left on a black background",
])
def test_parse_prompt_rejects_anything_else(prompt):
    with pytest.raises(ValueError):
        parse_prompt(prompt)


def test_spec_rejects_values_outside_the_domain():
    with pytest.raises(ValueError, match="color"):
        ClipSpec("square", "orange", "left", "black", 10.0, 1.5, 16.0, 16.0)
    with pytest.raises(ValueError, match="size"):
        ClipSpec("square", "red", "left", "black", 0.0, 1.5, 16.0, 16.0)


# ------------------------------------------------------------------ labels are true of the pixels
@pytest.mark.parametrize("shape", SHAPES)
def test_object_interior_has_exactly_the_spec_colour_and_the_rest_is_background(shape):
    spec = ClipSpec(shape, "purple", "right", "gray", size=12.0, speed=1.25, x0=9.0, y0=15.0)
    video = render(spec)
    fg, bg = np.array(COLORS["purple"]), np.array(BACKGROUNDS["gray"])
    for t in range(video.shape[0]):
        cx, cy = spec.centre(t)
        # A 3x3 pixel block at and below the centre, inside every shape (a triangle widens downward).
        block = video[t, int(cy):int(cy) + 3, int(cx) - 1:int(cx) + 2].reshape(-1, 3)
        assert (block == fg).all()
        assert (video[t, :, 0] == bg).all() and (video[t, :, -1] == bg).all()  # far columns untouched
    assert set(map(tuple, video.reshape(-1, 3))) > {tuple(fg), tuple(bg)}  # anti-aliased edge blends exist


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_object_moves_in_the_spec_direction_by_speed_per_frame(direction):
    frames, speed = 8, 1.3
    dx, dy = MOTION[direction]
    # Starts 4.5 px behind the centre so that it ends 4.6 px past it, inside the frame.
    spec = ClipSpec("circle", "green", direction, "black", size=10.0, speed=speed, x0=16.2 - 4.5 * dx,
                    y0=15.7 - 4.5 * dy)
    c = centroids(render(spec, frames=frames), spec)
    np.testing.assert_allclose(c[-1] - c[0], [dx * speed * (frames - 1), dy * speed * (frames - 1)], atol=0.1)
    steps = np.diff(c, axis=0) @ np.array([dx, dy], float)  # every frame moves about `speed`: sub-pixel shows
    np.testing.assert_allclose(steps, speed, atol=0.1)


def test_sampled_object_stays_inside_and_moves_visibly():
    rng = random.Random(7)
    for frames, height, width in ((8, 32, 32), (16, 64, 64), (8, 32, 48)):
        scale = min(height, width) / 32
        for _ in range(40):
            spec = sample_spec(rng, frames, height, width)
            dx, dy = MOTION[spec.direction]
            assert 8 * scale <= spec.size <= 12 * scale
            # 1.2-2.0 px/frame at 32 px, or as fast as the frame allows (a 1 px margin at both ends)
            room = (width if dx else height) - spec.size - 2
            assert spec.speed <= 2.0 * scale
            assert spec.speed >= 1.2 * scale or spec.speed * (frames - 1) == pytest.approx(room)
            video = render(spec, frames, height, width)
            bg = np.array(BACKGROUNDS[spec.background])
            border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
            assert (border == bg).all(), spec  # never touches the edge
            cover = coverage(video, spec).sum(axis=(1, 2))
            # The whole object in every frame: 4x4 supersampling moves a small triangle's area by up to ~6%.
            np.testing.assert_allclose(cover, cover[0], rtol=0.1)
            c = centroids(video, spec)
            np.testing.assert_allclose(c[-1] - c[0], np.array([dx, dy]) * spec.speed * (frames - 1), atol=0.25)


def test_cross_clips_cross_the_frame_so_the_direction_decides_the_start_and_end_halves():
    rng = random.Random(11)
    for frames, height, width in ((8, 32, 32), (17, 32, 32), (9, 64, 48)):
        for _ in range(40):
            spec = sample_spec(rng, frames, height, width, layout="cross")
            dx, dy = MOTION[spec.direction]
            extent = width if dx else height
            room = extent - spec.size - 2
            travel = spec.speed * (frames - 1)
            assert 0.6 * room - 1e-9 <= travel <= room + 1e-9
            video = render(spec, frames, height, width)
            border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
            assert (border == np.array(BACKGROUNDS[spec.background])).all(), spec
            c = centroids(video, spec)
            np.testing.assert_allclose(c[-1] - c[0], np.array([dx, dy]) * travel, atol=0.25)
            along = (c[:, 0] if dx else c[:, 1]) * (dx or dy)  # position along the motion, growing with it
            half = extent / 2 * (dx or dy)
            assert along[0] < half < along[-1], spec  # starts in the half it leaves, ends in the other


def test_layouts_are_deterministic_distinct_and_checked():
    assert LAYOUTS == ("anywhere", "cross")
    assert [s for s, _ in dataset(4, seed=2)] == [s for s, _ in dataset(4, seed=2, layout="anywhere")]
    cross = dataset(4, seed=2, layout="cross")
    assert [s for s, _ in cross] == [s for s, _ in dataset(4, seed=2, layout="cross")]
    assert [s for s, _ in cross] != [s for s, _ in dataset(4, seed=2)]
    with pytest.raises(ValueError, match="layout='diagonal' is not known: pass one of anywhere, cross"):
        dataset(2, seed=0, layout="diagonal")
    with pytest.raises(ValueError, match="pass one of anywhere, cross"):
        sample_spec(random.Random(0), layout="diagonal")


def test_a_static_clip_repeats_its_first_frame():
    spec = ClipSpec("triangle", "white", "up", "navy", size=9.0, speed=0.0, x0=16.0, y0=16.0)
    video = render(spec)
    assert all(np.array_equal(video[0], f) for f in video)


# ------------------------------------------------------------------ evaluation prompts
def test_held_out_prompts_are_deterministic_balanced_and_parse():
    prompts = held_out_prompts(32)
    assert prompts == held_out_prompts(32) and prompts != held_out_prompts(32, seed=1)
    assert held_out_prompts(10) == prompts[:10]
    parsed = [parse_prompt(p) for p in prompts]
    for key, values in (("color", COLORS), ("direction", DIRECTIONS)):
        counts = [sum(p[key] == v for p in parsed) for v in values]
        assert max(counts) - min(counts) <= 1, (key, counts)
    pairs = {(p["color"], p["direction"]) for p in parsed[:24]}
    assert len(pairs) == len(COLORS) * len(DIRECTIONS)  # the first 24 hold every colour x direction pair

"""tools/vae_roundtrip.py: the shipped CogVideoX VAE keeps colour and direction through its round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tools import vae_roundtrip

PRESETS = Path(__file__).resolve().parents[2] / "exporter" / "presets"


def test_the_shipped_cogvideox_vae_keeps_what_the_prompt_says(tmp_path):
    out, pic = tmp_path / "rt.json", tmp_path / "rt.png"
    assert vae_roundtrip.main(["--vae", str(PRESETS / "cogvideox-tiny" / "vae"), "--family", "cogvideox",
                               "--clips", "12", "--picture", str(pic), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["clips"] == 12 and result["colour"] >= 0.9 and result["direction"] >= 0.9
    assert 0 < result["mse"] < 0.03
    import imageio.v3 as iio

    assert iio.imread(pic).shape == (6 * 32 * 3, 6 * 32 * 3, 3)  # 6 clips x (3 frames + 3 reconstructed)


def test_a_lost_colour_is_scored_as_lost():
    from tools import synthetic

    data = synthetic.dataset(8, seed=1, frames=9, height=32, width=32, layout="cross")
    clips = np.stack([c for _, c in data])
    grey = np.repeat(clips.mean(axis=-1, keepdims=True), 3, axis=-1).astype(np.uint8)  # colour gone, motion kept
    kept = vae_roundtrip.score(clips, clips, [s.prompt for s, _ in data])
    lost = vae_roundtrip.score(clips, grey, [s.prompt for s, _ in data])
    assert kept["colour"] == kept["direction"] == 1.0 and kept["mse"] == 0.0
    assert lost["colour"] < 0.5 and lost["mse"] > 0

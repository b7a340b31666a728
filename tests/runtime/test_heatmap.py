import imageio.v3 as iio
import numpy as np
import pytest

from runtime.errors import ForesightError, OutputPathError
from runtime.heatmap import plot_reuse_heatmap
from runtime.outputs import OutputSet


def make_trace(num_layers=4, num_steps=6, num_probes=2, policy="foresight", reuse=True) -> dict:
    """Steps 0, 1 and every third step compute (and measure) all layers; the rest reuse odd layers."""
    steps = []
    for t in range(num_steps):
        full = not reuse or t < 2 or t % 3 == 0
        computed = list(range(num_layers)) if full else [l for l in range(num_layers) if l % 2 == 0]
        measure = policy != "none" and full and t > 0
        mse = None
        if policy != "none":
            mse = [
                [10.0 ** -(1 + l + p) if measure and l in computed else None for p in range(num_probes)]
                for l in range(num_layers)
            ]
        steps.append({
            "step": t,
            "computed": computed,
            "source": [0, 0] if full and t > 0 else None,
            "measure": measure,
            "mse": mse,
            "thresholds": [[1e-3] * num_probes for _ in range(num_layers)] if policy != "none" else None,
        })
    return {
        "schema": "foresight-trace/2",
        "policy": policy,
        "config": {},
        "num_layers": num_layers,
        "num_probes": num_probes,
        "steps": steps,
    }


def read_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = iio.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 100 and image.shape[1] > 100
    return image


def test_reuse_changes_the_picture(tmp_path):
    with_reuse = read_png(plot_reuse_heatmap(make_trace(reuse=True), tmp_path / "reuse.png"))
    all_computed = read_png(plot_reuse_heatmap(make_trace(reuse=False), tmp_path / "full.png"))
    assert with_reuse.shape == all_computed.shape
    assert np.abs(with_reuse.astype(np.int16) - all_computed).sum(axis=-1).astype(bool).mean() > 0.005
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.png", "reuse.png"]


def test_an_expert_switch_is_marked(tmp_path):
    one = read_png(plot_reuse_heatmap(make_trace(num_steps=12), tmp_path / "one.png"))
    two = read_png(plot_reuse_heatmap({**make_trace(num_steps=12), "stages": [0, 7]}, tmp_path / "two.png"))
    assert one.shape == two.shape
    dark = lambda im: (im[..., :3].astype(int).sum(axis=-1) < 60).sum()  # noqa: E731
    assert dark(two) > dark(one)


def test_policy_none(tmp_path):
    read_png(plot_reuse_heatmap(make_trace(policy="none", reuse=False), tmp_path / "none.png", title="baseline"))


def test_single_layer(tmp_path):
    read_png(plot_reuse_heatmap(make_trace(num_layers=1, num_steps=3), tmp_path / "one.png"))


def test_large_trace(tmp_path):
    read_png(plot_reuse_heatmap(make_trace(num_layers=28, num_steps=50), tmp_path / "big.png"))


def test_mse_all_equal_or_zero(tmp_path):
    trace = make_trace(num_layers=2, num_steps=3, num_probes=1)
    for step in trace["steps"]:
        step["mse"] = [[0.0], [0.0]]
    read_png(plot_reuse_heatmap(trace, tmp_path / "zero.png"))


def test_bad_trace_rejected(tmp_path):
    trace = make_trace()
    trace["schema"] = "foresight-trace/0"
    with pytest.raises(ForesightError, match="schema"):
        plot_reuse_heatmap(trace, tmp_path / "x.png")
    trace = make_trace()
    trace["steps"][1]["computed"] = [99]
    with pytest.raises(ForesightError, match="layer 99"):
        plot_reuse_heatmap(trace, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_output_must_be_png(tmp_path):
    with pytest.raises(OutputPathError, match=r"\.png"):
        plot_reuse_heatmap(make_trace(), tmp_path / "x.jpg")


def test_heatmap_appears_with_the_other_outputs_or_not_at_all(tmp_path):
    with OutputSet() as outputs:
        png = plot_reuse_heatmap(make_trace(), tmp_path / "map.png", outputs=outputs)
        assert not png.exists()
    assert png.exists()
    bad = make_trace()
    bad["steps"][0]["computed"] = [99]
    with pytest.raises(ForesightError, match="layer 99"), OutputSet() as outputs:
        outputs.add(tmp_path / "stats.json", lambda tmp: tmp.write_text("{}"))
        plot_reuse_heatmap(bad, tmp_path / "map.png", outputs=outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]

"""Open-Sora 1.2's parts: the stem/layers/head stack equals STDiT3's forward, and every part
exports to ONNX with dynamic batch, frames, token grid and caption length, matching PyTorch at two
shapes (the exporter's own export and validation path)."""

from __future__ import annotations

import torch

from exporter.export import export_part, validate_part
from exporter.inputs import make_inputs, validation_dims
from exporter.families import opensora
from dit.stdit3 import STDiT3, STDiT3Config


def tiny():
    torch.manual_seed(0)
    return STDiT3(STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)).eval()


def test_stacked_parts_equal_the_model_forward():
    model = tiny()
    parts = opensora.parts(model)
    assert [p.name for p in parts] == ["stem", "layer_000", "layer_001", "head"]
    dims = validation_dims(opensora.dims(model, max_frames=8, max_grid=8))[1]
    inputs = dict(zip([s.name for s in parts[0].inputs], make_inputs(parts[0].inputs, dims, torch.Generator().manual_seed(3))))
    got = opensora.stacked(parts, inputs)
    with torch.no_grad():
        want = model(inputs["latents"], inputs["timestep"], inputs["caption"][:, None], inputs["caption_mask"] > 0.5,
                     fps=inputs["fps"], height=inputs["height"], width=inputs["width"])
    assert got.shape == (dims["B"], 8, dims["F"], dims["H"], dims["W"])
    assert torch.equal(got, want)


def test_every_part_exports_and_matches_pytorch_at_two_shapes(tmp_path):
    model = tiny()
    spec = opensora.dims(model, max_frames=8, max_grid=8)
    for part in opensora.parts(model)[:2] + opensora.parts(model)[-1:]:  # stem, one layer, head
        path = tmp_path / f"{part.name}.onnx"
        export_part(part, spec, path, torch.Generator().manual_seed(0))
        results = validate_part(part, path, spec, torch.Generator().manual_seed(1))
        assert len(results) == 2 and results[0]["dims"] != results[1]["dims"]
        for r in results:
            for name, err in r["max_rel_error"].items():
                assert err < 1e-4, (part.name, name, r["dims"], err)

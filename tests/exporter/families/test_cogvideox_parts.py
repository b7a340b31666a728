"""CogVideoX's parts: the stem/layers/head stack equals diffusers' CogVideoXTransformer3DModel,
and every part exports to ONNX with dynamic batch, frames, token grid and text length, matching
PyTorch at two shapes."""

from __future__ import annotations

import pytest
import torch

from exporter.export import export_part, validate_part
from exporter.inputs import make_inputs, validation_dims
from exporter.families import cogvideox


def tiny(rotary: bool = True):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=24, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=8, use_rotary_positional_embeddings=rotary).eval()


def test_stacked_parts_equal_the_diffusers_model_with_rotary_tables():
    model = tiny()
    parts = cogvideox.parts(model)
    assert [p.name for p in parts] == ["stem", "layer_000", "layer_001", "head"]
    dims = validation_dims(cogvideox.dims(model, max_frames=4, max_grid=8))[1]
    g = torch.Generator().manual_seed(3)
    inputs = dict(zip([s.name for s in parts[0].inputs], make_inputs(parts[0].inputs, dims, g)))
    rot = make_inputs(parts[1].inputs[3:], dims, g)
    inputs.update(rotary_cos=rot[0], rotary_sin=rot[1])
    got = cogvideox.stacked(parts, inputs)
    with torch.no_grad():
        want = model(inputs["latents"], inputs["encoder_hidden_states"], inputs["timestep"],
                     image_rotary_emb=(rot[0].flatten(0, 2), rot[1].flatten(0, 2)), return_dict=False)[0]
    assert got.shape == (dims["B"], dims["F"], 4, dims["H"], dims["W"])
    assert torch.equal(got, want)


@pytest.mark.parametrize("size", [(16, 16, 3), (12, 20, 2)], ids=["training size", "other size"])
def test_stacked_parts_equal_the_diffusers_model_with_the_sincos_table(size):
    """At the training size diffusers adds its precomputed buffer, elsewhere a table it computes:
    the table the pipeline passes in equals both."""
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    model = tiny(rotary=False)
    parts = cogvideox.parts(model)
    assert [s.name for s in parts[0].inputs][-1] == "pos_embedding" and len(parts[1].inputs) == 3
    H, W, F = size
    g = torch.Generator().manual_seed(4)
    inputs = {"latents": torch.randn(2, F, 4, H, W, generator=g), "timestep": torch.tensor([999.0, 10.0]),
              "encoder_hidden_states": torch.randn(2, 8, 24, generator=g)}
    cfg = model.config
    pos = get_3d_sincos_pos_embed(32, (W // 2, H // 2), F, cfg.spatial_interpolation_scale,
                                  cfg.temporal_interpolation_scale, output_type="pt")
    inputs["pos_embedding"] = pos.reshape(F, H // 2, W // 2, 32)
    got = cogvideox.stacked(parts, inputs)
    with torch.no_grad():
        want = model(inputs["latents"], inputs["encoder_hidden_states"], inputs["timestep"], return_dict=False)[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "sincos"])
def test_every_part_exports_and_matches_pytorch_at_two_shapes(tmp_path, rotary):
    model = tiny(rotary)
    spec = cogvideox.dims(model, max_frames=4, max_grid=8)
    all_parts = cogvideox.parts(model)
    for part in (all_parts[0], all_parts[1], all_parts[-1]):
        path = tmp_path / f"{part.name}.onnx"
        export_part(part, spec, path, torch.Generator().manual_seed(0))
        for r in validate_part(part, path, spec, torch.Generator().manual_seed(1)):
            for name, err in r["max_rel_error"].items():
                assert err < 1e-4, (part.name, name, r["dims"], err)


def test_unsupported_configurations_are_refused_with_a_reason():
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=32, text_embed_dim=24, num_layers=1, sample_width=16,
                                        sample_height=16, sample_frames=9, max_text_seq_length=8,
                                        use_rotary_positional_embeddings=True,
                                        use_learned_positional_embeddings=True)
    with pytest.raises(NotImplementedError, match="I2V"):
        cogvideox.parts(model)


COGVIDEOX_2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                    text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49,
                    patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=False)
COGVIDEOX_5B = dict(COGVIDEOX_2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)


@pytest.mark.parametrize("config, layers, table", [(COGVIDEOX_2B, 30, ("pos_embedding", 1920)),
                                                   (COGVIDEOX_5B, 42, ("rotary_cos", 64))], ids=["2B", "5B"])
def test_released_configurations_split_with_the_pipelines_shapes(config, layers, table):
    """The released 2B/5B configurations (on the meta device: no memory) split into stem, one part
    per block and head; the family's manifest facts are CogVideoXPipeline's (226 tokens, 13 latent
    frames of 60x90 latents at the default 49 x 480 x 720)."""
    from diffusers import CogVideoXTransformer3DModel

    from exporter.families.cogvideox import CogVideoXFamily

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**config)
    family = CogVideoXFamily()
    parts = family.parts(model)
    assert len(parts) == layers + 2
    name, width = table
    tables = {s.name: s.shape for s in cogvideox.pipeline_inputs(model)}
    assert tables[name] == ["F", "h", "w", width]
    where = parts[1] if name.startswith("rotary") else parts[0]
    assert name in [s.name for s in where.inputs]
    vae = {"block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4, "scaling_factor": 0.7}
    pipe = family.pipeline(model, vae)
    dims = family.dims(model, pipe["vae_scale_factor"])
    assert (pipe["max_text_length"], pipe["default_frames"], dims["F"]["opt"]) == (226, 49, 13)
    assert (dims["h"]["opt"], dims["w"]["opt"], dims["T"]["opt"]) == (30, 45, 226)

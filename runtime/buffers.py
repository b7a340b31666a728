"""Caller-owned, preallocated device buffers for one shape.

Each layer owns two buffer sets (ping-pong) for all of its outputs. A computed layer
writes into its *other* set, the probe mse is taken between the new set and the current
one (the cache), and the index flips: no copy ever moves a cached output. Reusing layer
k binds k's current set as layer k+1's input. The per-step statistics (mse of every probe
and a finite-check of the head's output) live in one device vector, so a step needs
exactly one device-to-host transfer.
"""

from __future__ import annotations

import torch

from .manifest import Manifest


class BufferPool:
    def __init__(self, manifest: Manifest, dims: dict[str, int], device, dtype=torch.float32):
        self.dims = dict(dims)
        self.device = torch.device(device)

        def alloc(specs):
            # The compute dtype applies to every tensor but those the manifest pins (timesteps).
            return {io.name: torch.empty(io.shape_at(dims), device=self.device,
                                         dtype=getattr(torch, io.dtype) if io.fixed_dtype else dtype)
                    for io in specs}

        # Tensors the pipeline computes once per shape (e.g. rotary tables): layers bind them
        # as "pipeline:<name>"; a stem input of the same name is the same buffer.
        self.shape_in = alloc(manifest.flow.pipeline_inputs)
        self.stem_in = alloc([io for io in manifest.stem.inputs if io.name not in self.shape_in])
        self.stem_in.update({n: self.shape_in[n] for n in manifest.stem.input_names if n in self.shape_in})
        self.stem_out = alloc(manifest.stem.outputs)
        self.head_out = alloc(manifest.head.outputs)
        self.layer_sets = [(alloc(layer.outputs), alloc(layer.outputs)) for layer in manifest.layers]
        self.current = [0] * manifest.num_layers
        self.probes = list(manifest.probes)
        num_layers, num_probes = manifest.num_layers, len(self.probes)
        # stats = [mse of every probe (L*P) | head output finite (1)]: one transfer per step.
        self.stats = torch.zeros(num_layers * num_probes + 1, device=self.device, dtype=torch.float32)
        self.bytes_copied = 0  # bytes moved between cached buffers by the runtime (stays 0: reuse binds)
        unique = {id(t): t for group in (self.shape_in, self.stem_in, self.stem_out, self.head_out,
                                         *[s for pair in self.layer_sets for s in pair]) for t in group.values()}
        self.bytes_allocated = sum(t.numel() * t.element_size() for t in unique.values())

    def cached(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer's latest computed outputs (the cache)."""
        return self.layer_sets[layer][self.current[layer]]

    def scratch(self, layer: int) -> dict[str, torch.Tensor]:
        """Where the layer's next computation is written."""
        return self.layer_sets[layer][1 - self.current[layer]]

    def commit(self, layer: int) -> None:
        """The scratch set becomes the cache: flip the index, copy nothing."""
        self.current[layer] = 1 - self.current[layer]

    def reset(self) -> None:
        self.current = [0] * len(self.current)
        self.stats.zero_()

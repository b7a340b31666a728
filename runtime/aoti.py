"""What an AOTInductor package is tied to, shared by the exporter (records it) and the runtime (checks it).

An AOTInductor package is native code compiled for one libtorch, one device kind and, on
CPU, the vector instruction set the kernels were generated for (on CUDA, the GPU's compute
capability). ``identity`` is what the manifest's ``aoti`` section records; ``check_compat``
refuses a folder built for anything else with a message saying how to re-export it, before
any package is loaded (a mismatched ``.so`` can crash the process instead of raising).
"""

from __future__ import annotations

import torch

from .errors import BackendError

SECTION_KEYS = ("torch", "device", "isa")


def identity(device: torch.device | str) -> dict:
    """The facts an AOTInductor package built here, now, for ``device`` depends on."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        isa = f"sm_{major}{minor}"
    else:
        isa = torch.backends.cpu.get_cpu_capability()
    return {"torch": torch.__version__, "device": device.type, "isa": isa}


def load_program(path, device: torch.device):
    """A fresh instance of the compiled program in package ``path`` on ``device`` (its constants are
    its own: load them with ``load_constants``)."""
    device = torch.device(device)
    index = device.index if device.index is not None else -1  # -1: the current device
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)


def check_compat(section: dict, device: torch.device, root) -> None:
    """Refuse packages built for another torch, device kind or instruction set than this process has."""
    fix = f"re-export with `foresight-export --backend aoti --device {device.type} --out {root} --overwrite`"
    built = {k: section.get(k) for k in SECTION_KEYS}
    if built["device"] != device.type:
        raise BackendError(f"the AOTInductor packages in {root} were built for {built['device']}, not {device.type}: "
                           f"run with --device {built['device']}, or {fix}")
    here = identity(device)
    for key, what in (("torch", "torch"), ("isa", "instruction set" if device.type == "cpu" else "GPU architecture")):
        if built[key] != here[key]:
            raise BackendError(f"the AOTInductor packages in {root} were built with {what} {built[key]}, this process "
                               f"has {here[key]} (compiled code runs only where it was built for); {fix}")


def load_part(manifest, entry: dict, device: torch.device, io_check=None):
    """A fresh instance of the program ``entry`` names (a part's or component's ``{program, weights}``) with
    that entry's weights loaded; ``io_check(path, io)`` checks the package's ``foresight.io`` signature.
    Refuses a package that does not load or weights that are not exactly its constants."""
    import json

    from safetensors.torch import load_file

    path = manifest.path(manifest.aoti["programs"][entry["program"]]["file"])
    try:
        runner = load_program(path, device)
        io = json.loads(runner.get_metadata().get("foresight.io", "null") or "null")
    except (RuntimeError, ValueError) as exc:
        raise BackendError(f"could not load the AOTInductor package {path} ({exc}); re-export with "
                           f"`foresight-export --backend aoti --out {manifest.root} --overwrite`") from None
    if not io:
        raise BackendError(f"{path} is not a package foresight-export built (no I/O signature); re-export")
    if io_check is not None:
        io_check(path, io)
    weights = load_file(str(manifest.path(entry["weights"])), device=str(device))
    want = set(runner.get_constant_fqns())
    if set(weights) != want:
        raise BackendError(f"{entry['weights']} holds other weights than {path.name} takes "
                           f"(missing {sorted(want - set(weights))[:3]}, extra "
                           f"{sorted(set(weights) - want)[:3]}); re-export the engines folder")
    runner.load_constants(weights, False, True, False, False)
    return runner


class CompiledComponent:
    """A compiled text encoder or VAE decoder (the manifest's ``aoti.components``), called with tensors."""

    def __init__(self, manifest, name: str, device: torch.device):
        check_compat(manifest.aoti, device, manifest.root)
        self.name = name
        self.entry = manifest.aoti["components"][name]
        self.runner = load_part(manifest, self.entry, device)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.runner.run(list(inputs))[0]


class CompiledTextEncoder:
    """Called as a transformers encoder is: ``encoder(input_ids, attention_mask=mask)`` gives an output
    with ``[0]`` and ``.last_hidden_state``."""

    def __init__(self, component: CompiledComponent):
        self.component = component

    def __call__(self, input_ids, attention_mask=None):
        from transformers.modeling_outputs import BaseModelOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return BaseModelOutput(last_hidden_state=self.component(input_ids, attention_mask))


class CompiledVaeDecoder:
    """Stands in for the diffusers VAE where the pipeline decodes: ``vae.decode(z).sample``; anything
    else (its config) is the eager VAE's. A video VAE's decoder is compiled for one latent frame count
    (the default video's): other latents are refused with a ShapeError saying what to do."""

    def __init__(self, component: CompiledComponent, vae):
        self.component, self.eager = component, vae

    def check(self, latents: torch.Tensor) -> None:
        """Latents ``(B, C, F, h, w)`` of a video decoder: F must be the one it was compiled for."""
        from .errors import ShapeError

        entry = self.component.entry
        shape = entry["inputs"][0]["shape"]
        if len(shape) == 5 and latents.shape[2] != shape[2]:
            frames = entry["outputs"][0]["shape"][2]
            raise ShapeError(f"the compiled VAE decoder decodes {shape[2]} latent frames ({frames} frames, the default "
                             f"video), not {latents.shape[2]}: pass --frames {frames}, or run without "
                             f"--compiled-components")

    def check_frames(self, frames: int) -> None:
        """Refuse (before denoising) a video of another frame count than the video decoder makes."""
        from .errors import ShapeError

        entry = self.component.entry
        if len(entry["inputs"][0]["shape"]) == 5 and frames != entry["outputs"][0]["shape"][2]:
            want = entry["outputs"][0]["shape"][2]
            raise ShapeError(f"frames={frames}: the compiled VAE decoder makes {want} frames (the default video's; "
                             f"foresight-export compiles it for one frame count): pass --frames {want}, or run "
                             f"without --compiled-components")

    def decode(self, latents, return_dict=True):
        from types import SimpleNamespace

        self.check(latents)
        images = self.component(latents.contiguous())
        return SimpleNamespace(sample=images) if return_dict else (images,)

    def __getattr__(self, name):
        return getattr(self.eager, name)

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

"""Compile every part ahead of time with AOTInductor (``foresight-export --backend aoti``).

Each part is captured with ``torch.export`` (the manifest's dims dynamic) and compiled by
``torch._inductor.aoti_compile_and_package`` into a package of native code for one device
(CPU: C++ kernels; CUDA: Triton kernels). Packages hold no weights
(``aot_inductor.package_constants_in_so = False``): each part's constants are a safetensors
file the runtime loads into its own instance of the program. Parts built alike share one
program, so the layers of a model compile once however many there are: a structural key
(module types, scalar attributes, parameter/buffer names, shapes and dtypes) groups the parts,
one part per group is traced, and the traced graph's hash keys the compiled program.
Every part, sharing or not, is then validated against its own eager module at two shapes, so
a grouping mistake cannot pass unnoticed.

Re-exporting over a folder with packages reuses every program whose key (graph, dims, dtype,
torch version, device, instruction set) is unchanged; only weights are rewritten.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.aoti import identity, load_program
from runtime.errors import ForesightError
from runtime.manifest import MANIFEST_NAME, Dims, sha256_file

FOLDER = "aoti"
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}
# Max relative error of a compiled part vs eager PyTorch in the same dtype (measured on the
# tiny presets: fp32 <= 3e-7; fp16/bf16: rounding of fused reductions differs from eager's).
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}


class AotiError(ForesightError):
    """AOTInductor compilation or validation failed, or cannot run here."""


def require_compiler(device: str) -> None:
    """Say what is missing before minutes of export: a C++ compiler, and on CUDA a GPU and Triton."""
    import torch

    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler
        raise AotiError("--backend aoti compiles C++: no C++ compiler was found (install g++, e.g. "
                        "`apt-get install g++`, or set CXX to one)") from None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise AotiError("--backend aoti --device cuda needs a CUDA GPU and a CUDA build of torch; "
                            "pass --device cpu to build CPU packages")
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise AotiError("--backend aoti --device cuda generates Triton kernels: pip install triton")


def trace_dims(dims_spec: dict) -> dict:
    """Example sizes for ``torch.export``: every free dim distinct and >= 2 (equal sizes would be
    unified into one symbol, size 1 specialised), as close to the opt size as the range allows; a
    dim of one size (min = max) is static at it."""
    dims = Dims.parse(dims_spec)
    used, values = set(), {}
    for sym, r in dims.ranges.items():
        if r.min == r.max:  # static: its one size
            values[sym] = r.min
            continue
        candidates = [r.opt] + [v for k in range(1, r.max - r.min + 2) for v in (r.opt + k, r.opt - k)]
        value = next((v for v in candidates if r.min <= v <= r.max and v >= 2 and v not in used), None)
        if value is None:
            raise AotiError(f"dims.{sym} ({r.min}..{r.max}) leaves no size >= 2 distinct from the others to trace "
                            f"the parts with; export with a wider range")
        used.add(value)
        values[sym] = value
    return dims.derive(values)


def structure_key(module) -> str:
    """Parts with the same key have the same code path and constants (names, shapes, dtypes)."""
    rows = []
    for name, m in module.named_modules():
        scalars = sorted((k, repr(v)) for k, v in vars(m).items()
                         if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None))))
        others = sorted((k, type(v).__qualname__) for k, v in vars(m).items()
                        if not k.startswith("_") and not isinstance(v, (bool, int, float, str, tuple, type(None))))
        rows.append((name, type(m).__module__, type(m).__qualname__, scalars, others))
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in (*module.named_parameters(), *module.named_buffers())]
    return hashlib.sha256(repr((rows, tensors)).encode()).hexdigest()


def baked_digest(module, fqns) -> str:
    """sha256 of the part's parameters and buffers the program does not take as constants: Inductor
    compiled their values into the code (a small bias, say), so the program computes this part only if
    those values are exactly the ones it was built with. Names, dtypes, shapes and bytes."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(named_tensors(module).items()):
        if name in fqns:
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def named_tensors(module) -> dict:
    """Every parameter and buffer (persistent or not) by its dotted name: a package's constant fqns."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def io_signature(part) -> dict:
    return {"inputs": [[s.name, len(s.shape), s.dtype] for s in part.inputs],
            "outputs": [[s.name, len(s.shape), s.dtype] for s in part.outputs]}


@dataclass
class Program:
    name: str  # the first part built with it
    structure: str
    members: list = field(default_factory=list)
    exported: object = None
    key: str = ""
    baked: str = ""  # baked_digest of the values compiled into it


def trace(part, dims_spec: dict, device, generator):
    import torch
    from torch.export import export

    from .inputs import dynamic_shapes, make_inputs

    example = tuple(t.to(device) for t in make_inputs(part.inputs, trace_dims(dims_spec), generator))
    with torch.no_grad():
        return export(part.module, example, dynamic_shapes=dynamic_shapes(part.inputs, dims_spec))


def program_key(exported, part, dims_spec: dict, ident: dict, dtype: str) -> str:
    constants = [(k, tuple(v.shape), str(v.dtype)) for k, v in {**exported.state_dict, **exported.constants}.items()]
    facts = {"graph": exported.graph_module.code, "constants": constants, "dims": dims_spec, "io": io_signature(part),
             "identity": ident, "dtype": dtype, "configs": INDUCTOR_CONFIGS}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def previous_programs(old: Path | None) -> dict:
    """``{key: [(path, baked digest or None), ...]}`` of the packages an earlier export left in ``old``
    (intact files only)."""
    try:
        manifest = json.loads((old / MANIFEST_NAME).read_text())
        section, files = manifest.get("aoti") or {}, manifest.get("files", {})
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
    found: dict[str, list] = {}
    for entry in section.get("programs", {}).values():
        path = old / entry.get("file", "")
        listed = files.get(entry.get("file"), {})
        if path.is_file() and listed.get("sha256") == sha256_file(path):
            found.setdefault(entry.get("key"), []).append((path, entry.get("baked")))
    return found


def compile_program(program, first, file: Path) -> None:
    import torch

    configs = {**INDUCTOR_CONFIGS, "aot_inductor.metadata": {
        "foresight.part": program.name, "foresight.io": json.dumps(io_signature(first))}}
    try:
        torch._inductor.aoti_compile_and_package(program.exported, package_path=str(file), inductor_configs=configs)
    except Exception as exc:  # noqa: BLE001 - a compiler failure becomes one message
        raise AotiError(f"AOTInductor could not compile {program.name}: {exc}") from exc


def validate(runner, part, dims_spec: dict, device, generator) -> list[dict]:
    """The compiled part vs its eager module at the export's two validation shapes."""
    import torch

    from .inputs import make_inputs, max_rel_error, validation_dims

    results = []
    for dims in validation_dims(dims_spec):
        inputs = [t.to(device) for t in make_inputs(part.inputs, dims, generator)]
        with torch.no_grad():
            ref = part.module(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = runner.run(inputs)
        for spec, g in zip(part.outputs, got):
            want_shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
            if tuple(g.shape) != want_shape:
                raise AotiError(f"{part.name}: the compiled part returned {spec.name} of shape {tuple(g.shape)}, "
                                f"expected {want_shape}")
        results.append({"dims": dict(dims), "max_rel_error": {s.name: max_rel_error(g, r)
                                                              for s, g, r in zip(part.outputs, got, ref)}})
    return results


def build(folder: Path, parts, dims_spec: dict, device: str, dtype: str, previous: Path | None = None,
          generator=None, tolerance: float | None = None, progress: bool = True, prefix: str = "",
          shared: dict | None = None) -> dict:
    """Compile, validate and write every part's package and weights under ``folder/aoti``; returns
    the manifest's ``aoti`` section.

    ``prefix`` names another expert's files (``aoti/<prefix><name>``); ``shared``: the ``programs``
    this export already built (another expert's): a program with one of their keys is not written
    again, its parts name that program, and the returned ``programs`` hold only new ones."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    dev = torch.device(device)
    ident = identity(dev)
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    generator = generator or torch.Generator().manual_seed(0)
    for part in parts:
        part.module.to(dev)
    (folder / FOLDER / prefix).mkdir(parents=True, exist_ok=True)
    carried = previous_programs(previous)
    known = {entry["key"]: name for name, entry in (shared or {}).items()}
    tag = prefix.strip("/").replace("/", "_") + "_" if prefix else ""  # program names are unique in the folder

    programs: list[Program] = []
    for part in parts:  # group the parts; trace one per group
        key = structure_key(part.module)
        program = next((p for p in programs if p.structure == key), None)
        if program is None:
            program = Program(tag + part.name, key)
            programs.append(program)
        program.members.append(part)

    section = {**ident, "dtype": dtype, "inductor_configs": INDUCTOR_CONFIGS, "programs": {}, "parts": {}}
    bar = tqdm(total=len(parts), desc="aoti", unit="part", disable=not progress)
    queue = list(programs)
    while queue:
        program = queue.pop(0)
        first = program.members[0]
        t0 = time.perf_counter()
        program.exported = trace(first, dims_spec, dev, generator)
        program.key = program_key(program.exported, first, dims_spec, ident, dtype)
        # A program built elsewhere (another expert's, an earlier export's) computes this group only if the
        # values compiled into it are this group's: its baked digest must match, else it is compiled afresh.
        candidates = [(folder / shared[known[program.key]]["file"], shared[known[program.key]].get("baked"),
                       known[program.key])] if program.key in known else []
        candidates += [(path, baked, None) for path, baked in carried.get(program.key, [])]
        file, how = folder / FOLDER / f"{program.name}.pt2", "compiled"
        for path, baked, name in candidates:
            fqns = set(load_program(path, dev).get_constant_fqns())
            if baked is not None and baked == baked_digest(first.module, fqns):
                if name is not None:  # this export's other expert built it: its parts name that program
                    program.name, file = name, path
                elif path.resolve() != file.resolve():
                    shutil.copy2(path, file)
                how = "reused"
                break
        if how == "compiled":
            compile_program(program, first, file)
        program.baked = baked_digest(first.module, set(load_program(file, dev).get_constant_fqns()))
        seconds = time.perf_counter() - t0
        if program.name not in (shared or {}):
            section["programs"][program.name] = {"file": file.relative_to(folder).as_posix(), "key": program.key,
                                                 "baked": program.baked, "seconds": round(seconds, 2), "built": how}
        bar.write(f"  {prefix + program.name:<18} {how} in {seconds:5.1f} s, {len(program.members)} part(s)")
        exported_constants = {**program.exported.state_dict, **program.exported.constants}
        for k, part in enumerate(list(program.members)):
            bar.set_postfix_str(part.name)
            runner = load_program(file, dev)
            tensors = exported_constants if k == 0 else named_tensors(part.module)
            missing = [f for f in runner.get_constant_fqns() if f not in tensors]
            if missing or (k and baked_digest(part.module, set(runner.get_constant_fqns())) != program.baked):
                # not built alike after all (other constants, or other values compiled in): a program of its own
                program.members.remove(part)
                queue.append(Program(tag + part.name, program.structure + part.name, [part]))
                continue
            weights = {f: tensors[f].detach().to(dev).contiguous() for f in runner.get_constant_fqns()}
            runner.load_constants(weights, False, True, False, False)
            validation = validate(runner, part, dims_spec, dev, generator)
            worst = max(e for v in validation for e in v["max_rel_error"].values())
            if not worst <= tolerance:
                raise AotiError(f"{part.name}: the AOTInductor package differs from eager PyTorch by a relative "
                                f"{worst:.2e} (limit {tolerance:.0e}); per output: {validation}")
            weights_file = f"{FOLDER}/{prefix}{part.name}.safetensors"
            save_file({f: t.cpu().clone() for f, t in weights.items()}, str(folder / weights_file))
            section["parts"][part.name] = {"program": program.name, "weights": weights_file, "validation": validation}
            bar.write(f"  {part.name:<10} max rel err {worst:.2e}")
            bar.update(1)
    bar.close()
    section["parts"] = {p.name: section["parts"][p.name] for p in parts}  # in part order
    section["build_seconds"] = round(time.perf_counter() - t_start, 2)
    section["validation"] = {"tolerance": tolerance, "reference": f"torch eager {dtype} on {dev.type}"}
    return section


def build_components(folder: Path, components, device: str, programs: dict, previous: Path | None = None,
                     generator=None, progress: bool = True) -> dict:
    """Compile the family's text encoder / VAE decoder parts (``[(PartSpec, dims spec), ...]``, float32,
    each at its own dims) under ``folder/aoti/components``; their programs join ``programs``. Returns the
    manifest's ``aoti.components``: per component its program, weights, validation, dims and I/O."""
    out = {}
    for part, dims_spec in components:
        section = build(folder, [part], dims_spec, device, "float32", previous=previous, generator=generator,
                        progress=progress, prefix="components/", shared=programs)
        programs.update(section["programs"])
        out[part.name] = {**section["parts"][part.name], "dims": dims_spec,
                          "inputs": [s.to_dict() for s in part.inputs], "outputs": [s.to_dict() for s in part.outputs]}
    return out

"""Execution backends: run a named part with caller-owned input and output buffers.

Every backend implements the same small interface (``run(part, inputs, outputs)``) and
writes into the output tensors it is given; it never allocates results of its own. The
buffers are torch tensors on the runtime's device, so the ONNX Runtime backend binds
their memory directly (IOBinding) and the torch backend copies its result into them.
``torch`` is the reference: the model code's stem/layer/head modules (:mod:`dit`) over the
transformer weights the export wrote into the folder, run eagerly. A backend is handed what
it runs (Polygraphy's loader -> runner): :func:`make_backend` loads, the backend never reaches
outside the engines folder. Every backend checks at load that each engine's inputs and outputs
are the ones the manifest lists (names, ranks, dtypes), so a valid file in the wrong slot is
refused with a message instead of failing mid-generation.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import torch

from .errors import BackendError
from .manifest import Manifest

BACKENDS = ("onnxruntime", "torch", "aoti", "tensorrt")
log = logging.getLogger(__name__)
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def check_io(part, path, inputs: list[tuple[str, int, str]], outputs: list[tuple[str, int, str]]) -> None:
    """Refuse an engine whose (name, rank, dtype) inputs or outputs are not the manifest's for ``part``.

    The dtype checked is the exported one: reduced-precision engines take every tensor but the
    manifest's fixed-dtype ones (timesteps) in the manifest's dtype."""
    for kind, got, specs in (("inputs", inputs, part.inputs), ("outputs", outputs, part.outputs)):
        want = [(t.name, len(t.shape), t.dtype) for t in specs]
        if sorted(got) != sorted(want):
            raise BackendError(f"{path} is not the engine of {part.name}: its {kind} are {sorted(got)}, the manifest "
                               f"lists {sorted(want)} (a file in the wrong slot?); re-export the engines folder")


class Backend:
    name = "base"

    def __init__(self, manifest: Manifest, device: torch.device):
        self.manifest = manifest
        self.device = torch.device(device)
        self.calls: Counter[str] = Counter()  # part name -> engine calls (test oracle)
        self.loaded = 0  # engines / sessions loaded
        # Bytes a backend copied from tensors it allocated into the caller's buffers (torch modules and
        # AOTInductor packages return their own outputs); 0 for backends that write into bound buffers.
        self.bytes_copied = 0
        self._graphs: dict[tuple, object] = {}  # CUDA graphs keyed by part and bound buffers (_graph_key)
        self._graph_pool = None  # one memory pool shared by every captured graph
        self.output_names = {p.name: p.output_names for p in manifest.all_parts}  # result order of each part
        # Dtype of the I/O buffers: compiled engines take what their files were exported in.
        self.io_dtype = getattr(torch, manifest.dtype)

    def run(self, part: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        self.calls[part] += 1
        self._run(part, inputs, outputs)

    @contextlib.contextmanager
    def denoise_context(self):
        """Process-wide settings for the denoising loop (default: none)."""
        yield

    def forget_buffers(self) -> None:
        """Buffers the runtime bound may be freed: drop what was keyed on their addresses (CUDA graphs)."""
        self._graphs.clear()

    def _run(self, part, inputs, outputs):  # pragma: no cover - interface
        raise NotImplementedError

    def _replay_graph(self, part, inputs, outputs, call) -> None:
        """Run ``call(part, inputs, outputs)`` through a CUDA graph captured on its first call with these
        buffers. All graphs share one memory pool (parts run one after another on one stream)."""
        key = self._graph_key(part, inputs, outputs)
        graph = self._graphs.get(key)
        if graph is None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS handles, allocations)
                call(part, inputs, outputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                call(part, inputs, outputs)
            self._graph_pool = graph.pool()
            self._graphs[key] = graph
        graph.replay()

    def _copy_out(self, part, result, outputs) -> None:
        """Copy a part's own result tensors into the caller's buffers, counting the bytes."""
        for name, value in zip(self.output_names[part], result):
            outputs[name].copy_(value)
            self.bytes_copied += value.numel() * value.element_size()

    @staticmethod
    def _graph_key(part, inputs, outputs) -> tuple:
        """A captured CUDA graph is bound to its buffers' addresses and shapes. Buffers are
        preallocated and ping-pong between two sets, so each part sees only a few distinct
        combinations: one graph per combination."""
        return (part, *((t.data_ptr(), tuple(t.shape)) for t in (*inputs.values(), *outputs.values())))


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime with IOBinding: inputs and outputs are bound to the caller's buffers."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, device: torch.device, threads: int | None = None):
        super().__init__(manifest, device)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
        self._np_types = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}
        if self.io_dtype not in self._np_types:
            raise BackendError(f"the onnxruntime backend cannot run {manifest.dtype} engines (ONNX Runtime has no "
                               f"bf16 CPU kernels): use --backend torch, aoti or tensorrt, or export in "
                               f"float32/float16")
        available = ort.get_available_providers()
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu, or run on --device cpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0,
                                                    "user_compute_stream": str(torch.cuda.current_stream(self.device).cuda_stream)})]
            self._ort_device = ("cuda", self.device.index or 0)
        else:
            providers = ["CPUExecutionProvider"]
            self._ort_device = ("cpu", 0)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # Worker threads spin while a run dispatches its ~130 small ops (measured 1.25x faster
        # per layer than sleeping), but must stop when the run ends: left spinning, they
        # starve the torch ops between engine calls on the same cores (measured 10x slower).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.sessions = {}
        for part in manifest.all_parts:
            path = manifest.path(part.file)
            try:
                session = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as exc:  # noqa: BLE001
                raise BackendError(f"onnxruntime could not load {path}: {exc}; re-export the engines folder") from None
            check_io(part, path, [(i.name, len(i.shape), ORT_TYPES.get(i.type, i.type)) for i in session.get_inputs()],
                     [(o.name, len(o.shape), ORT_TYPES.get(o.type, o.type)) for o in session.get_outputs()])
            self.sessions[part.name] = session
            self.loaded += 1
        self.bindings = {name: s.io_binding() for name, s in self.sessions.items()}

    @contextlib.contextmanager
    def denoise_context(self):
        """On CPU the engines own the cores: the torch glue between engine calls (scheduler,
        guidance, mse) is a few tiny element-wise ops, which run faster on one thread than
        when torch's pool competes with ONNX Runtime's (measured: 10% of the loop)."""
        if self.device.type != "cpu":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _bind(self, bind, name, tensor: torch.Tensor):
        import numpy as np

        if not tensor.is_contiguous():
            raise BackendError(f"buffer for {name} is not contiguous")  # internal invariant, reported clearly
        bind(name, self._ort_device[0], self._ort_device[1], np.dtype(self._np_types[tensor.dtype]),
             list(tensor.shape), tensor.data_ptr())

    def _run(self, part, inputs, outputs):
        io = self.bindings[part]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, t in inputs.items():
            self._bind(io.bind_input, name, t)
        for name, t in outputs.items():
            self._bind(io.bind_output, name, t)
        if self.device.type == "cuda":
            io.synchronize_inputs()
        self.sessions[part].run_with_iobinding(io)


class TorchBackend(Backend):
    """Eager PyTorch on part modules it is handed (``modules``: part name -> module taking the
    part's inputs in manifest order): the reference every backend is compared with."""

    name = "torch"

    def __init__(self, manifest: Manifest, device: torch.device, modules: dict, dtype: torch.dtype | str | None = None,
                 cuda_graphs: bool = False):
        """``dtype``: compute and buffer dtype (default: the manifest's, the precision the engines were
        exported in). ``cuda_graphs``: capture each part once per set of bound buffers and replay it (CUDA only)."""
        super().__init__(manifest, device)
        if cuda_graphs and self.device.type != "cuda":
            raise BackendError("CUDA graphs need --device cuda")
        self.cuda_graphs = cuda_graphs
        dtype = manifest.dtype if dtype is None else dtype
        self.io_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        missing = sorted({p.name for p in manifest.all_parts} - modules.keys())
        if missing:
            raise BackendError(f"the torch backend was handed no module for part(s) {missing}")
        self.modules = {name: m.eval().to(self.device, self.io_dtype) for name, m in modules.items()}
        self.loaded = len(self.modules)

    def _run(self, part, inputs, outputs):
        if self.cuda_graphs:
            return self._replay_graph(part, inputs, outputs, self._eager)
        self._eager(part, inputs, outputs)

    @torch.no_grad()
    def _eager(self, part, inputs, outputs):
        result = self.modules[part](*inputs.values())
        self._copy_out(part, result if isinstance(result, tuple) else (result,), outputs)


class AOTInductorBackend(Backend):
    """AOTInductor packages (``foresight-export --backend aoti``): one instance of a compiled program
    per part, loaded with that part's weights; parts built alike share the program file.

    A package returns tensors it allocates (AOTInductor has no caller-provided outputs), so each
    result is copied into the runtime's buffer and counted in ``bytes_copied``: one copy of each
    output, the minimum with that interface. On CUDA, ``cuda_graphs`` captures run and copy together.
    """

    name = "aoti"

    def __init__(self, manifest: Manifest, device: torch.device, cuda_graphs: bool = False):
        super().__init__(manifest, device)
        from .aoti import check_compat, load_part

        section = manifest.aoti
        if not section:
            raise BackendError(f"{manifest.root} has no AOTInductor packages: build them with `foresight-export "
                               f"--backend aoti --device {self.device.type} --out {manifest.root} --overwrite`")
        if cuda_graphs and self.device.type != "cuda":
            raise BackendError("CUDA graphs need --device cuda")
        check_compat(section, self.device, manifest.root)
        self.cuda_graphs = cuda_graphs
        self.runners = {}
        for part in manifest.all_parts:
            def io_check(path, io, part=part):
                check_io(part, path, [tuple(x) for x in io["inputs"]], [tuple(x) for x in io["outputs"]])

            runner = load_part(manifest, section["parts"][part.name], self.device, io_check)
            self.runners[part.name] = runner
            self.loaded += 1

    def _run(self, part, inputs, outputs):
        if self.cuda_graphs:
            return self._replay_graph(part, inputs, outputs, self._call)
        self._call(part, inputs, outputs)

    def _call(self, part, inputs, outputs):
        self._copy_out(part, self.runners[part].run(list(inputs.values())), outputs)


class TensorRTBackend(Backend):
    """TensorRT engines on CUDA, one execution context per part, all contexts sharing one
    scratch buffer (parts run one after another); torch CUDA tensors are the I/O buffers.

    Written to the TensorRT 10.12+/11 Python API (``execute_async_v3`` with tensor addresses);
    every call below is listed in ``TRT_API`` so a test can check the names exist wherever
    tensorrt is importable.
    """

    name = "tensorrt"
    TRT_API = ("Logger", "Runtime", "ExecutionContextAllocationStrategy", "TensorIOMode",
               "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_mode",
               "ICudaEngine.get_tensor_shape", "ICudaEngine.get_tensor_dtype",
               "ICudaEngine.device_memory_size_v2", "ICudaEngine.create_execution_context",
               "IExecutionContext.set_device_memory", "IExecutionContext.set_input_shape",
               "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3")

    def __init__(self, manifest: Manifest, device: torch.device, cuda_graphs: bool = False):
        """``cuda_graphs``: after a part's first call with a set of buffers, capture its
        ``execute_async_v3`` into a CUDA graph and replay that for later calls with the same
        buffers (a failed capture falls back to plain enqueues for that part)."""
        super().__init__(manifest, device)
        from .trt import check_runtime_compat, device_identity, require_tensorrt

        trt = require_tensorrt()
        if self.device.type != "cuda":
            raise BackendError("the tensorrt backend runs on CUDA only: pass --device cuda")
        section = manifest.tensorrt
        check_runtime_compat(section, trt.__version__, device_identity(), manifest.root)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engines, self.contexts = {}, {}
        for part in manifest.all_parts:
            entry = section["engines"].get(part.name)
            path = manifest.path(entry["file"]) if entry else None
            if path is None or not path.is_file():
                raise BackendError(f"no TensorRT engine for {part.name}: re-export with --backend tensorrt")
            if entry.get("onnx_sha256") != manifest.files[part.file].sha256:  # a re-export carried it over
                raise BackendError(f"the TensorRT engine of {part.name} was built from another {part.file}: rebuild "
                                   f"with `foresight-export --backend tensorrt --out {manifest.root} --overwrite`")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"TensorRT could not load {path}: re-export with --backend tensorrt")
            ios = [engine.get_tensor_name(k) for k in range(engine.num_io_tensors)]
            mode = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in ios}
            sig = {n: (n, len(engine.get_tensor_shape(n)), TRT_TYPES.get(str(engine.get_tensor_dtype(n)), "?"))
                   for n in ios}
            check_io(part, path, [sig[n] for n in ios if mode[n]], [sig[n] for n in ios if not mode[n]])
            self.engines[part.name] = engine
            self.loaded += 1
        # One scratch allocation for all contexts, sized to the largest requirement.
        size = max(int(e.device_memory_size_v2) for e in self.engines.values())
        self.scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        for name, engine in self.engines.items():
            ctx = engine.create_execution_context(strategy)
            ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            self.contexts[name] = ctx
        # A non-default stream: TensorRT syncs extra on the legacy default stream.
        self.stream = torch.cuda.Stream(device=self.device)
        self.cuda_graphs = cuda_graphs  # self._graphs: key -> CUDAGraph, or False where capture failed

    @contextlib.contextmanager
    def denoise_context(self):
        """All torch glue of the loop runs on the engines' stream, so no cross-stream syncs are needed."""
        outer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(outer)  # inputs staged before the loop
        with torch.cuda.stream(self.stream):
            yield
        outer.wait_stream(self.stream)  # decoding after the loop sees the final latents

    def _run(self, part, inputs, outputs):
        if not self.cuda_graphs:
            return self._enqueue(part, inputs, outputs)
        key = self._graph_key(part, inputs, outputs)
        graph = self._graphs.get(key)
        if graph is None:
            self._enqueue(part, inputs, outputs)  # enqueue once before capture: this call's work
            self._graphs[key] = self._capture(part, inputs, outputs)
        elif graph is False:
            self._enqueue(part, inputs, outputs)
        else:
            graph.replay()  # on the current stream: the engines' stream inside denoise_context

    def _capture(self, part, inputs, outputs):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):  # captured on the engines' (side) stream
                self._enqueue(part, inputs, outputs)
        except (RuntimeError, BackendError) as exc:
            log.warning("CUDA graph capture of %s failed (%s); it runs without a graph", part, exc)
            return False
        return graph

    def _enqueue(self, part, inputs, outputs):
        ctx = self.contexts[part]
        for name, t in inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise BackendError(f"TensorRT failed to enqueue {part}; check the shapes against the engine's profile")


TRT_TYPES = {"DataType.FLOAT": "float32", "DataType.HALF": "float16", "DataType.BF16": "bfloat16",
             "DataType.INT64": "int64", "DataType.INT32": "int32", "DataType.BOOL": "bool"}


def load_reference_modules(manifest: Manifest) -> dict:
    """The torch reference backend's modules: the model code of the manifest's family over the
    transformer weights the export wrote into the folder (hashed like every other file)."""
    if "transformer" not in manifest.components:
        raise BackendError(f"{manifest.root} has no transformer weights, which the torch backend runs: re-export it "
                           f"with this version of foresight-export, or use --backend onnxruntime")
    from dit import model_code

    code = model_code(manifest.family)
    folder = manifest.component("transformer")
    try:
        model = code.load_transformer(folder)
    except Exception as exc:  # noqa: BLE001 - a loader failure becomes one actionable message
        raise BackendError(f"could not load the transformer weights in {folder} ({exc}); re-export the engines "
                           f"folder") from None
    return code.part_modules(model, manifest.pipeline)


def make_backend(name: str, manifest: Manifest, device, **kwargs) -> Backend:
    """Load and start backend ``name``. The torch backend's modules come from the folder unless
    ``modules`` is given (an in-memory model, e.g. tools/gpu_check.py)."""
    if name == "onnxruntime":
        return OnnxRuntimeBackend(manifest, device, **kwargs)
    if name == "torch":
        modules = kwargs.pop("modules", None) or load_reference_modules(manifest)
        return TorchBackend(manifest, device, modules, **kwargs)
    if name == "tensorrt":
        return TensorRTBackend(manifest, device, **kwargs)
    if name == "aoti":
        return AOTInductorBackend(manifest, device, **kwargs)
    raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")

#!/usr/bin/env bash
# Every GPU check in one run, for the lent GPU machine (H100/H200 with PyTorch + CUDA + Triton; no TensorRT,
# no onnxruntime-gpu). About 10 minutes. Results under $OUT (default /tmp/gpu-checks):
#   env.txt              GPU and library versions
#   latte-tiny-20.json   foresight-run --stats of the trained Latte preset at 20 steps: the decision pattern replayed below
#   gpu_check.*          tools/gpu_check.py: Latte-1-sized model, bf16, 16x256x256: diffusers eager, diffusers +
#                        torch.compile, runtime torch / torch+graphs / aoti / aoti+graphs with none, foresight and the
#                        replayed pattern; per-part ms, ms/step, peak memory, compile seconds
#   pytest.txt           CUDA conformance (torch fp32/bf16/fp16), runtime on CUDA vs CPU, CUDA graphs, syncs per step,
#                        AOTInductor packages compiled for CUDA vs torch on CUDA (with and without CUDA graphs)
#   demo.gif, reuse.png, stats.json   foresight-run of the shipped preset on the GPU (aoti backend, CUDA graphs)
#   wan-a14b.gif, wan-a14b-stats.json the two-expert Wan 2.2 layout on CUDA packages (stages, experts per step)
#   serve-load-cuda.json foresight-serve on CUDA (aoti): 40 requests, none lost, every video equal to one process's
#   cpp-cuda.txt         the C++ runtime on CUDA: foresight-run-cpp's frames and decisions vs foresight-run's
#   tensorrt.txt         what a machine with TensorRT must run (run here when tensorrt is importable)
# Packages missing there (diffusers) travel as wheels in .whl/ (see the device notes in the README).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi -L
  python3 -c "import torch, diffusers, transformers, onnxruntime as ort; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'onnxruntime', ort.__version__, \
ort.get_available_providers())"
  python3 -c "import triton; print('triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
export_cli() { python3 -c "import sys; from exporter.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
run_cli() { python3 -c "import sys; from runtime.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
PROMPT="a red square moving left on a black background"
ENG=/tmp/gpu-engines; mkdir -p "$ENG"

echo "== 1. the trained Latte preset's Foresight decisions at 20 steps (replayed at Latte-1 size)"
timeout 120 export_cli --model latte --preset tiny --out "$ENG/latte-tiny" --overwrite 2>&1 | tail -2
timeout 60 run_cli --engines "$ENG/latte-tiny" --backend torch --device cuda --steps 20 --prompt "$PROMPT" \
    --out "$OUT/latte-tiny-20.gif" --stats "$OUT/latte-tiny-20.json" --quiet 2>&1 | tail -3

echo "== 2. tools/gpu_check.py (Latte-1 size, bf16)"
REPLAY=(); [ -f "$OUT/latte-tiny-20.json" ] && REPLAY=(--replay "$OUT/latte-tiny-20.json")
timeout 420 python3 -m tools.gpu_check --out "$OUT" --steps 20 --backends torch,aoti "${REPLAY[@]}" 2>&1 \
    | grep -v "Warning\|warn(" | tee "$OUT/gpu_check.log"

echo "== 3. GPU tests"
# -o addopts="": one process (the GPU machine may lack pytest-xdist, which the suite's addopts use)
timeout 240 python3 -m pytest -q -rs -o addopts="" -p no:cacheprovider tests/runtime/test_backends.py tests/runtime/test_cuda.py \
    tests/runtime/test_aoti.py -k "cuda and not refused_on_cpu" 2>&1 | tee "$OUT/pytest.txt"

echo "== 4. foresight-run with AOTInductor packages for CUDA"
timeout 150 export_cli --model latte --preset tiny --out "$ENG/latte-tiny-aoti" --backend aoti --device cuda \
    --overwrite 2>&1 | grep -v "it/s" | tail -12
timeout 60 run_cli --engines "$ENG/latte-tiny-aoti" --backend aoti --device cuda --cuda-graphs --prompt "$PROMPT" \
    --out "$OUT/demo.gif" --heatmap "$OUT/reuse.png" --stats "$OUT/stats.json" 2>&1 | tail -5

echo "== 4b. Wan 2.2 A14B (two experts, shared programs) with AOTInductor packages for CUDA"
timeout 150 export_cli --model wan --preset tiny-random-a14b --out "$ENG/wan-a14b-aoti" --backend aoti --device cuda \
    --overwrite 2>&1 | grep -v "it/s" | grep "compiled\|reused\|wrote\|error" | tail -8
timeout 60 run_cli --engines "$ENG/wan-a14b-aoti" --backend aoti --device cuda --steps 10 --prompt "$PROMPT" \
    --out "$OUT/wan-a14b.gif" --stats "$OUT/wan-a14b-stats.json" --quiet 2>&1 | tail -3
ls -la "$OUT"

echo "== 4c. foresight-serve on CUDA: 40 requests from 8 clients, every video equal to one process's"
if python3 -c "import fastapi, uvicorn, prometheus_client, requests" 2>/dev/null; then
    timeout 240 python3 -m tools.serve_load --engines "$ENG/latte-tiny-aoti" --backend aoti --device cuda \
        --requests 40 --clients 8 --json "$OUT/serve-load-cuda.json" 2>&1 | tail -20
else
    echo "(fastapi/uvicorn/prometheus-client/requests not importable here: carry their wheels in .whl/)"
fi

echo "== 4d. the C++ runtime on CUDA: foresight-run-cpp vs foresight-run --compiled-components, same CUDA packages"
NLOHMANN=$(python3 -c "import nlohmann_json; print(nlohmann_json.get_include())" 2>/dev/null)
if command -v cmake >/dev/null && [ -n "$NLOHMANN" ]; then
    { GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
      timeout 300 cmake -S cpp -B /tmp/cpp-build "${GEN[@]}" -DNLOHMANN_JSON_INCLUDE_DIR="$NLOHMANN" \
          -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')" | grep foresight
      timeout 300 cmake --build /tmp/cpp-build -j 16 2>&1 | tail -2
      common=(--engines "$ENG/latte-tiny-aoti" --prompt "$PROMPT" --steps 20 --seed 3 --device cuda)
      timeout 60 /tmp/cpp-build/foresight-run-cpp "${common[@]}" --out "$OUT/cpp-cuda.npy" --stats "$OUT/cpp-cuda.json"
      timeout 60 run_cli "${common[@]}" --backend aoti --compiled-components --quiet --out "$OUT/py-cuda.gif" \
          --save-frames "$OUT/py-cuda.npy" --stats "$OUT/py-cuda.json"
      python3 - "$OUT" <<'PY'
import json, sys, numpy as np
out = sys.argv[1]
a, b = np.load(f"{out}/cpp-cuda.npy").astype(int), np.load(f"{out}/py-cuda.npy").astype(int)
sa, sb = (json.load(open(f"{out}/{n}-cuda.json")) for n in ("cpp", "py"))
print("frames equal:", np.array_equal(a, b), "max diff:", int(np.abs(a - b).max()), "traces equal:",
      sa["trace"] == sb["trace"], "C++ s:", sa.get("total_seconds"), "Python s:", sb.get("total_seconds"))
PY
    } 2>&1 | tee "$OUT/cpp-cuda.txt"
else
    echo "(cmake or nlohmann-json missing here: carry the nlohmann-json wheel in .whl/)" | tee "$OUT/cpp-cuda.txt"
fi

echo "== 5. TensorRT"
{ echo "A machine with tensorrt (pip install 'foresight-dit[tensorrt]') and a GPU must run:"
  echo "  foresight-export --model latte --preset tiny --out E --backend tensorrt --validate          (fp32 engines vs ORT)"
  echo "  foresight-export --model latte --preset tiny --out E16 --dtype float16 --backend tensorrt --validate"
  echo "  python -m pytest -q -o addopts= tests/exporter/test_tensorrt_build.py tests/runtime/test_backends.py -k tensorrt"
  echo "  foresight-run --engines E16 --backend tensorrt --device cuda [--cuda-graphs] --prompt P --out o.mp4 --stats s.json"
  echo "  python -m tools.benchmark --engines E16 --backends tensorrt,torch --device cuda --policies none,foresight"
  echo "  cmake -S cpp -B build/cpp-trt -G Ninja -DTENSORRT_ROOT=<TensorRT folder> <the README's -D flags>  (says: TensorRT engines run)"
  echo "  build/cpp-trt/foresight-run-cpp --engines E --backend tensorrt --device cuda --prompt P --steps 8 --out c.npy --stats c.json"
  echo "    == foresight-run --engines E --backend tensorrt --device cuda --prompt P --steps 8 --save-frames p.npy --stats p.json"
  echo "    (decisions equal; frames within the TensorRT tolerance of the Python backend's: same engines, same glue)"
  echo "and compare: decisions equal to the torch backend's, latents within 1e-3 (fp32) / 1e-2 (fp16)."
  if python3 -c "import tensorrt" 2>/dev/null; then
      timeout 120 export_cli --model latte --preset tiny --out "$ENG/latte-trt" --dtype float16 --backend tensorrt \
          --validate --overwrite 2>&1 | tail -15
  else
      echo "(tensorrt is not importable here: not run)"
  fi; } 2>&1 | tee "$OUT/tensorrt.txt"

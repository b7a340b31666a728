#!/usr/bin/env bash
# Every GPU check in one run, for the lent GPU machine (H100/H200 with PyTorch + CUDA; no TensorRT,
# no onnxruntime-gpu). Results under $OUT (default /tmp/gpu-checks):
#   env.txt         GPU and library versions
#   gpu_check.*     tools/gpu_check.py: Latte-1-sized model, bf16, runtime vs diffusers eager (< 8 min)
#   pytest.txt      CUDA conformance (torch fp32/bf16/fp16), runtime on CUDA vs CPU, CUDA graphs, syncs per step,
#                   CogVideoX and Open-Sora presets on CUDA vs their reference pipelines
#   demo.gif, reuse.png, stats.json   foresight-run of the shipped preset on the GPU (torch backend, bf16)
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
ort.get_available_providers())"; } 2>&1 | tee "$OUT/env.txt"

echo "== 1. tools/gpu_check.py"
timeout 300 python3 -m tools.gpu_check --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"

echo "== 2. GPU tests"
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_backends.py tests/runtime/test_cuda.py \
    2>&1 | tee "$OUT/pytest.txt"

echo "== 3. foresight-run on the GPU"
ENG=/tmp/gpu-engines/latte-tiny; mkdir -p /tmp/gpu-engines
timeout 90 python3 -c "import sys; from exporter.cli import main; sys.exit(main(sys.argv[1:]))" \
    --model latte --preset tiny --out "$ENG" --overwrite 2>&1 | tail -3
timeout 60 python3 -c "import sys; from runtime.cli import main; sys.exit(main(sys.argv[1:]))" \
    --engines "$ENG" --backend torch --device cuda --dtype bfloat16 --prompt "a red square moving left on a black background" \
    --out "$OUT/demo.gif" --heatmap "$OUT/reuse.png" --stats "$OUT/stats.json" 2>&1 | tail -5
ls -la "$OUT"

echo "== 4. diffusers caches vs the runtime at Latte-1 size (random weights, torch backend)"
timeout 240 python3 -m tools.compare --size latte --device cuda --backends torch --steps 20 --prompts 2 --repeats 3 \
    --json "$OUT/compare.json" --plot "$OUT/compare.png" 2>&1 | tail -30

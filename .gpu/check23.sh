#!/usr/bin/env bash
# Issue 23 verification on one GPU: the CUDA suite, then the bench's floor ratio.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
start=$(date +%s)
timeout "${TEST_BUDGET:-400}" python3 -m pytest -m cuda --require-device cuda -p no:cacheprovider -q -rfE --durations=25 ${TESTS:-} > "$OUT/cuda_tests.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
tail -n 45 "$OUT/cuda_tests.log"
if [ -n "${BENCH:-1}" ]; then
  start=$(date +%s)
  timeout 150 graphhal bench --device cuda:0 --batch-sizes 1,64 --modes "floor,full,full (first-replay check)" --no-prefill --no-capture-cost --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? in $(( $(date +%s) - start )) s"
  tail -n 25 "$OUT/bench.log"
fi

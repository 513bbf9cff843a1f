#!/usr/bin/env bash
# The npu device on real Ascend hardware (Atlas A2/A3, torch_npu installed, CANN's set_env.sh sourced): the
# stack's preflight, the npu tests on the device, the bench and the demo on npu:0. Paste the whole output
# (npu_smoke.log) into an issue: nothing here has been run on hardware by graphhal's authors, only on the
# CPU simulator of torch_npu (docs/ascend-npu.md).
#
#   bash scripts/npu_smoke.sh            # writes npu_smoke.log next to where it is run
#
# Each step runs even when one before it failed; the script exits non-zero if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${NPU_SMOKE_LOG:-npu_smoke.log}
exec > >(tee "$log") 2>&1

status=0
step() {
    echo
    echo "+ $*"
    "$@" || { echo "FAILED ($?): $*"; status=1; }
}

echo "graphhal npu smoke, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm)"
step git log -1 --format='graphhal %H %s'
step python3 -c 'import torch, torch_npu; print("torch", torch.__version__, "torch_npu", torch_npu.__version__)'
step npu-smi info
echo "TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE-unset} HCCL_OP_EXPANSION_MODE=${HCCL_OP_EXPANSION_MODE-unset}"
step python3 -m graphhal.cli.main info                                   # the preflight's checks, under npu
step python3 -m pytest -m npu --require-device npu -q -p no:cacheprovider
step python3 -m graphhal.cli.main demo --device npu:0 --model small
step python3 -m graphhal.cli.main demo --device npu:0                     # the default model: head dim 64
step python3 -m graphhal.cli.main bench --device npu:0 --model small --batch-sizes 1,8,64 --capture-max-bs 64
step python3 -m graphhal.cli.main bench --device npu:0 --batch-sizes 1,8,64 --capture-max-bs 64 --no-prefill
echo
echo "npu smoke: $([ "$status" = 0 ] && echo 'every step passed' || echo 'a step FAILED (see above)'); log: $log"
exit "$status"

#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU: 300 s in all on one H100 (each part under `timeout`, cut to the
# time left), one verdict line per claim (PASS, FAIL or SKIP with its reason), then the overall verdict:
#   dispatch       which dispatch moe_impl="auto" chose on this GPU; grouped GEMM against the loop in bf16
#   no_sync        a compiled training step, and a step skipped for NaN gradients, under
#                  torch.cuda.set_sync_debug_mode("error") on 9.x/10.x GPUs (elsewhere the loop syncs: skipped)
#   resume_sample  train.py on the GPU, resumed, then sample.py from its checkpoint
#   bench          bench.py --quick in bf16, eager, and its ratios to the dense model
# Without a GPU every part says SKIP (a dry run). The longer tests marked `cuda` (compiled training at
# moe_e4k2's shapes, nccl with two GPUs) are separate: python -m pytest -m cuda tests/test_cuda.py
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${GPU_CHECK_SECONDS:-300}
failed=0
python -c "import torch; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; print(
    f'{p.name}, compute capability {p.major}.{p.minor}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}'
    if p else f'no CUDA GPU (torch {torch.__version__}): a dry run, the CUDA parts skipped')"

part() {  # name, the part's own limit in seconds
    local limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "FAIL $1: not run, the ${BUDGET} s budget is spent"
        failed=1
        return
    fi
    timeout -k 5 "$limit" python tests/gpu_check.py "$1"
    rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "FAIL $1: stopped at its time limit, ${limit} s"
    fi
    ((rc != 0)) && failed=1
    echo "     $1 took $((SECONDS - start)) s"
}

part dispatch 40
part no_sync 100
part resume_sample 70
part bench 120
echo "GPU check $( ((failed)) && echo FAILED || echo passed) in ${SECONDS} s (budget ${BUDGET} s)"
exit $failed

#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (designed to take under 5 minutes on one):
# the tests marked `cuda` (compiled bf16 dispatch against the loop, a compiled training run at
# moe_e4k2's shapes, fused AdamW, and two processes with nccl where two GPUs are visible), then the
# benchmark at moe_e4k2's shapes, compiled in bf16, with its MFU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible: the GPU check needs one')"
python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, compute capability {p.major}.{p.minor}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}')"
SECONDS=0
python -m pytest -q -rs -m cuda tests/test_cuda.py
echo "tests: ${SECONDS}s"
SECONDS=0
python bench.py --compile=true --dtype=bfloat16
echo "bench: ${SECONDS}s"

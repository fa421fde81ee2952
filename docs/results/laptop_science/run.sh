#!/usr/bin/env bash
# The laptop-science study (protocol: README.md beside this file). Run from the repository root of a
# checkout at the commit the protocol names:  bash docs/results/laptop_science/run.sh
# Two lanes run at once, one training process each, one thread per process. Rerunning the script
# skips finished runs and resumes interrupted ones (experiment.py does that).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
TEXT=${TEXT:-../shared/data/shakespeare.txt}
COMMON="config/cpu_moe.py --max_iters=600 --eval_interval=100 --jobs=1"

# --- data -----------------------------------------------------------------------------------------
# S1: the plays with a 2048-token BPE (as in shakespeare_trio), and the same data with the training
# split cut to its first 1/8 (same tokenizer, same validation split): 8x the repetition.
[ -f data/shakespeare/meta.json ] || python prepare.py --input "$TEXT" --name shakespeare --vocab_size 2048
if [ ! -f data/shakespeare_r8/meta.json ]; then
  mkdir -p data/shakespeare_r8
  cp data/shakespeare/{meta.json,tokenizer.json,val.bin} data/shakespeare_r8/
  python - <<'PY'
import numpy as np
train = np.fromfile("data/shakespeare/train.bin", dtype=np.uint16)
train[: len(train) // 8].tofile("data/shakespeare_r8/train.bin")
PY
fi
# S2: the same text at byte level (a 257-token vocabulary: 256 bytes + end-of-text, no merges)
[ -f data/shakespeare_bytes/meta.json ] || python prepare.py --input "$TEXT" --name shakespeare_bytes --vocab_size 257

# --- lane A: S1 (fresh data, then repeated data) -----------------------------------------------------
laneA() {
  python experiment.py $COMMON --seeds=3 --dataset=shakespeare --name=ls_s1_fresh
  python experiment.py $COMMON --seeds=3 --dataset=shakespeare_r8 --name=ls_s1_repeat8
}
# --- lane B: S2, then S3 in the regime the protocol's rule picks --------------------------------------
laneB() {
  python experiment.py $COMMON --seeds=3 --dataset=shakespeare_bytes --name=ls_s2_bytes
  # wait until S1-fresh is finished, then apply the rule: the regime with the larger mean active gap
  until [ -f out/ls_s1_fresh/report.md ]; do sleep 30; done
  REGIME=$(python docs/results/laptop_science/pick_regime.py out/ls_s1_fresh out/ls_s2_bytes)
  echo "S3 regime: $REGIME"
  S3="$COMMON --seeds=2 --dataset=$REGIME --match=none"
  python experiment.py $S3 --sweep="n_experts=8,16" --name=ls_s3_${REGIME}_e8-16k2
  python experiment.py $S3 --sweep="n_experts=16;top_k=4" --name=ls_s3_${REGIME}_e16k4
  python experiment.py $S3 --sweep="n_experts=32;top_k=8" --name=ls_s3_${REGIME}_e32k8
}
laneA > out_laneA.log 2>&1 &
A=$!
laneB > out_laneB.log 2>&1 &
B=$!
wait $A; wait $B

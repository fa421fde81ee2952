#!/usr/bin/env bash
# The runs behind README.md beside this file, one at a time, one thread each. Run from the repository root
# after `python prepare.py --corpus=shakespeare --vocab_size=2048`:  bash docs/results/cpu_moe_reference/run.sh
# Each run's log goes to out/cpu_moe_ref/<run>/metrics.jsonl; a finished run (its log has step 600) is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
run() {  # run NAME ARGS...: python train.py config/cpu_moe.py ARGS --out_dir=out/cpu_moe_ref/NAME
    local name=$1; shift
    local dir=out/cpu_moe_ref/$name
    if grep -qs '"iter": 600, "tokens": [0-9]*, "val_loss"' "$dir/metrics.jsonl"; then echo "$name: done"; return; fi
    echo "$name: python train.py config/cpu_moe.py $* --out_dir=$dir"
    mkdir -p "$dir"
    python train.py config/cpu_moe.py "$@" --out_dir="$dir" --overwrite=True > "$dir/train.log" 2>&1
}
for seed in 1337 1338 1339; do run "moe-fp32-s$seed" --dtype=float32 --seed=$seed; done
run moe-auto-s1337 --seed=1337
for seed in 1337 1338 1339; do run "dense-active-fp32-s$seed" --dtype=float32 --seed=$seed --match=active; done

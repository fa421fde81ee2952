#!/usr/bin/env bash
# The length study (protocol: README.md beside this file). Run from the repository root of a checkout at
# the commit the protocol names:  bash docs/results/laptop_length/run.sh
# Two runs at a time, one thread each (experiment.py --jobs=2 gives each cpu_count / 2 threads: the protocol
# pins that to 1, so it needs a 2-core machine). Rerunning the script skips finished runs and resumes
# interrupted ones (experiment.py does that).
set -euo pipefail
cd "$(dirname "$0")/../../.."
[ "$(python -c 'import os; print(os.cpu_count())')" = 2 ] || { echo "the protocol pins one thread for each of two runs: use a 2-core machine" >&2; exit 1; }
TEXT=${TEXT:-../shared/data/shakespeare.txt}  # the 5 MB of plays
[ -f data/shakespeare_bytes/meta.json ] || python prepare.py --input="$TEXT" --name=shakespeare_bytes --vocab_size=257
COMMON="config/cpu_moe.py --dataset=shakespeare_bytes --dtype=float32 --compile=false --eval_interval=100 --jobs=2"
python experiment.py $COMMON --max_iters=600 --seeds=5 --match=active --name=len_600
python experiment.py $COMMON --max_iters=2000 --seeds=5 --match=active --name=len_2000
# dense-total beside the first 3 seeds (their MoE and dense-active runs are finished by now, so only it runs)
python experiment.py $COMMON --max_iters=2000 --seeds=3 --match=both --name=len_2000

"""S3's regime rule (fixed in the protocol before any run): of S1-fresh and S2-bytes, the dataset
whose mean paired gap dense-active - moe in best validation loss is larger. Prints the dataset name."""
import glob
import json
import os
import statistics
import sys


def best(run_dir):
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return min(r["val_loss"] for r in records if "val_loss" in r)


def mean_active_gap(exp_dir):
    gaps = []
    for moe in sorted(glob.glob(os.path.join(exp_dir, "moe-s*"))):
        seed = moe.rsplit("-s", 1)[1]
        gaps.append(best(os.path.join(exp_dir, f"dense-active-s{seed}")) - best(moe))
    return statistics.mean(gaps)


def dataset(exp_dir):
    records = [json.loads(line) for line in open(os.path.join(exp_dir, "moe-s1337", "metrics.jsonl"))]
    return next(r for r in records if r.get("event") == "start")["config"]["dataset"]


if __name__ == "__main__":
    gaps = {exp: mean_active_gap(exp) for exp in sys.argv[1:]}
    for exp, gap in gaps.items():
        print(f"{exp}: mean dense-active - moe = {gap:+.4f}", file=sys.stderr)
    print(dataset(max(gaps, key=gaps.get)))

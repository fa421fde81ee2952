"""The laptop-science study's summary: reads the runs' metrics.jsonl files under OUT (the study's
out/ folder) and writes report.md, gaps.png and experts.png into this folder. The tests of each
hypothesis are the ones the protocol (README.md) fixed before the runs.

    python docs/results/laptop_science/analyze.py ../tinymoe-study/out
"""

import json
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONDITIONS = [  # (label, experiment folder, what it is)
    ("S1-fresh", "ls_s1_fresh", "2048-token BPE, the whole training split"),
    ("S1-repeat8", "ls_s1_repeat8", "2048-token BPE, the first 1/8 of the training split"),
    ("S2-bytes", "ls_s2_bytes", "bytes (257 tokens), the whole training split"),
]
SEEDS = (1337, 1338, 1339)
TRIO = ("moe", "dense-active", "dense-total")


def read_run(run_dir):
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    start = next(r for r in records if r.get("event") == "start")
    evals = [r for r in records if "val_loss" in r]
    train = [r for r in records if "ce" in r and "val_loss" not in r]
    last = [r["ce"] for r in train if r["iter"] > start["config"]["max_iters"] - 100]  # the last 100 steps
    return {"start": start, "best": min(r["val_loss"] for r in evals),
            "curve": [(r["iter"], r["val_loss"]) for r in evals],
            "train_ce": statistics.mean(last), "routing": evals[-1]["routing"],
            "minutes": (evals[-1]["time"] - start["time"]) / 60, "code": start["code"]}


def mean_se(values):
    """(mean, standard error) over seeds."""
    m = statistics.mean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def verdict(values):
    """The protocol's rule: positive if the mean is more than two standard errors above zero, negative
    if more than two below, else a tie."""
    m, se = mean_se(values)
    return "positive" if m > 2 * se else "negative" if m < -2 * se else "a tie"


def fmt(values, digits=4):
    m, se = mean_se(values)
    return f"{m:+.{digits}f} +/- {se:.{digits}f}"


def tokens_in(data_dir, split, dtype_bytes=2):
    return os.path.getsize(os.path.join(data_dir, f"{split}.bin")) // dtype_bytes


def main(out):
    runs = {}
    for label, folder, _ in CONDITIONS:
        for model in TRIO:
            for seed in SEEDS:
                runs[(label, model, seed)] = read_run(os.path.join(out, folder, f"{model}-s{seed}"))
    s3_folder = next(f for f in sorted(os.listdir(out)) if f.startswith("ls_s3_") and f.endswith("_e8-16k2"))
    s3_dataset = s3_folder[len("ls_s3_"):-len("_e8-16k2")]
    s3_label = next(label for label, folder, _ in CONDITIONS
                    if runs[(label, "moe", SEEDS[0])]["start"]["config"]["dataset"] == s3_dataset)
    s3 = {}
    for name, folder, sub in [("E8k2", "e8-16k2", "moe-n_experts=8"), ("E16k2", "e8-16k2", "moe-n_experts=16"),
                              ("E16k4", "e16k4", "moe-n_experts=16-top_k=4"),
                              ("E32k8", "e32k8", "moe-n_experts=32-top_k=8")]:
        for seed in SEEDS[:2]:
            s3[(name, seed)] = read_run(os.path.join(out, f"ls_s3_{s3_dataset}_{folder}", f"{sub}-s{seed}"))
    for seed in SEEDS[:2]:
        s3[("E4k2", seed)] = runs[(s3_label, "moe", seed)]
        s3[("dense-active", seed)] = runs[(s3_label, "dense-active", seed)]

    data_root = os.path.join(os.path.dirname(os.path.abspath(out)), "data")
    lines = ["# Laptop science: results", "",
             "Protocol, hypotheses and decision rules: [README.md](README.md) (committed before the runs). "
             "This file is written by `analyze.py` from the runs' own metrics.jsonl files.", ""]
    codes = sorted({r["code"] for r in [*runs.values(), *s3.values()]})
    minutes = sum(r["minutes"] for r in [*runs.values(), *s3.values()])
    lines += [f"Code: {', '.join(codes)}. {len(runs) + len(s3) - 4} training runs of 600 steps, "
              f"{minutes:.0f} minutes of training summed over runs (two at a time, one thread each, on a "
              "2-core x86_64 CPU that other work shared: wall times are not comparable between runs).", ""]

    # --- the trio in each condition ---
    lines += ["## The trio in each condition", "",
              "Best validation loss, mean +/- standard error over 3 seeds (1337-1339); train CE is the mean "
              "training-batch cross-entropy over the last 100 steps; passes = training tokens seen / "
              "training tokens available; tokens per parameter on the MoE's active count.", "",
              "| condition | model | total params | active params | best val loss | train CE (last 100) | "
              "val - train | passes | tokens / active param |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, _, what in CONDITIONS:
        cfg = runs[(label, "moe", SEEDS[0])]["start"]["config"]
        seen = cfg["max_iters"] * cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
        available = tokens_in(os.path.join(data_root, cfg["dataset"]), "train")
        for model in TRIO:
            rs = [runs[(label, model, s)] for s in SEEDS]
            p = rs[0]["start"]["params"]
            best = [r["best"] for r in rs]
            ce = [r["train_ce"] for r in rs]
            lines.append(f"| {label} ({what}) | {model} | {p['total']:,} | {round(p['active']):,} | "
                         f"{fmt(best)[1:]} | {statistics.mean(ce):.4f} | "
                         f"{statistics.mean(b - c for b, c in zip(best, ce)):+.4f} | {seen / available:.2f} | "
                         f"{seen / p['active']:.2f} |")
    lines += [""]

    # --- gaps ---
    def gap(label, a, b):
        return [runs[(label, a, s)]["best"] - runs[(label, b, s)]["best"] for s in SEEDS]

    lines += ["## Gaps, paired by seed", "",
              "Positive: the first model is worse. Mean +/- standard error over 3 seeds, the protocol's verdict "
              "(more than two standard errors from zero), and the gap as a fraction of dense-active's loss.", "",
              "| condition | dense-active - moe | verdict | relative | moe - dense-total | verdict | per seed "
              "(active gap) |", "|---|---:|---|---:|---:|---|---|"]
    for label, _, _ in CONDITIONS:
        active, total = gap(label, "dense-active", "moe"), gap(label, "moe", "dense-total")
        dense = statistics.mean(runs[(label, "dense-active", s)]["best"] for s in SEEDS)
        lines.append(f"| {label} | {fmt(active)} | {verdict(active)} | {statistics.mean(active) / dense:+.2%} | "
                     f"{fmt(total)} | {verdict(total)} | {', '.join(f'{g:+.4f}' for g in active)} |")
    lines += [""]

    h1 = [a - b for a, b in zip(gap("S1-fresh", "dense-active", "moe"), gap("S1-repeat8", "dense-active", "moe"))]
    h2 = [a - b for a, b in zip(gap("S2-bytes", "dense-active", "moe"), gap("S1-fresh", "dense-active", "moe"))]
    lines += ["## Hypotheses", "",
              f"- **H1** (repetition hurts the MoE more): gap(S1-fresh) - gap(S1-repeat8) = {fmt(h1)}: "
              f"{verdict(h1)} -> " + {"positive": "supported", "negative": "refuted", "a tie": "open"}[verdict(h1)]
              + ".",
              f"- **H2** (more tokens from the same text): gap(S2-bytes) - gap(S1-fresh) = {fmt(h2)} "
              f"(nats per byte minus nats per BPE token: read the sign and the spread): {verdict(h2)} -> "
              + {"positive": "supported", "negative": "refuted", "a tie": "open"}[verdict(h2)] + "."]

    # --- S3 ---
    names = ["dense-active", "E4k2", "E8k2", "E16k2", "E16k4", "E32k8"]
    best3 = {n: [s3[(n, s)]["best"] for s in SEEDS[:2]] for n in names}
    spread = max(max(v) - min(v) for v in best3.values())
    mono = statistics.mean(best3["E4k2"]) > statistics.mean(best3["E8k2"]) > statistics.mean(best3["E16k2"])
    fine_ok = all(statistics.mean(best3[n]) <= statistics.mean(best3["E4k2"]) + spread for n in ("E16k4", "E32k8"))
    worse = statistics.mean(best3["E16k2"]) > statistics.mean(best3["E4k2"]) + spread
    h3 = "supported" if mono and fine_ok else "refuted" if worse else "not supported (neither rule met)"
    lines += [f"- **H3** (more experts at fixed active parameters): in {s3_label} (picked by the protocol's rule), "
              f"E4k2 > E8k2 > E16k2 monotone: {'yes' if mono else 'no'}; E16k4 and E32k8 no worse than E4k2 by more "
              f"than the largest seed spread ({spread:.4f}): {'yes' if fine_ok else 'no'} -> {h3}. Two seeds: a "
              "weak test.", "",
              f"## S3: more experts at fixed active parameters ({s3_label}, seeds 1337-1338)", "",
              "| model | experts x hidden | top-k | total params | active params | best val loss (mean; min-max) | "
              "vs dense-active |", "|---|---|---:|---:|---:|---:|---:|"]
    for n in names:
        c = s3[(n, SEEDS[0])]["start"]["model_args"]
        p = s3[(n, SEEDS[0])]["start"]["params"]
        shape = f"{c['n_experts']} x {c['expert_hidden']}" if c["n_experts"] else f"dense {c['ffn_hidden']}"
        v = best3[n]
        diff = [a - b for a, b in zip(best3["dense-active"], v)]
        lines.append(f"| {n} | {shape} | {c['top_k'] if c['n_experts'] else '-'} | {p['total']:,} | "
                     f"{round(p['active']):,} | {statistics.mean(v):.4f}; {min(v):.4f}-{max(v):.4f} | "
                     f"{statistics.mean(diff):+.4f} |")
    lines += ["", "vs dense-active: dense-active's best validation loss minus the model's, paired by seed "
              "(positive: the MoE is better).", ""]

    # --- routing health ---
    lines += ["## Routing at the end of training (max/mean expert load, over layers and seeds)", "",
              "| condition | moe: max/mean load (mean over layers; worst layer) |", "|---|---|"]
    for label, _, _ in CONDITIONS:
        loads = [layer["max_mean"] for s in SEEDS for layer in runs[(label, "moe", s)]["routing"]]
        lines.append(f"| {label} | {statistics.mean(loads):.2f}; {max(loads):.2f} |")
    for n in names[2:]:
        loads = [layer["max_mean"] for s in SEEDS[:2] for layer in s3[(n, s)]["routing"]]
        lines.append(f"| {s3_label} {n} | {statistics.mean(loads):.2f}; {max(loads):.2f} |")
    lines += [""]

    plots = write_plots(runs, s3, names, s3_label)
    lines += [f"![{p}]({p})" for p in plots]
    with open(os.path.join(HERE, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_plots(runs, s3, names, s3_label):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(13, 4), sharey=False)
    for ax, (label, _, _) in zip(axes, CONDITIONS):
        for a, b, color in (("dense-active", "moe", "C0"), ("moe", "dense-total", "C1")):
            per_seed = []
            for s in SEEDS:
                ca, cb = dict(runs[(label, a, s)]["curve"]), dict(runs[(label, b, s)]["curve"])
                per_seed.append([(it, ca[it] - cb[it]) for it in sorted(ca) if it > 0 and it in cb])
            its = [it for it, _ in per_seed[0]]
            means = [statistics.mean(p[i][1] for p in per_seed) for i in range(len(its))]
            ses = [mean_se([p[i][1] for p in per_seed])[1] for i in range(len(its))]
            ax.errorbar(its, means, yerr=[2 * s for s in ses], marker="o", capsize=3, color=color, label=f"{a} - {b}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[0].set_ylabel("validation loss gap (+/- 2 SE)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "gaps.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        curves = [dict(s3[(n, s)]["curve"]) for s in SEEDS[:2]]
        its = [it for it in sorted(curves[0]) if it >= 200]
        ax.plot(its, [statistics.mean(c[it] for c in curves) for it in its], marker="o", label=n,
                linestyle="--" if n == "dense-active" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (mean of 2 seeds)")
    ax.set_title(f"S3: experts at fixed active parameters ({s3_label})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "experts.png"), dpi=110)
    plt.close(fig)
    return ["gaps.png", "experts.png"]


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../../out"))

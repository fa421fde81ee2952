"""The reference curve of config/cpu_moe.py on tiny Shakespeare: reads runs/<run>/metrics.jsonl beside this
file and writes table.md (the numbers README.md quotes) and reference.png.

    python docs/results/cpu_moe_reference/summarize.py
"""

import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = (1337, 1338, 1339)
T_95 = 4.303  # Student's t, two-sided 95%, 2 degrees of freedom (3 seeds)
GROUPS = [  # (label, run folder pattern, line style)
    ("MoE, fp32", "moe-fp32-s{seed}", "-"),
    ("dense-active, fp32", "dense-active-fp32-s{seed}", "--"),
]
AUTO = "moe-auto-s1337"  # the one run with the default dtype=auto


def read_run(name):
    """(evals {iter: val_loss}, train [(iter, ce)], ms_per_iter [...], minutes from start to the last eval), or
    None if the run is not there."""
    path = os.path.join(HERE, "runs", name, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    records = [json.loads(line) for line in open(path) if line.strip()]
    start = next(r for r in records if r.get("event") == "start")
    evals = {r["iter"]: r["val_loss"] for r in records if "val_loss" in r}
    train = [(r["iter"], r["ce"]) for r in records if "ce" in r and "val_loss" not in r]
    last_eval = max((r for r in records if "val_loss" in r), key=lambda r: r["iter"])
    return {"evals": evals, "train": train, "ms": [r["ms_per_iter"] for r in records if "ms_per_iter" in r],
            "minutes": (last_eval["time"] - start["time"]) / 60, "code": start["code"]}


def interval(values):
    """(mean, half-width of the t-based 95% interval); the half-width is nan for fewer than 2 values."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, T_95 * statistics.stdev(values) / math.sqrt(len(values))


def val_table(label, runs):
    steps = sorted(set.intersection(*(set(r["evals"]) for r in runs.values())))
    lines = [f"**{label}**: validation loss (mean over {len(runs)} seeds, 95% interval = mean +/- t * sd / sqrt(n), "
             f"t = {T_95})", "",
             "| step | " + " | ".join(f"seed {s}" for s in runs) + " | mean | 95% interval | spread (max - min) |",
             "|---:|" + "---:|" * (len(runs) + 3)]
    for step in steps:
        values = [r["evals"][step] for r in runs.values()]
        m, h = interval(values)
        lines.append(f"| {step} | " + " | ".join(f"{v:.4f}" for v in values)
                     + f" | {m:.4f} | {m - h:.4f} to {m + h:.4f} | {max(values) - min(values):.4f} |")
    return lines


def main():
    groups = {label: {s: read_run(pattern.format(seed=s)) for s in SEEDS} for label, pattern, _ in GROUPS}
    groups = {label: {s: r for s, r in runs.items() if r} for label, runs in groups.items()}
    auto = read_run(AUTO)
    out = []
    for label, runs in groups.items():
        if runs:
            out += val_table(label, runs) + [""]
    moe, dense = groups["MoE, fp32"], groups["dense-active, fp32"]
    paired = [s for s in SEEDS if s in moe and s in dense]
    if paired:
        out += ["**MoE - dense-active**, fp32, validation loss paired by seed (positive: the MoE is worse)", "",
                "| step | " + " | ".join(f"seed {s}" for s in paired) + " | mean | 95% interval |",
                "|---:|" + "---:|" * (len(paired) + 2)]
        for step in sorted(set(moe[paired[0]]["evals"]) & set(dense[paired[0]]["evals"])):
            gaps = [moe[s]["evals"][step] - dense[s]["evals"][step] for s in paired]
            m, h = interval(gaps)
            out.append(f"| {step} | " + " | ".join(f"{g:+.4f}" for g in gaps) + f" | {m:+.4f} | {m - h:+.4f} to "
                       f"{m + h:+.4f} |")
        out.append("")
    out += ["**Training loss** (cross-entropy of one batch of 2,048 tokens, logged every 20 steps): the mean of the "
            "5 logged at steps 520 to 600, and their range", "", "| run | mean | min | max |", "|---|---:|---:|---:|"]
    named = [(pattern.format(seed=s), groups[label].get(s)) for label, pattern, _ in GROUPS for s in SEEDS]
    named = [(name, run) for name, run in named + [(AUTO, auto)] if run]
    for name, run in named:
        last = [ce for it, ce in run["train"] if it > 500]
        out.append(f"| {name} | {statistics.mean(last):.4f} | {min(last):.4f} | {max(last):.4f} |")
    out.append("")
    fp32 = groups["MoE, fp32"].get(1337)
    if auto and fp32:
        out += ["**dtype=auto against fp32**, MoE, seed 1337: validation loss", "",
                "| step | fp32 | auto | auto - fp32 |", "|---:|---:|---:|---:|"]
        for step in sorted(set(auto["evals"]) & set(fp32["evals"])):
            a, f = auto["evals"][step], fp32["evals"][step]
            out.append(f"| {step} | {f:.6f} | {a:.6f} | {a - f:+.6f} |")
        out.append("")
    out += ["**Wall time** (exploratory: a shared 2-core machine, one thread)", "",
            "| run | ms per step, over each 20-step log interval: median of 30 | min | max | minutes, start to last "
            "evaluation | code |",
            "|---|---:|---:|---:|---:|---|"]
    for name, run in named:
        out.append(f"| {name} | {statistics.median(run['ms']):.0f} | {min(run['ms']):.0f} | {max(run['ms']):.0f} "
                   f"| {run['minutes']:.1f} | {run['code']} |")
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))
    plot(groups, auto)


def plot(groups, auto):
    """Validation loss (whole run, and steps 200-600 magnified) and training loss against step, a line per run."""
    fig, (ax_val, ax_zoom, ax_train) = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = dict(zip(SEEDS, ("tab:blue", "tab:orange", "tab:green")))
    lines = [(f"{label}, seed {seed}", run, style, colors[seed])
             for label, _, style in GROUPS for seed, run in groups[label].items()]
    if auto:
        lines.append(("MoE, dtype=auto (bf16 here), seed 1337", auto, ":", "black"))
    for name, run, style, color in lines:
        steps = sorted(run["evals"])
        for ax in (ax_val, ax_zoom):
            ax.plot(steps, [run["evals"][s] for s in steps], style, marker="o", ms=3, color=color, label=name)
        ax_train.plot(*zip(*run["train"]), style, lw=1, color=color, label=name)
    ax_val.axhline(math.log(2048), color="grey", lw=0.8)
    ax_val.text(600, math.log(2048), "ln 2048", ha="right", va="bottom", color="grey", fontsize=8)
    ax_val.set(title="validation loss (the same 20 batches each time)", xlabel="step", ylabel="loss (nats/token)")
    ax_zoom.set(title="validation loss, steps 200 to 600", xlabel="step", xlim=(190, 610))
    ax_zoom.set_ylim(4.15, 4.8)
    ax_train.set(title="training loss (one batch, every 20 steps)", xlabel="step")
    for ax in (ax_val, ax_train):
        ax.set_ylim(3.8, 7.8)
    for ax in (ax_val, ax_zoom, ax_train):
        ax.grid(alpha=0.3)
    ax_zoom.legend(fontsize=7)
    fig.suptitle("config/cpu_moe.py on tiny Shakespeare (2048-token BPE), 600 steps, CPU, one thread", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "reference.png"), dpi=100)


if __name__ == "__main__":
    main()

"""The length study's report (protocol: README.md beside this file, committed before the runs).

    python docs/results/laptop_length/analyze.py --collect=../tinymoe-length/out  # copy the runs' records here
    python docs/results/laptop_length/analyze.py                                  # report.md and plots from them

--collect copies each finished run's metrics.jsonl (a few dozen KB) into runs/<experiment>/<run>/, so
that every number of report.md reproduces from the repository by the second command alone. The
statistics and verdicts are the ones the protocol fixed: the paired change D = gap2000 - gap600 of
gap = best val loss(dense-active) - best val loss(MoE), with t-based 95% intervals over seeds.
"""

import json
import math
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
SEEDS = (1337, 1338, 1339, 1340, 1341)  # L600 and L2000
TOTAL_SEEDS = (1337, 1338, 1339)  # dense-total at 2000 steps
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def collect(out):
    """Copy the metrics.jsonl of every run of the study's experiments under `out` into runs/."""
    copied = 0
    for experiment in ("len_600", "len_2000"):
        folder = os.path.join(out, experiment)
        for run in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            src = os.path.join(folder, run, "metrics.jsonl")
            if os.path.isfile(src):
                os.makedirs(os.path.join(RUNS, experiment, run), exist_ok=True)
                shutil.copyfile(src, os.path.join(RUNS, experiment, run, "metrics.jsonl"))
                copied += 1
    print(f"copied {copied} runs' metrics.jsonl into {RUNS}")


def read_run(experiment, model, seed):
    """A run's start record, evaluations and training records; None if missing or not finished."""
    path = os.path.join(RUNS, experiment, f"{model}-s{seed}", "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    records = [json.loads(line) for line in open(path) if line.strip()]
    start = next(r for r in records if r.get("event") == "start")
    max_iters = start["config"]["max_iters"]
    evals = [r for r in records if "val_loss" in r]
    if not evals or evals[-1]["iter"] != max_iters:
        return None
    train = [r for r in records if "ce" in r and "val_loss" not in r]
    return {"start": start, "best": min(r["val_loss"] for r in evals),
            "curve": {r["iter"]: r["val_loss"] for r in evals},
            "train_ce": statistics.mean(r["ce"] for r in train if r["iter"] > max_iters - 100),
            "minutes": (evals[-1]["time"] - start["time"]) / 60, "code": start["code"],
            "params": start["params"]}


def interval(values):
    """(mean, standard error, low, high): the t-based 95% interval over seeds."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan"), float("nan")
    se = statistics.stdev(values) / math.sqrt(len(values))
    half = T975[len(values) - 1] * se
    return m, se, m - half, m + half


def fmt(values, digits=4):
    m, se, low, high = interval(values)
    return f"{m:+.{digits}f} +/- {se:.{digits}f} (95% [{low:+.{digits}f}, {high:+.{digits}f}], n={len(values)})"


def verdict(d, gap2000):
    """The protocol's decision rule for hypothesis L."""
    _, _, low, high = interval(d)
    if low > 0:
        crossed = interval(gap2000)[2] > 0
        return "supported, and crosses" if crossed else "supported, narrows without crossing"
    if high < 0:
        return "refuted"
    inside = -0.01 <= low and high <= 0.01
    return "open" + (" (no effect of length larger than 0.01 nats per byte is left)" if inside else "")


def main():
    runs = {(e, m, s): read_run(e, m, s) for e in ("len_600", "len_2000") for m in ("moe", "dense-active")
            for s in SEEDS}
    runs.update({("len_2000", "dense-total", s): read_run("len_2000", "dense-total", s) for s in TOTAL_SEEDS})
    done = {k: v for k, v in runs.items() if v is not None}
    paired = [s for s in SEEDS
              if all(runs[(e, m, s)] for e in ("len_600", "len_2000") for m in ("moe", "dense-active"))]
    gap = {(e, s): runs[(e, "dense-active", s)]["best"] - runs[(e, "moe", s)]["best"]
           for e in ("len_600", "len_2000") for s in SEEDS if runs[(e, "dense-active", s)] and runs[(e, "moe", s)]}
    d = [gap[("len_2000", s)] - gap[("len_600", s)] for s in paired]
    complete = len(done) == len(runs)
    lines = ["# Laptop science 2: the length study (report)", "",
             "Protocol, hypothesis and decision rules: [README.md](README.md), committed before any run. Written by "
             "`analyze.py` from the runs' own metrics.jsonl records, committed under [runs/](runs/) (every number "
             "below reproduces with `python docs/results/laptop_length/analyze.py`).", "",
             f"Runs finished: {len(done)} of {len(runs)}"
             + ("." if complete else " - **the study is not complete** (rerun run.sh to continue); the verdict "
                                      "is given once the 20 runs of the primary statistic have finished."), "",
             f"Code: {', '.join(sorted({r['code'] for r in done.values()}))}. Wall time of a run (training and "
             f"evaluation, one thread, two runs at a time on a shared 2-core CPU: not comparable between runs): "
             + ", ".join(f"{e[4:]} steps {min(r['minutes'] for k, r in done.items() if k[0] == e):.1f}-"
                         f"{max(r['minutes'] for k, r in done.items() if k[0] == e):.1f} min"
                         for e in ("len_600", "len_2000") if any(k[0] == e for k in done)) + ".", ""]

    lines += ["## Best validation loss (nats per byte)", "",
              "Mean +/- standard error over seeds, with the t-based 95% interval; train CE is the mean training-batch "
              "cross-entropy over each run's last 100 steps.", "",
              "| steps | model | params (total / active) | best val loss | train CE (last 100) | seeds |",
              "|---:|---|---:|---:|---:|---:|"]
    for e in ("len_600", "len_2000"):
        for m in ("moe", "dense-active", "dense-total"):
            rs = [done[k] for k in done if k[0] == e and k[1] == m]
            if rs:
                p = rs[0]["params"]
                m_, se, low, high = interval([r["best"] for r in rs])
                ce = statistics.mean(r["train_ce"] for r in rs)
                lines.append(f"| {e[4:]} | {m} | {p['total']:,} / {p['active']:,} | {m_:.4f} +/- {se:.4f} "
                             f"[{low:.4f}, {high:.4f}] | {ce:.4f} | {len(rs)} |")

    lines += ["", "## The active gap and its change with length (primary statistic)", "",
              "gap = best val loss(dense-active) - best val loss(MoE): positive means the MoE is better (the published "
              "ordering). D = gap2000 - gap600, paired by seed.", "",
              "| seed | gap600 | gap2000 | D |", "|---:|---:|---:|---:|"]
    for s in SEEDS:
        cells = [f"{gap[(e, s)]:+.4f}" if (e, s) in gap else "-" for e in ("len_600", "len_2000")]
        lines.append(f"| {s} | {cells[0]} | {cells[1]} | {f'{d[paired.index(s)]:+.4f}' if s in paired else '-'} |")
    g600 = [gap[("len_600", s)] for s in SEEDS if ("len_600", s) in gap]
    g2000 = [gap[("len_2000", s)] for s in SEEDS if ("len_2000", s) in gap]
    lines += ["", f"- gap600: {fmt(g600)}" if len(g600) > 1 else "- gap600: too few seeds yet",
              f"- gap2000: {fmt(g2000)}" if len(g2000) > 1 else "- gap2000: too few seeds yet",
              f"- **D (primary): {fmt(d)}**" if len(d) > 1 else "- D (primary): too few paired seeds yet"]
    for e in ("len_600", "len_2000"):
        rel = [gap[(e, s)] / runs[(e, "dense-active", s)]["best"] for s in SEEDS if (e, s) in gap]
        if len(rel) > 1:
            lines.append(f"- gap{e[4:]} relative to dense-active's loss: {fmt([100 * r for r in rel], 2)} (percent)")
    total = [runs[("len_2000", "moe", s)]["best"] - runs[("len_2000", "dense-total", s)]["best"]
             for s in TOTAL_SEEDS if runs[("len_2000", "moe", s)] and runs[("len_2000", "dense-total", s)]]
    if len(total) > 1:
        lines.append(f"- total gap at 2000 steps, MoE - dense-total (positive: dense-total better, as published): "
                     f"{fmt(total)}")
    lines += ["", "## Verdict", ""]
    if len(d) == len(SEEDS):  # the primary statistic's runs (L600, L2000) all finished; dense-total is secondary
        lines.append(f"Hypothesis L (longer training moves the gap toward the published ordering), by the protocol's "
                     f"rule: **{verdict(d, g2000)}**.")
    else:
        lines.append("None yet: the protocol's verdict needs all 5 paired seeds of L600 and L2000.")
    lines += ["", "![D by seed](length.png)", "", "![the gap over training](gap_curve.png)", ""]
    open(os.path.join(HERE, "report.md"), "w").write("\n".join(lines))
    plots(gap, paired, d, runs)
    print("\n".join(lines))


def plots(gap, paired, d, runs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, e in ((0, "len_600"), (1, "len_2000")):
        vals = [gap[(e, s)] for s in SEEDS if (e, s) in gap]
        ax.scatter([x] * len(vals), vals, color="gray", zorder=3)
        if len(vals) > 1:
            m, _, low, high = interval(vals)
            ax.errorbar([x + 0.1], [m], yerr=[[m - low], [high - m]], fmt="o", color="C0", capsize=4)
    for s in paired:
        ax.plot([0, 1], [gap[("len_600", s)], gap[("len_2000", s)]], color="gray", alpha=0.5)
    if len(d) > 1:
        m, _, low, high = interval(d)
        ax.errorbar([2], [m], yerr=[[m - low], [high - m]], fmt="s", color="C3", capsize=4)
        ax.scatter([1.9] * len(d), d, color="C3", alpha=0.5)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks([0, 1, 2], ["gap600", "gap2000", "D = gap2000 - gap600"])
    ax.set_xlim(-0.4, 2.4)
    ax.set_ylabel("nats per byte (positive: MoE better)")
    ax.set_title("dense-active - MoE, per seed, mean and 95% interval")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "length.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for e, color in (("len_600", "C1"), ("len_2000", "C0")):
        steps = sorted({it for s in SEEDS for k in [(e, "moe", s)] if runs[k] for it in runs[k]["curve"]})
        means = []
        for it in steps:
            vals = [runs[(e, "dense-active", s)]["curve"][it] - runs[(e, "moe", s)]["curve"][it] for s in SEEDS
                    if runs[(e, "dense-active", s)] and runs[(e, "moe", s)] and it > 0]
            if len(vals) > 1:
                m, _, low, high = interval(vals)
                means.append((it, m, low, high))
        if means:
            its, ms, ls, hs = zip(*means)
            ax.plot(its, ms, color=color, label=f"{e[4:]} steps")
            ax.fill_between(its, ls, hs, color=color, alpha=0.2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss(dense-active) - val loss(MoE)")
    ax.set_title("the active gap at each evaluation: mean, 95% interval")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "gap_curve.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--collect="):
        collect(sys.argv[1].split("=", 1)[1])
    main()

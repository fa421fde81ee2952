"""The laptop-science study's summary, from the validation curves committed beside this file
(runs/*/curves.csv: every evaluation of every run, as experiment.py wrote them). Writes report.md,
gaps.png and experts.png into this folder. The hypotheses are tested by the rules the protocol
(README.md) fixed before the runs; each is shown next to its t-based 95% interval.

    python docs/results/laptop_science/analyze.py

The runs' metrics.jsonl records were not kept, so what only they held (training cross-entropy,
routing, run times) is quoted from the first version of report.md and marked as such.
"""

import csv
import math
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
SEEDS = (1337, 1338, 1339)
S3_SEEDS = SEEDS[:2]
TRIO = ("moe", "dense-active", "dense-total")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # t(0.975, degrees of freedom): the 95% interval is mean +/- t x SE
FIRST_REPORT = "fb302e3"  # the commit of the first report.md, written from the runs' metrics.jsonl files

# Training tokens of each dataset and validation tokens of each tokenizer, counted from the datasets'
# .bin files that run.sh's prepare.py commands make from the plays (the text is not in the repo).
# They give the passes the first report stated: 0.74, 5.89 and 0.27.
CONDITIONS = [  # (label, folder under runs/, what, training tokens available)
    ("S1-fresh", "ls_s1_fresh", "2048-token BPE, the whole training split", 1_670_195),
    ("S1-repeat8", "ls_s1_repeat8", "2048-token BPE, the first 1/8 of the training split", 1_670_195 // 8),
    ("S2-bytes", "ls_s2_bytes", "bytes (257 tokens), the whole training split", 4_551_497),
]
VAL_TOKENS = {"bpe": 191_412, "bytes": 505_743}  # the same validation text: 2.642 bytes per BPE token
# (total, active) parameters, as `python train.py config/cpu_moe.py --dry_run=True --vocab_size=V`
# prints them (S3: with --match=none and the model's --n_experts, --top_k, --expert_hidden)
PARAMS = {
    "bpe": {"moe": (2_100_352, 1_313_920), "dense-active": (1_313_408, 1_313_408),
            "dense-total": (2_099_840, 2_099_840)},
    "bytes": {"moe": (1_871_104, 1_084_672), "dense-active": (1_084_160, 1_084_160),
              "dense-total": (1_870_592, 1_870_592), "E4k2": (1_871_104, 1_084_672),
              "E8k2": (3_446_016, 1_086_720), "E16k2": (6_595_840, 1_090_816),
              "E16k4": (3_450_112, 1_090_816), "E32k8": (3_458_304, 1_099_008)},
}
S3 = [  # (name, folder under runs/ after ls_s3_<dataset>_, sweep point in curves.csv, experts x hidden, top-k)
    ("E8k2", "e8-16k2", "n_experts=8", "8 x 256", 2),
    ("E16k2", "e8-16k2", "n_experts=16", "16 x 256", 2),
    ("E16k4", "e16k4", "n_experts=16,top_k=4", "16 x 128", 4),
    ("E32k8", "e32k8", "n_experts=32,top_k=8", "32 x 64", 8),
]

# Not in any committed file: the first report.md (commit FIRST_REPORT) computed these from the runs'
# metrics.jsonl files, which were not kept. Quoted as it printed them; nothing here can recompute them.
NOT_KEPT_TRAIN_CE = {  # mean training-batch cross-entropy over the last 100 steps, mean over the 3 seeds
    "S1-fresh": {"moe": 4.2853, "dense-active": 4.2601, "dense-total": 4.1692},
    "S1-repeat8": {"moe": 3.7569, "dense-active": 3.7547, "dense-total": 3.6604},
    "S2-bytes": {"moe": 1.7647, "dense-active": 1.7603, "dense-total": 1.7430},
}
NOT_KEPT_ROUTING = [  # max/mean expert load at the last evaluation: mean over layers and seeds; worst layer
    ("S1-fresh", 1.18, 1.42), ("S1-repeat8", 1.16, 1.20), ("S2-bytes", 1.11, 1.21), ("S2-bytes E8k2", 1.38, 1.58),
    ("S2-bytes E16k2", 1.79, 2.06), ("S2-bytes E16k4", 1.37, 1.71), ("S2-bytes E32k8", 1.47, 1.70),
]


# -----------------------------------------------------------------------------
# reading the curves and the statistics

def read_curves(folder, point=""):
    """{(model, seed): {iter: val_loss}} for one sweep point of an experiment's curves.csv; tokens by iter."""
    curves, tokens = {}, {}
    with open(os.path.join(RUNS, folder, "curves.csv")) as f:
        for row in csv.DictReader(f):
            if row["point"] == point:
                curves.setdefault((row["model"], int(row["seed"])), {})[int(row["iter"])] = float(row["val_loss"])
                tokens[int(row["iter"])] = int(row["tokens"])
    return curves, tokens


def best(curve):
    """The protocol's statistic: a run's best (lowest) evaluation."""
    return min(curve.values())


def summary(values):
    """Mean, standard error, t statistic and the half-width of the t-based 95% interval over seeds."""
    n, m = len(values), statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": m, "se": se, "t": m / se if se else math.inf, "half95": T975[n - 1] * se}


def verdict(values):
    """The protocol's rule: positive if the mean is more than two standard errors above zero, negative
    if more than two below, else a tie."""
    s = summary(values)
    return "positive" if s["mean"] > 2 * s["se"] else "negative" if s["mean"] < -2 * s["se"] else "a tie"


def fmt(values, digits=4, sign="+"):
    """mean +/- SE [95% interval]; sign="" for a loss rather than a difference"""
    s = summary(values)
    m, lo, hi = s["mean"], s["mean"] - s["half95"], s["mean"] + s["half95"]
    return f"{m:{sign}.{digits}f} +/- {s['se']:.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def per_seed(values, digits=4):
    return ", ".join(f"{v:+.{digits}f}" for v in values)


def outcome(rule):
    return {"positive": "supported", "negative": "refuted", "a tie": "open"}[rule]


# -----------------------------------------------------------------------------
# the report

def main():
    runs, tokens = {}, {}
    for label, folder, _, _ in CONDITIONS:
        curves, tokens[label] = read_curves(folder)
        for (model, seed), curve in curves.items():
            runs[(label, model, seed)] = curve
    gap = lambda label, a, b, seeds=SEEDS: [best(runs[(label, a, s)]) - best(runs[(label, b, s)]) for s in seeds]
    active = {label: gap(label, "dense-active", "moe") for label, *_ in CONDITIONS}
    total = {label: gap(label, "moe", "dense-total") for label, *_ in CONDITIONS}

    # S3's regime, by the protocol's rule (pick_regime.py): of S1-fresh and S2-bytes, the larger mean active gap
    s3_label = max(("S1-fresh", "S2-bytes"), key=lambda label: statistics.mean(active[label]))
    s3_dataset = {"S1-fresh": "shakespeare", "S2-bytes": "shakespeare_bytes"}[s3_label]
    s3 = {(n, s): runs[(s3_label, m, s)] for n, m in (("dense-active", "dense-active"), ("E4k2", "moe"))
          for s in S3_SEEDS}
    for name, folder, point, _, _ in S3:
        curves, _ = read_curves(f"ls_s3_{s3_dataset}_{folder}", point)
        for s in S3_SEEDS:
            s3[(name, s)] = curves[("moe", s)]
    steps = max(tokens["S1-fresh"])
    seen = tokens["S1-fresh"][steps]
    codes = sorted({line.split("runs at commit ")[1].split(";")[0] for folder in os.listdir(RUNS)
                    for line in open(os.path.join(RUNS, folder, "report.md")) if "runs at commit " in line})

    lines = ["# Laptop science: results", "",
             "Protocol, hypotheses and decision rules: [README.md](README.md) (committed before the runs). "
             "This file is written by `python docs/results/laptop_science/analyze.py` from the validation curves "
             "committed under [runs/](runs/) (every evaluation of every run), so each validation-loss number below "
             "can be recomputed from the repository. The runs' metrics.jsonl records were not kept: the few numbers "
             "that only they held are in the last section, marked.", "",
             f"{len(runs) + 4 * len(S3_SEEDS)} training runs of {steps} steps ({seen:,} tokens each), each with "
             f"its own {steps}-step cosine schedule, at code {', '.join(codes)} (as each experiment's report under "
             "runs/ records it). **The length of training was not varied**: nothing here says what a longer run "
             "would do. The curve of a run under one schedule does not predict a run with a longer schedule. "
             "A pre-registered length study tests that: [../laptop_length](../laptop_length/README.md).", "",
             "**Conventions.** Every +/- is mean +/- standard error over seeds (SE = sd / sqrt(n)); the bracket "
             "is the t-based 95% interval, mean +/- t(0.975, n-1) x SE, with t = 4.303 for 3 seeds and 12.706 "
             "for 2. The protocol's verdict rule counts a mean more than 2 SE from zero as positive or negative: "
             "with 3 seeds that is an 82% interval, with 2 seeds a 70% one, not 95%. Both are given; where they "
             "disagree, the text says so.", ""]

    # --- data and models ---
    lines += ["## Conditions", "",
              "Passes = training tokens seen / training tokens available; tokens per active parameter on the MoE's "
              "active count. Token counts from the datasets' files (see `CONDITIONS` in analyze.py).", "",
              "| condition | what | training tokens available | passes | MoE total / active params | "
              "tokens / active param |", "|---|---|---:|---:|---:|---:|"]
    for label, _, what, available in CONDITIONS:
        tok_total, tok_active = PARAMS["bytes" if "bytes" in label else "bpe"]["moe"]
        lines.append(f"| {label} | {what} | {available:,} | {seen / available:.2f} | {tok_total:,} / "
                     f"{tok_active:,} | {seen / tok_active:.2f} |")
    lines += [""]

    # --- the trio ---
    lines += ["## Best validation loss", "",
              "Mean +/- SE [95% interval] over seeds 1337-1339. S1 in nats per BPE token, S2 in nats per byte.", "",
              "| condition | moe | dense-active | dense-total |", "|---|---:|---:|---:|"]
    for label, *_ in CONDITIONS:
        cells = [fmt([best(runs[(label, m, s)]) for s in SEEDS], sign="") for m in TRIO]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += [""]

    lines += ["## Gaps, paired by seed", "",
              "Positive: the first model is worse. Mean +/- SE [95% interval], t with 2 degrees of freedom, the "
              "protocol's verdict (2 SE), and the gap relative to dense-active's loss.", "",
              "| condition | gap | mean +/- SE [95%] | t(2) | verdict (2 SE) | 95% interval excludes 0 | relative | "
              "per seed |", "|---|---|---:|---:|---|---|---:|---|"]
    for label, *_ in CONDITIONS:
        dense = statistics.mean(best(runs[(label, "dense-active", s)]) for s in SEEDS)
        for name, values in (("dense-active - moe", active[label]), ("moe - dense-total", total[label])):
            s = summary(values)
            lines.append(f"| {label} | {name} | {fmt(values)} | {s['t']:+.2f} | {verdict(values)} | "
                         f"{'yes' if abs(s['mean']) > s['half95'] else 'no'} | {s['mean'] / dense:+.2%} | "
                         f"{per_seed(values)} |")
    lines += [""]

    # --- over training ---
    its = [it for it in sorted(tokens["S1-fresh"]) if it > 0]
    lines += ["## The active gap over training", "",
              f"dense-active - moe at each evaluation, mean +/- SE over 3 seeds. Every run follows its own "
              f"{steps}-step schedule (the learning rate decays to its minimum at the last step), so these "
              "curves show how the gap moved within one schedule, not what a longer run would reach.", "",
              "| condition | " + " | ".join(f"step {it}" for it in its) + " |", "|---|" + "---:|" * len(its)]
    for label, *_ in CONDITIONS:
        cells = []
        for it in its:
            s = summary([runs[(label, "dense-active", sd)][it] - runs[(label, "moe", sd)][it] for sd in SEEDS])
            cells.append(f"{s['mean']:+.4f} +/- {s['se']:.4f}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "See [gaps.png](gaps.png) for both gaps with their per-seed values.", ""]

    # --- hypotheses ---
    h1 = [a - b for a, b in zip(active["S1-fresh"], active["S1-repeat8"])]
    h2 = [a - b for a, b in zip(active["S2-bytes"], active["S1-fresh"])]
    bytes_per_token = VAL_TOKENS["bytes"] / VAL_TOKENS["bpe"]
    h2_byte = [a - b / bytes_per_token for a, b in zip(active["S2-bytes"], active["S1-fresh"])]
    rel = {label: [g / best(runs[(label, "dense-active", s)]) for g, s in zip(active[label], SEEDS)]
           for label in ("S1-fresh", "S2-bytes")}
    h2_rel = [a - b for a, b in zip(rel["S2-bytes"], rel["S1-fresh"])]
    opposite = sum(1 for v in h1 if (v > 0) != (statistics.mean(h1) > 0))
    lines += ["## Hypotheses", "",
              f"- **H1** (repetition hurts the MoE more): gap(S1-fresh) - gap(S1-repeat8) = {fmt(h1)}, "
              f"t(2) = {summary(h1)['t']:+.2f}; per seed {per_seed(h1)}. Protocol's rule: {verdict(h1)} -> "
              f"**{outcome(verdict(h1))}**. The mean points against H1 (the MoE fared relatively better on the "
              f"repeated data), but {opposite} seed of 3 has the opposite sign and the 95% interval holds both "
              "signs: the data do not show that repetition helps or hurts the MoE.",
              f"- **H2** (more tokens from the same text): gap(S2-bytes) - gap(S1-fresh) = {fmt(h2)}, "
              f"t(2) = {summary(h2)['t']:+.2f}; per seed {per_seed(h2)}. Protocol's rule: {verdict(h2)} -> "
              f"{outcome(verdict(h2))}, by {summary(h2)['t']:.2f} SE against a threshold of 2, and the 95% "
              "interval holds 0. That difference subtracts nats per BPE token from nats per byte. In one unit it is "
              f"a tie: per byte (the BPE gap divided by the {bytes_per_token:.3f} bytes per BPE token of the "
              f"validation text) {fmt(h2_byte)}, t(2) = {summary(h2_byte)['t']:+.2f}; relative to dense-active's "
              f"loss {fmt([100 * v for v in h2_rel], 2)} percentage points, t(2) = {summary(h2_rel)['t']:+.2f}. "
              "**Reading: not established**; the protocol's rule is met only by the mixed-unit difference."]
    names = ["dense-active", "E4k2", *(n for n, *_ in S3)]
    best3 = {n: [best(s3[(n, s)]) for s in S3_SEEDS] for n in names}
    spread = max(max(v) - min(v) for v in best3.values())
    mean3 = {n: statistics.mean(v) for n, v in best3.items()}
    mono = mean3["E4k2"] > mean3["E8k2"] > mean3["E16k2"]
    fine_ok = all(mean3[n] <= mean3["E4k2"] + spread for n in ("E16k4", "E32k8"))
    worse = mean3["E16k2"] > mean3["E4k2"] + spread
    h3 = "supported" if mono and fine_ok else "refuted" if worse else "not supported (neither rule met)"
    excludes = [t for t in total if abs(summary(total[t])["mean"]) > summary(total[t])["half95"]]
    published = [t for t in total if verdict(active[t]) == verdict(total[t]) == "positive"]
    lines += [f"- **H3** (more experts at fixed active parameters): in {s3_label} (picked by the protocol's rule: "
              f"the larger mean active gap, {statistics.mean(active[s3_label]):+.4f} against "
              f"{statistics.mean(active['S1-fresh' if s3_label == 'S2-bytes' else 'S2-bytes']):+.4f}), "
              f"E4k2 > E8k2 > E16k2 monotone: {'yes' if mono else 'no'} (means {mean3['E4k2']:.4f}, "
              f"{mean3['E8k2']:.4f}, {mean3['E16k2']:.4f}); E16k4 and E32k8 no worse than E4k2 by more than the "
              f"largest seed spread ({spread:.4f}): {'yes' if fine_ok else 'no'} -> **{h3}**. Two seeds: a weak test.",
              f"- Secondary, the total gap moe - dense-total: positive by the protocol's rule in "
              f"{', '.join(t for t in total if verdict(total[t]) == 'positive') or 'no condition'}; its 95% interval "
              f"excludes 0 in {', '.join(excludes) or 'no condition'} and holds 0 in "
              f"{', '.join(t for t in total if t not in excludes) or 'no condition'}.",
              "- The published ordering (dense-total < moe < dense-active, both gaps positive by the protocol's rule) "
              f"appears in {', '.join(published) or 'no condition'}.",
              ""]

    # --- S3, exploratory ---
    lines += [f"## S3: more experts at fixed active parameters ({s3_label}, seeds {S3_SEEDS[0]}-{S3_SEEDS[-1]})", "",
              "**Exploratory.** The protocol's test of S3 is H3 above, among the MoEs. The comparison with "
              "dense-active in the last column was not pre-registered, and 2 seeds give a 95% interval of 12.7 "
              "standard errors: read it as a lead for a study with more seeds, not as a finding.", "",
              "| model | experts x hidden | top-k | total params | active params | best val loss per seed | mean | "
              "dense-active - model, mean +/- SE [95%] |", "|---|---|---:|---:|---:|---|---:|---:|"]
    shapes = {"dense-active": ("dense 513", "-"), "E4k2": ("4 x 256", 2), **{n: (x, k) for n, _, _, x, k in S3}}
    for n in names:
        p_total, p_active = PARAMS["bytes"][n]
        diff = [a - b for a, b in zip(best3["dense-active"], best3[n])]
        last = fmt(diff) if n != "dense-active" else "-"
        lines.append(f"| {n} | {shapes[n][0]} | {shapes[n][1]} | {p_total:,} | {p_active:,} | "
                     f"{', '.join(f'{v:.4f}' for v in best3[n])} | {mean3[n]:.4f} | {last} |")
    lines += ["", "[experts.png](experts.png) shows each seed.", ""]

    # --- what the repository cannot reproduce ---
    lines += ["## Not reproducible from the repository (records not kept)", "",
              f"The first version of this report (commit {FIRST_REPORT}) also gave the numbers below, computed from "
              "the runs' metrics.jsonl files. Those files were not kept, so nothing in the repository can recompute "
              "or check them; they are quoted as that report printed them.", "",
              "Training cross-entropy, mean over the last 100 steps and over the 3 seeds (the protocol asked for it "
              "beside validation loss, to show how far each model memorises):", "",
              "| condition | moe | dense-active | dense-total |", "|---|---:|---:|---:|"]
    for label, *_ in CONDITIONS:
        lines.append(f"| {label} | " + " | ".join(f"{NOT_KEPT_TRAIN_CE[label][m]:.4f}" for m in TRIO) + " |")
    lines += ["", "Routing at the last evaluation, max/mean expert load (1.00 is balanced):", "",
              "| condition | mean over layers and seeds | worst layer |", "|---|---:|---:|"]
    lines += [f"| {label} | {m:.2f} | {w:.2f} |" for label, m, w in NOT_KEPT_ROUTING]
    lines += ["", "Run times are in each experiment's report under runs/, as experiment.py recorded them.", ""]

    plots = write_plots(runs, s3, names, s3_label)
    lines += [f"![{p}]({p})" for p in plots]
    with open(os.path.join(HERE, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(HERE, 'report.md')} and {', '.join(plots) or 'no plots (no matplotlib)'}")


# -----------------------------------------------------------------------------
# plots

def write_plots(runs, s3, names, s3_label):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(13, 4))
    for ax, (label, *_) in zip(axes, CONDITIONS):
        for a, b, color in (("dense-active", "moe", "C0"), ("moe", "dense-total", "C1")):
            its = [it for it in sorted(runs[(label, a, SEEDS[0])]) if it > 0]
            gaps = [[runs[(label, a, s)][it] - runs[(label, b, s)][it] for s in SEEDS] for it in its]
            for i in range(len(SEEDS)):
                ax.plot(its, [g[i] for g in gaps], color=color, alpha=0.35, lw=0.8, marker=".",
                        label="one seed" if i == 0 and a == "moe" else None)
            ax.errorbar(its, [statistics.mean(g) for g in gaps], yerr=[summary(g)["half95"] for g in gaps],
                        marker="o", capsize=3, color=color, label=f"{a} - {b}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[0].set_ylabel("validation loss gap\n(mean, 95% t interval; thin: each seed)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "gaps.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = names[1:]
    for x, n in enumerate(models):
        diff = [best(s3[("dense-active", s)]) - best(s3[(n, s)]) for s in S3_SEEDS]
        for s, d, marker in zip(S3_SEEDS, diff, ("o", "s")):
            ax.plot(x, d, marker, color="C0", alpha=0.7, label=f"seed {s}" if x == 0 else None)
        s = summary(diff)
        ax.errorbar(x + 0.15, s["mean"], yerr=s["half95"], marker="_", markersize=14, capsize=4, color="C3",
                    label="mean, 95% t interval (1 df)" if x == 0 else None)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("dense-active - model, best val loss\n(positive: the MoE is better)")
    ax.set_title(f"S3 (exploratory): experts at fixed active parameters ({s3_label}, 2 seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "experts.png"), dpi=110)
    plt.close(fig)
    return ["gaps.png", "experts.png"]


if __name__ == "__main__":
    main()

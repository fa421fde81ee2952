"""
Rendering of experiment results: the parameter table (also printed by train.py), out/<name>/report.md
with its tables, curves.csv, and the plots curves.png, gaps.png or sweep.png, and each MoE variant's
expert load (expert_load_<run>.png; for a single run, expert_load.png by experiment.py --plot_run).
experiment.py runs the protocol and hands the finished runs (experiment.Run) here: report.py is not run
by itself, and has no knobs of its own.

    python experiment.py config/cpu_moe.py --seeds=3 --report_only=True  # rewrite out/cpu_moe/report.md
    python experiment.py --plot_run=out/cpu_moe      # one run's expert load: out/cpu_moe/expert_load.png
    python experiment.py --help                      # the knobs of the experiment and its report
"""

import guard  # isort: skip  (first: from here on a Ctrl-C or SIGTERM exits quietly, never a traceback)

import csv
import io
import os
import platform
import statistics
import sys

import torch

from configurator import UserError, print_help
from model import GPTConfig, count_params
from runtime import ROOT, code_version, read_log

# The published trio: Abdalrahman Wael, "Dense vs Sparse Pretraining at Tiny Scale: Active-Parameter vs
# Total-Parameter Matching", arXiv:2605.13769 (2026). Best validation loss, mean +/- std over 3 seeds, of
# config/moe_e4k2.py's recipe and its matched dense baselines on TinyStories (under 25M parameters).
PUBLISHED = {"dense-active": (1.6545, 0.0012), "moe": (1.5788, 0.0020), "dense-total": (1.5608, 0.0025)}
GAPS = (("dense-active - moe", "dense-active", "moe"), ("moe - dense-total", "moe", "dense-total"))  # name, a, b


# -----------------------------------------------------------------------------
# the parameter table


def param_table(rows, markdown=False):
    """The table of models, rows [(name, GPTConfig, goal, note)]: goal is the MoE count a dense
    baseline was matched to (None for the others), note a remark after the row. Plain text for the
    console, or Markdown for a report."""
    header = ["model", "layers x width", "FFN / experts", "routing", "total", "active", "embedding", "mismatch"]
    table = []
    for name, cfg, goal, note in rows:
        counts = count_params(cfg)
        mismatch = f"{(counts['total'] - goal) / goal:+.3%}" if goal else ""
        table.append([name, f"{cfg.n_layer} x {cfg.n_embd}", ffn_text(cfg), routing_text(cfg), f"{counts['total']:,}",
                      f"{round(counts['active']):,}", f"{counts['embedding']:,}", mismatch, note])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|---:|---:|---:|---:|"]
        return "\n".join(lines + ["| " + " | ".join(row[:-1]) + " |" for row in table])
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                                 for i, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), *(f"{line(row[:-1])}  {row[-1]}".rstrip() for row in table)])


def ffn_text(cfg):
    """The feed-forward of a config: the dense hidden size, or count x hidden of each expert group."""
    if cfg.n_experts == 0:
        return str(cfg.ffn_hidden)
    text = " + ".join(f"{n}x{h}" for n, h in cfg.expert_groups or ((cfg.n_experts, cfg.expert_hidden),))
    if cfg.n_shared_experts:
        text += f" + {cfg.n_shared_experts}x{cfg.shared_expert_hidden} shared"
    return text


def routing_text(cfg):
    return f"top-{cfg.top_k}, router {cfg.n_experts * cfg.n_embd * cfg.n_layer:,}" if cfg.n_experts else "-"


# -----------------------------------------------------------------------------
# numbers from the runs


def flops_text(flops_per_s):
    """A FLOP/s rate in readable units: '41.2 GFLOP/s', '312.0 TFLOP/s'."""
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.1f} {unit}"
    return f"{flops_per_s / 1e6:.1f} MFLOP/s"


def point_label(point):
    """A sweep point as text: 'n_experts=8,top_k=2'."""
    return ",".join(f"{k}={v}" for k, v in point.items())


def mean_std(values):
    """'mean +/- std' (sample std over seeds; just the value for one seed)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +/- {statistics.stdev(values):.4f}"


def value_at(curve, iter_num):
    return next((v for _, it, v in curve if it == iter_num), None)


def pairs_by_seed(runs, a, b):
    """[(run of model a, run of model b)] of the same seed, both finished, in seed order."""
    done = {(r.model, r.seed): r for r in runs if r.done}
    return [(done[(a, s)], done[(b, s)]) for s in sorted({r.seed for r in runs}) if (a, s) in done and (b, s) in done]


def paired_gaps(runs):
    """{gap name: [best val loss of a - that of b, per seed]} for the GAPS whose models both finished."""
    gaps = {name: [run_a.best - run_b.best for run_a, run_b in pairs_by_seed(runs, a, b)] for name, a, b in GAPS}
    return {name: values for name, values in gaps.items() if values}


def gaps_at(runs, a, b, iter_num):
    """Per seed, the val loss of a minus that of b at iteration iter_num (where both evaluated then)."""
    pairs = [(value_at(run_a.curve, iter_num), value_at(run_b.curve, iter_num)) for run_a, run_b in
             pairs_by_seed(runs, a, b)]
    return [va - vb for va, vb in pairs if va is not None and vb is not None]


def machine():
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def repo_path(path):
    """path as the report shows it: relative to the repository, so that no machine's folders leak in."""
    return os.path.relpath(os.path.abspath(path), ROOT)


# -----------------------------------------------------------------------------
# report.md


def write_report(cfg, runs, points, exp_dir, wall_s, argv):
    """Write exp_dir/report.md (with curves.csv and the plots) from the collected runs; return its path."""
    models = list(dict.fromkeys(r.model for r in runs))
    versions = sorted({r.start["code"] for r in runs if r.start and "code" in r.start})
    lines = [f"# Experiment {os.path.basename(exp_dir)}", "",
             f"Command: `python experiment.py {' '.join(a for a in argv if not a.startswith('--report_only'))}`",
             "", f"Code: runs at {', '.join(versions) or 'an unrecorded version'}; report at "
             f"{code_version()}. Machine: {machine()}.", ""]
    any_start = next((r.start for r in runs if r.start), None)
    if any_start:
        lines += [setup_line(any_start["config"]),
                  f"Seeds: {', '.join(str(cfg.seed + i) for i in range(cfg.seeds))}. "
                  f"Runs finished: {sum(r.done for r in runs)} of {len(runs)}, {cfg.jobs} at a time; "
                  f"{sum(r.seconds for r in runs) / 60:.1f} min of training summed over runs"
                  + ("." if cfg.report_only else f"; this invocation took {wall_s / 60:.1f} min."), ""]
    lines += ["## Models", "",
              "Active = parameters one token uses: embeddings, attention, norms, the router (counted as active: "
              "every token uses all of it) and top_k of the n_experts experts. Mismatch: a dense model's total "
              "against the MoE's active or total count.", "", param_table(model_rows(runs), markdown=True), ""]
    for point in points:
        point_runs = [r for r in runs if r.point == point]
        title = f" ({point_label(point)})" if point else ""
        lines += [f"## Best validation loss{title}", "", "| model | best val loss (mean +/- std over seeds) | seeds |",
                  "|---|---|---:|"]
        for model in models:
            values = [r.best for r in point_runs if r.model == model and r.done]
            lines.append(f"| {model} | {mean_std(values)} | {len(values)} |")
        lines += [""] + gap_lines(point_runs)
    if cfg.sweep:
        lines += sweep_lines(runs, points, models)
    elif set(PUBLISHED) <= set(models):
        lines += ordering_lines(runs)
    plots = write_plots(runs, points, models, exp_dir)
    lines += [f"![{p}]({p})" for p in plots if not p.startswith("expert_load")] or \
        ["(matplotlib is not installed: no plots; curves.csv has the data)"]
    loads = [p for p in plots if p.startswith("expert_load")]
    if loads:
        lines += ["", "## Expert load", "", "Each MoE variant's first seed: per layer, every expert's share of the "
                  "routed slots on the validation batches at each evaluation (white: the balanced 1/E), and the "
                  "coefficient of variation of the load.", ""] + [f"![{p}]({p})" for p in loads]
    write_csv(runs, exp_dir)
    lines += ["", "All numbers above come from the runs' own metrics.jsonl files; curves.csv has every evaluation."]
    guard.write_text(os.path.join(exp_dir, "report.md"), "\n".join(lines) + "\n")
    return os.path.join(exp_dir, "report.md")


def setup_line(config):
    """The data and schedule of the runs, from one run's logged config."""
    data = repo_path(os.path.join(config["data_root"], config["dataset"]))
    sequences = config["gradient_accumulation_steps"] * config["batch_size"]
    return (f"Data: `{config['dataset']}` ({data}); {config['max_iters']} steps of {sequences} x "
            f"{config['block_size']} tokens; lr {config['learning_rate']} -> {config['min_lr']}, warmup "
            f"{config['warmup_iters']}; evaluation every {config['eval_interval']} steps on {config['eval_iters']} "
            f"fixed validation batches.")


def model_rows(runs):
    """param_table rows: one per model of each sweep point, from the runs' own start records."""
    rows, seen = [], set()
    for run in runs:
        if run.start is None or run.label in seen:
            continue
        seen.add(run.label)
        moe = next((r for r in runs if r.model == "moe" and r.point == run.point and r.start), None)
        goal = moe.start["params"][run.model.split("-")[1]] if run.model != "moe" and moe is not None else None
        rows.append((run.label, GPTConfig(**run.start["model_args"]), goal, ""))
    return rows


def gap_lines(runs):
    """The paired gaps in best validation loss, and the gaps at four points of training."""
    gaps = paired_gaps(runs)
    if not gaps:
        return []
    lines = ["Gaps in best validation loss, paired by seed (positive: the first model is worse):", ""]
    lines += [f"- {name}: {mean_std(values)} ({len(values)} seed{'s' * (len(values) != 1)})"
              for name, values in gaps.items()]
    moe_runs = [r for r in runs if r.model == "moe" and r.done]
    if moe_runs:
        iters = [it for _, it, _ in moe_runs[0].curve]
        marks = sorted({min(iters, key=lambda it: abs(it - f * iters[-1])) for f in (0.25, 0.5, 0.75, 1.0)})
        lines += ["", "The gaps in validation loss over training (mean +/- std over seeds):", "",
                  "| gap | " + " | ".join(f"step {it}" for it in marks) + " |", "|---|" + "---|" * len(marks)]
        for name, a, b in GAPS:
            if name in gaps:
                lines.append(f"| {name} | " + " | ".join(mean_std(gaps_at(runs, a, b, it)) for it in marks) + " |")
    return lines + [""]


def ordering_lines(runs):
    """This experiment's ordering of the trio next to the published one."""
    means = {m: statistics.mean(v) for m in PUBLISHED if (v := [r.best for r in runs if r.model == m and r.done])}
    if len(means) < len(PUBLISHED):
        return []
    ours = " < ".join(sorted(means, key=means.get))
    theirs = " < ".join(sorted(PUBLISHED, key=lambda m: PUBLISHED[m][0]))
    published = ", ".join(f"{m} {v:.4f} +/- {s:.4f}" for m, (v, s) in PUBLISHED.items())
    return ["## Against the published result", "",
            f"Published (Wael 2026, arXiv:2605.13769: TinyStories, under 25M parameters, 3 seeds; best validation "
            f"loss): {published}.", "",
            f"Ordering of mean best validation loss here: {ours}; published: {theirs} "
            f"({'the same' if ours == theirs else 'different'}). Absolute losses are not comparable across "
            f"datasets, tokenizers and model sizes; the ordering and the sign of the gaps are.", ""]


def sweep_lines(runs, points, models):
    keys = list(points[0])
    lines = ["## Sweep", "", "Best validation loss (mean +/- std over seeds):", "",
             "| " + " | ".join(keys) + " | " + " | ".join(models) + " |", "|---" * (len(keys) + len(models)) + "|"]
    for point in points:
        cells = [mean_std([r.best for r in runs if r.point == point and r.model == m and r.done]) for m in models]
        lines.append("| " + " | ".join(str(point[k]) for k in keys) + " | " + " | ".join(cells) + " |")
    return lines + [""]


def write_csv(runs, exp_dir):
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["model", "point", "seed", "iter", "tokens", "val_loss"])
    for r in runs:
        writer.writerows([r.model, point_label(r.point), r.seed, it, tokens, v] for tokens, it, v in r.curve)
    guard.write_text(os.path.join(exp_dir, "curves.csv"), text.getvalue())


# -----------------------------------------------------------------------------
# plots


def pyplot():
    """matplotlib.pyplot drawing to files, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(runs, points, models, exp_dir):
    """curves.png and gaps.png, or for a sweep sweep.png, and expert_load_<run>.png for the first seed of each
    MoE variant; the names of the files written ([] without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return []
    if len(points) > 1:
        figures = [("sweep.png", plot_sweep(plt, runs, points, models))]
    else:  # one sweep point: its runs' curves
        done = [r for r in runs if r.done]
        figures = [("curves.png", plot_curves(plt, done, models)), ("gaps.png", plot_gaps(plt, done))]
    written = []
    for filename, fig in figures:
        if fig.axes[0].lines or fig.axes[0].containers:  # something was drawn
            fig.axes[0].legend()
            fig.tight_layout()
            save_figure(fig, os.path.join(exp_dir, filename))
            written.append(filename)
        plt.close(fig)
    first_seeds = {}  # MoE variant -> its first run with routing records
    for run in sorted(runs, key=lambda r: r.seed):
        if run.model == "moe" and run.routing:
            first_seeds.setdefault(run.label, run)
    for run in first_seeds.values():
        name = os.path.basename(run.out_dir)
        filename = f"expert_load_{name}.png"
        fig = plot_expert_load(plt, run.routing, name)
        save_figure(fig, os.path.join(exp_dir, filename))
        plt.close(fig)
        written.append(filename)
    return written


def band(ax, curves, label):
    """Mean line and min-max band over seeds of curves [[(tokens, value)]] sharing their x."""
    n = min(len(c) for c in curves)
    xs = [curves[0][i][0] for i in range(n)]
    ys = [[c[i][1] for c in curves] for i in range(n)]
    ax.plot(xs, [statistics.mean(y) for y in ys], label=label)
    if len(curves) > 1:
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.25)


def plot_curves(plt, runs, models):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in models:
        curves = [[(tokens, v) for tokens, it, v in r.curve if it > 0] for r in runs if r.model == model]
        if curves:
            band(ax, curves, model)
    ax.set(xlabel="training tokens", ylabel="validation loss", title="Validation loss (band: min-max over seeds)")
    return fig


def plot_gaps(plt, runs):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, a, b in GAPS:
        curves = []
        for run_a, run_b in pairs_by_seed(runs, a, b):
            val_b = {it: v for _, it, v in run_b.curve}
            curves.append([(tokens, v - val_b[it]) for tokens, it, v in run_a.curve if it > 0 and it in val_b])
        if curves:
            band(ax, curves, name)
    if ax.lines:
        ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="training tokens", ylabel="validation loss gap", title="Gaps (positive: the first model is worse)")
    return fig


def plot_sweep(plt, runs, points, models):
    """Best validation loss against the first swept key: one line per model and per value of the other keys."""
    keys = list(points[0])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}
    for point in points:
        for model in models:
            values = [r.best for r in runs if r.point == point and r.model == model and r.done]
            if values:
                rest = ",".join(f"{k}={point[k]}" for k in keys[1:])
                lines.setdefault(" ".join(filter(None, [model, rest])), []).append(
                    (point[keys[0]], statistics.mean(values), min(values), max(values)))
    numeric = all(isinstance(p[keys[0]], (int, float)) for p in points)
    for label, marks in lines.items():
        xs = [x if numeric else str(x) for x, *_ in marks]
        ax.errorbar(xs, [mean for _, mean, _, _ in marks], marker="o", capsize=3, label=label,
                    yerr=[[mean - lo for _, mean, lo, _ in marks], [hi - mean for _, mean, _, hi in marks]])
    if numeric and all(p[keys[0]] > 0 for p in points):
        ax.set_xscale("log", base=2)
    ax.set(xlabel=keys[0], ylabel="best validation loss", title="Sweep (bars: min-max over seeds)")
    return fig


# -----------------------------------------------------------------------------
# expert load


def routing_history(log):
    """[(iteration, routing)] of a run's evaluations, routing being the per-layer summaries
    (train.routing_summary) its metrics.jsonl records hold; [] for a dense run."""
    return [(r["iter"], r["routing"]) for r in log if r.get("routing")]


def plot_expert_load(plt, history, title):
    """Per MoE layer, a heatmap of each expert's share of the routed slots against the training step, white
    at the balanced 1/E, red above, blue below; then each layer's coefficient of variation of the load."""
    from matplotlib.colors import TwoSlopeNorm

    iters = [it for it, _ in history]
    n_layers, n_experts = len(history[0][1]), len(history[0][1][0]["load"])
    # cell edges halfway between evaluations, so that uneven intervals (the last one) draw true to scale
    middles = [(a + b) / 2 for a, b in zip(iters, iters[1:])]
    edges = [2 * iters[0] - middles[0], *middles, 2 * iters[-1] - middles[-1]] if middles else \
        [iters[0] - 0.5, iters[0] + 0.5]
    loads = [[[routing[layer]["load"][e] for _, routing in history] for e in range(n_experts)]
             for layer in range(n_layers)]  # per layer (E, evaluations)
    highest = max(max(max(row) for row in load) for load in loads)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1 / n_experts, vmax=max(highest, 2 / n_experts))
    fig, axes = plt.subplots(n_layers + 1, 1, sharex=True, layout="constrained",
                             figsize=(8, 1.0 + (n_layers + 1) * (1.0 + 0.03 * n_experts)))
    for layer, (ax, load) in enumerate(zip(axes, loads)):
        mesh = ax.pcolormesh(edges, [e - 0.5 for e in range(n_experts + 1)], load, cmap="RdBu_r", norm=norm)
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(range(n_experts) if n_experts <= 16 else range(0, n_experts, n_experts // 8))
    fig.colorbar(mesh, ax=axes, label=f"share of slots (1/E = {1 / n_experts:.3f})", shrink=0.8)
    for layer in range(n_layers):
        axes[-1].plot(iters, [routing[layer]["cv"] for _, routing in history], marker=".", label=f"layer {layer}")
    axes[-1].set(xlabel="training step", ylabel="load cv")
    axes[-1].legend(fontsize="small", ncol=min(n_layers, 4))
    fig.suptitle(f"Expert load of {title} (validation batches at each evaluation)")
    return fig


def write_expert_load(run_dir):
    """run_dir/expert_load.png from run_dir/metrics.jsonl (experiment.py --plot_run); return its path."""
    log_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(log_path):
        raise UserError(f"no metrics.jsonl in {run_dir}: --plot_run takes the out_dir of a train.py run")
    history = routing_history(read_log(log_path))
    if not history:
        raise UserError(f"{log_path} has no routing records: a dense run, or one not evaluated yet")
    plt = pyplot()
    if plt is None:
        raise UserError("--plot_run draws with matplotlib: pip install matplotlib")
    fig = plot_expert_load(plt, history, os.path.basename(os.path.normpath(run_dir)))
    path = os.path.join(run_dir, "expert_load.png")
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_figure(fig, path):
    """A PNG, through guard.write_file (a plot half written by a kill is never left)."""
    guard.write_file(path, lambda f: fig.savefig(f, format="png", dpi=120))


def main(argv):
    """As a command, report.py only answers --help (its docstring; so does a bare `python report.py`); anything
    else is refused with the same hint."""
    if not argv or "-h" in argv or "--help" in argv:
        print_help(__doc__.strip())
        return
    sys.exit("error: report.py is not run by itself: experiment.py writes the report (`python experiment.py "
             "CONFIG --report_only=True` rewrites it from finished runs; `python experiment.py --help`)")


if __name__ == "__main__":
    guard.run_main(main)

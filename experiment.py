"""
The dense-vs-MoE protocol: for each seed, train an MoE config and its dense baselines matched to
its active and its total parameters (everything else equal, the same data order for the same seed),
then write out/<name>/report.md with tables, curves.png and gaps.png.

    python experiment.py config/moe_e4k2.py --seeds=3
    python experiment.py config/cpu_moe.py --seeds=3 --max_iters=1500 --name=cpu_trio
    python experiment.py config/moe_e4k2.py --sweep="n_experts=4,8,16,32"        # active params held
    python experiment.py config/moe_e4k2.py --sweep="top_k=1,2,4" --match=active  # + dense-active each
    python experiment.py config/cpu_moe.py --sweep="max_iters=500,1000,2000" --match=both  # tokens/param
    python experiment.py config/cpu_moe.py --sweep="n_experts=4,8;top_k=1,2"      # a grid

Runs go to out/<name>/<model>-s<seed>/ (with any sweep values in the name); finished runs are
skipped and interrupted ones resumed, so the same command continues an experiment. Any train.py
knob can be given too (--max_iters=..., --device=...): it applies to every run.
"""

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import train
from configurator import UserError, configure

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
name = ""  # out/<name>/ holds the runs and the report; default: the config file's name (+ the sweep)
seeds = 3  # runs per model, with seeds seed, seed + 1, ...
sweep = ""  # MoE variants to train: "key=v1,v2" or a grid "key=v1,v2;key2=w1,w2"
match = ""  # dense baselines beside each MoE: "both", "active", "total", "none"; default: both, or none in a sweep
hold_active = True  # in a sweep over top_k, rescale expert_hidden so that top_k * expert_hidden stays the same
jobs = 1  # runs at once; on CPU each gets cpu_count / jobs threads
report_only = False  # only rewrite the report from the runs already in out/<name>/
# -----------------------------------------------------------------------------
EXPERIMENT_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
                   and isinstance(v, (int, float, bool, str))]
BASELINES = {"both": ["dense-active", "dense-total"], "active": ["dense-active"], "total": ["dense-total"], "none": []}
# best validation loss over 3 seeds in the tiny-scale dense-vs-sparse study (TinyStories, < 25M parameters)
PUBLISHED = {"dense-active": (1.6545, 0.0012), "moe": (1.5788, 0.0020), "dense-total": (1.5608, 0.0025)}
GAPS = (("dense-active - moe", "dense-active", "moe"), ("moe - dense-total", "moe", "dense-total"))  # name, a, b


def parse_sweep(text, defaults):
    """'a=1,2;b=x' -> [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}], each value parsed and checked as the
    configurator parses --key=value (so a misspelt key or a wrong type stops here, not mid-experiment)."""
    if not text:
        return [{}]
    axes = []
    for part in text.split(";"):
        key, eq, values = part.partition("=")
        if not eq or not values:
            raise UserError(f"sweep expects key=v1,v2[;key2=w1,w2], got {part!r}")
        key = key.strip()
        axes.append([(key, configure([f"--{key}={v.strip()}"], defaults)[key]) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)]


def point_label(point):
    return ",".join(f"{k}={v}" for k, v in point.items())


def plan(cfg, train_args, exp_dir):
    """The runs of the experiment: a list of namespaces (label, model, point, seed, out_dir, args)."""
    points = parse_sweep(cfg.sweep, vars(cfg))
    baselines = BASELINES[cfg.match or ("none" if cfg.sweep else "both")]
    runs = []
    for point in points:
        overrides = dict(point)
        if cfg.hold_active and "top_k" in point and "expert_hidden" not in point:
            base = configured_model(cfg)
            overrides["expert_hidden"] = max(1, round(base.top_k * base.expert_hidden / point["top_k"]))
        for i in range(cfg.seeds):  # seed by seed, so that a partial experiment already has whole trios
            seed = cfg.seed + i
            for model in ["moe", *baselines]:
                label = "-".join(filter(None, [model, point_label(point).replace(",", "-")]))
                out_dir = os.path.join(exp_dir, f"{label}-s{seed}")
                args = [*train_args, *(f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}"
                                       for k, v in overrides.items()),
                        f"--seed={seed}", f"--out_dir={out_dir}",
                        f"--match={match_of(model)}"]
                runs.append(SimpleNamespace(label=label, model=model, point=point, seed=seed, out_dir=out_dir,
                                            args=args, overrides=overrides,
                                            max_iters=overrides.get("max_iters", cfg.max_iters)))
    return runs


def match_of(model):
    """train.py's --match for a model name: moe -> none, dense-active -> active, dense-total -> total."""
    return model.split("-")[1] if model != "moe" else "none"


def configured_model(cfg, match="none", **overrides):
    """The GPTConfig train.py builds from cfg with some keys overridden: the MoE, or with match
    its matched dense baseline (UserError if it cannot be built or matched)."""
    return train.model_configs(SimpleNamespace(**{**vars(cfg), **overrides, "match": match}))[1]


def read_log(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def finished(run):
    """Whether the run has evaluated at its last step (so a larger max_iters continues finished runs)."""
    return any("val_loss" in r and r["iter"] == run.max_iters for r in read_log(run.out_dir))


def command(run):
    resume = os.path.exists(os.path.join(run.out_dir, "ckpt.pt"))
    return [sys.executable, os.path.join(ROOT, "train.py"), *run.args,
            "--init_from=resume" if resume else "--overwrite=True"]


def execute(runs, jobs):
    """Run what is not finished yet, `jobs` at a time; a failed run stops the experiment."""
    todo = [r for r in runs if not finished(r)]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to go")
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            run = todo.pop(0)
            os.makedirs(run.out_dir, exist_ok=True)
            log = open(os.path.join(run.out_dir, "train.log"), "a")
            print(f"start {run.label} seed {run.seed}: {' '.join(command(run)[1:])}")
            running.append((run, subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT, env=env),
                            time.time()))
        time.sleep(1)
        for item in list(running):
            run, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                for _, other, _ in running:
                    other.terminate()
                tail = open(os.path.join(run.out_dir, "train.log")).read().strip().splitlines()[-1:]
                raise UserError(f"run {run.out_dir} failed ({tail[0] if tail else 'no output'}); fix it and run the "
                                f"same command again to continue")
            print(f"done  {run.label} seed {run.seed} in {time.time() - t0:.0f}s")


# -----------------------------------------------------------------------------
# the report


def run_versions(runs):
    return {r.start["code"] for r in runs if r.start and "code" in r.start}


def machine():
    import platform

    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def mean_std(values):
    """'mean +/- std' (sample std over seeds; just the value for one seed)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +/- {statistics.stdev(values):.4f}"


def collect(runs):
    """Per run: its log's start record, eval curve [(tokens, iter, val_loss)], best val loss, wall time."""
    for run in runs:
        log = read_log(run.out_dir)
        run.start = next((r for r in log if r.get("event") == "start"), None)
        run.curve = [(r["tokens"], r["iter"], r["val_loss"]) for r in log if "val_loss" in r]
        run.best = min((v for _, _, v in run.curve), default=None)
        run.done = finished(run)
        times = [r["time"] for r in log if "time" in r]
        run.seconds = times[-1] - times[0] if times else 0.0
    return runs


def param_rows(runs):
    """Markdown rows: one per model of each sweep point, from the runs' own start records."""
    rows, seen = [], set()
    for run in runs:
        if run.start is None or run.label in seen:
            continue
        seen.add(run.label)
        args, p = run.start["model_args"], run.start["params"]
        moe = next((r for r in runs if r.model == "moe" and r.point == run.point and r.start), None)
        mismatch = ""
        if run.model != "moe" and moe is not None:
            goal = moe.start["params"][run.model.split("-")[1]]
            mismatch = f"{(p['total'] - goal) / goal:+.3%}"
        ffn = (f"{args['n_experts']}x{args['expert_hidden']}" if args["n_experts"] and not args["expert_groups"]
               else args["expert_groups"] or args["ffn_hidden"])
        routing = f"top-{args['top_k']}, router {args['n_experts'] * args['n_embd'] * args['n_layer']:,}" \
            if args["n_experts"] else "-"
        rows.append(f"| {run.label} | {args['n_layer']} x {args['n_embd']} | {ffn} | {routing} | {p['total']:,} | "
                    f"{round(p['active']):,} | {p['embedding']:,} | {mismatch} |")
    return rows


def value_at(curve, iter_num):
    return next((v for _, it, v in curve if it == iter_num), None)


def write_report(cfg, runs, exp_dir, wall_s, argv):
    points = parse_sweep(cfg.sweep, vars(cfg))
    models = list(dict.fromkeys(r.model for r in runs))
    lines = [f"# Experiment {os.path.basename(exp_dir)}", "",
             f"Command: `python experiment.py {' '.join(a for a in argv if not a.startswith('--report_only'))}`",
             "", f"Code: runs at {', '.join(sorted(run_versions(runs))) or 'an unrecorded version'}; report at "
             f"{train.code_version()}. Machine: {machine()}.", ""]
    any_start = next((r.start for r in runs if r.start), None)
    if any_start:
        c = any_start["config"]
        lines += [f"Data: `{c['dataset']}` ({os.path.join(c['data_root'], c['dataset'])}); "
                  f"{c['max_iters']} steps of {c['gradient_accumulation_steps'] * c['batch_size']} x "
                  f"{c['block_size']} tokens; lr {c['learning_rate']} -> {c['min_lr']}, warmup {c['warmup_iters']}; "
                  f"evaluation every {c['eval_interval']} steps on {c['eval_iters']} fixed validation batches.",
                  f"Seeds: {', '.join(str(cfg.seed + i) for i in range(cfg.seeds))}. "
                  f"Runs finished: {sum(r.done for r in runs)} of {len(runs)}, {cfg.jobs} at a time; "
                  f"{sum(r.seconds for r in runs) / 60:.1f} min of training summed over runs"
                  + ("." if cfg.report_only else f"; this invocation took {wall_s / 60:.1f} min."), ""]
    lines += ["## Models", "",
              "Active = parameters one token uses: embeddings, attention, norms, the router (counted as active: "
              "every token uses all of it) and top_k of the n_experts experts. Mismatch: a dense model's total "
              "against the MoE's active or total count.", "",
              "| model | layers x width | FFN / experts | routing | total | active | embedding | mismatch |",
              "|---|---|---|---|---:|---:|---:|---:|", *param_rows(runs), ""]
    for point in points:
        prs = [r for r in runs if r.point == point]
        title = f" ({point_label(point)})" if point else ""
        lines += [f"## Best validation loss{title}", "", "| model | best val loss (mean +/- std over seeds) | seeds |",
                  "|---|---|---:|"]
        for m in models:
            vals = [r.best for r in prs if r.model == m and r.done]
            lines.append(f"| {m} | {mean_std(vals)} | {len(vals)} |")
        lines += [""] + gap_lines(prs)
    if cfg.sweep:
        lines += sweep_lines(runs, points, models)
    elif set(PUBLISHED) <= set(models):
        lines += ordering_lines(runs)
    plots = write_plots(runs, points, models, exp_dir)
    lines += [f"![{p}]({p})" for p in plots] or ["(matplotlib is not installed: no plots; curves.csv has the data)"]
    write_csv(runs, exp_dir)
    lines += ["", "All numbers above come from the runs' own metrics.jsonl files; curves.csv has every evaluation."]
    with open(os.path.join(exp_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(exp_dir, "report.md")


def paired_gaps(prs):
    """{'dense-active - moe': [per seed], 'moe - dense-total': [...]} from finished runs, paired by seed."""
    best = {(r.model, r.seed): r.best for r in prs if r.done}
    gaps = {}
    for name, a, b in GAPS:
        seeds_ok = sorted(s for (m, s) in best if m == a and (b, s) in best)
        if seeds_ok:
            gaps[name] = [best[(a, s)] - best[(b, s)] for s in seeds_ok]
    return gaps


def gap_lines(prs):
    gaps = paired_gaps(prs)
    if not gaps:
        return []
    lines = ["Gaps in best validation loss, paired by seed (positive: the first model is worse):", ""]
    lines += [f"- {name}: {mean_std(v)} ({len(v)} seeds)" for name, v in gaps.items()]
    # the gaps at several points of training, from the val loss at those evaluations
    moe_runs = [r for r in prs if r.model == "moe" and r.done]
    if moe_runs:
        iters = [it for _, it, _ in moe_runs[0].curve]
        marks = sorted({min(iters, key=lambda it: abs(it - f * iters[-1])) for f in (0.25, 0.5, 0.75, 1.0)})
        header = "| gap | " + " | ".join(f"step {it}" for it in marks) + " |"
        lines += ["", "The gaps in validation loss over training (mean +/- std over seeds):", "", header,
                  "|---|" + "---|" * len(marks)]
        for name, a, b in GAPS:
            if name not in gaps:
                continue
            cells = []
            for it in marks:
                vals = []
                for s in sorted({r.seed for r in prs}):
                    ra = next((r for r in prs if r.model == a and r.seed == s and r.done), None)
                    rb = next((r for r in prs if r.model == b and r.seed == s and r.done), None)
                    if ra and rb and value_at(ra.curve, it) is not None and value_at(rb.curve, it) is not None:
                        vals.append(value_at(ra.curve, it) - value_at(rb.curve, it))
                cells.append(mean_std(vals))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
            f"Published (TinyStories, under 25M parameters, 3 seeds; best validation loss): {published}.", "",
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
    with open(os.path.join(exp_dir, "curves.csv"), "w") as f:
        f.write("model,point,seed,iter,tokens,val_loss\n")
        for r in runs:
            for tokens, it, v in r.curve:
                f.write(f"{r.model},\"{point_label(r.point)}\",{r.seed},{it},{tokens},{v}\n")


def write_plots(runs, points, models, exp_dir):
    """curves.png and gaps.png (and sweep.png for a sweep); [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def band(ax, curves, label):
        """Mean line and min-max band over seeds of curves [[(tokens, value)]] sharing their x."""
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ys = [[c[i][1] for c in curves] for i in range(n)]
        ax.plot(xs, [statistics.mean(y) for y in ys], label=label)
        if len(curves) > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.25)

    def save(fig, ax, filename, **labels):
        if ax.lines or ax.containers:  # something was drawn
            ax.set(**labels)
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(exp_dir, filename), dpi=120)
            written.append(filename)
        plt.close(fig)

    point = points[0] if len(points) == 1 else None
    if point is not None:
        prs = [r for r in runs if r.point == point and r.done]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in models:
            curves = [[(t, v) for t, it, v in r.curve if it > 0] for r in prs if r.model == m]
            if curves:
                band(ax, curves, m)
        save(fig, ax, "curves.png", xlabel="training tokens", ylabel="validation loss",
             title="Validation loss (band: min-max over seeds)")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, a, b in GAPS:
            curves = []
            for s in sorted({r.seed for r in prs}):
                ra = next((r for r in prs if r.model == a and r.seed == s), None)
                rb = next((r for r in prs if r.model == b and r.seed == s), None)
                if ra and rb:
                    vb = {it: v for _, it, v in rb.curve}
                    curves.append([(t, v - vb[it]) for t, it, v in ra.curve if it > 0 and it in vb])
            if curves:
                band(ax, curves, name)
        if ax.lines:
            ax.axhline(0, color="gray", lw=0.8)
        save(fig, ax, "gaps.png", xlabel="training tokens", ylabel="validation loss gap",
             title="Gaps (positive: the first model is worse)")
    else:
        keys = list(points[0])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups = {}
        for p in points:  # one line per model and per value of the other keys, against the first key
            for m in models:
                vals = [r.best for r in runs if r.point == p and r.model == m and r.done]
                if vals:
                    rest = ",".join(f"{k}={p[k]}" for k in keys[1:])
                    groups.setdefault(" ".join(filter(None, [m, rest])), []).append(
                        (p[keys[0]], statistics.mean(vals), min(vals), max(vals)))
        numeric = all(isinstance(p[keys[0]], (int, float)) for p in points)
        for label, pts in groups.items():
            xs = [x if numeric else str(x) for x, *_ in pts]
            ax.errorbar(xs, [m for _, m, _, _ in pts], yerr=[[m - lo for _, m, lo, _ in pts],
                                                             [hi - m for _, m, _, hi in pts]], marker="o",
                        capsize=3, label=label)
        if numeric and all(p[keys[0]] > 0 for p in points):
            ax.set_xscale("log", base=2)
        save(fig, ax, "sweep.png", xlabel=keys[0], ylabel="best validation loss",
             title="Sweep (bars: min-max over seeds)")
    return written


# -----------------------------------------------------------------------------


def main(argv):
    try:
        defaults = {**train.defaults(), **{k: globals()[k] for k in EXPERIMENT_KEYS}}
        cfg = SimpleNamespace(**configure(argv, defaults))
        if cfg.match not in ("", *BASELINES):
            raise UserError(f"match must be one of both, active, total, none; got {cfg.match!r}")
        if cfg.seeds < 1 or cfg.jobs < 1:
            raise UserError("seeds and jobs must be at least 1")
        files = [a for a in argv if not a.startswith("--")]
        exp_name = cfg.name or "_".join(filter(None, [os.path.splitext(os.path.basename(files[0]))[0] if files
                                                      else "default", point_label_safe(cfg.sweep)]))
        exp_dir = os.path.join("out", exp_name)
        # every run gets the config files and the train.py knobs given here, plus its own overrides
        train_args = files + [a for a in argv if a.startswith("--") and a[2:].split("=")[0] not in EXPERIMENT_KEYS
                              and a[2:].split("=")[0] not in ("out_dir", "seed", "match", "init_from", "overwrite")]
        if cfg.vocab_size == 0:
            cfg.vocab_size = train.load_meta(os.path.join(cfg.data_root, cfg.dataset), cfg.dataset)["vocab_size"]
        runs = plan(cfg, train_args, exp_dir)
        for r in runs:  # every variant must be a valid model that can be matched, before any training
            configured_model(cfg, match_of(r.model), **r.overrides)
        t0 = time.time()
        if not cfg.report_only:
            execute(runs, cfg.jobs)
        report = write_report(cfg, collect(runs), exp_dir, time.time() - t0, argv)
        print(f"report: {report}")
    except UserError as e:
        sys.exit(f"error: {e}")


def point_label_safe(sweep_text):
    return sweep_text.replace(";", "_").replace("=", "").replace(",", "-")


if __name__ == "__main__":
    main(sys.argv[1:])

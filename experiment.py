"""
The dense-vs-MoE protocol: for each seed, train an MoE config and its dense baselines matched to
its active and its total parameters (everything else equal, the same data order for the same seed),
then write out/<name>/report.md with tables, curves.png and gaps.png (report.py renders them).

    python experiment.py config/moe_e4k2.py --seeds=3
    python experiment.py config/cpu_moe.py --seeds=3 --max_iters=1500 --name=cpu_trio
    python experiment.py config/moe_e4k2.py --sweep="n_experts=4,8,16,32"        # active params held
    python experiment.py config/moe_e4k2.py --sweep="top_k=1,2,4" --match=active  # + dense-active each
    python experiment.py config/cpu_moe.py --sweep="max_iters=500,1000,2000" --match=both  # tokens/param
    python experiment.py config/cpu_moe.py --sweep="n_experts=4,8;top_k=1,2"      # a grid
    python experiment.py --plot_run=out/cpu_moe      # one run's expert load: out/cpu_moe/expert_load.png

Runs go to out/<name>/<model>-s<seed>/ (with any sweep values in the name; out/ in the current
directory), each with its train.log; finished runs are skipped and interrupted ones resumed, so the same
command continues an experiment. Progress and the time left are printed at least every minute. Any train.py
knob can be given too (--max_iters=..., --device=...; `python train.py --help` lists them): it applies to
every run; out_dir, init_from, overwrite and dry_run are the experiment's to set, and refused.

Each run folder records the settings that made it (the start record of its metrics.jsonl). Running the same
--name again with different settings is refused, naming the knob, rather than reporting the old runs as the
new: of the settings, only max_iters may differ, and only upwards (a larger max_iters continues finished
runs), and so may the knobs that change how a run is carried out but not what it learns: RUN_FREE_KEYS.
"""

import guard  # isort: skip  (first: from here on a Ctrl-C or SIGTERM exits quietly, never a traceback)

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import train
from configurator import UserError, check, check_choice, configure, overrides, print_help, usage
from prepare import PLAIN_NAME
from report import point_label, routing_history, write_expert_load, write_report
from runtime import ROOT, duration, job_env, read_log

# -----------------------------------------------------------------------------
name = ""  # out/<name>/ holds the runs and the report; default: the config file's name (+ the sweep)
seeds = 3  # runs per model (at least 1), with seeds seed, seed + 1, ... (each below 2**63)
sweep = ""  # MoE variants to train: "key=v1,v2" or a grid "key=v1,v2;key2=w1,w2"
match = ""  # dense baselines beside each MoE: "both", "active", "total", "none"; default: both, or none in a sweep
hold_active = True  # in a sweep over top_k, rescale expert_hidden so that top_k * expert_hidden stays the same
jobs = 1  # runs at once (at least 1); on CPU each gets cpu_count / jobs threads
report_only = False  # only rewrite the report from the runs already in out/<name>/
plot_run = ""  # only draw one train.py run's expert load: --plot_run=out/cpu_moe writes out/cpu_moe/expert_load.png
# -----------------------------------------------------------------------------
EXPERIMENT_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
                   and isinstance(v, (int, float, bool, str))]
PROGRESS_SECONDS = 60  # while runs go, a progress line at least this often
BASELINES = {"both": ["dense-active", "dense-total"], "active": ["dense-active"], "total": ["dense-total"], "none": []}


def check_knobs(cfg, points):
    """The valid range of every knob above, and of train.py's knobs at every sweep point (the models
    themselves are checked by plan's caller), before any run starts."""
    check_choice("match", cfg.match or "both", BASELINES)
    check(cfg.seeds >= 1, f"seeds must be at least 1, got {cfg.seeds}")
    check(cfg.jobs >= 1, f"jobs must be at least 1, got {cfg.jobs}")
    check(not cfg.name or re.fullmatch(PLAIN_NAME, cfg.name),  # out/<name> must stay in out/
          f"name must be a plain folder name (letters, digits, '.', '_', '-'), got {cfg.name!r}")
    for point in points:  # match is the experiment's own knob here: plan gives each run train.py's
        train.check_knobs(SimpleNamespace(**{**vars(cfg), **point, "match": "none"}))
    check(cfg.seed + cfg.seeds <= 2**63, f"seed + seeds must not pass 2**63 (the seeds are seed .. seed + seeds - 1), "
                                         f"got seed={cfg.seed}, seeds={cfg.seeds}")


@dataclass(frozen=True)
class Run:
    """One training run of the experiment: planned by plan(), its results read back by collect()."""
    label: str  # the model and the sweep point: its folder is out/<name>/<label>-s<seed>
    model: str  # "moe", "dense-active" or "dense-total"
    point: dict  # the swept keys' values ({} outside a sweep)
    seed: int
    out_dir: str
    args: list  # train.py's arguments
    overrides: dict  # keys this run sets beyond the common ones: the sweep point, a rescaled expert_hidden
    max_iters: int
    # from the run's metrics.jsonl, by collect()
    start: dict | None = None  # the start record: config, model_args, params, code version
    curve: list = field(default_factory=list)  # [(tokens, iter, val_loss)] at every evaluation
    routing: list = field(default_factory=list)  # [(iter, per-layer routing summaries)] at every evaluation
    best: float | None = None  # best validation loss
    done: bool = False  # evaluated at its last step (max_iters)
    seconds: float = 0.0  # from the first log record to the last


REFUSED_KEYS = ("out_dir", "init_from", "overwrite", "dry_run")  # train.py knobs that plan() sets for each run
# train.py knobs that change how a run is carried out, not what it learns: a rerun may change them
RUN_FREE_KEYS = ("out_dir", "init_from", "overwrite", "data_root", "device", "dtype", "compile", "log_interval",
                 "max_bad_steps", "dry_run")


def set_keys(argv, defaults):
    """The keys that argv's config files and --key=value arguments set."""
    return set(overrides(argv, defaults))


def settings(args):
    """The train.py config that a run's arguments make, as its metrics.jsonl records it (JSON: tuples as lists)."""
    return json.loads(json.dumps(configure(args, train.defaults())))


def check_recorded(runs, exp_dir):
    """Refuse to take a run folder made with other settings for one of these runs: which knob differs, and how
    to start fresh. max_iters may grow (a finished run continues), never fall below what a run has trained."""
    for run in runs:
        start = next((r for r in run_log(run) if r.get("event") == "start"), None) if os.path.isdir(run.out_dir) \
            else None
        if start is None or not isinstance(start.get("config"), dict):
            continue
        recorded, wanted = start["config"], settings(run.args)
        differ = [k for k in wanted if k not in RUN_FREE_KEYS and k != "max_iters" and k in recorded
                  and recorded[k] != wanted[k] and not (k == "vocab_size" and wanted[k] == 0)]  # 0: the dataset's
        fresh = f"give this experiment another --name, or delete {exp_dir} to retrain it"
        check(not differ, f"{run.out_dir} was trained with "
                          f"{', '.join(f'{k}={recorded[k]!r}' for k in differ)}, not "
                          f"{', '.join(f'{k}={wanted[k]!r}' for k in differ)}: {fresh}")
        check(run.max_iters >= logged_iter(run), f"{run.out_dir} has trained {logged_iter(run)} iterations, more "
                                                 f"than max_iters={run.max_iters}: max_iters may grow, not shrink; "
                                                 f"{fresh}")


def parse_sweep(text, defaults):
    """'a=1,2;b=x' -> [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}], each value parsed and checked as the
    configurator parses --key=value (so a misspelt key or a wrong type stops here, not mid-experiment)."""
    if not text:
        return [{}]
    axes = []
    for part in text.split(";"):
        key, eq, values = part.partition("=")
        if not eq or not values or not key.strip():
            raise UserError(f"sweep expects key=v1,v2[;key2=w1,w2], got {part!r}")
        key = key.strip()
        check(key not in [axis[0][0] for axis in axes], f"sweep sets {key} twice: give its values once, "
                                                        f"comma-separated")
        axis = [(key, configure([f"--{key}={v.strip()}"], defaults)[key]) for v in values.split(",")]
        check(key in train.defaults() and key not in (*REFUSED_KEYS, "seed", "match"),
              f"sweep over {key!r}: only train.py's knobs can be swept, and not out_dir, init_from, overwrite, "
              f"dry_run, seed (use --seeds) or match (use --match)")
        same = [v for i, (_, v) in enumerate(axis) if v in [w for _, w in axis[:i]]]
        if same:
            raise UserError(f"sweep gives {key}={same[0]!r} twice: each point once")
        axes.append(axis)
    return [dict(point) for point in itertools.product(*axes)]


def plan(cfg, points, train_args, exp_dir):
    """The runs of the experiment, seed by seed, so that a partial experiment already has whole trios."""
    baselines = BASELINES[cfg.match or ("none" if cfg.sweep else "both")]
    runs = []
    for point in points:
        overrides = dict(point)
        if cfg.hold_active and "top_k" in point and "expert_hidden" not in point:
            base = configured_model(cfg)
            overrides["expert_hidden"] = max(1, round(base.top_k * base.expert_hidden / point["top_k"]))
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            for model in ["moe", *baselines]:
                label = "-".join(filter(None, [model, point_label(point).replace(",", "-")]))
                out_dir = os.path.join(exp_dir, f"{label}-s{seed}")
                args = [*train_args, *(f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}"
                                       for k, v in overrides.items()),
                        f"--seed={seed}", f"--out_dir={out_dir}", f"--match={match_of(model)}"]
                runs.append(Run(label=label, model=model, point=point, seed=seed, out_dir=out_dir, args=args,
                                overrides=overrides, max_iters=overrides.get("max_iters", cfg.max_iters)))
    return runs


def match_of(model):
    """train.py's --match for a model name: moe -> none, dense-active -> active, dense-total -> total."""
    return model.split("-")[1] if model != "moe" else "none"


def configured_model(cfg, match="none", **overrides):
    """The GPTConfig train.py builds from cfg with some keys overridden: the MoE, or with match
    its matched dense baseline (UserError if it cannot be built or matched)."""
    return train.model_configs(SimpleNamespace(**{**vars(cfg), **overrides, "match": match}))[1]


def run_log(run):
    return read_log(os.path.join(run.out_dir, "metrics.jsonl"))


def logged_iter(run):
    """The last iteration the run has logged (0 before it starts); read while the run may be writing, so a
    record only partly written does not count."""
    path = os.path.join(run.out_dir, "metrics.jsonl")
    text = open(path).read() if os.path.exists(path) else ""
    return max(map(int, re.findall(r'"iter": (\d+)[,}]', text)), default=0)


def finished(run):
    """Whether the run has evaluated at its last step (so a larger max_iters continues finished runs)."""
    return any("val_loss" in r and r["iter"] == run.max_iters for r in run_log(run))


def command(run):
    resume = os.path.exists(os.path.join(run.out_dir, "ckpt.pt"))
    return [sys.executable, os.path.join(ROOT, "train.py"), *run.args,
            "--init_from=resume" if resume else "--overwrite=True"]


def execute(runs, jobs):
    """Run what is not finished yet, `jobs` at a time, printing progress and the time left; a failed run stops
    the experiment. The runs are started in their own session, so that a Ctrl-C reaches them once, from here:
    on Ctrl-C each running run gets one SIGINT and is waited for while it writes its checkpoint (a second
    Ctrl-C stops them at once)."""
    running = []  # (run, process, start time)
    try:
        run_pending(runs, jobs, running)
    except BaseException as e:  # a Ctrl-C, SIGTERM (run_main makes it one), a failed run, a closed stdout...
        stop_runs([proc for _, proc, _ in running])  # ...leaves no training running
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt("the runs in progress stopped with a checkpoint: run the same command again "
                                    "to continue") from None
        raise


def run_pending(runs, jobs, running):
    """execute()'s loop; `running` holds the runs in progress."""
    todo = [r for r in runs if not finished(r)]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to go")
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    first = {r.out_dir: logged_iter(r) for r in todo}  # where each run starts (a resumed one, past 0)
    total = sum(r.max_iters - first[r.out_dir] for r in todo)  # optimizer steps to run, in all
    done_steps, done_runs, t_start, t_said = 0, 0, time.time(), time.time()

    def standing():  # runs and steps done (those of the running runs too), and the time left
        steps = done_steps + sum(logged_iter(r) - first[r.out_dir] for r, _, _ in running)
        return progress(done_runs, len(todo), steps, total, time.time() - t_start)

    queue, log_start = list(todo), {}
    slots = {}  # out_dir of each running run -> its job slot (and so its GPU: runtime.job_env)
    while queue or running:
        while queue and len(running) < jobs:
            run = queue.pop(0)
            slots[run.out_dir] = min(set(range(jobs)) - {slots[r.out_dir] for r, _, _ in running})
            os.makedirs(run.out_dir, exist_ok=True)
            log = open(os.path.join(run.out_dir, "train.log"), "a")
            log_start[run.out_dir] = log.tell()  # a failure is reported from what this run wrote, not earlier ones
            print(f"start {run.label} seed {run.seed} ({len(todo) - len(queue)} of {len(todo)}, log in "
                  f"{run.out_dir}/train.log): {' '.join(command(run)[1:])}")
            running.append((run, subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT,
                                                  env=job_env(env, slots[run.out_dir], jobs),
                                                  start_new_session=True), time.time()))
        time.sleep(1)
        for item in list(running):
            run, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                stop_runs([other for _, other, _ in running])
                with open(os.path.join(run.out_dir, "train.log"), errors="replace") as f:
                    f.seek(log_start[run.out_dir])
                    tail = f.read().strip().splitlines()[-1:]
                said = tail[0] if tail else f"exit status {proc.returncode}, no output"
                raise UserError(f"run {run.out_dir} failed ({said}); fix it and run the same command again to "
                                f"continue")
            done_steps += run.max_iters - first[run.out_dir]
            done_runs += 1
            print(f"done  {run.label} seed {run.seed} in {duration(time.time() - t0)}; {standing()}")
            t_said = time.time()
        if running and time.time() - t_said >= PROGRESS_SECONDS:
            now = ", ".join(f"{r.label} seed {r.seed} at iteration {logged_iter(r)} of {r.max_iters}"
                            for r, _, _ in running)
            print(f"      {now}; {standing()}")
            t_said = time.time()


def progress(done_runs, n_runs, steps, total, seconds):
    """'2 of 6 runs done, 1,200 of 3,000 steps, about 4.5 min left': the time left at the pace so far."""
    left = f", about {duration(seconds / steps * (total - steps))} left" if 0 < steps < total else ""
    return f"{done_runs} of {n_runs} runs done, {steps:,} of {total:,} steps{left}"


def stop_runs(procs):
    """Stop training processes as a Ctrl-C would (each writes a checkpoint) and wait for them; a Ctrl-C while
    waiting passes on, and stops them at once."""
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        while proc.poll() is None:
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)


def collect(runs):
    """The runs with what their logs hold: start record, evaluation curve, best val loss, wall time."""
    collected = []
    for run in runs:
        log = run_log(run)
        curve = [(r["tokens"], r["iter"], r["val_loss"]) for r in log if "val_loss" in r]
        times = [r["time"] for r in log if "time" in r]
        collected.append(replace(run, start=next((r for r in log if r.get("event") == "start"), None), curve=curve,
                                 routing=routing_history(log), best=min((v for _, _, v in curve), default=None),
                                 done=finished(run), seconds=times[-1] - times[0] if times else 0.0))
    return collected


# -----------------------------------------------------------------------------


def main(argv):
    if "-h" in argv or "--help" in argv:
        print_help(usage(__doc__, {k: globals()[k] for k in EXPERIMENT_KEYS}, [__file__]))
        return
    sys.stdout.reconfigure(line_buffering=True)  # each line as it is printed, into a file or pipe too
    try:
        defaults = {**train.defaults(), **{k: globals()[k] for k in EXPERIMENT_KEYS}}
        cfg = SimpleNamespace(**configure(argv, defaults))
        if cfg.plot_run:
            print(f"expert load: {write_expert_load(cfg.plot_run)}")
            return
        files = [a for a in argv if not a.startswith("--")]
        sweep_name = cfg.sweep.replace(";", "_").replace("=", "").replace(",", "-")
        config_name = os.path.splitext(os.path.basename(files[0]))[0] if files else "default"
        exp_dir = os.path.join("out", cfg.name or "_".join(filter(None, [config_name, sweep_name])))
        # every run gets the config files and the train.py knobs given here, plus its own overrides
        refused = [k for k in REFUSED_KEYS if k in set_keys(argv, defaults)]
        if refused:
            raise UserError(f"{refused[0]} is set by experiment.py for each run (out/<name>/<run>, resumed when "
                            f"unfinished): leave it out, and name the experiment with --name")
        own_keys = (*EXPERIMENT_KEYS, "out_dir", "seed", "match", "init_from", "overwrite")
        train_args = files + [a for a in argv if a.startswith("--") and a[2:].split("=")[0] not in own_keys]
        points = parse_sweep(cfg.sweep, vars(cfg))
        check_knobs(cfg, points)
        runs = plan(cfg, points, train_args, exp_dir)
        for point in points:  # every point's dataset (a swept one too) must be there and fit its model
            at = SimpleNamespace(**{**vars(cfg), **point})
            data_dir = os.path.join(at.data_root, at.dataset)
            if at.vocab_size == 0:
                at.vocab_size = train.load_meta(data_dir, at.dataset)["vocab_size"]
            train.load_data(at.dataset, data_dir, configured_model(at), None)
        cfg.vocab_size = cfg.vocab_size or train.load_meta(os.path.join(cfg.data_root, cfg.dataset),
                                                           cfg.dataset)["vocab_size"]
        for r in runs:  # every variant must be a valid model that can be matched, before any training
            configured_model(cfg, match_of(r.model), **r.overrides)
        check_recorded(runs, exp_dir)
        t0 = time.time()
        if not cfg.report_only:
            execute(runs, cfg.jobs)
        print(f"report: {write_report(cfg, collect(runs), points, exp_dir, time.time() - t0, argv)}")
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    guard.run_main(main)

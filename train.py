"""
Train a dense or Mixture-of-Experts GPT on a dataset made by prepare.py.

    python train.py config/moe_e4k2.py                      # the MoE recipe on TinyStories
    python train.py config/moe_e4k2.py --match=active       # the dense model with its active params
    python train.py config/moe_e4k2.py --dry_run=True       # just the parameter table
    python train.py config/cpu_moe.py                       # a few minutes on a laptop CPU
    python train.py config/moe_e4k2.py --init_from=resume   # continue from out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=2 train.py config/moe_e4k2.py  # 2 processes (GPUs, or CPU with gloo)
    python train.py --help                                  # every knob, its default and what it does

Every knob below (and every GPTConfig field in model.py) can be set by a config file or --key=value.
Relative paths (config files, out_dir, data_root) are taken from the current directory.
"""

import guard  # isort: skip  (first: from here on a Ctrl-C or SIGTERM exits quietly, never a traceback)

import json
import math
import os
import re
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from configurator import UserError, check, check_choice, overrides, print_help, usage
from model import GPT, GPTConfig, count_params, flops_per_token, match_dense, model_fields
from moe_kernels import grouped_note
from prepare import CORPORA, PLAIN_NAME, encoding, load_spec
from report import flops_text, param_table
from runtime import (
    StopFlag,
    append_log,
    check_device,
    check_out_dir,
    code_version,
    compile_model,
    device_name,
    duration,
    end_processes,
    finite_state,
    keep_freed_memory,
    load_checkpoint,
    load_weights,
    out_dir_lock,
    peak_flops,
    print0,
    set_threads,
    setup_system,
    skips_on_device,
    truncate_log,
    use_compile,
    wrap_ddp,
    write_checkpoint,
    write_log,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
GPT2_VOCAB = 50257  # tokens of GPT-2's tokenizer, prepare.py's default

# -----------------------------------------------------------------------------
# config: defaults, overridden by config files and --key=value (see configurator.py)
# I/O
out_dir = "out"  # checkpoint (ckpt.pt) and metrics (metrics.jsonl) go here
data_root = "data"  # where prepare.py writes dataset folders
dataset = "tinystories"  # data_root/<dataset>/{train.bin, val.bin, meta.json}
init_from = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt)
overwrite = False  # let a fresh run replace the checkpoint of an earlier run in out_dir
eval_interval = 250  # iterations between evaluations (each also writes the checkpoint)
eval_iters = 50  # validation batches per evaluation, the same batches every time
log_interval = 10  # iterations between log lines
log_seconds = 30.0  # also a log line where one more step would leave this many seconds without one (0: never)
dry_run = False  # print the parameter table and exit
match = "none"  # "active" or "total": train the dense model matched to the configured MoE
# data
batch_size = 32  # sequences per micro-step, per process
gradient_accumulation_steps = 1  # micro-steps per optimizer step, over all processes (rounded up to a multiple)
# AdamW and schedule: linear warmup, then cosine decay to min_lr
learning_rate = 1e-3  # peak learning rate, reached after warmup_iters
max_iters = 5000  # optimizer steps
weight_decay = 0.1  # on matrices only
beta1 = 0.9  # AdamW's first-moment decay
beta2 = 0.95  # AdamW's second-moment decay
grad_clip = 1.0  # clip the global gradient norm to this; 0: no clipping
warmup_iters = 100  # >= max_iters is allowed, with a warning: the run ends before the full learning rate
lr_decay_iters = 0  # iterations of cosine decay; 0: max_iters; beyond max_iters: a warning, the run ends mid-decay
min_lr = 1e-4  # the learning rate at the end of the decay
max_bad_steps = 5  # stop after this many steps in a row with a non-finite loss or gradient
# system
device = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device like "cpu", "cuda:1"
dtype = "auto"  # "float32", "bfloat16" or "auto": bf16 on GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX
compile = "auto"  # torch.compile the model: "auto" (on for CUDA), "true" or "false"
seed = 1337  # model init and data order, from 0 to 2**63 - 1 (torch takes 64 bits; each process adds its rank)
threads = 0  # CPU threads of torch (torch.set_num_threads) in each process; 0: torch's default (OMP_NUM_THREADS)
# experiment tracking (nanoGPT's knobs): the records of metrics.jsonl, also sent to Weights & Biases
wandb_log = False  # needs `pip install wandb`; WANDB_MODE=offline keeps the run in out_dir/wandb, to sync later
wandb_project = "tinymoe"  # the W&B project
wandb_run_name = ""  # the W&B run's name; "": out_dir's folder name
# -----------------------------------------------------------------------------
TRAIN_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
              and isinstance(v, (int, float, bool, str))]


def defaults():
    """All config keys with their defaults: the model's (GPTConfig fields) and train.py's own."""
    return {**{f.name: f.default for f in fields(GPTConfig)}, **{k: globals()[k] for k in TRAIN_KEYS}}


def check_knobs(cfg):
    """The valid range of every knob above, checked before anything is read or written (the model's knobs:
    GPTConfig.validate, when the model is built from them)."""
    for name in ("out_dir", "data_root"):
        check(getattr(cfg, name) != "", f"{name} must name a folder")
    check(re.fullmatch(PLAIN_NAME, cfg.dataset),
          f"dataset must be the plain name of a folder in data_root (as prepare.py's --name), got {cfg.dataset!r}")
    check_choice("init_from", cfg.init_from, ("scratch", "resume"))
    check_choice("match", cfg.match, ("none", "active", "total"))
    check_choice("dtype", cfg.dtype, ("auto", "float32", "bfloat16"))
    check_choice("compile", cfg.compile.lower(), ("auto", "true", "false"))
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                 "max_bad_steps"):
        check(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "threads"):
        check(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "log_seconds"):
        check(0 <= getattr(cfg, name) < math.inf, f"{name} must be a finite number >= 0, got {getattr(cfg, name)}")
    check(cfg.min_lr <= cfg.learning_rate, f"min_lr ({cfg.min_lr}) must not exceed learning_rate ({cfg.learning_rate})")
    for name in ("beta1", "beta2"):
        check(0 <= getattr(cfg, name) < 1, f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    check(cfg.lr_decay_iters == 0 or cfg.lr_decay_iters >= cfg.warmup_iters,
          f"lr_decay_iters ({cfg.lr_decay_iters}) must be 0 (decay until max_iters) or at least warmup_iters "
          f"({cfg.warmup_iters})")
    check(0 <= cfg.seed < 2**63, f"seed must be a whole number from 0 to 2**63 - 1, got {cfg.seed}")
    check_device(cfg.device)
    if cfg.warmup_iters >= cfg.max_iters > 0:
        print0(f"warning: warmup_iters ({cfg.warmup_iters}) >= max_iters ({cfg.max_iters}): the learning rate never "
               f"reaches learning_rate")
    if cfg.lr_decay_iters > cfg.max_iters:
        print0(f"warning: lr_decay_iters ({cfg.lr_decay_iters}) > max_iters ({cfg.max_iters}): the run ends before "
               f"the learning rate has decayed to min_lr")


# what a resumed run takes from its checkpoint and may not change: the model and its matching, the data order,
# and the optimizer settings its state was made with. Every other knob may change on resume.
RUN_KEYS = (*model_fields(), "match", "seed", "weight_decay", "beta1", "beta2")


def resume_config(cfg, state, given, path):
    """Continue the checkpointed run: cfg takes its RUN_KEYS from the checkpoint (vocab_size as trained).
    given: the keys the user set by config files or --key=value (None: all); one of them that differs from
    the checkpoint is refused, as is vocab_size unless 0 (take the dataset's)."""
    run = {**state["config"], "vocab_size": state["model_args"]["vocab_size"]}
    changed = [k for k in RUN_KEYS if k in run and (given is None or k in given) and getattr(cfg, k) != run[k]
               and not (k == "vocab_size" and cfg.vocab_size == 0)]
    if changed:
        raise UserError(f"{path} was trained with {', '.join(f'{k}={run[k]!r}' for k in changed)}, not "
                        f"{', '.join(f'{k}={getattr(cfg, k)!r}' for k in changed)}: a resumed run keeps its model, "
                        f"match, seed and optimizer settings (leave them out, or start a new run in another out_dir)")
    for k in RUN_KEYS:
        if k in run:
            setattr(cfg, k, run[k])


@dataclass
class Progress:
    """Where training stands: with the weights, optimizer and data sampler, what a checkpoint needs to
    continue exactly."""
    iter_num: int = 0  # optimizer steps taken
    best_val_loss: float = float("inf")
    evaluated_iter: int = -1  # the last iteration whose evaluation was done and logged
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in all


# -----------------------------------------------------------------------------
# the models: the one to train, and the table of those involved


def resolve_models(cfg, data_dir, state):
    """(configured, trained, match, vocab_source): the configured GPTConfig, the one to train, the match knob
    and where vocab_size came from; on resume, the checkpointed run's (resume_config has put its keys in cfg)."""
    if state is not None:  # cfg holds the run's model keys (resume_config)
        configured, _ = model_configs(cfg)
        return configured, GPTConfig(**state["model_args"]), cfg.match, "the resumed run's"
    cfg.vocab_size, source = model_vocab(cfg, data_dir)
    configured, trained = model_configs(cfg)
    return configured, trained, cfg.match, source


def model_vocab(cfg, data_dir):
    """(vocab_size, where it comes from) of a fresh run: the config's vocab_size if set, else the dataset's.
    A dry run without the dataset counts with GPT-2's, prepare.py's default, so that the parameter table
    needs no download."""
    meta_path = os.path.join(data_dir, "meta.json")
    if cfg.vocab_size:
        return cfg.vocab_size, "set in the config or on the command line"
    if cfg.dry_run and not os.path.exists(meta_path):
        return GPT2_VOCAB, (f"GPT-2's tokenizer, as no dataset is at {data_dir} yet "
                            f"(--vocab_size=N counts with another)")
    return load_meta(data_dir, cfg.dataset)["vocab_size"], f"from {meta_path}"


def model_configs(cfg):
    """(configured, trained): the GPTConfig the keys describe, and the one to train, which is its
    matched dense baseline under --match=active|total."""
    try:
        configured = GPTConfig(**{k: getattr(cfg, k) for k in model_fields()})
        if cfg.match == "none":
            return configured, configured
        if configured.n_experts == 0:
            raise UserError(f"--match={cfg.match} needs an MoE config (n_experts > 0) to match")
        return configured, match_dense(configured, cfg.match)
    except ValueError as e:
        raise UserError(str(e)) from None


def models_involved(configured, match):
    """Rows of report.param_table: the configured MoE and its dense baselines matched to its active and
    total counts, or the configured dense model; the one this run trains is marked."""
    if configured.n_experts == 0:
        return [("dense", configured, None, "<- trains")]
    counts = count_params(configured)
    rows = [("moe", configured, None, "<- trains" if match == "none" else "")]
    for target in ("active", "total"):
        trains = "<- trains" if match == target else ""
        rows.append((f"dense-{target}", match_dense(configured, target), counts[target], trains))
    return rows


# -----------------------------------------------------------------------------
# data, schedule, evaluation


def remake(dataset_name, meta=None):
    """The prepare.py command that makes the dataset again (with its BPE's size, when meta tells it)."""
    source = f"--corpus={dataset_name}" if dataset_name in CORPORA else f"--input=FILE --name={dataset_name}"
    bpe = isinstance(meta, dict) and meta.get("tokenizer") == "bpe" and isinstance(meta.get("vocab_size"), int)
    return f"python prepare.py {source}" + (f" --vocab_size={meta['vocab_size']}" if bpe else "")


def load_meta(data_dir, dataset_name):
    """The dataset's meta.json, checked: a vocabulary size, a token dtype that holds it, and a tokenizer."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise UserError(f"dataset {dataset_name!r} not found at {data_dir}: make it with `{remake(dataset_name)}` "
                        f"(`python prepare.py --help` lists the corpora)")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: make the dataset again with `{remake(dataset_name)}`")
    try:
        meta = json.load(open(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}): make the dataset again "
                        f"with `{remake(dataset_name)}`") from None
    problem = None
    if not isinstance(meta, dict):
        problem = "is not a JSON object"
    elif [k for k in ("vocab_size", "dtype", "tokenizer") if k not in meta]:
        problem = f"has no {', '.join(k for k in ('vocab_size', 'dtype', 'tokenizer') if k not in meta)}"
    elif type(meta["vocab_size"]) is not int or meta["vocab_size"] <= 0:
        problem = f"has vocab_size {meta['vocab_size']!r}, not a positive whole number"
    elif meta["dtype"] not in ("uint16", "uint32"):
        problem = f"has dtype {meta['dtype']!r}, not uint16 or uint32"
    elif meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1:
        problem = f"has dtype {meta['dtype']}, too narrow for vocab_size {meta['vocab_size']}"
    elif meta["tokenizer"] not in ("gpt2", "bpe") or meta["tokenizer"] == "bpe" and "tokenizer_file" not in meta:
        problem = f"names no tokenizer prepare.py makes (tokenizer {meta['tokenizer']!r})"
    if problem:
        raise UserError(f"{path} {problem}: make the dataset again with `{remake(dataset_name, meta)}`")
    return meta


def check_tokenizer(data_dir, dataset_name, meta, state):
    """The dataset's tokenizer description (prepare.load_spec), checked to build a tokenizer of meta's
    vocab_size, and on resume to be the one the checkpoint was trained with."""
    path = os.path.join(data_dir, meta.get("tokenizer_file", "meta.json"))
    try:
        spec = load_spec(data_dir)
        n_vocab = encoding(spec).n_vocab if spec["type"] == "bpe" else meta["vocab_size"]  # GPT-2's: tiktoken's
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} does not describe a tokenizer ({type(e).__name__}: {e}): make the dataset again "
                        f"with `{remake(dataset_name, meta)}`") from None
    if n_vocab != meta["vocab_size"]:
        raise UserError(f"{path} makes a tokenizer of {n_vocab} tokens, meta.json says vocab_size "
                        f"{meta['vocab_size']}: make the dataset again with `{remake(dataset_name, meta)}`")
    if state is not None and spec != state["tokenizer"]:
        raise UserError(f"dataset {dataset_name!r} has another tokenizer than the one the resumed run was trained "
                        f"with: resume on the dataset it was trained on, or start a new run in another out_dir")


def load_split(data_dir, split, meta, block_size, dataset_name):
    """The tokens of train.bin or val.bin, checked: a whole number of tokens, as many as meta.json says, each
    below vocab_size (one pass over the file, a small cost next to training), more than one block."""
    path = os.path.join(data_dir, f"{split}.bin")
    size = os.path.getsize(path) if os.path.isfile(path) else None
    itemsize = np.dtype(meta["dtype"]).itemsize
    problem = ("is missing" if size is None else "is empty" if size == 0 else
               f"has {size:,} bytes, not a whole number of {meta['dtype']} tokens" if size % itemsize else None)
    if problem is None:
        data = np.memmap(path, dtype=meta["dtype"], mode="r")
        expected = meta.get(f"{split}_tokens", len(data))
        top = int(data.max())
        if len(data) != expected:
            problem = f"holds {len(data):,} tokens, meta.json says {expected:,}"
        elif top >= meta["vocab_size"]:
            problem = f"holds token id {top}, beyond the vocabulary of {meta['vocab_size']} in meta.json"
    if problem:
        raise UserError(f"{path} {problem}: make the dataset again with `{remake(dataset_name, meta)}`")
    if len(data) <= block_size:
        raise UserError(f"{path} has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}: lower "
                        f"block_size or prepare more text")
    return data


def load_data(dataset, data_dir, model_config, state):
    """(meta, train tokens, val tokens) of the dataset, its files checked, and checked against the model and a
    resumed run."""
    meta = load_meta(data_dir, dataset)
    if meta["vocab_size"] > model_config.vocab_size:
        raise UserError(f"dataset {dataset!r} has a vocabulary of {meta['vocab_size']}, larger than the "
                        f"model's vocab_size {model_config.vocab_size}")
    if state is not None and meta["vocab_size"] != state["dataset_vocab_size"]:
        raise UserError(f"dataset {dataset!r} has a vocabulary of {meta['vocab_size']}, the resumed run "
                        f"was trained on one of {state['dataset_vocab_size']}")
    check_tokenizer(data_dir, dataset, meta, state)
    return (meta, load_split(data_dir, "train", meta, model_config.block_size, dataset),
            load_split(data_dir, "val", meta, model_config.block_size, dataset))


def get_batch(data, batch_size, block_size, generator, device):
    """batch_size random windows of data: inputs x (B, T) and next-token targets y (B, T)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def add_routing(total, routing):
    """Routing counts (stats["routing"] of GPT.forward) of two forward passes, added layer by layer."""
    if total is None:
        return routing
    return [{k: a[k] + b[k] for k in a} for a, b in zip(total, routing)]


@torch.no_grad()
def evaluate(model, data, batch_size, block_size, eval_iters, device, autocast, log_seconds=0.0):
    """(mean cross-entropy, routing counts) over eval_iters validation batches, the same batches at
    every call (and for every model), so that evaluations compare like with like. log_seconds > 0: a progress
    line where one more batch would leave that long without one (a long evaluation on a slow machine)."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    total, routing, last = 0.0, None, time.time()
    for done in range(1, eval_iters + 1):
        batch_start = time.time()
        x, y = get_batch(data, batch_size, block_size, generator, device)
        with autocast:
            _, _, stats = model(x, y)
        total += stats["ce"].item()
        routing = add_routing(routing, stats["routing"])
        now = time.time()
        if 0 < log_seconds <= now - last + (now - batch_start) and done < eval_iters:
            print0(f"  evaluating: {done} of {eval_iters} validation batches")
            last = now
    model.train()
    return total / eval_iters, routing


@torch.no_grad()
def routing_summary(model, routing):
    """Per MoE layer, the statistics logs show of `routing` (stats["routing"], summed over batches): each
    expert's share of the slots, max/mean load, coefficient of variation, share of slots dropped,
    router entropy per token, and with aux_free balancing the range of the bias."""
    summary = []
    for moe, counts in zip(model.moe_layers, routing):
        slots = counts["load"].sum().clamp_min(1)
        load = counts["load"] / slots  # (E,)
        layer = {
            "load": [round(v, 4) for v in load.tolist()],
            "max_mean": (load.max() / load.mean()).item(),
            "cv": (load.std(unbiased=False) / load.mean()).item(),
            "dropped": (counts["dropped"] / slots).item(),
            "entropy": (counts["entropy"] / max(counts["tokens"], 1)).item(),
        }
        if model.config.balance == "aux_free":
            layer["bias_range"] = [moe.expert_bias.min().item(), moe.expert_bias.max().item()]
        summary.append(layer)
    return summary


def routing_line(layer, summary):
    """One console line of an MoE layer's routing (an entry of routing_summary)."""
    line = (f"  moe layer {layer}: load max/mean {summary['max_mean']:.2f}, cv {summary['cv']:.3f}, "
            f"entropy {summary['entropy']:.3f}, dropped {summary['dropped']:.2%}")
    if "bias_range" in summary:
        low, high = summary["bias_range"]
        line += f", bias [{low:+.4f}, {high:+.4f}]"
    return line


def resume_from(state, path, model, optimizer, data_rng, system):
    """Load a checkpoint's weights, optimizer state and this process's data sampler state; return its
    Progress."""
    load_weights(model, state, path)
    optimizer.load_state_dict(state["optimizer"])
    if len(state["data_rng"]) != system.world:
        raise UserError(f"the checkpoint was written by {len(state['data_rng'])} process(es); resume it "
                        f"with as many (this run has {system.world})")
    data_rng.set_state(state["data_rng"][system.rank])
    return Progress(**{f.name: state[f.name] for f in fields(Progress)})


def micro_steps(gradient_accumulation_steps, world):
    """Micro-steps each of `world` processes runs per optimizer step. gradient_accumulation_steps counts them
    over all processes together (as nanoGPT, which divides it by the number of processes); one that the
    processes cannot share evenly is rounded up, so a step takes the tokens asked for or the fewest more."""
    return math.ceil(gradient_accumulation_steps / world)


def summary_line(progress, max_iters, seconds, out_dir, launcher, argv):
    """The line that ends a run: how far it got in what wall time, its best validation loss, its checkpoint,
    and the commands to sample from it and to continue it. launcher + argv: the command that started the run
    (launcher ends with the path of train.py)."""
    finished = progress.iter_num >= max_iters
    replaced = ("--init_from=", "--overwrite=") + (("--max_iters=",) if finished else ())
    resume = [*launcher, *(a for a in argv if not a.startswith(replaced)), "--init_from=resume"]
    if finished:  # resuming it as it is would do nothing: suggest twice as many iterations
        resume.append(f"--max_iters={2 * max_iters}")
    sample = ["python", os.path.join(os.path.dirname(launcher[-1]), "sample.py"), f"--out_dir={out_dir}"]
    state = f"finished {max_iters} iterations" if finished else \
        f"stopped at iteration {progress.iter_num} of {max_iters}"
    return (f"{state} in {duration(seconds)}, best val loss {progress.best_val_loss:.4f}, checkpoint"
            f"{'' if finished else ' written:'} {os.path.join(out_dir, 'ckpt.pt')}; sample: {shlex.join(sample)}; "
            f"{'train on' if finished else 'continue'}: {shlex.join(resume)}")


# -----------------------------------------------------------------------------
# training


def train(cfg, given=None):
    """Train as cfg (a namespace of every config key) says; return its Progress (None for a dry run). given: the
    keys the user set (see resume_config). Every knob is checked first; then, but for a dry run, the first
    process holds out_dir for the whole run (one run per out_dir). A SIGINT or SIGTERM stops the run with
    Stopped once its checkpoint is written (a second one at once, with KeyboardInterrupt; see StopFlag)."""
    check_knobs(cfg)
    hold = not cfg.dry_run and int(os.environ.get("RANK", 0)) == 0
    with out_dir_lock(cfg.out_dir) if hold else nullcontext(), StopFlag() as stop, \
            guard.phase("training", "lower batch_size, block_size or the model (n_layer, n_embd, n_experts)"):
        return run_training(cfg, given, stop)


def run_training(cfg, given, stop):
    """train(), out_dir held and signals caught: set up, then the loop, read top to bottom as nanoGPT's:
    evaluate and checkpoint -> one optimizer step -> log -> stop on a signal."""
    run = setup(cfg, given, stop)
    if run is None:  # a dry run
        return None
    progress, system = run.progress, run.system
    stop.graceful = True  # from here a first signal lets the step finish and writes a checkpoint
    bar = tqdm(total=cfg.max_iters, initial=progress.iter_num, disable=not (system.master and sys.stderr.isatty()),
               dynamic_ncols=True)
    clock = [time.time(), progress.iter_num]  # time and iteration of the last log line or evaluation
    first_iter, eval_s = progress.iter_num + 1, 0.0  # this run's first step; seconds of the last evaluation
    together = False  # whether every process reached the end (or a stop) with this one
    try:
        while True:
            # --- evaluate and checkpoint, every eval_interval steps and at the end ---
            it = progress.iter_num
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and progress.evaluated_iter != it:
                read_bad_steps(run, cfg, it, stop)
                t = time.time()
                evaluate_and_checkpoint(run, cfg, stop)
                eval_s, clock = time.time() - t, [time.time(), it]
            if it >= cfg.max_iters:
                break

            # --- one optimizer step: lr, micro-steps, clip, step (skipped on the device if non-finite) ---
            step_start = time.time()
            lr, parts, finite = optimizer_step(run, cfg, it)
            count_bad_step(run, finite)
            progress.iter_num = it = it + 1
            bar.update(1)
            # --- log: every log_interval steps, after this run's first step, and at least every log_seconds ---
            synced = it % cfg.log_interval == 0 or it in (first_iter, cfg.max_iters)  # the same on every process
            now = time.time()  # one more step like this one before logging would pass log_seconds: log now
            late = 0 < cfg.log_seconds <= now - clock[0] + (now - step_start)
            if synced or late:
                read_bad_steps(run, cfg, it, stop)
                dt = log_step(run, cfg, it, lr, parts, clock, startup=it == first_iter)
                pace_note(run, cfg, it, dt, first_iter, eval_s)
                clock = [time.time(), it]

            # --- stop cleanly on SIGINT / SIGTERM: several processes agree at log lines, where they sync anyway ---
            if (system.world == 1 or synced) and stop.anywhere(system):  # every process stops after the same step
                read_bad_steps(run, cfg, it, stop)
                check_finite(run, it, stop)
                write_checkpoint(run.ckpt_path, run.about, run.raw_model, run.optimizer, progress, run.data_rng,
                                 system)
                together = True
                raise Stopped(progress)
        together = True
    finally:
        # --- finish ---
        bar.close()
        if run.tracker is not None:
            run.tracker.finish()
        if system.world > 1:
            del run.model  # DDP's reducer holds the process group
            end_processes(together)
    return progress


def setup(cfg, given, stop):
    """Everything the loop needs, as a namespace: the models (raw, compiled or DDP-wrapped, for evaluation),
    optimizer, data and its sampler, Progress, the system, paths and per-step counts; None for a dry run,
    once the parameter table is printed."""
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    state = load_checkpoint(ckpt_path) if cfg.init_from == "resume" else None
    # the checkpoint a run that stops now can be resumed from, as error lines name it
    stop.checkpoint = f"{ckpt_path} (iteration {state['iter_num']})" if state is not None else "none"
    if state is not None:
        resume_config(cfg, state, given, ckpt_path)
        done = state["iter_num"] > cfg.max_iters or (state["iter_num"] == cfg.max_iters
                                                     and state["evaluated_iter"] == cfg.max_iters)
        check(cfg.dry_run or not done, f"{ckpt_path} is at iteration {state['iter_num']} already, max_iters="
                                       f"{cfg.max_iters}: "
                        f"nothing to train; give a larger --max_iters to continue it")
    configured, model_config, match, vocab_source = resolve_models(cfg, data_dir, state)
    print0(param_table(models_involved(configured, match)))
    if configured.n_experts > 0:
        print0("active = what one token uses, the router and K of the E experts included; "
               "mismatch = a dense total against the MoE's count")
    print0(f"vocab_size {model_config.vocab_size:,}: {vocab_source}")
    if cfg.dry_run:
        return None

    meta, train_data, val_data = load_data(cfg.dataset, data_dir, model_config, state)
    # what the checkpoint says of the run; the tokenizer too, so that sampling needs no dataset
    about = {"model_args": asdict(model_config), "config": vars(cfg), "dataset_vocab_size": meta["vocab_size"],
             "tokenizer": load_spec(data_dir)}

    system = setup_system(cfg.device, cfg.dtype)
    device, world = system.device, system.world
    threads_line = set_threads(cfg.threads)
    if device.type == "cpu":
        print0(threads_line)
        keep_freed_memory()  # glibc: reuse freed heap blocks rather than page-fault every step's temporaries in
    accum = micro_steps(cfg.gradient_accumulation_steps, world)  # micro-steps of this process
    if accum * world != cfg.gradient_accumulation_steps:
        print0(f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} rounded up to {accum * world}, "
               f"{accum} micro-step(s) on each of the {world} processes")
        cfg.gradient_accumulation_steps = accum * world  # what the checkpoint and the log record
    if system.master:
        check_out_dir(ckpt_path, state is None, cfg.overwrite)
    tracker = open_tracker(cfg) if cfg.wandb_log and system.master else None

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    with guard.phase("building the model", "lower n_layer, n_embd, n_experts, expert_hidden or vocab_size"):
        raw_model = GPT(model_config).to(device)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                              device.type)
    data_rng = torch.Generator().manual_seed(cfg.seed + system.rank)  # the order of the training batches
    progress = Progress()
    if state is not None:
        progress = resume_from(state, ckpt_path, raw_model, optimizer, data_rng, system)
        print0(f"resumed from iteration {progress.iter_num} of {ckpt_path} (best val loss "
               f"{progress.best_val_loss:.4f})")
        if system.master:  # drop what a crashed run logged after its checkpoint
            truncate_log(log_path, progress.iter_num, progress.evaluated_iter == progress.iter_num)
    elif system.master:
        write_log(log_path, [{"event": "start", "time": time.time(), "code": code_version(), "config": vars(cfg),
                              "model_args": asdict(model_config), "params": count_params(model_config),
                              "flops_per_token": flops_per_token(model_config)}])
    compiled = use_compile(cfg.compile, device)
    if note := grouped_note(model_config, device, system.dtype, compiled):  # moe_impl=grouped that cannot run here
        print0(note)
    model = compile_model(raw_model) if compiled else raw_model
    eval_model = model  # evaluation needs no gradient synchronisation
    if world > 1:
        model = wrap_ddp(model, device)
    block_size = model_config.block_size  # T, the context length
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * block_size
    precision = "bfloat16 autocast" if system.dtype == torch.bfloat16 else "float32"
    print0(f"tokens per iteration: {tokens_per_iter:,} = {cfg.gradient_accumulation_steps} micro-step(s) x "
           f"{cfg.batch_size} sequences x {block_size} tokens; device {device}, {precision}, {world} process(es)")
    peak, peak_note = peak_flops(device_name(device), system.dtype)
    print0(f"training FLOPs per token: {flops_per_token(model_config):,.0f} (6 x the active parameters in matmuls, "
           f"output layer included, + attention over the full T x T; model.flops_per_token); {peak_note}")
    print0(f"training to iteration {cfg.max_iters}: a log line every {cfg.log_interval} iterations"
           + (f" and at least every {cfg.log_seconds:g}s" if cfg.log_seconds else "")
           + (f"; first an evaluation on {cfg.eval_iters} validation batches" if progress.iter_num < cfg.max_iters
              and progress.evaluated_iter != progress.iter_num else ""))
    return SimpleNamespace(raw_model=raw_model, model=model, eval_model=eval_model, optimizer=optimizer,
                           train_data=train_data, val_data=val_data, data_rng=data_rng, progress=progress,
                           system=system, about=about, ckpt_path=ckpt_path, log_path=log_path, accum=accum,
                           block_size=block_size, tokens_per_iter=tokens_per_iter, peak=peak,
                           bad=torch.zeros(3, dtype=torch.long, device=device),  # count_bad_step
                           flops_per_iter=flops_per_token(model_config) * tokens_per_iter,  # over all processes
                           tracker=tracker, fastest=(math.inf, 0))  # fastest: (seconds a step, iteration), pace_note


def evaluate_and_checkpoint(run, cfg, stop):
    """Validation loss and routing at this iteration, logged; then the checkpoint, unless anything is
    non-finite (the run stops with the last good checkpoint named)."""
    it, progress, system = run.progress.iter_num, run.progress, run.system
    val_loss, routing = evaluate(run.eval_model, run.val_data, cfg.batch_size, run.block_size, cfg.eval_iters,
                                 system.device, system.autocast, cfg.log_seconds)
    if not math.isfinite(val_loss):  # not a new best, and no reason to checkpoint
        raise UserError(diverged(f"iteration {it}: validation loss is non-finite ({val_loss}), not "
                                 f"checkpointed", stop.checkpoint, vars(cfg)))
    check_finite(run, it, stop)
    routing = routing_summary(run.raw_model, routing)
    progress.best_val_loss, progress.evaluated_iter = min(progress.best_val_loss, val_loss), it
    print0(f"iter {it}: val loss {val_loss:.4f}, best {progress.best_val_loss:.4f}")
    for layer, summary in enumerate(routing):
        print0(routing_line(layer, summary))
    record(run, {"iter": it, "tokens": it * run.tokens_per_iter, "val_loss": val_loss,
                 "best_val_loss": progress.best_val_loss, "routing": routing, "time": time.time()})
    write_checkpoint(run.ckpt_path, run.about, run.raw_model, run.optimizer, progress, run.data_rng, system)
    stop.checkpoint = f"{run.ckpt_path} (iteration {it})"


def check_finite(run, it, stop):
    """Stop before a checkpoint would save non-finite weights or optimizer state."""
    if not finite_state(run.raw_model, run.optimizer):
        raise UserError(diverged(f"iteration {it}: non-finite weights or optimizer state, not checkpointed",
                                 stop.checkpoint, run.about["config"]))


def optimizer_step(run, cfg, it):
    """One optimizer step at iteration it: set the lr, run the micro-steps (gradients averaged over them and,
    by DDP, over processes), clip, step (and the aux_free bias update). Returns (lr, the loss parts averaged over
    micro-steps, whether the step was taken: not with a non-finite gradient)."""
    model, raw_model, system = run.model, run.raw_model, run.system
    lr = get_lr(it, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    parts = dict.fromkeys(("loss", "ce", "aux", "z"), 0.0)  # averaged over micro-steps, for the log
    routing = None  # summed over micro-steps, for the aux_free bias update
    for micro_step in range(run.accum):
        x, y = get_batch(run.train_data, cfg.batch_size, run.block_size, run.data_rng, system.device)
        last = micro_step == run.accum - 1
        with (model.no_sync() if system.world > 1 and not last else nullcontext()), system.autocast:
            loss, stats = model(x, y)[1:]  # the logits (B, T, V) go at once: not kept into the next micro-step
        (loss / run.accum).backward()  # gradients average over micro-steps (and, by DDP, processes)
        parts["loss"] += loss.detach() / run.accum
        for k in ("ce", "aux", "z"):
            parts[k] += stats[k] / run.accum
        routing = add_routing(routing, stats["routing"])
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
    finite = torch.isfinite(grad_norm)  # DDP averaged the gradients, so every process agrees
    if skips_on_device(run.optimizer):  # no host sync: the fused kernel leaves everything as it was if found_inf
        run.optimizer.found_inf = (~finite).float()
        run.optimizer.step()
        raw_model.update_expert_bias(routing, finite)
    elif finite:  # a host sync (MPS: its fused kernel ignores found_inf)
        run.optimizer.step()
        raw_model.update_expert_bias(routing)
    run.optimizer.zero_grad(set_to_none=True)
    return lr, parts, finite


def count_bad_step(run, finite):
    """Count a step skipped for a non-finite loss or gradient on the device, without a host sync: run.bad holds
    (skipped since the last read, skipped in a row now, the most in a row since the last read)."""
    skipped = (~finite).long()
    in_a_row = (run.bad[1] + 1) * skipped
    run.bad = torch.stack([run.bad[0] + skipped, in_a_row, torch.maximum(run.bad[2], in_a_row)])


def read_bad_steps(run, cfg, it, stop):
    """At a log line, an evaluation or a stop (where the host waits for the device anyway): add the steps the
    device counted as skipped (count_bad_step) to progress, say so in one line, and stop the run once
    max_bad_steps were skipped in a row."""
    skipped, in_a_row, most = run.bad.tolist()
    if not skipped:
        return
    run.bad = torch.tensor([0, in_a_row, in_a_row], device=run.bad.device)
    run.progress.skipped_steps += skipped
    print0(f"iter {it}: {skipped} step(s) skipped for a non-finite loss or gradient since the last line "
           f"({most} in a row at most)")
    if most >= cfg.max_bad_steps:
        raise UserError(diverged(f"{cfg.max_bad_steps} steps in a row had a non-finite loss or gradient "
                                 f"({most} by iteration {it}), stopping", stop.checkpoint, vars(cfg)))


def log_step(run, cfg, it, lr, parts, clock, startup=False):
    """The log line and metrics.jsonl record after iteration it: the loss parts, lr, time per step since the last
    line (clock: [time, iteration] of it) and the FLOP/s and MFU that make. Returns that time per step. startup: the
    run's first step, whose time includes compiling and warming up: no FLOP/s or MFU from it."""
    dt = (time.time() - clock[0]) / max(1, it - clock[1])
    values = {k: float(v) for k, v in parts.items()}
    speed = {} if startup else {"flops_per_s": run.flops_per_iter / dt}  # achieved, by all processes together
    if run.peak and not startup:
        speed["mfu"] = speed["flops_per_s"] / (run.peak * run.system.world)
    print0(f"iter {it}: loss {values['loss']:.4f}, ce {values['ce']:.4f}, aux {values['aux']:.4f}, "
           f"z {values['z']:.4f}, lr {lr:.1e}, {dt * 1000:.1f}ms"
           + (" (start-up included)" if startup else f", {flops_text(speed['flops_per_s'])}")
           + (f", MFU {speed['mfu']:.1%}" if "mfu" in speed else ""))
    record(run, {"iter": it, "tokens": it * run.tokens_per_iter, **values, "lr": lr, "ms_per_iter": dt * 1000,
                 "tokens_per_s": run.tokens_per_iter / dt, **speed, "skipped_steps": run.progress.skipped_steps})
    return dt


def pace_note(run, cfg, it, dt, first_iter, eval_s):
    """After this run's first step (dt seconds a step), its expected duration at that pace; later, once, a note
    when steps have become several times slower than the fastest seen since: the machine is likely shared."""
    if it == first_iter:
        steps, evals = cfg.max_iters - it, cfg.max_iters // cfg.eval_interval - it // cfg.eval_interval + (
            cfg.max_iters % cfg.eval_interval != 0)
        print0(f"first step {dt:.2f}s (start-up included): the {steps} step(s) left take ~{duration(steps * dt)} "
               f"at this pace, + {evals} evaluation(s)" + (f" of ~{duration(eval_s)}" if eval_s else ""))
        return
    fastest, where = run.fastest
    if dt < fastest:
        run.fastest = (dt, it)
    elif dt > 3 * fastest and dt > 0.05 and where > 0:
        run.fastest = (0.0, -1)  # warned: never again
        cpu = run.system.device.type == "cpu"
        print0(f"note: steps take {dt / fastest:.1f}x as long as by iteration {where} ({dt * 1000:.0f} against "
               f"{fastest * 1000:.0f} ms): other work is likely sharing this " + ("CPU; fewer threads "
               f"(--threads=1, now {torch.get_num_threads()}) may be several times faster" if cpu else "machine"))


def record(run, entry):
    """Append a record to metrics.jsonl (the first process only) and, with wandb_log, send it to W&B as well,
    the routing statistics as flat keys (routing/layer0/max_mean, routing/layer0/load/e3...)."""
    if not run.system.master:
        return
    append_log(run.log_path, entry)
    if run.tracker is not None:
        flat = {k: v for k, v in entry.items() if k not in ("iter", "routing")}
        for layer, summary in enumerate(entry.get("routing") or []):
            for key, value in summary.items():
                names = [f"e{e}" for e in range(len(value))] if key == "load" else ["low", "high"]
                for name, v in zip(names, value) if isinstance(value, list) else [(None, value)]:
                    flat["/".join(filter(None, ["routing", f"layer{layer}", key, name]))] = v
        run.tracker.log(flat, step=entry["iter"])


def open_tracker(cfg):
    """The W&B run of wandb_log (nanoGPT's convention: project, run name, the config), its files in
    out_dir/wandb; wandb is imported only here, so that it is needed only when asked for."""
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs the wandb package: pip install wandb (or leave wandb_log off)") from None
    name = cfg.wandb_run_name or os.path.basename(os.path.normpath(os.path.abspath(cfg.out_dir)))
    return wandb.init(project=cfg.wandb_project, name=name, config=vars(cfg), dir=cfg.out_dir)


class Stopped(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM once its checkpoint is written: main ends it with the summary line
    (and status 130, as an interrupted command)."""

    def __init__(self, progress):
        super().__init__(f"stopped at iteration {progress.iter_num}, checkpoint written")
        self.progress = progress


def launcher():
    """How this process was started, up to the path of train.py: python, or torchrun for several processes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return ["python", sys.argv[0]] if world == 1 else \
        ["torchrun", "--standalone", f"--nproc_per_node={world}", sys.argv[0]]


# knobs that can make a run diverge, each with the value above which it is the likelier cause: ten times what
# the recipes use (config/*.py; DeepSeek-V3's 1e-3 bias step); grad_clip 0 (off) and balance are checked apart
DIVERGENCE_KNOBS = {"learning_rate": 1e-2, "aux_loss_coef": 0.1, "z_loss_coef": 1e-2, "bias_update_rate": 1e-2}


def likely_cause(config):
    """The knob that most likely made a run diverge: the one furthest past its DIVERGENCE_KNOBS value, else
    grad_clip if clipping is off, else learning_rate (the usual cause)."""
    ratios = {k: config.get(k, 0) / limit for k, limit in DIVERGENCE_KNOBS.items()
              if k != "bias_update_rate" or config.get("balance") == "aux_free"}
    knob = max(ratios, key=ratios.get)
    if ratios[knob] > 1:
        return f"{knob} ({config[knob]:g}) is high: lower it"
    if config.get("grad_clip", 1) == 0:
        return "grad_clip=0 turns clipping off: try --grad_clip=1.0"
    return "try a lower learning_rate"


def diverged(what, last_good, config):
    """The line a diverging run stops with: what went wrong, the checkpoint to resume from, the likely knob."""
    cause = likely_cause(config)
    return f"{what}. Last good checkpoint: {last_good}. {cause[0].upper()}{cause[1:]}"


def main(argv):
    if "-h" in argv or "--help" in argv:
        print_help(usage(__doc__, defaults(), [__file__, os.path.join(ROOT, "model.py")]))
        return
    sys.stdout.reconfigure(line_buffering=True)  # each line as it is printed, into a file or pipe too
    try:
        given = overrides(argv, defaults())
        cfg = SimpleNamespace(**{**defaults(), **given})
        start = time.time()
        progress = train(cfg, set(given))
    except UserError as e:
        sys.exit(f"error: {e}")
    except Stopped as e:
        summary = summary_line(e.progress, cfg.max_iters, time.time() - start, cfg.out_dir, launcher(), argv)
        print0(f"interrupted: {summary}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt as e:
        print0(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        sys.exit(130)
    if progress is not None:  # None: a dry run
        print0(summary_line(progress, cfg.max_iters, time.time() - start, cfg.out_dir, launcher(), argv))


if __name__ == "__main__":
    guard.run_main(main)

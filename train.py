"""
Train a dense or Mixture-of-Experts GPT on a dataset made by prepare.py.

    python train.py config/moe_e4k2.py                      # the MoE recipe on TinyStories
    python train.py config/moe_e4k2.py --match=active       # the dense model with its active params
    python train.py config/moe_e4k2.py --dry_run=True       # just the parameter table
    python train.py config/cpu_moe.py                       # a few minutes on a laptop CPU
    python train.py config/moe_e4k2.py --init_from=resume   # continue from out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py config/moe_e4k2.py

Every knob below (and every GPTConfig field in model.py) can be set by a config file or --key=value.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from configurator import UserError, configure
from model import GPT, GPTConfig, count_params, flops_per_token, match_dense, model_fields
from prepare import load_spec
from report import flops_text, param_table
from runtime import (
    StopFlag,
    append_log,
    check_out_dir,
    code_version,
    compile_model,
    device_name,
    end_processes,
    keep_freed_memory,
    load_checkpoint,
    load_weights,
    peak_flops,
    print0,
    setup_system,
    truncate_log,
    use_compile,
    wrap_ddp,
    write_checkpoint,
)

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# config: defaults, overridden by config files and --key=value (see configurator.py)
# I/O
out_dir = "out"  # checkpoint (ckpt.pt) and metrics (metrics.jsonl) go here
data_root = os.path.join(ROOT, "data")  # where prepare.py writes dataset folders
dataset = "tinystories"  # data_root/<dataset>/{train.bin, val.bin, meta.json}
init_from = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt)
overwrite = False  # let a fresh run replace the checkpoint of an earlier run in out_dir
eval_interval = 250  # iterations between evaluations (each also writes the checkpoint)
eval_iters = 50  # validation batches per evaluation, the same batches every time
log_interval = 10  # iterations between log lines
dry_run = False  # print the parameter table and exit
match = "none"  # "active" or "total": train the dense model matched to the configured MoE
# data
batch_size = 32  # sequences per micro-step, per process
gradient_accumulation_steps = 1  # micro-steps per optimizer step, over all processes together
# AdamW and schedule: linear warmup, then cosine decay to min_lr
learning_rate = 1e-3
max_iters = 5000  # optimizer steps
weight_decay = 0.1  # on matrices only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0: no clipping
warmup_iters = 100
lr_decay_iters = 0  # iterations of cosine decay; 0: max_iters
min_lr = 1e-4
max_bad_steps = 5  # stop after this many steps in a row with a non-finite loss or gradient
# system
device = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device like "cpu", "cuda:1"
dtype = "auto"  # "auto" (bfloat16 autocast where CUDA supports it, else float32), "float32", "bfloat16"
compile = "auto"  # torch.compile the model: "auto" (on for CUDA), "true" or "false"
seed = 1337  # model init and data order
# -----------------------------------------------------------------------------
TRAIN_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
              and isinstance(v, (int, float, bool, str))]


TRAIN_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
              and isinstance(v, (int, float, bool, str))]


def defaults():
    """All config keys with their defaults: the model's (GPTConfig fields) and train.py's own."""
    return {**{f.name: f.default for f in fields(GPTConfig)}, **{k: globals()[k] for k in TRAIN_KEYS}}


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
    """(configured, trained, match): the configured GPTConfig, the one to train and the match knob; on
    resume, the checkpointed run's, whatever the config says now. vocab_size 0 takes the dataset's."""
    if state is not None:
        configured, _ = model_configs(SimpleNamespace(**state["config"]))
        return configured, GPTConfig(**state["model_args"]), state["config"]["match"]
    if cfg.vocab_size == 0:
        cfg.vocab_size = load_meta(data_dir, cfg.dataset)["vocab_size"]
    configured, trained = model_configs(cfg)
    return configured, trained, cfg.match


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


def load_meta(data_dir, dataset_name):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"dataset {dataset_name!r} not found at {data_dir}: run `python prepare.py` (TinyStories) "
                        f"or `python prepare.py --input FILE.txt --name {dataset_name}` first")
    return json.load(open(path))


def load_split(data_dir, split, meta, block_size):
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    if len(data) <= block_size:
        raise UserError(f"{split}.bin of {data_dir} has {len(data)} tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}: lower block_size or prepare more text")
    return data


def load_data(dataset, data_dir, model_config, state):
    """(meta, train tokens, val tokens) of the dataset, checked against the model and a resumed run."""
    meta = load_meta(data_dir, dataset)
    if meta["vocab_size"] > model_config.vocab_size:
        raise UserError(f"dataset {dataset!r} has a vocabulary of {meta['vocab_size']}, larger than the "
                        f"model's vocab_size {model_config.vocab_size}")
    if state is not None and meta["vocab_size"] != state["dataset_vocab_size"]:
        raise UserError(f"dataset {dataset!r} has a vocabulary of {meta['vocab_size']}, the resumed run "
                        f"was trained on one of {state['dataset_vocab_size']}")
    return (meta, load_split(data_dir, "train", meta, model_config.block_size),
            load_split(data_dir, "val", meta, model_config.block_size))


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
def evaluate(model, data, batch_size, block_size, eval_iters, device, autocast):
    """(mean cross-entropy, routing counts) over eval_iters validation batches, the same batches at
    every call (and for every model), so that evaluations compare like with like."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    total, routing = 0.0, None
    for _ in range(eval_iters):
        x, y = get_batch(data, batch_size, block_size, generator, device)
        with autocast:
            _, _, stats = model(x, y)
        total += stats["ce"].item()
        routing = add_routing(routing, stats["routing"])
    model.train()
    return total / eval_iters, routing


def routing_line(layer, summary):
    """One console line of an MoE layer's routing (an entry of GPT.routing_summary)."""
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


def check_choice(cfg, name, allowed):
    if getattr(cfg, name) not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}")


# -----------------------------------------------------------------------------
# training


def train(cfg):
    """Train as cfg (a namespace of every config key) says; return the best validation loss."""
    # --- setup: the model to train, data, processes, state ---
    check_choice(cfg, "init_from", ("scratch", "resume"))
    check_choice(cfg, "match", ("none", "active", "total"))
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    state = load_checkpoint(ckpt_path) if cfg.init_from == "resume" else None
    configured, model_config, match = resolve_models(cfg, data_dir, state)
    block_size = model_config.block_size  # T, the context length
    print0(param_table(models_involved(configured, match)))
    if configured.n_experts > 0:
        print0("active = what one token uses, the router and K of the E experts included; "
               "mismatch = a dense total against the MoE's count")
    if cfg.dry_run:
        return None

    meta, train_data, val_data = load_data(cfg.dataset, data_dir, model_config, state)
    # what the checkpoint says of the run; the tokenizer too, so that sampling needs no dataset
    about = {"model_args": asdict(model_config), "config": vars(cfg), "dataset_vocab_size": meta["vocab_size"],
             "tokenizer": load_spec(data_dir)}

    system = setup_system(cfg.device, cfg.dtype)
    device, autocast, world = system.device, system.autocast, system.world
    if device.type == "cpu":
        keep_freed_memory()  # glibc: reuse freed heap blocks rather than page-fault every step's temporaries in
    if cfg.gradient_accumulation_steps % world:
        raise UserError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple "
                        f"of the number of processes ({world})")
    accum = cfg.gradient_accumulation_steps // world  # micro-steps of this process
    if system.master:
        check_out_dir(cfg.out_dir, ckpt_path, state is None, cfg.overwrite)

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    raw_model = GPT(model_config).to(device)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                              device.type)
    data_rng = torch.Generator().manual_seed(cfg.seed + system.rank)  # the order of the training batches
    progress = Progress()
    if state is not None:
        progress = resume_from(state, ckpt_path, raw_model, optimizer, data_rng, system)
        if system.master:  # drop what a crashed run logged after its checkpoint
            truncate_log(log_path, progress.iter_num, progress.evaluated_iter == progress.iter_num)
    elif system.master:
        open(log_path, "w").close()
        append_log(log_path, {"event": "start", "time": time.time(), "code": code_version(), "config": vars(cfg),
                              "model_args": asdict(model_config), "params": count_params(model_config),
                              "flops_per_token": flops_per_token(model_config)})
    model = compile_model(raw_model) if use_compile(cfg.compile, device) else raw_model
    eval_model = model  # evaluation needs no gradient synchronisation
    if world > 1:
        model = wrap_ddp(model, device)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * block_size
    precision = "bfloat16 autocast" if system.dtype == torch.bfloat16 else "float32"
    print0(f"tokens per iteration: {tokens_per_iter:,} = {cfg.gradient_accumulation_steps} x {cfg.batch_size} x "
           f"{block_size}; device {device}, {precision}, {world} process(es)")
    flops_per_iter = flops_per_token(model_config) * tokens_per_iter  # over all processes
    peak, peak_note = peak_flops(device_name(device), system.dtype)
    print0(f"training FLOPs per token: {flops_per_token(model_config):,.0f} (6 x the active parameters in matmuls, "
           f"output layer included, + attention over the full T x T; model.flops_per_token); {peak_note}")

    saved_iter = progress.iter_num if state is not None else None  # of the last checkpoint written
    bad_steps = 0  # in a row
    stop = StopFlag()
    bar = tqdm(total=cfg.max_iters, initial=progress.iter_num, disable=not (system.master and sys.stderr.isatty()),
               dynamic_ncols=True)
    t_last, it_last = time.time(), progress.iter_num
    try:
        while True:
            # --- evaluate and checkpoint, every eval_interval steps and at the end ---
            it = progress.iter_num
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and progress.evaluated_iter != it:
                val_loss, routing = evaluate(eval_model, val_data, cfg.batch_size, block_size, cfg.eval_iters, device,
                                             autocast)
                routing = raw_model.routing_summary(routing)
                progress.best_val_loss, progress.evaluated_iter = min(progress.best_val_loss, val_loss), it
                print0(f"iter {it}: val loss {val_loss:.4f}, best {progress.best_val_loss:.4f}")
                for layer, summary in enumerate(routing):
                    print0(routing_line(layer, summary))
                if system.master:
                    append_log(log_path, {"iter": it, "tokens": it * tokens_per_iter, "val_loss": val_loss,
                                          "best_val_loss": progress.best_val_loss, "routing": routing,
                                          "time": time.time()})
                write_checkpoint(ckpt_path, about, raw_model, optimizer, progress, data_rng, system)
                saved_iter = it
                t_last, it_last = time.time(), it
            if it >= cfg.max_iters:
                break

            # --- one optimizer step: lr, micro-steps, clip, step ---
            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = dict.fromkeys(("loss", "ce", "aux", "z"), 0.0)  # averaged over micro-steps, for the log
            routing = None  # summed over micro-steps, for the aux_free bias update
            for micro_step in range(accum):
                x, y = get_batch(train_data, cfg.batch_size, block_size, data_rng, device)
                last = micro_step == accum - 1
                with (model.no_sync() if world > 1 and not last else nullcontext()), autocast:
                    _, loss, stats = model(x, y)
                (loss / accum).backward()  # gradients average over micro-steps (and, by DDP, processes)
                parts["loss"] += loss.detach() / accum
                for k in ("ce", "aux", "z"):
                    parts[k] += stats[k] / accum
                routing = add_routing(routing, stats["routing"])
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            if torch.isfinite(grad_norm):  # DDP averaged the gradients, so every process agrees
                optimizer.step()
                raw_model.update_expert_bias(routing)
                bad_steps = 0
            else:  # a non-finite loss or gradient: skip the step rather than poison the weights
                bad_steps += 1
                progress.skipped_steps += 1
                print0(f"iter {it}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
                if bad_steps >= cfg.max_bad_steps:
                    last_good = f"{ckpt_path} (iteration {saved_iter})" if saved_iter is not None else "none"
                    raise UserError(f"{bad_steps} steps in a row had a non-finite loss or gradient, stopping. "
                                    f"Last good checkpoint: {last_good}. Try a lower learning_rate")
            optimizer.zero_grad(set_to_none=True)
            progress.iter_num = it = it + 1
            bar.update(1)

            # --- log ---
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                dt = (time.time() - t_last) / max(1, it - it_last)
                t_last, it_last = time.time(), it
                values = {k: float(v) for k, v in parts.items()}
                speed = {"flops_per_s": flops_per_iter / dt}  # achieved, by all processes together
                if peak:
                    speed["mfu"] = speed["flops_per_s"] / (peak * world)
                print0(f"iter {it}: loss {values['loss']:.4f}, ce {values['ce']:.4f}, aux {values['aux']:.4f}, "
                       f"z {values['z']:.4f}, lr {lr:.1e}, {dt * 1000:.1f}ms, {flops_text(speed['flops_per_s'])}"
                       + (f", MFU {speed['mfu']:.1%}" if peak else ""))
                if system.master:
                    append_log(log_path, {"iter": it, "tokens": it * tokens_per_iter, **values, "lr": lr,
                                          "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_iter / dt, **speed,
                                          "skipped_steps": progress.skipped_steps})

            # --- stop cleanly on SIGINT / SIGTERM ---
            stop_now = torch.tensor(float(stop.set))
            if world > 1:
                dist.all_reduce(stop_now)  # every process stops after the same step
            if stop_now.item():
                write_checkpoint(ckpt_path, about, raw_model, optimizer, progress, data_rng, system)
                print0(f"stopped at iteration {it}, checkpoint written: continue with the same command "
                       f"and --init_from=resume")
                break
    finally:
        # --- finish ---
        stop.restore()
        bar.close()
        if world > 1:
            del model  # DDP's reducer holds the process group
            end_processes()
    print0(f"best val loss {progress.best_val_loss:.4f}")
    return progress.best_val_loss


def main(argv):
    try:
        train(SimpleNamespace(**configure(argv, defaults())))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])

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

import ctypes
import glob
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import UserError, configure
from model import GPT, GPTConfig, count_params, match_dense, model_fields
from prepare import load_spec

ROOT = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_FORMAT = 1

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


def defaults():
    """All config keys with their defaults: the model's (GPTConfig fields) and train.py's own."""
    return {**{f.name: f.default for f in fields(GPTConfig)}, **{k: globals()[k] for k in TRAIN_KEYS}}


def code_version():
    """The git commit of this code, for logs and reports."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return f"commit {commit}" + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def print0(*args, **kwargs):
    """print on the first process only."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


# -----------------------------------------------------------------------------
# model configs and the parameter table


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


def param_table(mc, match):
    """Text table of the models involved: the MoE and its matched dense baselines (or the dense model)."""
    rows = [("model", mc)]
    if mc.n_experts > 0:
        rows = [("moe", mc), ("dense-active", match_dense(mc, "active")), ("dense-total", match_dense(mc, "total"))]
    moe_counts = count_params(mc)
    lines = [f"{'model':<13} {'n_embd':>6} {'ffn/expert':>10} {'total':>12} {'active':>12} {'embedding':>10} "
             f"{'mismatch':>9}"]
    for name, c in rows:
        n = count_params(c)
        hidden = c.ffn_hidden if c.n_experts == 0 else "/".join(str(h) for h in sorted(set(c.expert_sizes)))
        if c.n_experts > 0:
            hidden = f"{c.n_experts}x{hidden}"
            if c.n_shared_experts:
                hidden += f"+{c.n_shared_experts}x{c.shared_expert_hidden}"
        target = name.split("-")[-1] if name.startswith("dense-") else None
        mismatch = f"{(n['total'] - moe_counts[target]) / moe_counts[target]:+.3%}" if target else ""
        mark = " <- trains" if (name == "moe" and match == "none") or target == match or name == "model" else ""
        lines.append(f"{name:<13} {c.n_embd:>6} {hidden:>10} {n['total']:>12,} {round(n['active']):>12,} "
                     f"{n['embedding']:>10,} {mismatch:>9}{mark}")
    if mc.n_experts > 0:
        lines.append("active = per token: the router and K of E experts (router counted as active); "
                     "dense mismatch is against the MoE's active/total count")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# data


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


@torch.no_grad()
def evaluate(model, loss_parts, data, batch_size, block_size, eval_iters, device, autocast):
    """Mean cross-entropy over eval_iters validation batches, the same batches at every call
    (and for every model), so that evaluations compare like with like."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(eval_iters):
        x, y = get_batch(data, batch_size, block_size, generator, device)
        with autocast:
            model(x, y)
        total += loss_parts()["ce"].item()
    model.train()
    return total / eval_iters


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, state):
    """Write atomically: a temp file in the same folder, flushed to disk, then renamed over path,
    so a crash or a full disk at any point leaves the previous checkpoint whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)
    except OSError as e:
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, or UserError for a missing, truncated or foreign file."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} (truncated or not a checkpoint): {type(e).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a tinymoe checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def load_weights(model, state, path):
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not hold the weights of the model it describes: "
                        f"{str(e).splitlines()[0]}") from None


def truncate_log(path, iter_num, evaluated):
    """Keep the log records up to a resumed checkpoint (at iter_num, its evaluation done or not):
    drop those a crashed run wrote after it."""
    if not os.path.exists(path):
        return
    records = [json.loads(line) for line in open(path) if line.strip()]
    keep = [r for r in records if r.get("iter", 0) < iter_num
            or (r.get("iter") == iter_num and ("val_loss" not in r or evaluated))]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)


# -----------------------------------------------------------------------------
# system


def setup_system(cfg):
    """(device, dtype, autocast context, rank, world size) from the config and torchrun's environment."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    if cfg.device == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        name = cfg.device
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        backend = "nccl" if name.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if name.startswith("cuda"):
            name = f"cuda:{local_rank}"
            torch.cuda.set_device(name)
    device = torch.device(name)
    if device.type == "cpu":
        keep_freed_memory()
    if cfg.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    elif cfg.dtype in ("float32", "bfloat16"):
        dtype = getattr(torch, cfg.dtype)
    else:
        raise UserError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {cfg.dtype!r}")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return device, dtype, autocast, rank, world


def keep_freed_memory():
    """On glibc, keep freed blocks of up to 32 MB for reuse rather than returning them to the OS:
    otherwise each step page-faults its large temporaries back in (about 5 ms per 16 MB on a CPU)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum): heap-allocate blocks up to 32 MB
    libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD: never trim the heap's free top


def use_compile(cfg, device):
    value = cfg.compile.lower()
    if value not in ("auto", "true", "false"):
        raise UserError(f"compile must be 'auto', 'true' or 'false', got {cfg.compile!r}")
    return device.type == "cuda" if value == "auto" else value == "true"


class StopFlag:
    """Set by SIGINT or SIGTERM: the loop finishes its step, writes a checkpoint and exits 0."""

    def __init__(self):
        self.set = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.set:  # a second signal: stop now, without a new checkpoint
            print0(f"{signal.Signals(signum).name} again: stopping now; the last checkpoint is intact")
            raise SystemExit(130)
        self.set = True
        print0(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop at once)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_choice(cfg, name, allowed):
    if getattr(cfg, name) not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}")


def check_out_dir(out_dir, ckpt_path, fresh_start, overwrite):
    """Refuse to overwrite another run's checkpoint by accident; make sure out_dir is writable; remove
    the temp files of checkpoint writes that a killed run left behind."""
    if fresh_start and os.path.exists(ckpt_path) and not overwrite:
        raise UserError(f"{ckpt_path} exists: continue it with --init_from=resume, or start over with "
                        f"--overwrite=True")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        for stale in glob.glob(f"{ckpt_path}.tmp*"):
            os.remove(stale)
    except OSError as e:
        raise UserError(f"out_dir {out_dir} is not writable: {e.strerror}") from None


def weights_checksum(model):
    """One number from all weights: data parallelism must keep it equal on every process."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().item()


def routing_line(layer, s):
    line = (f"  moe layer {layer}: load max/mean {s['max_mean']:.2f}, cv {s['cv']:.3f}, "
            f"entropy {s['entropy']:.3f}, dropped {s['dropped']:.2%}")
    if "bias_range" in s:
        line += f", bias [{s['bias_range'][0]:+.4f}, {s['bias_range'][1]:+.4f}]"
    return line


def train(cfg):
    """Train as cfg (a namespace of every config key) says; return the best validation loss."""
    check_choice(cfg, "init_from", ("scratch", "resume"))
    check_choice(cfg, "match", ("none", "active", "total"))
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")

    # --- the model to train, and the table of the models involved ---
    state = load_checkpoint(ckpt_path) if cfg.init_from == "resume" else None
    if state is not None:
        configured, _ = model_configs(SimpleNamespace(**state["config"]))
        mc = GPTConfig(**state["model_args"])
        match = state["config"]["match"]
    else:
        if cfg.vocab_size == 0:
            cfg.vocab_size = load_meta(data_dir, cfg.dataset)["vocab_size"]
        configured, mc = model_configs(cfg)
        match = cfg.match
    print0(param_table(configured, match))
    if cfg.dry_run:
        return None

    # --- data ---
    meta = load_meta(data_dir, cfg.dataset)
    if meta["vocab_size"] > mc.vocab_size:
        raise UserError(f"dataset {cfg.dataset!r} has a vocabulary of {meta['vocab_size']}, larger than the "
                        f"model's vocab_size {mc.vocab_size}")
    if state is not None and meta["vocab_size"] != state["dataset_vocab_size"]:
        raise UserError(f"dataset {cfg.dataset!r} has a vocabulary of {meta['vocab_size']}, the resumed run "
                        f"was trained on one of {state['dataset_vocab_size']}")
    tokenizer = load_spec(data_dir)  # saved in checkpoints, so sampling needs no dataset
    train_data = load_split(data_dir, "train", meta, mc.block_size)
    val_data = load_split(data_dir, "val", meta, mc.block_size)

    # --- system: device, precision, processes ---
    device, dtype, autocast, rank, world = setup_system(cfg)
    master = rank == 0
    if cfg.gradient_accumulation_steps % world:
        raise UserError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple "
                        f"of the number of processes ({world})")
    accum = cfg.gradient_accumulation_steps // world  # micro-steps of this process
    if master:
        check_out_dir(cfg.out_dir, ckpt_path, state is None, cfg.overwrite)

    # --- model, optimizer, state ---
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    raw_model = GPT(mc).to(device)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                              device.type)
    data_rng = torch.Generator().manual_seed(cfg.seed + rank)  # the order of the training batches
    iter_num, best_val, evaluated_iter = 0, float("inf"), -1
    if state is not None:
        load_weights(raw_model, state, ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        iter_num, best_val, evaluated_iter = state["iter_num"], state["best_val_loss"], state["evaluated_iter"]
        if len(state["data_rng"]) != world:
            raise UserError(f"the checkpoint was written by {len(state['data_rng'])} process(es); resume it "
                            f"with as many (this run has {world})")
        data_rng.set_state(state["data_rng"][rank])
        if master:
            truncate_log(log_path, iter_num, evaluated_iter == iter_num)
    elif master:
        open(log_path, "w").close()
    model = torch.compile(raw_model) if use_compile(cfg, device) else raw_model
    eval_model = model
    if world > 1:
        # the MoE buffers hold each process's own routing counts: DDP must not overwrite them with rank 0's
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"  # the newer name (torch 2.13) and the older one
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})

    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * mc.block_size
    print0(f"tokens per iteration: {tokens_per_iter:,} = {cfg.gradient_accumulation_steps} x {cfg.batch_size} x "
           f"{mc.block_size}; device {device}, {'bfloat16 autocast' if dtype == torch.bfloat16 else 'float32'}, "
           f"{world} process(es)")

    def log(record):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint():
        rngs = [data_rng.get_state()]
        if world > 1:  # one collective: every process's data sampler state and weights checksum
            gathered = [None] * world
            dist.all_gather_object(gathered, (data_rng.get_state(), weights_checksum(raw_model)))
            rngs, sums = zip(*gathered)
            if len(set(sums)) > 1:
                raise UserError(f"the processes' weights diverged (checksums {sums}); please report this as a bug")
        if master:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "model_args": asdict(mc), "config": vars(cfg),
                "dataset_vocab_size": meta["vocab_size"], "tokenizer": tokenizer, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "iter_num": iter_num, "best_val_loss": best_val,
                "evaluated_iter": evaluated_iter, "data_rng": rngs, "skipped_steps": skipped,
            })
        return iter_num

    if state is None:
        log({"event": "start", "time": time.time(), "code": code_version(), "config": vars(cfg),
             "model_args": asdict(mc), "params": count_params(mc)})
    saved_iter = state["iter_num"] if state is not None else None
    stop = StopFlag()
    bad_steps = 0  # in a row
    skipped = state["skipped_steps"] if state is not None else 0  # in all
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not (master and sys.stderr.isatty()), dynamic_ncols=True)
    t_last, it_last = time.time(), iter_num
    try:
        while True:
            # --- evaluate and checkpoint ---
            if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and evaluated_iter != iter_num:
                raw_model.pop_routing_stats()  # forget the training steps' routing
                val_loss = evaluate(eval_model, lambda: raw_model.loss_parts, val_data, cfg.batch_size,
                                    mc.block_size, cfg.eval_iters, device, autocast)
                routing = raw_model.pop_routing_stats()
                best_val, evaluated_iter = min(best_val, val_loss), iter_num
                print0(f"iter {iter_num}: val loss {val_loss:.4f}, best {best_val:.4f}")
                for layer, s in enumerate(routing):
                    print0(routing_line(layer, s))
                log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "val_loss": val_loss,
                     "best_val_loss": best_val, "routing": routing, "time": time.time()})
                saved_iter = checkpoint()
                t_last, it_last = time.time(), iter_num
            if iter_num >= cfg.max_iters:
                break

            # --- one optimizer step: lr, micro-steps, clip, step ---
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = dict.fromkeys(("loss", "ce", "aux", "z"), 0.0)
            for micro_step in range(accum):
                x, y = get_batch(train_data, cfg.batch_size, mc.block_size, data_rng, device)
                last = micro_step == accum - 1
                with (model.no_sync() if world > 1 and not last else nullcontext()), autocast:
                    _, loss = model(x, y)
                (loss / accum).backward()  # gradients average over micro-steps (and, by DDP, processes)
                parts["loss"] += loss.detach() / accum
                for k in ("ce", "aux", "z"):
                    parts[k] += raw_model.loss_parts[k] / accum
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            if torch.isfinite(grad_norm):  # DDP averaged the gradients, so every process agrees
                optimizer.step()
                raw_model.update_expert_bias()
                bad_steps = 0
            else:  # a non-finite loss or gradient: skip the step rather than poison the weights
                raw_model.pop_routing_stats()
                bad_steps += 1
                skipped += 1
                print0(f"iter {iter_num}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
                if bad_steps >= cfg.max_bad_steps:
                    last_good = f"{ckpt_path} (iteration {saved_iter})" if saved_iter is not None else "none"
                    raise UserError(f"{bad_steps} steps in a row had a non-finite loss or gradient, stopping. "
                                    f"Last good checkpoint: {last_good}. Try a lower learning_rate")
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            bar.update(1)

            # --- log ---
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                dt = (time.time() - t_last) / max(1, iter_num - it_last)
                t_last, it_last = time.time(), iter_num
                vals = {k: float(v) for k, v in parts.items()}
                print0(f"iter {iter_num}: loss {vals['loss']:.4f}, ce {vals['ce']:.4f}, aux {vals['aux']:.4f}, "
                       f"z {vals['z']:.4f}, lr {lr:.1e}, {dt * 1000:.1f}ms")
                log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, **vals, "lr": lr,
                     "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_iter / dt, "skipped_steps": skipped})

            # --- stop cleanly on SIGINT / SIGTERM ---
            stop_now = torch.tensor(float(stop.set))
            if world > 1:
                dist.all_reduce(stop_now)  # every process stops after the same step
            if stop_now.item():
                checkpoint()
                print0(f"stopped at iteration {iter_num}, checkpoint written: continue with the same command "
                       f"and --init_from=resume")
                break
    finally:
        stop.restore()
        bar.close()
        if world > 1:
            # free DDP (its reducer holds the process group) and finish all collectives first: a
            # process group destroyed while its worker threads still release tensors can deadlock
            del model
            dist.barrier()
            dist.destroy_process_group()
    print0(f"best val loss {best_val:.4f}")
    return best_val


def main(argv):
    try:
        train(SimpleNamespace(**configure(argv, defaults())))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])

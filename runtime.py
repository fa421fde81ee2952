"""
The machinery around training that is not training itself, so that train.py reads as the loop:
devices and processes, torch.compile, the CPU allocator, checkpoint files, the metrics log, the
stop flag, output folders and the code version. Used by train.py, sample.py, bench.py and
experiment.py.
"""

import ctypes
import glob
import inspect
import json
import os
import signal
import subprocess
from contextlib import nullcontext
from dataclasses import asdict
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_FORMAT = 1  # version of what write_checkpoint stores; load_checkpoint refuses any other


def print0(*args, **kwargs):
    """print on the first process only (through tqdm, so that a progress bar stays intact)."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


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


# -----------------------------------------------------------------------------
# devices, precision, processes


class System(NamedTuple):
    """Where this process computes, in what precision, and its place among the processes."""
    device: torch.device
    dtype: torch.dtype  # bfloat16 (autocast) or float32
    autocast: object  # the context forward passes run in
    rank: int  # this process, 0 .. world - 1
    world: int  # number of processes

    @property
    def master(self):
        """The process that logs and writes checkpoints."""
        return self.rank == 0


def pick_device(name):
    """A device name: name itself, or for "auto" the first available of cuda, mps and cpu."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def setup_system(device, dtype):
    """The System from the device and dtype knobs and torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE);
    several processes join one process group (nccl on CUDA, gloo elsewhere)."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    name = pick_device(device)
    rank, world = 0, 1
    if int(os.environ.get("RANK", -1)) != -1:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        dist.init_process_group(backend="nccl" if name.startswith("cuda") else "gloo")
        if name.startswith("cuda"):
            name = f"cuda:{local_rank}"
            torch.cuda.set_device(name)
    device = torch.device(name)
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    dtype = getattr(torch, dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return System(device, dtype, autocast, rank, world)


# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, by torch.cuda.get_device_name(), matched exactly: one
# name can begin another ("NVIDIA L4", "NVIDIA L40S"), and one chip's form factors differ (H100 SXM, PCIe).
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA GeForce RTX 4090": 165e12,  # with fp32 accumulation, as torch's bf16 matmuls use
    "NVIDIA GeForce RTX 3090": 71e12,  # idem
}


def device_name(device):
    """The name of device as torch.cuda reports it (the keys of PEAK_BF16_FLOPS), or its type ("cpu", "mps")."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops(name, dtype):
    """(peak FLOP/s, note): the denominator of MFU for a device of that name (device_name) computing in dtype,
    or None; the note says which peak is used, or why there is none. CPUs get none: their matmul rate depends
    on the vector units, the clock and the cores other work leaves free, so a fixed peak would mislead and a
    start-up probe would measure the machine's load of the moment; achieved FLOP/s is shown alone."""
    if name == "cpu":
        return None, "MFU not shown on CPU (no fixed peak); achieved FLOP/s only"
    if dtype != torch.bfloat16:
        precision = str(dtype).removeprefix("torch.")
        return None, f"MFU not shown: the peaks known are bf16 tensor-core ones, this run computes in {precision}"
    if name not in PEAK_BF16_FLOPS:
        return None, f"MFU not shown: no peak for {name!r} in runtime.PEAK_BF16_FLOPS"
    peak = PEAK_BF16_FLOPS[name]
    return peak, f"MFU against the dense bf16 peak of {name}: {peak / 1e12:.0f} TFLOP/s"


def wrap_ddp(model, device):
    """The model wrapped for data parallelism. DDP would broadcast the buffers from rank 0 before every
    forward; they are equal on every process already (the aux_free bias is updated from every process's
    load), so that is turned off."""
    no_broadcast = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"  # the newer name (torch 2.13) and the older one
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_broadcast: False})


def end_processes():
    """Finish every collective, then leave the process group: a group destroyed while its worker threads
    still release tensors can deadlock. Free the DDP model first (its reducer holds the group)."""
    dist.barrier()
    dist.destroy_process_group()


def weights_checksum(model):
    """One number from all weights: data parallelism must keep it equal on every process."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().item()


def use_compile(value, device):
    """The compile knob, the same in train.py and bench.py: "auto" (on for CUDA), "true" or "false"."""
    value = value.lower()
    if value not in ("auto", "true", "false"):
        raise UserError(f"compile must be 'auto', 'true' or 'false', got {value!r}")
    return device.type == "cuda" if value == "auto" else value == "true"


def compile_model(model, fullgraph=False):
    """torch.compile the model. The MoE's loop path indexes each expert's tokens with torch.where, whose
    size depends on the routing: dynamo must trace such ops rather than break the graph there."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model, fullgraph=fullgraph)


def keep_freed_memory():
    """On glibc, keep freed blocks of up to 32 MB for reuse rather than returning them to the OS:
    otherwise each step page-faults its large temporaries back in (about 5 ms per 16 MB on a CPU)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum): heap-allocate blocks up to 32 MB
    libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD: never trim the heap's free top


# -----------------------------------------------------------------------------
# checkpoints


def write_checkpoint(path, about, model, optimizer, progress, data_rng, system):
    """Save what continuing exactly needs, from the first process: `about` the run (model_args, config,
    dataset_vocab_size, tokenizer), the weights (of the uncompiled, unwrapped model: no "_orig_mod."
    prefixes), the optimizer, `progress` (a dataclass: iter_num, best_val_loss, ...), every process's data
    sampler state and the format version. With several processes, one collective gathers the samplers'
    states together with a checksum of each process's weights, which must agree."""
    samplers = [data_rng.get_state()]
    if system.world > 1:
        gathered = [None] * system.world
        dist.all_gather_object(gathered, (data_rng.get_state(), weights_checksum(model)))
        samplers, checksums = zip(*gathered)
        if len(set(checksums)) > 1:
            raise UserError(f"the processes' weights diverged (checksums {checksums}); please report this as a bug")
    if system.master:
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, **about, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), **asdict(progress), "data_rng": samplers})


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
    """The checkpoint's weights into model, or UserError if they do not fit the model it describes."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not hold the weights of the model it describes: "
                        f"{str(e).splitlines()[0]}") from None


# -----------------------------------------------------------------------------
# the metrics log, the stop flag, the output folder


def read_log(path):
    """The records of a metrics.jsonl file; [] if there is none."""
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, iter_num, evaluated):
    """Keep the log records up to a resumed checkpoint (at iter_num, its evaluation done or not):
    drop those a crashed run wrote after it."""
    keep = [r for r in read_log(path) if r.get("iter", 0) < iter_num
            or (r.get("iter") == iter_num and ("val_loss" not in r or evaluated))]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)


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

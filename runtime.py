"""
The machinery around training that is not training itself, so that train.py reads as the loop:
devices and processes, torch.compile, the CPU allocator, checkpoint files, the metrics log, the
stop flag, output folders and their lock, and the code version. Used by train.py, sample.py, bench.py
and experiment.py.
"""

import ctypes
import glob
import inspect
import json
import os
import signal
import subprocess
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import guard
from configurator import UserError
from model import GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_FORMAT = 1  # version of what write_checkpoint stores; load_checkpoint refuses any other
CHECKPOINT_KEYS = ("model_args", "config", "dataset_vocab_size", "tokenizer", "model", "optimizer", "data_rng",
                   "iter_num", "best_val_loss", "evaluated_iter", "skipped_steps")  # the last four: train.Progress
LOCK_FILE = "run.lock"  # in out_dir while a run writes there: the pid of its train.py


def print0(*args, **kwargs):
    """print on the first process only (through tqdm, so that a progress bar stays intact)."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


def duration(seconds):
    """A wall time for people: '42s', '12.5 min', '3.2 h'."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


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


def check_device(name):
    """UserError unless name is "auto" or a device this machine has: cpu, cuda, cuda:N or mps."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}, but this machine has no CUDA GPU that torch {torch.__version__} can use: "
                        f"use --device=cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device={name}, but this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name}, but MPS (Apple GPUs) is not available here: use --device=cpu (or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device={name}: tinymoe runs on cpu, cuda or mps")


def native_bf16(device):
    """Whether device computes in bf16 natively: CUDA GPUs from Ampere (SM 8.0) on (without the argument,
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated, slowly: V100, T4), and x86
    CPUs with AVX-512 BF16 or AMX, where oneDNN's bf16 matmuls run (elsewhere bf16 on a CPU is slower
    than fp32)."""
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def pick_dtype(dtype, bf16):
    """The torch dtype of the dtype knob: "auto" is bfloat16 where the device has it natively (bf16), else
    float32 (fp16 would need a loss scaler, which train.py does not have)."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if bf16 else "float32"
    return getattr(torch, dtype)


def setup_system(device, dtype):
    """The System from the device and dtype knobs and torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE);
    several processes join one process group: nccl on CUDA, bound to the process's GPU (so that barriers
    and object collectives use it), gloo elsewhere."""
    name = pick_device(device)
    rank, world = 0, 1
    if int(os.environ.get("RANK", -1)) != -1:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        name = f"cuda:{local_rank}" if name.startswith("cuda") else name
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # where this process's CUDA work goes by default
    dtype = pick_dtype(dtype, native_bf16(device))  # a wrong dtype knob stops before any process group exists
    if world > 1:
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
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
    "NVIDIA GeForce RTX 5090": 209.5e12,  # idem (NVIDIA's RTX Blackwell GPU architecture whitepaper)
    "NVIDIA H800": 989e12,  # H800 SXM5: the H100 SXM5's compute, less interconnect
    "NVIDIA H800 PCIe": 756e12,
    "NVIDIA A800-SXM4-80GB": 312e12,  # the A100's compute, less interconnect
    "NVIDIA A800-SXM4-40GB": 312e12,
    "NVIDIA A800 80GB PCIe": 312e12,
    "NVIDIA A800 40GB PCIe": 312e12,
    "NVIDIA B200": 2.25e15,  # HGX B200: 4.5 PFLOP/s dense FP8, half that in bf16
    "NVIDIA GB200": 2.5e15,  # GB200 NVL72: 180 PFLOP/s dense bf16 over 72 GPUs
}
# Cards with no peak in the table on purpose, by a part of their name: the note says why.
NO_PEAK = {
    "B300": "Blackwell Ultra (B300, GB300): NVIDIA's dense bf16 figure for it was not checked here",
    "B100": "B100: no dense bf16 figure was checked here",
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
        why = next((why for part, why in NO_PEAK.items() if part in name), "no peak in runtime.PEAK_BF16_FLOPS")
        return None, f"MFU not shown for {name!r}: {why}"
    peak = PEAK_BF16_FLOPS[name]
    return peak, f"MFU against the dense bf16 peak of {name}: {peak / 1e12:.0f} TFLOP/s"


def skips_on_device(optimizer):
    """Whether optimizer.step() skips a step on the device, without a host sync, where optimizer.found_inf is 1:
    fused AdamW on CUDA and CPU. torch's _fused_adamw (torch/optim/adam.py) adds 1 to every step counter, runs
    the kernel, which returns untouched where found_inf is 1 (weights, moments), then subtracts found_inf from
    the counters: all exactly as before. MPS's fused kernel takes found_inf but ignores it
    (aten/src/ATen/native/mps/operations/FusedAdamWKernelImpl.mm): there train.py asks the host."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return bool(optimizer.defaults.get("fused")) and all(p.device.type in ("cuda", "cpu") for p in params)


def job_env(env, slot, jobs):
    """The environment of a run in job slot `slot` of `jobs` (experiment.py --jobs=N): with several runs at
    once and several CUDA GPUs visible, CUDA_VISIBLE_DEVICES names one GPU, slot mod their number, so that the
    runs spread over the GPUs rather than all train on GPU 0."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible is not None else \
        [str(i) for i in range(torch.cuda.device_count())]
    if jobs == 1 or len(gpus) < 2:
        return env
    return {**env, "CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)].strip()}


def set_threads(threads):
    """Apply a script's threads knob (torch.set_num_threads; 0 leaves torch's default, which OMP_NUM_THREADS
    sets) and return the start-up line that says how many CPU threads torch uses, and how to change it. On a
    machine busy with other work (load average above its cores) torch's default of one thread per core
    starves: the line says so, as fewer threads then run several times faster (docs/performance.md)."""
    if threads:
        torch.set_num_threads(threads)
    source = ("threads" if threads else "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else
              "torch's default, one per core")
    line = (f"CPU threads: {torch.get_num_threads()} ({source}); change with --threads=N or OMP_NUM_THREADS=N")
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1
    if load > cores and torch.get_num_threads() > 1:
        line += (f". This machine is busy (load average {load:.1f} on {cores} cores): fewer threads, "
                 f"--threads=1, may be several times faster")
    return line


def wrap_ddp(model, device):
    """The model wrapped for data parallelism. DDP would broadcast the buffers from rank 0 before every
    forward; they are equal on every process already (the aux_free bias is updated from every process's
    load), so that is turned off."""
    no_broadcast = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"  # the newer name (torch 2.13) and the older one
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_broadcast: False})


def end_processes(together=True):
    """Finish every collective, then leave the process group: a group destroyed while its worker threads
    still release tensors can deadlock. Free the DDP model first (its reducer holds the group). together=False:
    this process stops on an error of its own while the others may wait in another collective: it leaves at
    once, no barrier (which would wait for them until the nccl timeout, 10 minutes), and its exit makes
    torchrun stop the others (its agent sends every worker SIGTERM once one fails, SIGKILL 30 s later:
    torch/distributed/elastic/agent/server/local_elastic_agent.py, _shutdown)."""
    if not together:
        return
    dist.barrier()
    dist.destroy_process_group()


def weights_checksum(model):
    """One number from all weights: data parallelism must keep it equal on every process."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().item()


def use_compile(value, device):
    """The compile knob, the same in train.py and bench.py: "auto" (on for CUDA), "true" or "false"."""
    choice = value.lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(f"compile must be 'auto', 'true' or 'false', got {value!r}")
    return device.type == "cuda" if choice == "auto" else choice == "true"


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


def finite_state(model, optimizer):
    """Whether every weight, buffer and optimizer state is finite: a checkpoint must not hold anything else."""
    return bool(finite_flag(model, optimizer))


def finite_flag(model, optimizer):
    """finite_state as one bool tensor on the weights' device, one host sync to read. Each tensor's flag is
    moved there first: an unfused optimizer keeps its step counters on the CPU beside GPU (MPS) weights."""
    tensors = [*model.state_dict().values(),
               *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
    device = next(model.parameters()).device
    return torch.stack([torch.isfinite(t).all().to(device) for t in tensors if t.is_floating_point()]).all()


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
    """Write through guard.write_file (a temp file in the same folder, flushed, renamed over path), so a crash
    or a full disk at any point leaves the previous checkpoint whole."""
    try:
        guard.write_file(path, lambda f: torch.save(state, f))
    except OSError as e:
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); {kept}") from None


def load_checkpoint(path):
    """A checkpoint written by write_checkpoint, or UserError for a missing, truncated or foreign file: one
    without every key, whose model cannot be built, or whose weights are not finite."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} (truncated or not a checkpoint): {type(e).__name__}") from None
    foreign = f"{path} is not a tinymoe checkpoint of format {CHECKPOINT_FORMAT}"
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(foreign)
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise UserError(f"{foreign}: it has no {', '.join(missing)}")
    try:
        GPTConfig(**state["model_args"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{foreign}: its model_args describe no model ({e})") from None
    weights = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    if not all(torch.isfinite(v).all() for v in weights):
        raise UserError(f"{path} holds non-finite weights: resume from an earlier copy, or start over")
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


NUMBER_FIELDS = ("iter", "tokens", "loss", "val_loss", "best_val_loss", "time")  # of a metrics.jsonl record


def read_log(path):
    """The records of a metrics.jsonl file; [] if there is none. A last line cut short (by a kill or a full
    disk mid-write) is dropped with a warning; any other line that is not a JSON record is a UserError."""
    if not os.path.exists(path):
        return []
    try:
        lines = open(path, "rb").read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            record = None
        bad = [k for k in NUMBER_FIELDS if isinstance(record, dict) and k in record and not (
            isinstance(record[k], (int, float)) and not isinstance(record[k], bool))]
        if bad:
            raise UserError(f"{path} line {number}: {bad[0]} is not a number ({record[bad[0]]!r}): repair or delete "
                            f"that line")
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines):
            print0(f"warning: dropped the last line of {path}, cut short: {line[:60].decode(errors='replace')!r}")
        else:
            raise UserError(f"{path} line {number} is not a JSON record: repair or delete that line")
    return records


def append_log(path, record):
    """Add one record: appended, not rewritten (a line cut by a kill is dropped by read_log)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror})") from None


def write_log(path, records):
    """Replace a log with records, through guard.write_file: a kill leaves the old or the new."""
    try:
        guard.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror})") from None


def truncate_log(path, iter_num, evaluated):
    """Keep the log records up to a resumed checkpoint (at iter_num, its evaluation done or not) and the
    records of no iteration (the start record): drop those a crashed run wrote after the checkpoint."""
    write_log(path, [r for r in read_log(path) if "iter" not in r or r["iter"] < iter_num
                     or (r["iter"] == iter_num and ("val_loss" not in r or evaluated))])


class StopFlag:
    """SIGINT and SIGTERM, caught for as long as the `with` block runs. Once `graceful` is set (train.py's loop),
    a first signal sets `set`: the loop finishes its step, writes a checkpoint and stops. Before that, or a
    second time, a signal raises KeyboardInterrupt at once, saying which is the last checkpoint (`checkpoint`,
    kept up to date by the loop)."""

    def __init__(self):
        self.set, self.graceful, self.checkpoint = False, False, "none"

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def anywhere(self, system):
        """Whether any process was signalled. With several processes it is a collective that every process
        calls after the same steps (train.py: at log lines), so that all stop after the same one; its tensor is
        on the process's device, as nccl reduces CUDA tensors only, but on the CPU for MPS, as gloo needs."""
        if system.world == 1:
            return self.set
        flag = torch.tensor(float(self.set), device="cpu" if system.device.type == "mps" else system.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.set or not self.graceful:
            raise KeyboardInterrupt(f"stopped at once; last checkpoint: {self.checkpoint}")
        self.set = True
        print0(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop at once)")


@contextmanager
def out_dir_lock(out_dir):
    """Hold out_dir for one run: its lock file holds this process's pid and is locked (a POSIX lock, which
    goes with the process however it ends, so the file a killed run leaves is simply taken over); it is
    removed on exit. out_dir is created if missing, and removed again if nothing else was written to it."""
    import fcntl  # Unix only: imported here, as in prepare.py, so that this module loads anywhere

    created = not os.path.isdir(out_dir)
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"another train.py (pid {holder}) is running in {out_dir}: wait for it to end, "
                                f"or give this run another out_dir") from None
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # locked a file that a finishing run has just removed: lock the one in place now
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        raise UserError(f"out_dir {out_dir} is not writable: {e.strerror}") from None
    try:
        yield
    finally:
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.remove(path)
        os.close(fd)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)


def check_out_dir(ckpt_path, fresh_start, overwrite):
    """Refuse to overwrite another run by accident: its checkpoint, or its metrics.jsonl alone (a run killed
    before its first checkpoint); with overwrite, remove both (so that a run killed before its first checkpoint
    leaves no mix of the old run and the new one); remove the temp files of writes that a killed run left
    behind. Called with out_dir locked."""
    log_path = os.path.join(os.path.dirname(ckpt_path), "metrics.jsonl")
    earlier = [p for p in (ckpt_path, log_path) if os.path.exists(p)] if fresh_start else []
    if earlier and not overwrite:
        resume = "continue it with --init_from=resume, or " if os.path.exists(ckpt_path) else ""
        raise UserError(f"{earlier[0]} exists (an earlier run): {resume}start over with --overwrite=True")
    try:
        for path in earlier:
            os.remove(path)
        for stale in glob.glob(os.path.join(os.path.dirname(ckpt_path), "*.tmp[0-9]*")):  # before guard.write_file
            os.remove(stale)
        guard.remove_leftovers(os.path.dirname(ckpt_path) or ".")
    except OSError as e:
        raise UserError(f"cannot remove {e.filename}: {e.strerror}") from None

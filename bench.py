"""
Time training steps (forward + backward + AdamW) of MoE models against the dense model with the
same active parameters, in one run, so that machine noise hits all models alike.

    python bench.py --quick                   # small shapes: 13 rows, 8 minutes on a busy 2-core CPU
    python bench.py                           # the shapes of config/moe_e4k2.py
    python bench.py --compile=true --dtype=bfloat16 --json_path=bench.json
    python bench.py --help                    # every knob, its default and what it does

Models: dense-active (matched to E4k2's active parameters), E4k2, and the fine-grained E16k4 and
E64k8 whose experts are 1/2 and 1/4 as wide, so K * expert_hidden and hence the active parameters
stay the same (up to the router). MoE models run with moe_impl=grouped and loop (the loop alone
where the grouped GEMM cannot run: compiled, it takes bf16 only), each with the router's real
routing and with forced-balanced routing (MoE.force_balance: every expert gets N*K/E slots, the
best case of dispatch; "x best" is a row's time over its balanced twin's). Warm-up steps are
excluded; repeats are interleaved across models; the median is reported, with its ratio to the
dense-active model. FLOP/s counts model.flops_per_token (active parameters, output layer and
attention); MFU where runtime.PEAK_BF16_FLOPS knows the GPU. Peak memory is the allocator's peak on
CUDA; on CPU (Linux) the peak resident memory of a fresh process running two such steps, less its
resident memory before the model. Nothing is written into the repository (the data cost's token
file goes to a temporary folder), only --json_path if given.
"""

import json
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import torch

from configurator import UserError, check, configure, usage
from model import GPT, GPTConfig, count_params, flops_per_token, match_dense
from report import flops_text
from runtime import check_device, compile_model, device_name, keep_freed_memory, peak_flops, use_compile
from train import get_batch  # what the data cost measures

# -----------------------------------------------------------------------------
quick = False  # small shapes (4 layers, 2048 tokens a step) for a quick CPU check
device = "auto"  # "auto" (cuda, then cpu), "cpu", "cuda"...
dtype = "float32"  # "float32" or "bfloat16" (autocast, as in training)
compile = "auto"  # torch.compile the models (fullgraph), as train.py does: "auto" (on for CUDA), "true" or "false"
repeats = 7  # timed steps per model, interleaved (at least 1)
warmup = 2  # untimed steps per model first (compilation happens here; >= 0)
json_path = ""  # also write the results to this JSON file, for tools: --json_path=bench.json
# -----------------------------------------------------------------------------
KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def check_knobs(cfg):
    """The valid range of every knob above, checked before any model is built or timed."""
    check_device(cfg.device)
    check(cfg.dtype in ("float32", "bfloat16"), f"dtype must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
    check(cfg.compile.lower() in ("auto", "true", "false"), f"compile must be 'auto', 'true' or 'false', got "
                                                            f"{cfg.compile!r}")
    check(cfg.repeats >= 1, f"repeats must be at least 1, got {cfg.repeats}")
    check(cfg.warmup >= 0, f"warmup must be >= 0, got {cfg.warmup}")
    folder = os.path.dirname(os.path.abspath(cfg.json_path)) if cfg.json_path else ""
    check(not cfg.json_path or os.path.isdir(folder) and not os.path.isdir(cfg.json_path),
          f"json_path must name a file in an existing folder, got {cfg.json_path!r}")


def shapes(quick):
    """(base MoE config, batch size): E4k2 at the quick shapes or at config/moe_e4k2.py's."""
    if quick:
        return GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256, n_experts=4, top_k=2,
                         expert_hidden=512), 8
    return GPTConfig(vocab_size=50257, block_size=256, n_layer=6, n_head=8, n_embd=256, n_experts=4, top_k=2,
                     expert_hidden=512), 16


def bench_models(moe, impls):
    """(name, GPTConfig, routing) of every model, MoE dispatch path of impls and routing ("real": the router's
    top-k; "balanced": forced, N*K/E slots per expert) to time."""
    hidden = moe.expert_hidden
    models = [("dense-active", match_dense(moe, "active")), ("moe-e4k2", moe),
              ("moe-e16k4", replace(moe, n_experts=16, top_k=4, expert_hidden=hidden // 2)),
              ("moe-e64k8", replace(moe, n_experts=64, top_k=8, expert_hidden=hidden // 4))]
    return [(name, replace(cfg, moe_impl=impl), routing) for name, cfg in models
            for impl in (impls if cfg.n_experts else ("auto",))
            for routing in (("real", "balanced") if cfg.n_experts else ("-",))]


def dispatch_paths(dtype, compiled):
    """The MoE dispatch paths to time: grouped and loop, or the loop alone where torch's grouped GEMM cannot
    run: compiled, it takes bf16 only (torch 2.13; see model.use_grouped_mm). The benched widths are all
    multiples of 16 bytes, as it needs."""
    return ("grouped", "loop") if dtype == torch.bfloat16 or not compiled else ("loop",)


class Runner:
    """One model, its optimizer and a fixed batch: step() is one timed training step."""

    def __init__(self, cfg, routing, compiled, batch_size, device, dtype):
        torch.manual_seed(0)
        self.model = GPT(cfg).to(device)
        for moe in self.model.moe_layers:
            moe.force_balance = routing == "balanced"
        self.forward = compile_model(self.model, fullgraph=True) if compiled else self.model
        self.optimizer = self.model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device.type)
        self.x, self.y = torch.randint(0, cfg.vocab_size, (2, batch_size, cfg.block_size), device=device)
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with self.autocast:
            _, loss, stats = self.forward(self.x, self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_expert_bias(stats["routing"])  # as train.py's step (aux_free balancing only)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (peak resident since exec) of this process, from Linux's /proc."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


def cpu_peak_memory(args):
    """In a fresh process: peak resident memory over some training steps, less the resident
    memory before the model was built."""
    cfg_dict, routing, compiled, batch_size, dtype_name, steps = args
    keep_freed_memory()  # as train.py does on CPU
    before = proc_status_bytes("VmRSS")
    runner = Runner(GPTConfig(**cfg_dict), routing, compiled, batch_size, torch.device("cpu"),
                    getattr(torch, dtype_name))
    for _ in range(steps):
        runner.step()
    return proc_status_bytes("VmHWM") - before


def peak_memory(cfg, routing, compiled, batch_size, device, dtype):
    """Peak memory of two training steps of the model cfg, in bytes."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        runner = Runner(cfg, routing, compiled, batch_size, device, dtype)
        for _ in range(2):
            runner.step()
        return torch.cuda.max_memory_allocated()
    if not os.path.exists("/proc/self/status"):
        return float("nan")  # CPU memory is read from Linux's /proc
    # Ctrl-C is the main process's to handle: the worker ignores it
    with multiprocessing.get_context("spawn").Pool(1, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
        return pool.apply(cpu_peak_memory, ((asdict(cfg), routing, compiled, batch_size, str(dtype).split(".")[1],
                                             2),))


def data_cost(batch_size, block_size, device):
    """Median seconds for get_batch to sample one batch from a memmapped token file (in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tokens.bin")
        np.random.default_rng(0).integers(0, 4096, 10_000_000, dtype=np.uint16).tofile(path)
        data = np.memmap(path, dtype=np.uint16, mode="r")
        generator = torch.Generator().manual_seed(0)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            get_batch(data, batch_size, block_size, generator, device)
            if device.type == "cuda":
                torch.cuda.synchronize()  # get_batch's copy to the GPU is non-blocking: wait for it
            times.append(time.perf_counter() - t)
        del data  # close the memmap before its folder is removed
        return statistics.median(times)


def time_steps(runners, labels, warmup, repeats):
    """Per runner, the seconds of `repeats` training steps after `warmup` untimed ones. Interleaved: each
    round times every model once, so that the machine's slow and fast moments hit all models alike."""
    for runner, label in zip(runners, labels):
        t = time.perf_counter()
        for _ in range(warmup):
            runner.step()
        print(f"warm-up of {label}: {warmup} steps in {time.perf_counter() - t:.1f}s")
    times = [[] for _ in runners]
    for i in range(repeats):
        for runner, runner_times in zip(runners, times):
            runner_times.append(runner.step())
        print(f"timed round {i + 1} of {repeats}: " + ", ".join(f"{label} {runner_times[-1] * 1000:.0f}ms"
                                                               for label, runner_times in zip(labels, times)))
    return times


def run(cfg):
    """Time every model of bench_models; print the table and return its rows."""
    check_knobs(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    dtype = getattr(torch, cfg.dtype)
    compiled = use_compile(cfg.compile, device)
    if device.type == "cpu":
        keep_freed_memory()  # as train.py does on CPU
    moe, batch_size = shapes(cfg.quick)
    impls = dispatch_paths(dtype, compiled)
    models = bench_models(moe, impls)
    machine = device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak, peak_note = peak_flops(device_name(device), dtype)
    print(f"{machine}, torch {torch.__version__}, {cfg.dtype}, batch {batch_size} x {moe.block_size} tokens, "
          f"{moe.n_layer} layers of width {moe.n_embd}, vocab {moe.vocab_size}")
    print(f"FLOP/s: model.flops_per_token (active parameters in matmuls, output layer and attention) x tokens/s; "
          f"{peak_note}")
    if "grouped" not in impls:
        how = "compiled" if compiled else "eagerly"
        print(f"grouped dispatch not timed: torch's grouped GEMM does not run {how} in {cfg.dtype} on {device.type}")
    if compiled:
        # every compiled model adds an entry for GPT.forward's code to dynamo's cache, which keeps recompile_limit
        # of them (8): past it, a model would fail under fullgraph. One per model, twice over for CUDA's memory runs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(models))
    labels = [f"{name} {model_cfg.moe_impl} {routing}" if model_cfg.n_experts else name
              for name, model_cfg, routing in models]
    runners = [Runner(model_cfg, routing, compiled, batch_size, device, dtype) for _, model_cfg, routing in models]
    times = time_steps(runners, labels, cfg.warmup, cfg.repeats)
    del runners
    results = []
    for (name, model_cfg, routing), label, model_times in zip(models, labels, times):
        print(f"peak memory of {label}...")
        seconds = statistics.median(model_times)
        tokens_per_s = batch_size * model_cfg.block_size / seconds
        results.append({
            "model": name, "moe_impl": model_cfg.moe_impl if model_cfg.n_experts else "-", "routing": routing,
            "compile": compiled, "dtype": cfg.dtype, "ms_per_step": seconds * 1000, "tokens_per_s": tokens_per_s,
            "flops_per_s": flops_per_token(model_cfg) * tokens_per_s,
            "active_params": count_params(model_cfg)["active"],
            "peak_memory_mb": peak_memory(model_cfg, routing, compiled, batch_size, device, dtype) / 2**20,
        })
        if peak:
            results[-1]["mfu"] = results[-1]["flops_per_s"] / peak
    balanced = {(r["model"], r["moe_impl"]): r["ms_per_step"] for r in results if r["routing"] == "balanced"}
    for row in results:
        row["ratio_to_dense"] = row["ms_per_step"] / results[0]["ms_per_step"]  # results[0]: dense-active
        row["memory_ratio_to_dense"] = row["peak_memory_mb"] / results[0]["peak_memory_mb"]
        if (row["model"], row["moe_impl"]) in balanced:  # how far from the best case of its dispatch
            row["ratio_to_balanced"] = row["ms_per_step"] / balanced[(row["model"], row["moe_impl"])]
    print(table(results))
    data_s = data_cost(batch_size, moe.block_size, device)
    print(f"data: get_batch takes {data_s * 1000:.2f} ms = {data_s / (results[0]['ms_per_step'] / 1000):.2%} "
          f"of a dense-active step")
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "batch_size": batch_size, "peak": peak_note,
                       "model": asdict(moe), "data_ms": data_s * 1000, "rows": results}, f, indent=2)
    return results


def table(results):
    mfu = any("mfu" in r for r in results)
    head = (f"| {'model':<12} | {'dispatch':<8} | {'routing':<8} | compile | {'dtype':<8} | {'ms/step':>8} | "
            f"{'tokens/s':>9} | {'FLOP/s':>13} |" + (" MFU   |" if mfu else "") +
            f" {'peak MB':>8} | {'x dense':>7} | {'x best':>6} | {'mem x':>5} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in results:
        best = f"{r['ratio_to_balanced']:.2f}" if "ratio_to_balanced" in r else "-"
        lines.append(f"| {r['model']:<12} | {r['moe_impl']:<8} | {r['routing']:<8} | "
                     f"{'on' if r['compile'] else 'off':<7} | {r['dtype']:<8} | {r['ms_per_step']:>8.1f} | "
                     f"{r['tokens_per_s']:>9,.0f} | {flops_text(r['flops_per_s']):>13} |"
                     + (f" {r['mfu']:>5.1%} |" if mfu else "") +
                     f" {r['peak_memory_mb']:>8.0f} | {r['ratio_to_dense']:>7.2f} | {best:>6} | "
                     f"{r['memory_ratio_to_dense']:>5.2f} |")
    return "\n".join(lines)


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(usage(__doc__, {k: globals()[k] for k in KEYS}, [__file__]))
        return
    sys.stdout.reconfigure(line_buffering=True)  # each line as it is printed, into a file or pipe too
    try:
        run(SimpleNamespace(**configure(argv, {k: globals()[k] for k in KEYS})))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])

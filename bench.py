"""
Time training steps (forward + backward + AdamW) of MoE models against the dense model with the
same active parameters, in one run, each step of a model alternating with one of the dense model's,
so that machine noise hits both alike.

    python bench.py --quick                   # small shapes: 13 rows, 2 to 3 minutes on a 2-core CPU
    python bench.py                           # the shapes of config/moe_e4k2.py
    python bench.py --compile=true --dtype=bfloat16 --json_path=bench.json
    python bench.py --help                    # every knob, its default and what it does

Models: dense-active (matched to E4k2's active parameters), E4k2, and the fine-grained E16k4 and
E64k8 whose experts are 1/2 and 1/4 as wide, so K * expert_hidden and hence the active parameters
stay the same (up to the router). MoE models run with moe_impl=grouped and loop (the loop alone
where the grouped GEMM cannot run: compiled, it takes bf16 only), each with the router's real
routing and with forced-balanced routing (force_balance: every expert gets N*K/E slots, the
best case of dispatch; "x best" is a row's time over its balanced twin's). Each model runs in a
process of its own (Worker), as in a training run; the dense-active model's process lasts the whole
run, and each other model's timed steps alternate with as many of its steps: "x dense" is the median,
over those rounds, of a model's step over the dense-active step beside it. Warm-up steps are excluded. FLOP/s counts
model.flops_per_token (active parameters, output layer and attention); MFU where
runtime.PEAK_BF16_FLOPS knows the GPU. Peak memory is the allocator's peak on CUDA; on CPU (Linux)
the peak resident memory of the model's process, less its resident memory before the model. Nothing
is written into the repository (the data cost's token file goes to a temporary folder), only
--json_path if given.
"""

import guard  # isort: skip  (first: from here on a Ctrl-C or SIGTERM exits quietly, never a traceback)

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

from configurator import UserError, check, check_choice, configure, print_help, usage
from model import GPT, GPTConfig, count_params, flops_per_token, match_dense
from moe_kernels import cuda_capability, grouped_mm_runs
from report import flops_text
from runtime import (
    check_device,
    compile_model,
    device_name,
    keep_freed_memory,
    peak_flops,
    set_threads,
    use_compile,
)
from train import get_batch  # what the data cost measures

# -----------------------------------------------------------------------------
quick = False  # small shapes (4 layers, 2048 tokens a step) for a quick CPU check
device = "auto"  # "auto" (cuda, then cpu), "cpu", "cuda"...
dtype = "float32"  # "float32" or "bfloat16" (autocast, as in training)
compile = "auto"  # torch.compile the models (fullgraph), as train.py does: "auto" (on for CUDA), "true" or "false"
repeats = 7  # timed steps per model, each alternating with one of the dense-active model's (at least 1)
warmup = 10  # untimed steps per model first: compilation; on CPU in bf16 oneDNN compiles kernels for new shapes (>= 0)
threads = 0  # CPU threads of torch in each model's process (torch.set_num_threads); 0: torch's default
json_path = ""  # also write the results to this JSON file, for tools: --json_path=bench.json
overwrite = False  # let json_path replace an existing file
# -----------------------------------------------------------------------------
KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def check_knobs(cfg):
    """The valid range of every knob above, checked before any model is built or timed."""
    check_device(cfg.device)
    check_choice("dtype", cfg.dtype, ("float32", "bfloat16"))
    check_choice("compile", cfg.compile.lower(), ("auto", "true", "false"))
    check(cfg.repeats >= 1, f"repeats must be at least 1, got {cfg.repeats}")
    check(cfg.warmup >= 0, f"warmup must be >= 0, got {cfg.warmup}")
    check(cfg.threads >= 0, f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    folder = os.path.dirname(os.path.abspath(cfg.json_path)) if cfg.json_path else ""
    check(not cfg.json_path or os.path.isdir(folder) and not os.path.isdir(cfg.json_path),
          f"json_path must name a file in an existing folder, got {cfg.json_path!r}")
    check(not cfg.json_path or cfg.overwrite or not os.path.exists(cfg.json_path),
          f"json_path {cfg.json_path} exists: replace it with --overwrite=True, or give another path")
    if cfg.json_path:  # before the minutes of timing, not after
        try:
            guard.check_writable(folder)
        except OSError as e:
            raise UserError(f"json_path {cfg.json_path} cannot be written: {e.strerror}") from None


def shapes(quick):
    """(base MoE config, batch size): E4k2 at the quick shapes or at config/moe_e4k2.py's, its training batch
    included (tests/test_bench.py checks them against the config file)."""
    if quick:
        return GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256, n_experts=4, top_k=2,
                         expert_hidden=512), 8
    return GPTConfig(vocab_size=50257, block_size=256, n_layer=6, n_head=8, n_embd=256, n_experts=4, top_k=2,
                     expert_hidden=512), 64


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


def dispatch_paths(dtype, compiled, device, widths):
    """The MoE dispatch paths to time: grouped and loop, or the loop alone where torch's grouped GEMM cannot
    run (moe_kernels.grouped_mm_runs, the rule train.py and sample.py share: compiled, it takes bf16 only;
    rows of 16 bytes; CPU or CUDA). widths: n_embd and the benched expert hidden sizes."""
    runs = grouped_mm_runs(device.type, cuda_capability(device), dtype, list(widths), compiled)
    return ("grouped", "loop") if runs else ("loop",)


def force_balance(moe):
    """Make an MoE layer route slot s = n * K + k to expert s mod E, so every expert gets N*K/E slots and a
    token's K slots go to K different experts: the best case of dispatch, as torchtitan, OLMo-core and
    megablocks benchmark it. Here only, on the module, never a config knob: the tokens would go to experts
    by position, whatever the router says (the weights stay the router's scores of those experts)."""
    route = moe.route

    def balanced(x):
        logits, scores, _, _ = route(x)
        N, K = x.shape[0], moe.config.top_k
        experts = (torch.arange(N * K, device=x.device) % moe.config.n_experts).view(N, K)  # (N, K)
        weights = scores.gather(-1, experts)  # (N, K)
        if moe.config.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, weights, experts
    moe.route = balanced


class Runner:
    """One model, its optimizer and a fixed batch: step() is one timed training step."""

    def __init__(self, cfg, routing, compiled, batch_size, device, dtype):
        torch.manual_seed(0)
        self.model = GPT(cfg).to(device)
        for moe in self.model.moe_layers if routing == "balanced" else []:
            force_balance(moe)
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


def serve(conn, cfg_dict, routing, compiled, batch_size, device_name, dtype_name):
    """A Worker's process: build the Runner, then answer "step" (seconds of one training step) and "memory"
    (peak bytes so far: the allocator's on CUDA; on CPU the peak resident memory less that before the model)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    device = torch.device(device_name)
    if device.type == "cpu":
        keep_freed_memory()  # as train.py does on CPU
    linux = os.path.exists("/proc/self/status")
    before = proc_status_bytes("VmRSS") if linux else 0
    try:
        runner = Runner(GPTConfig(**cfg_dict), routing, compiled, batch_size, device, getattr(torch, dtype_name))
        conn.send(("ok", None))
        while (command := conn.recv()) != "stop":
            if command == "step":
                conn.send(("ok", runner.step()))
            elif device.type == "cuda":
                conn.send(("ok", torch.cuda.max_memory_allocated(device)))
            else:  # CPU memory is read from Linux's /proc
                conn.send(("ok", proc_status_bytes("VmHWM") - before if linux else float("nan")))
    except Exception as e:  # the main process reports it
        conn.send(("error", f"{type(e).__name__}: {e}"))


class Worker:
    """A model timed in a process of its own. A process holds caches that every model in it shares: on CPU,
    oneDNN's compiled matmul kernels (the last ~1024 shapes; see moe_kernels.group_rows_multiple), which a model with
    other shapes would evict; dynamo's; the allocator's. One model per process, as in a training run."""

    def __init__(self, label, cfg, routing, compiled, batch_size, device, dtype):
        context = multiprocessing.get_context("spawn")
        self.label, (self.conn, child) = label, context.Pipe()
        self.process = context.Process(target=serve, daemon=True, args=(
            child, asdict(cfg), routing, compiled, batch_size, str(device), str(dtype).split(".")[1]))
        self.process.start()
        child.close()
        self.answer()  # the model is built

    def answer(self):
        try:
            status, value = self.conn.recv()
        except EOFError:  # the process died (killed for memory, for one)
            status, value = "error", f"its process ended with status {self.process.join() or self.process.exitcode}"
        if status == "error":
            raise UserError(f"{self.label} failed: {value}")
        return value

    def step(self):
        self.conn.send("step")
        return self.answer()

    def peak_memory(self):
        self.conn.send("memory")
        return self.answer()

    def warm_up(self, steps, every_s=30):
        """steps untimed steps, said before they start and every every_s seconds: a log shows what the bench does."""
        print(f"warming up {self.label}: {steps} untimed steps (compilation, kernel caches)...")
        t = last = time.perf_counter()
        for done in range(1, steps + 1):
            step_start = time.perf_counter()
            self.step()
            now = time.perf_counter()  # as train.py: a line where one more step would leave every_s without one
            if now - last + (now - step_start) >= every_s and done < steps:
                print(f"  warm-up of {self.label}: {done} of {steps} steps in {time.perf_counter() - t:.0f}s")
                last = time.perf_counter()
        print(f"warm-up of {self.label}: {steps} steps in {time.perf_counter() - t:.1f}s")

    def close(self):
        self.conn.send("stop")
        self.process.join()


def time_models(workers, warmup, repeats):
    """Time every model of `workers` (label and a function that starts its Worker): the first, the dense-active
    model, runs in a process that lasts throughout; each other model's `repeats` steps alternate with as many of
    the dense-active model's, so that the machine's slow and fast moments hit a model and its reference alike.
    Returns per model: its step seconds, the dense-active's in the same rounds, and its peak memory in bytes."""
    dense = workers[0]()
    dense.warm_up(warmup)
    results, dense_times = [], []
    try:
        for start in workers[1:]:
            worker = start()
            try:
                worker.warm_up(warmup)
                print(f"timing {worker.label}: {repeats} steps, each beside one of dense-active's...")
                times = [(dense.step(), worker.step()) for _ in range(repeats)]
                results.append(([t for _, t in times], [t for t, _ in times], worker.peak_memory()))
            finally:
                worker.close()
            dense_times += results[-1][1]
            model_ms, dense_ms = (statistics.median(ts) * 1000 for ts in results[-1][:2])
            print(f"{worker.label}: {model_ms:.0f} ms a step, dense-active {dense_ms:.0f} ms in the same rounds")
        if len(workers) == 1:
            dense_times = [dense.step() for _ in range(repeats)]
        return [(dense_times, dense_times, dense.peak_memory()), *results]
    finally:
        dense.close()


def paired_ratio(times, dense_times):
    """The median over rounds of a model's step time over the dense-active step it alternated with: a slow
    moment of the machine slows both steps of a round, and cancels; the ratio of the two medians need not."""
    return statistics.median(t / d for t, d in zip(times, dense_times, strict=True))


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


def run(cfg):
    """Time every model of bench_models; print the table and return its rows."""
    check_knobs(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    dtype = getattr(torch, cfg.dtype)
    compiled = use_compile(cfg.compile, device)
    moe, batch_size = shapes(cfg.quick)
    impls = dispatch_paths(dtype, compiled, device, (moe.n_embd, moe.expert_hidden, moe.expert_hidden // 4))
    models = bench_models(moe, impls)
    if cfg.threads:  # the models' processes (spawned) take it from the environment
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
    threads_line = set_threads(cfg.threads)
    machine = device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak, peak_note = peak_flops(device_name(device), dtype)
    print(f"{machine}, torch {torch.__version__}, {cfg.dtype}, batch {batch_size} x {moe.block_size} tokens, "
          f"{moe.n_layer} layers of width {moe.n_embd}, vocab {moe.vocab_size}")
    print(f"FLOP/s: model.flops_per_token (active parameters in matmuls, output layer and attention) x tokens/s; "
          f"{peak_note}")
    if device.type == "cpu":
        print(threads_line)
    if "grouped" not in impls:
        how = "compiled" if compiled else "eagerly"
        print(f"grouped dispatch not timed: torch's grouped GEMM does not run {how} in {cfg.dtype} on {device.type}")
    labels = [f"{name} {model_cfg.moe_impl} {routing}" if model_cfg.n_experts else name
              for name, model_cfg, routing in models]
    workers = [lambda label=label, model_cfg=model_cfg, routing=routing:
               Worker(label, model_cfg, routing, compiled, batch_size, device, dtype)
               for label, (_, model_cfg, routing) in zip(labels, models)]
    results = []
    for (name, model_cfg, routing), (times, dense_times, memory) in zip(models, time_models(workers, cfg.warmup,
                                                                                          cfg.repeats)):
        seconds = statistics.median(times)
        tokens_per_s = batch_size * model_cfg.block_size / seconds
        results.append({
            "model": name, "moe_impl": model_cfg.moe_impl if model_cfg.n_experts else "-", "routing": routing,
            "compile": compiled, "dtype": cfg.dtype, "ms_per_step": seconds * 1000, "tokens_per_s": tokens_per_s,
            "flops_per_s": flops_per_token(model_cfg) * tokens_per_s,
            "active_params": count_params(model_cfg)["active"], "peak_memory_mb": memory / 2**20,
            "ratio_to_dense": paired_ratio(times, dense_times),
        })
        if peak:
            results[-1]["mfu"] = results[-1]["flops_per_s"] / peak
    balanced = {(r["model"], r["moe_impl"]): r["ms_per_step"] for r in results if r["routing"] == "balanced"}
    for row in results:
        row["memory_ratio_to_dense"] = row["peak_memory_mb"] / results[0]["peak_memory_mb"]
        if (row["model"], row["moe_impl"]) in balanced:  # how far from the best case of its dispatch
            row["ratio_to_balanced"] = row["ms_per_step"] / balanced[(row["model"], row["moe_impl"])]
    print(table(results))
    data_s = data_cost(batch_size, moe.block_size, device)
    print(f"data: get_batch takes {data_s * 1000:.2f} ms = {data_s / (results[0]['ms_per_step'] / 1000):.2%} "
          f"of a dense-active step")
    if cfg.json_path:
        guard.write_text(cfg.json_path, json.dumps({
            "machine": machine, "torch": torch.__version__, "batch_size": batch_size, "peak": peak_note,
            "model": asdict(moe), "data_ms": data_s * 1000, "rows": results}, indent=2))
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
        print_help(usage(__doc__, {k: globals()[k] for k in KEYS}, [__file__]))
        return
    sys.stdout.reconfigure(line_buffering=True)  # each line as it is printed, into a file or pipe too
    try:
        with guard.phase("timing the models", "run with --quick=True, or on a device with more memory"):
            run(SimpleNamespace(**configure(argv, {k: globals()[k] for k in KEYS})))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    guard.run_main(main)

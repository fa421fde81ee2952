"""The CUDA path. First, on CPU, every choice made for CUDA: the dispatch each GPU generation gets, bf16
without emulation, fused AdamW, the process group bound to the process's GPU, and every collective's tensor on
the process's device (the meta device stands in for a GPU: nccl rejects tensors that are not on it).
Then the GPU check, marked `cuda` and skipped without a GPU: `bash tests/gpu_check.sh` runs it."""

import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import ROOT
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels
import runtime
from configurator import UserError
from model import GPT, GPTConfig, MoE
from moe_kernels import GROUPED_MM_FALLBACK_SYNCS, cuda_capability, use_grouped_mm
from runtime import StopFlag, System, pick_dtype, setup_system

# -----------------------------------------------------------------------------
# on CPU: the choices made for CUDA

BF16, FP32 = torch.bfloat16, torch.float32
E4K2_WIDTHS = [256, 512, 512, 512, 512]  # n_embd and the expert hidden sizes of config/moe_e4k2.py


@pytest.mark.parametrize("device_type, capability, dtype, widths, n_experts, compiling, grouped", [
    ("cuda", (9, 0), BF16, E4K2_WIDTHS, 4, True, True),  # H100, H200: the fused kernel
    ("cuda", (10, 0), BF16, E4K2_WIDTHS, 4, True, True),  # B200, GB200
    ("cuda", (8, 0), BF16, E4K2_WIDTHS, 4, True, False),  # A100: torch's fallback syncs more than the loop
    ("cuda", (8, 9), BF16, E4K2_WIDTHS, 4, True, False),  # L4, L40S, RTX 4090
    ("cuda", (12, 0), BF16, E4K2_WIDTHS, 4, True, False),  # RTX 5090, RTX PRO 6000
    ("cuda", (8, 0), BF16, [256] + [128] * 9, 9, True, False),  # as many experts as the fallback's syncs
    ("cuda", (8, 0), BF16, [256] + [128] * 10, 10, True, True),  # more experts: the fallback syncs less
    ("cuda", None, BF16, E4K2_WIDTHS, 4, True, False),  # ROCm: the fallback
    ("cuda", (9, 0), FP32, E4K2_WIDTHS, 4, True, False),  # compiled grouped_mm takes bf16 only
    ("cuda", (9, 0), FP32, [256] + [128] * 16, 16, False, True),  # eager fp32: the fallback, many experts
    ("cuda", (7, 0), FP32, E4K2_WIDTHS, 4, False, False),  # V100: float32 (no native bf16), the loop
    ("cuda", (9, 0), BF16, [260, 512, 512, 512, 512], 4, True, False),  # rows of 520 bytes: not 16-byte aligned
    ("cpu", None, FP32, E4K2_WIDTHS, 4, False, True),
    ("cpu", None, FP32, E4K2_WIDTHS, 4, True, False),
    ("cpu", None, BF16, E4K2_WIDTHS, 4, True, True),
    ("cpu", None, BF16, [32, 52], 1, False, False),  # 104-byte rows
    ("mps", None, BF16, E4K2_WIDTHS, 4, False, False),
])
def test_dispatch_by_gpu_generation(device_type, capability, dtype, widths, n_experts, compiling, grouped):
    assert use_grouped_mm(device_type, capability, dtype, widths, n_experts, compiling) == grouped


def test_windows_builds_take_the_loop_on_sm90(monkeypatch):
    """torch's Windows builds have no grouped kernel: on 9.x/10.x GPUs "auto" takes the loop and "grouped" is
    replaced by it."""
    assert use_grouped_mm("cuda", (9, 0), BF16, E4K2_WIDTHS, 4, True)
    monkeypatch.setattr(sys, "platform", "win32")
    assert not use_grouped_mm("cuda", (9, 0), BF16, E4K2_WIDTHS, 4, True)
    assert not use_grouped_mm("cuda", (10, 0), BF16, E4K2_WIDTHS, 16, True)
    assert use_grouped_mm("cpu", None, BF16, E4K2_WIDTHS, 4, True)


@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_knob_where_grouped_mm_cannot_run(compiled):
    """moe_impl=grouped compiled in fp32 (grouped_mm takes bf16 only there) or with rows not of 16 bytes runs
    the loop, with the note train.py and sample.py print, rather than crash at the first forward."""
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                    expert_hidden=18, moe_impl="grouped")  # 72-byte rows in fp32
    assert "per-expert loop" in moe_kernels.grouped_note(cfg, torch.device("cpu"), FP32, compiled)
    aligned = GPTConfig(**{**cfg.__dict__, "expert_hidden": 16})
    assert (moe_kernels.grouped_note(aligned, torch.device("cpu"), FP32, compiled) is None) == (not compiled)
    assert moe_kernels.grouped_note(aligned, torch.device("mps"), FP32, False) is not None
    moe = MoE(cfg)
    x = torch.randn(2, 8, 32)
    y = moe(x)[0]  # grouped_mm itself would refuse the 72-byte rows
    moe.config.moe_impl = "loop"
    assert torch.equal(y, moe(x)[0])


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("n_embd, hidden", [(32, 48), (36, 50), (40, 52), (24, 20)])
def test_alignment_rule_is_torchs(dtype, n_embd, hidden):
    """use_grouped_mm's 16-byte rule says exactly when torch's grouped_mm accepts the widths."""
    x, w = torch.randn(10, n_embd, dtype=dtype), torch.randn(2, n_embd, hidden, dtype=dtype)
    try:
        F.grouped_mm(x, w, offs=torch.tensor([4, 10], dtype=torch.int32))
        runs = True
    except RuntimeError as e:
        assert "16 bytes" in str(e)
        runs = False
    assert use_grouped_mm("cpu", None, dtype, [n_embd, hidden], 2, False) == runs


class CountOps(TorchDispatchMode):
    """Counts the aten ops that run while it is active."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_experts", [4, 16])
def test_host_syncs_of_each_dispatch(n_experts):
    """What the CUDA rule weighs: per MoE layer and training step, the grouped path calls grouped_mm
    GROUPED_MM_FALLBACK_SYNCS times (each a host sync in torch's fallback), the loop one torch.where
    (nonzero, a host sync) per expert."""
    calls = {}
    for impl in ("grouped", "loop"):
        cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=n_experts, top_k=2,
                        expert_hidden=16, moe_impl=impl)
        moe = MoE(cfg)
        x = torch.randn(2, 16, 32, requires_grad=True)
        with CountOps() as ops:
            y, aux, z, _ = moe(x)
            (y.square().sum() + aux + z).backward()
        calls[impl] = ops.counts
    assert calls["grouped"]["_grouped_mm"] == GROUPED_MM_FALLBACK_SYNCS
    assert calls["loop"]["nonzero"] == n_experts and calls["loop"]["_grouped_mm"] == 0


def test_capability_is_a_constant_under_compile(monkeypatch):
    """MoE.use_grouped asks for the GPU's capability inside the compiled forward. dynamo cannot put such a
    query in a graph (a fullgraph compile fails on it): cuda_capability is evaluated once, at tracing.
    On CPU, torch.cuda.device_count() stands in for the CUDA query, as dynamo treats both alike."""
    def capability_query(device):
        return (9, torch.cuda.device_count())

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_query)
    monkeypatch.setattr(torch.version, "hip", None)
    gpu = torch.device("cuda")
    shielded = lambda x: x + cuda_capability(gpu)[0]
    torch._dynamo.reset()
    assert torch.compile(shielded, fullgraph=True, backend="eager")(torch.zeros(2)).tolist() == [9, 9]
    unshielded = lambda x: x + capability_query(gpu)[0]
    with pytest.raises(Exception, match="non-Tensor"):  # what cuda_capability spares the compiled model
        torch.compile(unshielded, fullgraph=True, backend="eager")(torch.zeros(2))
    torch._dynamo.reset()


def test_dtype_auto_is_bf16_only_where_native():
    assert pick_dtype("auto", bf16=True) == BF16
    assert pick_dtype("auto", bf16=False) == FP32
    assert pick_dtype("bfloat16", bf16=False) == BF16 and pick_dtype("float32", bf16=True) == FP32
    with pytest.raises(UserError, match="dtype must be"):
        pick_dtype("float16", bf16=True)


def pre_ampere(monkeypatch):
    """Make torch.cuda report a GPU whose bf16 is emulated only (a V100 or T4)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)


def test_emulated_bf16_trains_in_fp32(monkeypatch):
    pre_ampere(monkeypatch)
    monkeypatch.delenv("RANK", raising=False)
    system = setup_system("cuda", "auto")
    assert system.device == torch.device("cuda") and system.dtype == FP32 and system.world == 1


def test_nccl_group_is_bound_to_the_local_gpu(monkeypatch):
    """Under torchrun on CUDA: process LOCAL_RANK uses GPU LOCAL_RANK, and its nccl group is bound to it
    (barriers and object collectives pick their device from it)."""
    pre_ampere(monkeypatch)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    for key, value in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    system = setup_system("cuda", "float32")
    assert (system.device, system.rank, system.world) == (torch.device("cuda:1"), 3, 4)
    assert calls == [("set_device", torch.device("cuda:1")),
                     ("init", {"backend": "nccl", "device_id": torch.device("cuda:1")})]
    calls.clear()
    assert setup_system("cpu", "float32").device == torch.device("cpu")
    assert calls == [("init", {"backend": "gloo"})]


class AtCollective(Exception):
    """Raised by a stand-in collective once it has seen its tensors (a meta tensor has no value to go on with)."""


def record_collectives(monkeypatch):
    """Replace the tensor collectives of torch.distributed by one that records the devices of its tensors."""
    devices = []

    def collective(tensor, *args, **kwargs):
        devices.extend(t.device for t in (tensor if isinstance(tensor, list) else [tensor]))
        raise AtCollective

    for name in ("all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "all_to_all"):
        monkeypatch.setattr(dist, name, collective)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    return devices


def test_stop_flag_is_reduced_on_the_process_device(monkeypatch):
    devices = record_collectives(monkeypatch)
    with StopFlag() as stop:
        with pytest.raises(AtCollective):
            stop.anywhere(System(torch.device("meta"), FP32, nullcontext(), rank=0, world=2))
        stop.set = True
        assert stop.anywhere(System(torch.device("cpu"), FP32, nullcontext(), rank=0, world=1))  # no collective
    assert devices == [torch.device("meta")]


def test_expert_bias_loads_are_reduced_on_the_process_device(monkeypatch):
    devices = record_collectives(monkeypatch)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4, top_k=2,
                    expert_hidden=16, balance="aux_free")
    model = GPT(cfg).to("meta")
    routing = [{"load": torch.zeros(4, device="meta")} for _ in model.moe_layers]
    with pytest.raises(AtCollective):
        model.update_expert_bias(routing)
    assert devices == [torch.device("meta")]


def test_every_collective_is_covered():
    """The collectives of the training code, by call site; each one's device is tested above or chosen by
    torch from the group's bound GPU (all_gather_object, barrier). A new one needs its device checked."""
    calls = Counter()
    for name in ("train.py", "runtime.py", "model.py", "bench.py", "experiment.py", "sample.py"):
        for line in open(os.path.join(ROOT, name)):
            for word in line.replace("(", " ").split():
                if word.startswith("dist.") and word[5:] not in ("is_available", "is_initialized",
                                                                 "init_process_group", "destroy_process_group"):
                    calls[(name, word)] += 1
    assert calls == {("runtime.py", "dist.all_gather_object"): 1, ("runtime.py", "dist.all_reduce"): 1,
                     ("runtime.py", "dist.barrier"): 1, ("model.py", "dist.all_reduce"): 1}


def test_adamw_is_fused_on_cuda():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cuda").defaults["fused"] is True


# -----------------------------------------------------------------------------
# the GPU check: `bash tests/gpu_check.sh`

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("idle_expert", [False, True])
@pytest.mark.parametrize("impl", ["grouped", "auto"])
def test_gpu_compiled_dispatch_equals_loop(impl, idle_expert):
    """An MoE layer of moe_e4k2's shapes, compiled in one graph under bf16 autocast, against the eager loop:
    outputs and gradients. An idle expert (no token chooses it) must get zero gradients."""
    torch._dynamo.reset()
    device = torch.device("cuda")
    cfg = dict(vocab_size=64, block_size=256, n_layer=1, n_head=8, n_embd=256, n_experts=4, top_k=2,
               expert_hidden=512, balance="aux_free" if idle_expert else "switch")
    x = torch.randn(16, 256, 256, device=device, generator=torch.Generator(device).manual_seed(0))
    results = {}
    for name, moe_impl, compiled in (("compiled", impl, True), ("loop", "loop", False)):
        torch.manual_seed(1)  # the same weights for both
        moe = MoE(GPTConfig(**cfg, moe_impl=moe_impl)).to(device)
        if idle_expert:
            moe.expert_bias[3] = -10.0  # scores are below 1: expert 3 is never among the top 2
        run = runtime.compile_model(moe, fullgraph=True) if compiled else moe
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=BF16):
            y, aux, z, counts = run(xi)
        (y.float().square().mean() + aux + z).backward()
        results[name] = (y, xi.grad, {n: p.grad for n, p in moe.named_parameters()}, counts["load"])
    (y1, gx1, g1, load1), (y2, gx2, g2, load2) = results["compiled"], results["loop"]
    assert (load1 - load2).abs().sum() <= 2  # the same routing, up to a near tie or two
    assert rel_error(y1, y2) < 2e-2 and rel_error(gx1, gx2) < 2e-2
    for n in g2:
        assert rel_error(g1[n], g2[n]) < 3e-2, n
    if idle_expert:
        assert load1[3] == 0
        for ws in ("w1", "w3", "w2"):
            assert g1[f"experts.{ws}.0"][3].abs().max() == 0, ws
    torch._dynamo.reset()


def synthetic_dataset(root, n_tokens=2_000_000, period=4096, vocab_size=50257):
    """A dataset in GPT-2's vocabulary (so that moe_e4k2's shapes are exact) that a model learns within
    a hundred steps: one random sequence of `period` tokens, repeated."""
    folder = os.path.join(root, "synthetic")
    os.makedirs(folder)
    tokens = np.tile(np.random.default_rng(0).integers(0, vocab_size, period, dtype=np.uint16), n_tokens // period)
    tokens.tofile(os.path.join(folder, "train.bin"))
    tokens[: n_tokens // 10].tofile(os.path.join(folder, "val.bin"))
    meta = {"source": "synthetic", "tokenizer": "gpt2", "vocab_size": vocab_size, "eot_token": vocab_size - 1,
            "dtype": "uint16", "train_tokens": len(tokens), "val_tokens": n_tokens // 10}
    json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
    return root


def train_on_gpu(data_root, out_dir, *extra, processes=1, timeout=420):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    args = [sys.executable, *launcher, "train.py", "config/moe_e4k2.py", f"--data_root={data_root}",
            "--dataset=synthetic", f"--out_dir={out_dir}", "--warmup_iters=10", "--log_interval=10", "--eval_iters=5",
            *extra]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return r, [x for x in records if "loss" in x], [x for x in records if "val_loss" in x]


@pytest.mark.cuda
@needs_gpu
def test_gpu_compiled_training_loss_falls(tmp_path):
    """train.py on one GPU as a user runs it (compiled, bf16 where native, fused AdamW), at moe_e4k2's shapes."""
    data_root = synthetic_dataset(str(tmp_path))
    r, steps, evals = train_on_gpu(data_root, tmp_path / "out", "--max_iters=100", "--eval_interval=100")
    precision = "bfloat16 autocast" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    assert f"device cuda, {precision}, 1 process(es)" in r.stdout
    assert all(np.isfinite(x["loss"]) for x in steps) and steps[-1]["iter"] == 100
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, [x["loss"] for x in steps]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals


@pytest.mark.cuda
@needs_gpu
def test_gpu_fused_adamw_equals_unfused():
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128, n_experts=4, top_k=2,
                    expert_hidden=256)
    models = [GPT(cfg).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = models[0].configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cuda")
    assert fused.defaults["fused"] is True
    groups = models[1].configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cuda").param_groups
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                              lr=1e-3, betas=(0.9, 0.95), fused=False, foreach=False)  # one tensor at a time
    idx = torch.randint(0, 512, (2, 8, 64), device=device)
    for model, optimizer in zip(models, (fused, plain)):
        for _ in range(3):
            _, loss, _ = model(idx[0], idx[1])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_two_processes_with_nccl(tmp_path):
    """torchrun with nccl: the stop flag, the aux_free loads and the checkpoint's gathered checksums are
    collectives on the GPUs; the replicas stay equal (checked at every checkpoint)."""
    data_root = synthetic_dataset(str(tmp_path))
    r, steps, evals = train_on_gpu(data_root, tmp_path / "out", "--max_iters=20", "--eval_interval=10",
                                   "--balance=aux_free", "--gradient_accumulation_steps=2", processes=2)
    assert "2 process(es)" in r.stdout and [x["iter"] for x in evals] == [0, 10, 20]
    assert all(np.isfinite(x["loss"]) for x in steps)


# -----------------------------------------------------------------------------
# on CPU: Apple GPUs (MPS), and a training step without host syncs


def test_finite_state_with_step_counters_on_another_device():
    """An unfused AdamW keeps its step counters on the CPU beside GPU weights (MPS): the finite check before
    every checkpoint moves each flag to the weights' device rather than stack two devices. The meta device
    stands in for the GPU."""
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)).to("meta")
    optimizer = torch.optim.AdamW(model.parameters(), fused=False)
    for p in model.parameters():
        optimizer.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p)}
    assert runtime.finite_flag(model, optimizer).device == torch.device("meta")


def test_adamw_is_fused_on_mps_and_the_stop_flag_reduced_on_the_cpu(monkeypatch):
    """On MPS, AdamW is fused (torch/utils/_foreach_utils.py lists mps), so its state lives beside the weights;
    gloo, the process group there, reduces CPU tensors only."""
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "mps").defaults["fused"] is True
    devices = record_collectives(monkeypatch)
    with StopFlag() as stop, pytest.raises(AtCollective):
        stop.anywhere(System(torch.device("mps"), FP32, nullcontext(), rank=0, world=2))
    assert devices == [torch.device("cpu")]


class CountSyncs:
    """Counts the calls that read a tensor's value on the host (each one a host sync on a GPU)."""

    def __init__(self, monkeypatch):
        self.calls = Counter()
        for name in ("item", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: self.note(_n) or _o(t, *a))

    def note(self, name):
        self.calls[name] += 1


def tiny_run():
    """The namespace train.optimizer_step reads, for a tiny aux_free MoE on CPU with 2 micro-steps; with
    run.poisoned set, the loss, and so every gradient, is NaN. run.logits: a weak reference to each forward's
    logits, which must be gone by the next forward."""
    import weakref

    import train
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                          expert_hidden=32, balance="aux_free"))
    run = None

    def forward(x, y):
        assert all(ref() is None for ref in run.logits), "the last micro-step's logits are still alive"
        logits, loss, stats = model(x, y)
        run.logits.append(weakref.ref(logits))
        return logits, loss * float("nan") if run.poisoned else loss, stats

    run = train.SimpleNamespace(
        model=forward, raw_model=model, optimizer=model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu"),
        train_data=np.arange(500, dtype=np.uint16) % 64, block_size=16, data_rng=torch.Generator().manual_seed(0),
        accum=2, system=System(torch.device("cpu"), FP32, nullcontext(), rank=0, world=1), logits=[],
        poisoned=False, bad=torch.zeros(3, dtype=torch.long))
    cfg = train.SimpleNamespace(**{**train.defaults(), "batch_size": 2, "warmup_iters": 0})
    return run, cfg


def state_of(run):
    """Weights, buffers and optimizer state, cloned."""
    opt = [v.clone() for s in run.optimizer.state.values() for v in s.values()]
    return [t.clone() for t in run.raw_model.state_dict().values()] + opt


def test_skipped_step_changes_nothing_and_syncs_nothing(monkeypatch):
    """A step with NaN gradients, skipped on the device (fused AdamW's found_inf), leaves weights, the aux_free
    bias and the optimizer state (step counters included) bit for bit as they were; a finite step equals the
    host-checked one bit for bit; neither reads a value on the host."""
    import train
    run, cfg = tiny_run()
    reference, _ = tiny_run()
    syncs = CountSyncs(monkeypatch)
    assert bool(train.optimizer_step(run, cfg, 0)[2])  # a finite step, on the device
    assert syncs.calls["__bool__"] == 1 and sum(syncs.calls.values()) == 1  # the assert's own
    with monkeypatch.context() as m:  # the host-checked step, as before
        m.setattr(train, "skips_on_device", lambda optimizer: False)
        train.optimizer_step(reference, cfg, 0)
    assert all(torch.equal(a, b) for a, b in zip(state_of(run), state_of(reference), strict=True))
    before, run.poisoned = state_of(run), True
    syncs.calls.clear()
    finite = train.optimizer_step(run, cfg, 1)[2]
    train.count_bad_step(run, finite)
    assert sum(syncs.calls.values()) == 0
    assert all(torch.equal(a, b) for a, b in zip(state_of(run), before, strict=True))
    assert run.bad.tolist() == [1, 1, 1]  # read at the next log line (train.read_bad_steps)


def test_a_failing_process_leaves_without_a_barrier(monkeypatch):
    """A process that stops on an error of its own skips the final barrier, where it would wait for the others
    until the nccl timeout: it exits, and torchrun stops the others."""
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    runtime.end_processes(together=False)
    assert calls == []
    runtime.end_processes(together=True)
    assert calls == ["barrier", "destroy"]


def test_parallel_runs_spread_over_the_gpus(monkeypatch):
    """experiment.py --jobs=N: each run in job slot s sees one GPU, s mod their number."""
    assert runtime.job_env({"CUDA_VISIBLE_DEVICES": "2,5"}, 0, 2)["CUDA_VISIBLE_DEVICES"] == "2"
    assert runtime.job_env({"CUDA_VISIBLE_DEVICES": "2,5"}, 3, 4)["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [runtime.job_env({}, s, 4)["CUDA_VISIBLE_DEVICES"] for s in range(4)] == ["0", "1", "2", "3"]
    assert runtime.job_env({}, 0, 1) == {}  # one run at a time: every GPU, as before
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.job_env({}, 1, 2) == {}


def test_peaks_of_newer_gpus():
    """Blackwell, the export Hoppers and Amperes and the RTX 5090 have a peak, or a note saying why not."""
    for name in ("NVIDIA B200", "NVIDIA GB200", "NVIDIA H800", "NVIDIA A800-SXM4-80GB", "NVIDIA GeForce RTX 5090"):
        assert runtime.peak_flops(name, BF16)[0] > 100e12
    peak, note = runtime.peak_flops("NVIDIA B300 SXM6 AC", BF16)
    assert peak is None and "Blackwell Ultra" in note

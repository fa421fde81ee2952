"""bench.py on tiny shapes: every model, path and routing runs, the table and JSON hold what they claim."""

import json
import os
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT

import bench
from model import GPTConfig, MoE, model_fields
from runtime import use_compile

TINY = GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                 expert_hidden=64)


def bench_cfg(**kw):
    return SimpleNamespace(**{**dict(quick=True, device="cpu", dtype="float32", compile="false", repeats=2, warmup=1,
                                     json_path="", overwrite=False, threads=0), **kw})


@pytest.mark.slow  # a process per model
def test_bench_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "shapes", lambda quick: (TINY, 2))
    out = tmp_path / "bench.json"
    rows = bench.run(bench_cfg(json_path=str(out)))
    moe_rows = [(m, impl, routing) for m in ("moe-e4k2", "moe-e16k4", "moe-e64k8") for impl in ("grouped", "loop")
                for routing in ("real", "balanced")]
    assert [(r["model"], r["moe_impl"], r["routing"]) for r in rows] == [("dense-active", "-", "-"), *moe_rows]
    assert all(r["ms_per_step"] > 0 and r["peak_memory_mb"] > 0 and not r["compile"] for r in rows)
    assert rows[0]["ratio_to_dense"] == 1.0 and all(r["ratio_to_dense"] > 0 for r in rows)
    assert all("mfu" not in r for r in rows)  # no peak on CPU
    # the same active parameters up to the router (E * n_embd per layer) and the dense match's rounding
    # (below half an FFN unit, 3 * n_embd * n_layer / 2)
    for r in rows[1:]:
        n_experts = int(r["model"].split("-e")[1].split("k")[0])
        slack = n_experts * TINY.n_embd * TINY.n_layer + 3 * TINY.n_embd * TINY.n_layer / 2
        assert abs(r["active_params"] - rows[0]["active_params"]) <= slack
    for r in rows:
        assert r["flops_per_s"] == pytest.approx(bench.flops_per_token(bench_model(r)) * r["tokens_per_s"])
        twin = next((b for b in rows if b["routing"] == "balanced" and b["model"] == r["model"]
                     and b["moe_impl"] == r["moe_impl"]), None)
        assert ("ratio_to_balanced" in r) == (twin is not None)
        if twin:
            assert r["ratio_to_balanced"] == pytest.approx(r["ms_per_step"] / twin["ms_per_step"])
    assert json.load(open(out))["rows"] == rows
    # the printed table: one line per row, with the row's numbers
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert len(lines) == len(rows)
    for line, r in zip(lines, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [r["model"], r["moe_impl"], r["routing"]]
        assert float(cells[5]) == pytest.approx(r["ms_per_step"], abs=0.05)
        assert float(cells[9]) == pytest.approx(r["ratio_to_dense"], abs=0.005)
        assert cells[10] == (f"{r['ratio_to_balanced']:.2f}" if "ratio_to_balanced" in r else "-")


def bench_model(row):
    """The GPTConfig bench timed for a row."""
    return next(cfg for name, cfg, routing in bench.bench_models(TINY, ("grouped", "loop"))
                if name == row["model"] and (cfg.moe_impl if cfg.n_experts else "-") == row["moe_impl"])


BENCH_MODELS = bench.bench_models


@pytest.mark.slow  # compiling takes minutes on 2 cores
def test_compiled_fp32_bench_times_the_loop(monkeypatch, capsys):
    """--compile in fp32: compiled grouped_mm takes bf16 only, so the MoE rows time the loop."""
    monkeypatch.setattr(bench, "shapes", lambda quick: (TINY, 2))
    monkeypatch.setattr(bench, "bench_models", lambda moe, impls: [
        row for row in BENCH_MODELS(moe, impls) if row[0] in ("dense-active", "moe-e4k2")])
    rows = bench.run(bench_cfg(compile="true", repeats=1))
    assert [(r["moe_impl"], r["routing"], r["compile"]) for r in rows] == [
        ("-", "-", True), ("loop", "real", True), ("loop", "balanced", True)]
    assert "grouped dispatch not timed" in capsys.readouterr().out


def test_time_models_alternates_with_the_dense_model(monkeypatch):
    """Each model's timed steps alternate with the dense-active model's, whose process lasts throughout; a
    model's reference times are those of its own rounds; every process is closed."""
    log = []

    class Fake:
        def __init__(self, label):
            self.label, self.steps = label, 0
            log.append(("start", label))

        def warm_up(self, steps):
            log.append(("warm", self.label, steps))

        def step(self):
            self.steps += 1
            log.append(("step", self.label))
            return {"dense": 1.0, "a": 2.0, "b": 3.0}[self.label] * self.steps

        def peak_memory(self):
            return {"dense": 10, "a": 20, "b": 30}[self.label]

        def close(self):
            log.append(("close", self.label))

    results = bench.time_models([lambda name=name: Fake(name) for name in ("dense", "a", "b")], warmup=4, repeats=2)
    assert results == [([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], 10), ([2.0, 4.0], [1.0, 2.0], 20),
                       ([3.0, 6.0], [3.0, 4.0], 30)]
    assert log == [("start", "dense"), ("warm", "dense", 4),
                   ("start", "a"), ("warm", "a", 4), ("step", "dense"), ("step", "a"), ("step", "dense"), ("step", "a"),
                   ("close", "a"),
                   ("start", "b"), ("warm", "b", 4), ("step", "dense"), ("step", "b"), ("step", "dense"), ("step", "b"),
                   ("close", "b"), ("close", "dense")]


def test_worker_failure_is_one_line():
    """A model that fails in its process (here: on the meta device, where no step can run; a width grouped_mm
    cannot take now falls back to the loop) stops bench.py with one line naming the model, not a traceback from
    another process."""
    bad = GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                    expert_hidden=32)
    with pytest.raises(bench.UserError, match="moe-bad failed: RuntimeError"):
        bench.Worker("moe-bad", bad, "real", False, 2, torch.device("meta"), torch.float32).step()


def test_data_cost_writes_outside_the_repository(monkeypatch):
    opened = []
    memmap = np.memmap
    monkeypatch.setattr(np, "memmap", lambda path, **kw: opened.append(path) or memmap(path, **kw))
    assert bench.data_cost(2, 16, torch.device("cpu")) > 0
    assert len(opened) == 1 and not os.path.abspath(opened[0]).startswith(ROOT + os.sep)
    assert not os.path.exists(opened[0])  # and removed


def test_full_shapes_are_moe_e4k2s_with_its_training_batch():
    """bench.py without --quick times config/moe_e4k2.py's model at its training batch, not a fraction of it."""
    knobs = {}
    exec(open(os.path.join(ROOT, "config", "moe_e4k2.py")).read(), {}, knobs)
    moe, batch_size = bench.shapes(quick=False)
    assert batch_size == knobs["batch_size"]
    assert all(getattr(moe, k) == v for k, v in knobs.items() if hasattr(moe, k))


def test_dispatch_paths():
    """Both paths eagerly; compiled, the grouped GEMM only in bf16 (moe_kernels.grouped_mm_runs)."""
    assert bench.dispatch_paths(torch.float32, False, torch.device("cpu"), (256, 130)) == ("loop",)  # 520-byte rows
    cpu, widths = torch.device("cpu"), (256, 512, 128)
    assert bench.dispatch_paths(torch.float32, False, cpu, widths) == ("grouped", "loop")
    assert bench.dispatch_paths(torch.float32, True, cpu, widths) == ("loop",)
    assert bench.dispatch_paths(torch.bfloat16, True, cpu, widths) == ("grouped", "loop")


def test_table_shows_mfu_where_known():
    row = dict(model="moe-e4k2", moe_impl="grouped", routing="real", compile=True, dtype="bfloat16", ms_per_step=2.0,
               tokens_per_s=1e6, flops_per_s=3.1e14, mfu=0.3135, peak_memory_mb=100.0, ratio_to_dense=1.1,
               memory_ratio_to_dense=1.2, ratio_to_balanced=1.05)
    lines = bench.table([row]).splitlines()
    assert "MFU" in lines[0] and "| 31.4% |" in lines[2] and "310.0 TFLOP/s" in lines[2]


def test_compile_knob():
    """bench.py's compile knob is train.py's: "auto" compiles on CUDA only."""
    assert not use_compile("auto", torch.device("cpu")) and use_compile("auto", torch.device("cuda"))
    assert use_compile("true", torch.device("cpu")) and not use_compile("false", torch.device("cuda"))


def test_paired_ratio_cancels_slow_moments():
    """Rounds 1 and 2 ran while the machine was slow for both models, round 3 for the model's step alone: the
    median of the rounds' ratios is 2, the ratio of the two medians 6."""
    model_s, dense_s = [6.0, 6.0, 6.0, 2.0, 2.0], [3.0, 3.0, 1.0, 1.0, 1.0]
    assert bench.paired_ratio(model_s, dense_s) == 2.0
    assert statistics.median(model_s) / statistics.median(dense_s) == 6.0


def test_forced_balance_gives_every_expert_the_same_slots():
    cfg = GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2, expert_hidden=48)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1)
        moe.router.weight[0] += 3  # on positive inputs, expert 0 wins every token
    x = torch.rand(2, 16, cfg.n_embd)
    assert moe(x)[3]["load"][0] == 32
    bench.force_balance(moe)
    _, _, weights, experts = moe.route(x.view(-1, cfg.n_embd))
    assert moe(x)[3]["load"].tolist() == [16.0] * 4  # N * K / E = 32 * 2 / 4
    assert all(len(set(row)) == 2 for row in experts.tolist())  # a token's K slots go to K different experts
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))  # still the router's (renormalised) weights
    for impl in ("grouped", "loop"):  # both dispatch paths take it
        moe.config.moe_impl = impl
        y, _, _, _ = moe(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_forced_balance_is_no_config_knob():
    """Only bench.py sets it, on the modules: no config file or --key=value can train with it."""
    assert not [k for k in model_fields() if "balance" in k and k != "balance"]

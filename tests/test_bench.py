"""bench.py on tiny shapes: every model and path runs, the table and JSON hold what they claim."""

import json
from types import SimpleNamespace

import pytest
import torch

import bench
from model import GPTConfig
from runtime import use_compile


@pytest.mark.slow  # a fresh process per model measures its peak memory
def test_bench_table_and_json(tmp_path, monkeypatch, capsys):
    tiny = GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                     expert_hidden=64)
    monkeypatch.setattr(bench, "shapes", lambda quick: (tiny, 2))
    out = tmp_path / "bench.json"
    cfg = SimpleNamespace(quick=True, device="cpu", dtype="float32", compile="false", repeats=2, warmup=1,
                          json_path=str(out))
    rows = bench.run(cfg)
    assert [(r["model"], r["moe_impl"]) for r in rows] == [
        ("dense-active", "-"), ("moe-e4k2", "grouped"), ("moe-e4k2", "loop"), ("moe-e16k4", "grouped"),
        ("moe-e16k4", "loop"), ("moe-e64k8", "grouped"), ("moe-e64k8", "loop")]
    assert all(r["ms_per_step"] > 0 and r["peak_memory_mb"] > 0 and not r["compile"] for r in rows)
    # the same active parameters up to the router (E * n_embd per layer) and the dense match's rounding
    # (below half an FFN unit, 3 * n_embd * n_layer / 2)
    for r in rows[1:]:
        n_experts = int(r["model"].split("-e")[1].split("k")[0])
        slack = n_experts * tiny.n_embd * tiny.n_layer + 3 * tiny.n_embd * tiny.n_layer / 2
        assert abs(r["active_params"] - rows[0]["active_params"]) <= slack
    assert json.load(open(out))["rows"] == rows
    # the printed table: one line per row, with the row's numbers
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert len(lines) == len(rows)
    for line, r in zip(lines, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [r["model"], r["moe_impl"]]
        assert float(cells[4]) == pytest.approx(r["ms_per_step"], abs=0.05)
        assert float(cells[7]) == pytest.approx(r["ms_per_step"] / rows[0]["ms_per_step"], abs=0.005)


def test_compile_knob():
    """bench.py's compile knob is train.py's: "auto" compiles on CUDA only."""
    assert not use_compile("auto", torch.device("cpu")) and use_compile("auto", torch.device("cuda"))
    assert use_compile("true", torch.device("cpu")) and not use_compile("false", torch.device("cuda"))

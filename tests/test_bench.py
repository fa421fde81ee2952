"""bench.py on tiny shapes: every model and path runs, the table and JSON hold what they claim."""

import json
from types import SimpleNamespace

import bench
from model import GPTConfig, count_params


def test_bench_table_and_json(tmp_path, monkeypatch, capsys):
    tiny = GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                     expert_hidden=64)
    monkeypatch.setattr(bench, "shapes", lambda quick: (tiny, 2))
    out = tmp_path / "bench.json"
    cfg = SimpleNamespace(quick=True, device="cpu", dtype="float32", compile=False, repeats=2, warmup=1,
                          json=str(out))
    rows = bench.run(cfg)
    assert [(r["model"], r["moe_impl"]) for r in rows] == [
        ("dense-active", "-"), ("moe-e4k2", "grouped"), ("moe-e4k2", "loop"), ("moe-e16k4", "grouped"),
        ("moe-e16k4", "loop"), ("moe-e64k8", "grouped"), ("moe-e64k8", "loop")]
    assert rows[0]["ratio_to_dense"] == 1.0
    assert all(r["ms_per_step"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    # the same active parameters up to the router: E * n_embd per layer
    dense_active = rows[0]["active_params"]
    for r in rows[1:]:
        assert abs(r["active_params"] - dense_active) <= 64 * 32 + 3 * 32
    assert json.load(open(out))["rows"] == rows
    printed = capsys.readouterr().out
    assert "| moe-e64k8    | grouped" in printed and "of a dense-active step" in printed
    assert count_params(tiny)["active"] == rows[1]["active_params"]

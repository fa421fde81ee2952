"""report.py on made-up runs (no training): pairing by seed, gaps, the parameter table, CSV, paths."""

import csv
import json
import os
import statistics
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, one_line_error, run_script

import report
from experiment import Run
from model import GPT, GPTConfig, count_params, match_dense

MOE = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=8, top_k=2, expert_hidden=24,
                n_shared_experts=1, shared_expert_hidden=16)


def fake_run(model, seed, best, done=True, point=None):
    """A finished run whose curve ends at `best` (evaluations at iterations 0, 10, 20)."""
    curve = [(0, 0, best + 2.0), (100, 10, best + 0.5), (200, 20, best)]
    return Run(label=model, model=model, point=point or {}, seed=seed, out_dir=f"out/x/{model}-s{seed}", args=[],
               overrides={}, max_iters=20, curve=curve, best=best, done=done)


RUNS = [fake_run("moe", 1, 3.0), fake_run("dense-active", 1, 3.5), fake_run("dense-total", 1, 2.9),
        fake_run("moe", 2, 3.2), fake_run("dense-active", 2, 3.3), fake_run("dense-total", 2, 3.0, done=False),
        fake_run("dense-total", 3, 2.0)]  # seed 3 has no MoE: it pairs with nothing


def test_pairs_by_seed_keeps_finished_pairs_only():
    pairs = report.pairs_by_seed(RUNS, "moe", "dense-total")
    assert [(a.seed, b.seed) for a, b in pairs] == [(1, 1)]  # seed 2's dense-total is unfinished, seed 3 unpaired
    assert [(a.seed, b.model) for a, b in report.pairs_by_seed(RUNS, "dense-active", "moe")] == [(1, "moe"), (2, "moe")]


def test_paired_gaps_and_gaps_over_training():
    gaps = report.paired_gaps(RUNS)
    assert gaps["dense-active - moe"] == pytest.approx([3.5 - 3.0, 3.3 - 3.2])
    assert gaps["moe - dense-total"] == pytest.approx([3.0 - 2.9])
    assert report.gaps_at(RUNS, "dense-active", "moe", 10) == pytest.approx([3.5 - 3.0, 3.3 - 3.2])
    assert report.gaps_at(RUNS, "dense-active", "moe", 15) == []  # nobody evaluated there
    lines = "\n".join(report.gap_lines(RUNS))
    mean, std = statistics.mean(gaps["dense-active - moe"]), statistics.stdev(gaps["dense-active - moe"])
    assert f"{mean:.4f} +/- {std:.4f}" in lines


def test_param_table_counts_and_shared_experts():
    counts = count_params(MOE)
    dense = match_dense(MOE, "active")
    rows = [("moe", MOE, None, ""), ("dense-active", dense, counts["active"], "<- trains")]
    table = report.param_table(rows, markdown=True).splitlines()
    moe_cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert moe_cells[2] == "8x24 + 1x16 shared"  # the shared expert is shown, and counted
    assert int(moe_cells[4].replace(",", "")) == counts["total"] == sum(p.numel() for p in GPT(MOE).parameters())
    dense_cells = [c.strip() for c in table[3].strip("|").split("|")]
    mismatch = (count_params(dense)["total"] - counts["active"]) / counts["active"]
    assert float(dense_cells[7].rstrip("%")) == pytest.approx(100 * mismatch, abs=5e-4)
    text = report.param_table(rows).splitlines()
    assert text[2].startswith("dense-active") and text[2].endswith("<- trains") and not text[1].endswith("trains")


def test_csv_holds_every_evaluation(tmp_path):
    runs = [fake_run("moe", 1, 3.0, point={"n_experts": 4, "top_k": 2})]
    report.write_csv(runs, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert [(r["point"], int(r["iter"]), float(r["val_loss"])) for r in rows] == [
        ("n_experts=4,top_k=2", it, v) for _, it, v in runs[0].curve]


def test_report_shows_repo_relative_data_path(tmp_path):
    start = {"code": "commit abc", "config": {"dataset": "shakespeare", "data_root": os.path.join(ROOT, "data"),
             "max_iters": 20, "gradient_accumulation_steps": 1, "batch_size": 4, "block_size": 16,
             "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 2, "eval_interval": 10, "eval_iters": 2},
             "model_args": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 97, "block_size": 16},
             "params": {"total": 1, "active": 1, "embedding": 1}}
    runs = [replace(run, start=start) if run.model == "dense-active" else run for run in RUNS[:3]]
    cfg = SimpleNamespace(seed=1, seeds=1, jobs=1, report_only=True, sweep="")
    text = open(report.write_report(cfg, runs, [{}], str(tmp_path), 0.0, [])).read()
    assert f"`shakespeare` ({os.path.join('data', 'shakespeare')})" in text and ROOT not in text


def routing_log(run_dir, iters=(0, 10, 25), n_layers=2, n_experts=4):
    """A metrics.jsonl of made-up evaluations whose routing summaries skew towards expert 0 over training."""
    records = [{"event": "start"}, {"iter": 5, "loss": 3.0}]
    for i, it in enumerate(iters):
        routing = []
        for layer in range(n_layers):
            load = [1 / n_experts + 0.05 * (i + layer)] + [1 / n_experts - 0.05 * (i + layer) / (n_experts - 1)] * 3
            routing.append({"load": load, "cv": 0.1 * (i + layer), "max_mean": 1.0, "dropped": 0.0, "entropy": 1.0})
        records.append({"iter": it, "val_loss": 3.0, "routing": routing})
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def test_expert_load_heatmap_holds_the_logged_loads(tmp_path):
    records = routing_log(tmp_path)
    history = report.routing_history(records)
    assert [it for it, _ in history] == [0, 10, 25]  # evaluations only
    plt = report.pyplot()
    fig = report.plot_expert_load(plt, history, "run")
    heatmaps = [ax.collections[0] for ax in fig.axes[:2]]
    for layer, mesh in enumerate(heatmaps):  # rows: experts, columns: evaluations
        expected = [[r["routing"][layer]["load"][e] for r in records[2:]] for e in range(4)]
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(4, 3), expected)
        assert mesh.norm.vcenter == 0.25  # white at the balanced share
    assert fig.axes[0].get_xlim() == (-5.0, 32.5)  # cells centred on evaluations, edges halfway between
    cv_lines = fig.axes[2].lines
    np.testing.assert_allclose([line.get_ydata() for line in cv_lines], [[0, 0.1, 0.2], [0.1, 0.2, 0.3]])
    plt.close(fig)
    path = report.write_expert_load(str(tmp_path))
    assert path == os.path.join(str(tmp_path), "expert_load.png") and os.path.getsize(path) > 0


def test_plot_run_command_and_its_errors(tmp_path):
    routing_log(tmp_path / "moe")
    r = run_script("experiment.py", f"--plot_run={tmp_path / 'moe'}")
    assert r.returncode == 0 and (tmp_path / "moe" / "expert_load.png").exists(), r.stderr
    one_line_error(run_script("experiment.py", f"--plot_run={tmp_path / 'none'}"), "no metrics.jsonl in")
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "metrics.jsonl").write_text('{"iter": 0, "val_loss": 3.0, "routing": []}\n')
    one_line_error(run_script("experiment.py", f"--plot_run={tmp_path / 'dense'}"), "has no routing records")

"""experiment.py on a tiny model: the trio over seeds, skipping and resuming runs, sweeps, the report."""

import json
import sys

import pytest
import torch
from conftest import TINY_MOE, run_script

import experiment

TINY = [a for a in TINY_MOE if not a.startswith("--log_interval")] + ["--eval_interval=2", "--max_iters=4"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run experiment.py from tmp_path, so that out/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def main(data_root, *args):
    experiment.main([*TINY, f"--data_root={data_root}", *args])


def test_trio_over_seeds_and_report(data_root, in_tmp, capsys):
    main(data_root, "--seeds=2", "--name=trio")
    exp = in_tmp / "out" / "trio"
    runs = sorted(p.name for p in exp.iterdir() if p.is_dir())
    assert runs == ["dense-active-s1337", "dense-active-s1338", "dense-total-s1337", "dense-total-s1338",
                    "moe-s1337", "moe-s1338"]
    report = (exp / "report.md").read_text()
    for text in ("| moe | 2 x 32 | 4x48 | top-2, router 256 |", "dense-active - moe:", "moe - dense-total:",
                 "Runs finished: 6 of 6", "router (counted as active", "![curves.png](curves.png)",
                 "## Against the published result", "published: dense-total < moe < dense-active"):
        assert text in report, text
    assert (exp / "curves.png").exists() and (exp / "gaps.png").exists() and (exp / "curves.csv").exists()
    # the report's numbers are the runs' numbers
    best = {}
    for run in runs:
        records = [json.loads(line) for line in open(exp / run / "metrics.jsonl")]
        best[run] = min(r["val_loss"] for r in records if "val_loss" in r)
    gaps = [best[f"dense-active-s{s}"] - best[f"moe-s{s}"] for s in (1337, 1338)]
    mean = sum(gaps) / 2
    std = (sum((g - mean) ** 2 for g in gaps)) ** 0.5  # sample std of two values: |a - b| / sqrt(2)
    assert f"dense-active - moe: {mean:.4f} +/- {std:.4f} (2 seeds)" in report
    # the same seed gives every model the same data order: their batch samplers end in the same state
    rng = {run: torch.load(exp / run / "ckpt.pt", weights_only=True)["data_rng"][0] for run in runs}
    assert torch.equal(rng["moe-s1337"], rng["dense-active-s1337"]) and torch.equal(rng["moe-s1337"],
                                                                                 rng["dense-total-s1337"])
    assert not torch.equal(rng["moe-s1337"], rng["moe-s1338"])

    # a second invocation skips the finished runs
    capsys.readouterr()
    main(data_root, "--seeds=2", "--name=trio")
    assert "6 of 6 runs already finished" in capsys.readouterr().out


def test_unfinished_run_resumes(data_root, in_tmp, capsys):
    main(data_root, "--seeds=1", "--name=cut", "--match=none", "--max_iters=2")
    run = in_tmp / "out" / "cut" / "moe-s1337"
    assert torch.load(run / "ckpt.pt", weights_only=True)["iter_num"] == 2
    capsys.readouterr()
    main(data_root, "--seeds=1", "--name=cut", "--match=none", "--max_iters=4")  # longer: continue the run
    out = capsys.readouterr().out
    assert "0 of 1 runs already finished" in out and "--init_from=resume" in out
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["iter"] for r in records if "loss" in r] == [2, 4]  # log_interval 10: the last steps only
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 2, 4]


def test_sweep_holds_active_params(data_root, in_tmp):
    main(data_root, "--seeds=1", "--sweep=top_k=1,2", "--match=active", "--name=sweep")
    exp = in_tmp / "out" / "sweep"
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == [
        "dense-active-top_k=1-s1337", "dense-active-top_k=2-s1337", "moe-top_k=1-s1337", "moe-top_k=2-s1337"]
    args = {p: torch.load(exp / p / "ckpt.pt", weights_only=True)["model_args"]
            for p in ("moe-top_k=1-s1337", "moe-top_k=2-s1337")}
    assert args["moe-top_k=1-s1337"]["expert_hidden"] == 96 and args["moe-top_k=2-s1337"]["expert_hidden"] == 48
    report = (exp / "report.md").read_text()
    assert "## Sweep" in report and "| top_k | moe | dense-active |" in report and "sweep.png" in report
    assert (exp / "sweep.png").exists()


def test_grid_sweep_names_and_report(data_root, in_tmp):
    main(data_root, "--seeds=1", "--sweep=n_experts=2,4;top_k=1,2", "--hold_active=False", "--name=grid",
         "--max_iters=2")
    exp = in_tmp / "out" / "grid"
    assert len([p for p in exp.iterdir() if p.is_dir()]) == 4
    report = (exp / "report.md").read_text()
    assert "| n_experts | top_k | moe |" in report
    assert report.count("\n| 2 | 1 |") == 1 and report.count("\n| 4 | 2 |") == 1


def test_tokens_per_parameter_sweep(data_root, in_tmp):
    main(data_root, "--seeds=1", "--sweep=max_iters=2,4", "--match=none", "--name=length")
    exp = in_tmp / "out" / "length"
    for n in (2, 4):
        records = [json.loads(line) for line in open(exp / f"moe-max_iters={n}-s1337" / "metrics.jsonl")]
        assert max(r["iter"] for r in records if "val_loss" in r) == n
    assert "| max_iters | moe |" in (exp / "report.md").read_text()


def test_report_without_matplotlib(data_root, in_tmp, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    main(data_root, "--seeds=1", "--name=noplot", "--match=none")
    exp = in_tmp / "out" / "noplot"
    report = (exp / "report.md").read_text()
    assert "matplotlib is not installed" in report and not (exp / "curves.png").exists()
    assert (exp / "curves.csv").read_text().startswith("model,point,seed,iter,tokens,val_loss")


@pytest.mark.parametrize("args, message", [
    (["--sweep=n_experts"], "sweep expects key=v1,v2"),
    (["--match=all"], "match must be one of"),
    (["--seeds=0"], "seeds and jobs must be at least 1"),
    (["--sweep=top_k=9"], "top_k (9) must be between 1 and n_experts (4)"),
    (["--sweep=n_expert=4,8"], "unknown config key 'n_expert'; did you mean n_experts?"),
    (["--sweep=top_k=1.5"], "top_k expects a int"),
])
def test_experiment_errors(data_root, args, message):
    r = run_script("experiment.py", *TINY, f"--data_root={data_root}", *args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert "start " not in r.stdout  # refused before any run

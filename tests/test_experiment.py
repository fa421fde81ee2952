"""experiment.py on a tiny model: the trio over seeds, skipping and resuming runs, sweeps, the report."""

import csv
import json
import re
import statistics
import sys

import pytest
import torch
from conftest import TINY_MOE, run_script

import experiment
import report
from model import GPTConfig

pytestmark = pytest.mark.slow  # every test here trains models in subprocesses

TINY = [a for a in TINY_MOE if not a.startswith("--log_interval")] + ["--eval_interval=2", "--max_iters=4"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run experiment.py from tmp_path, so that out/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def main(data_root, *args):
    experiment.main([*TINY, f"--data_root={data_root}", *args])


def table_after(text, heading):
    """The rows of the first Markdown table after heading, past its header: {first cell: [cells]}."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:end]]
    return {row[0]: row for row in rows}


def number(cell):
    return float(cell.replace(",", "").rstrip("%"))


def test_trio_over_seeds_and_report(data_root, in_tmp, capsys):
    main(data_root, "--seeds=2", "--name=trio")
    exp = in_tmp / "out" / "trio"
    runs = sorted(p.name for p in exp.iterdir() if p.is_dir())
    assert runs == ["dense-active-s1337", "dense-active-s1338", "dense-total-s1337", "dense-total-s1338",
                    "moe-s1337", "moe-s1338"]
    text = (exp / "report.md").read_text()
    for part in ("Runs finished: 6 of 6", "router (counted as active", "![curves.png](curves.png)",
                 "## Against the published result"):
        assert part in text, part
    assert (exp / "curves.png").exists() and (exp / "gaps.png").exists() and (exp / "curves.csv").exists()
    assert "![expert_load_moe-s1337.png](expert_load_moe-s1337.png)" in text.split("## Expert load")[1]
    assert (exp / "expert_load_moe-s1337.png").exists() and not (exp / "expert_load_moe-s1338.png").exists()
    # the report's numbers are the runs' numbers
    logs = {run: [json.loads(line) for line in open(exp / run / "metrics.jsonl")] for run in runs}
    models = table_after(text, "## Models")
    for label in ("moe", "dense-active", "dense-total"):
        start = logs[f"{label}-s1337"][0]
        cells, cfg = models[label], GPTConfig(**start["model_args"])
        assert cells[1] == f"{cfg.n_layer} x {cfg.n_embd}"
        assert [number(c) for c in cells[4:7]] == [start["params"][k] for k in ("total", "active", "embedding")]
        if label != "moe":
            goal = logs["moe-s1337"][0]["params"][label.split("-")[1]]
            assert number(cells[7]) == pytest.approx(100 * (start["params"]["total"] - goal) / goal, abs=5e-4)
    moe = GPTConfig(**logs["moe-s1337"][0]["model_args"])
    assert models["moe"][3] == f"top-{moe.top_k}, router {moe.n_experts * moe.n_embd * moe.n_layer:,}"
    best = {run: min(r["val_loss"] for r in log if "val_loss" in r) for run, log in logs.items()}
    gaps = [best[f"dense-active-s{s}"] - best[f"moe-s{s}"] for s in (1337, 1338)]
    mean, std, n = re.search(r"dense-active - moe: (\S+) \+/- (\S+) \((\d+) seeds\)", text).groups()
    assert float(mean) == pytest.approx(statistics.mean(gaps), abs=5e-5)
    assert float(std) == pytest.approx(statistics.stdev(gaps), abs=5e-5) and int(n) == 2
    published = " < ".join(sorted(report.PUBLISHED, key=lambda m: report.PUBLISHED[m][0]))
    assert f"published: {published}" in text
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
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]  # log_interval 10: each run's first and last
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 2, 4]


def test_sweep_holds_active_params(data_root, in_tmp):
    main(data_root, "--seeds=1", "--sweep=top_k=1,2", "--match=active", "--name=sweep")
    exp = in_tmp / "out" / "sweep"
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == [
        "dense-active-top_k=1-s1337", "dense-active-top_k=2-s1337", "moe-top_k=1-s1337", "moe-top_k=2-s1337"]
    args = {p: torch.load(exp / p / "ckpt.pt", weights_only=True)["model_args"]
            for p in ("moe-top_k=1-s1337", "moe-top_k=2-s1337")}
    assert args["moe-top_k=1-s1337"]["expert_hidden"] == 96 and args["moe-top_k=2-s1337"]["expert_hidden"] == 48
    text = (exp / "report.md").read_text()
    assert "## Sweep" in text and "| top_k | moe | dense-active |" in text and "sweep.png" in text
    assert (exp / "sweep.png").exists()


def test_grid_sweep_names_and_report(data_root, in_tmp):
    main(data_root, "--seeds=1", "--sweep=n_experts=2,4;top_k=1,2", "--hold_active=False", "--name=grid",
         "--max_iters=2")
    exp = in_tmp / "out" / "grid"
    assert len([p for p in exp.iterdir() if p.is_dir()]) == 4
    text = (exp / "report.md").read_text()
    assert "| n_experts | top_k | moe |" in text
    assert text.count("\n| 2 | 1 |") == 1 and text.count("\n| 4 | 2 |") == 1


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
    text = (exp / "report.md").read_text()
    assert "matplotlib is not installed" in text and not (exp / "curves.png").exists()
    rows = list(csv.DictReader(open(exp / "curves.csv")))
    logged = [r for r in map(json.loads, open(exp / "moe-s1337" / "metrics.jsonl")) if "val_loss" in r]
    assert [(int(r["iter"]), float(r["val_loss"])) for r in rows] == [(r["iter"], r["val_loss"]) for r in logged]


@pytest.mark.parametrize("args, message", [
    (["--sweep=n_experts"], "sweep expects key=v1,v2"),
    (["--match=all"], "match must be one of"),
    (["--seeds=0"], "seeds must be at least 1"),
    (["--sweep=top_k=9"], "top_k (9) must be between 1 and n_experts (4)"),
    (["--sweep=n_expert=4,8"], "unknown config key 'n_expert'; did you mean n_experts?"),
    (["--sweep=top_k=1.5"], "top_k expects an int"),
])
def test_experiment_errors(data_root, args, message):
    r = run_script("experiment.py", *TINY, f"--data_root={data_root}", *args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert "start " not in r.stdout  # refused before any run

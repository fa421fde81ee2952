"""What a newcomer meets first: every script's --help, a dry run before any data is downloaded, gradient
accumulation over several processes, the lines that confirm a resume and end a run, experiment.py's
progress and warnings."""

import json
import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_MOE, run_script, tiny_arg

import bench
import experiment
import prepare
import sample
import train
from configurator import configure, knob_comments
from model import count_params

SCRIPTS = {  # module: (its knobs with their defaults, the files documenting them)
    train: (train.defaults(), ["train.py", "model.py"]),
    sample: ({k: getattr(sample, k) for k in sample.KEYS}, ["sample.py"]),
    experiment: ({k: getattr(experiment, k) for k in experiment.EXPERIMENT_KEYS}, ["experiment.py"]),
    bench: ({k: getattr(bench, k) for k in bench.KEYS}, ["bench.py"]),
    prepare: (prepare.defaults(), ["prepare.py"]),
}


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_knob_with_its_default_and_doc(module, flag, capsys):
    knobs, files = SCRIPTS[module]
    docs = {}
    for path in reversed(files):  # the script's own comments first
        docs.update(knob_comments(os.path.join(ROOT, path)))
    assert not [k for k in knobs if not docs.get(k)], "knobs without a one-line doc"
    module.main([flag])
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip().splitlines()[0])
    for key, value in knobs.items():
        shown = repr(value) if isinstance(value, str) and not value.isprintable() else str(value)
        assert re.search(rf"^  --{key}={re.escape(shown)} +{re.escape(docs[key])}$", out, re.MULTILINE), key


@pytest.mark.slow
def test_help_as_a_process():
    r = run_script("train.py", "config/moe_e4k2.py", "--help")  # --help wins over anything else given
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert "--n_experts=0" in r.stdout and "routed experts E per layer" in r.stdout  # GPTConfig's docs too
    assert "--gradient_accumulation_steps=1" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "sample.py", "bench.py", "prepare.py", "experiment.py", "report.py",
                                    "export.py"])
def test_help_into_a_pipe_closed_early(script):
    """`python train.py --help | head`: the reader has gone before the help is written; the script ends quietly."""
    p = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the script has written anything: its write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and not err, err


def test_report_answers_help(capsys):
    import report

    report.main(["--help"])
    assert capsys.readouterr().out.startswith(report.__doc__.strip().splitlines()[0])
    with pytest.raises(SystemExit, match="experiment.py"):
        report.main(["--seeds=3"])


def test_dry_run_needs_no_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths (data_root "data", out_dir) are taken from here
    dry_run = lambda: SimpleNamespace(**configure([os.path.join(ROOT, "config", "moe_e4k2.py"), "--dry_run=True"],
                                                  train.defaults()))
    cfg = dry_run()
    assert train.train(cfg) is None
    out = capsys.readouterr().out
    path = os.path.join("data", "tinystories")
    assert f"vocab_size 50,257: GPT-2's tokenizer, as no dataset is at {path} yet" in out
    assert f"{count_params(train.model_configs(cfg)[0])['total']:,}" in out  # the table, counted with it
    assert os.listdir(tmp_path) == []  # nothing created
    # once a dataset is there (under the current directory), its vocabulary
    os.makedirs(path)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"vocab_size": 4096, "dtype": "uint16", "tokenizer": "gpt2"}, f)
    cfg = dry_run()
    train.train(cfg)
    assert f"vocab_size 4,096: from {os.path.join(path, 'meta.json')}" in capsys.readouterr().out
    assert cfg.vocab_size == 4096


@pytest.mark.parametrize("asked, world, each", [(1, 1, 1), (5, 1, 5), (1, 2, 1), (2, 2, 1), (3, 2, 2), (8, 4, 2)])
def test_accumulation_is_shared_by_the_processes_rounded_up(asked, world, each):
    assert train.micro_steps(asked, world) == each
    assert each * world >= asked and (each - 1) * world < asked  # the fewest micro-steps at least as many


@pytest.mark.slow
def test_torchrun_with_the_default_accumulation(data_root, tmp_path):
    """The README's torchrun command, with gradient_accumulation_steps left at its default of 1."""
    out = tmp_path / "ddp"
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY_MOE,
                   f"--data_root={data_root}", f"--out_dir={out}", "--max_iters=2")
    assert r.returncode == 0, r.stderr
    tokens = 2 * tiny_arg("batch_size") * tiny_arg("block_size")
    assert "gradient_accumulation_steps 1 rounded up to 2, 1 micro-step(s) on each of the 2 processes" in r.stdout
    assert f"tokens per iteration: {tokens:,} = 2 micro-step(s) x" in r.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["gradient_accumulation_steps"] == 2
    assert "torchrun --standalone --nproc_per_node=2 " in r.stdout.splitlines()[-1]  # the command to train on


def test_summary_line_of_a_stopped_run():
    argv = ["config/a b.py", "--overwrite=True", "--max_iters=60"]
    line = train.summary_line(train.Progress(iter_num=15, best_val_loss=2.5), 60, 75.0, "out/x",
                              ["python", "../tinymoe/train.py"], argv)
    assert line == ("stopped at iteration 15 of 60 in 75s, best val loss 2.5000, checkpoint written: out/x/ckpt.pt; "
                    "sample: python ../tinymoe/sample.py --out_dir=out/x; "
                    "continue: python ../tinymoe/train.py 'config/a b.py' --max_iters=60 --init_from=resume")


@pytest.mark.slow
def test_a_run_ends_with_a_summary_whose_commands_work(data_root, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", *TINY_MOE, f"--data_root={data_root}", f"--out_dir={out}", "--max_iters=3")
    assert r.returncode == 0, r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    best = torch.load(out / "ckpt.pt", weights_only=True)["best_val_loss"]
    assert summary.startswith("finished 3 iterations in ") and f"best val loss {best:.4f}" in summary
    assert f"checkpoint {out / 'ckpt.pt'}; sample: python sample.py --out_dir={out}; train on: python " in summary
    # the "train on" command, run as printed, resumes the run and says so
    command = shlex.split(summary.split("train on: ")[1])
    assert command[:2] == ["python", "train.py"] and command[-2:] == ["--init_from=resume", "--max_iters=6"]
    r = run_script(*command[1:])
    assert r.returncode == 0, r.stderr
    assert f"resumed from iteration 3 of {out / 'ckpt.pt'}" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("finished 6 iterations in ")
    state = torch.load(out / "ckpt.pt", weights_only=True)  # the vocabulary resolved at the start stays, for
    assert state["config"]["vocab_size"] == state["model_args"]["vocab_size"] > 0  # the next resume's table
    sample_command = shlex.split(summary.split("sample: ")[1].split(";")[0])
    r = run_script(*sample_command[1:], "--max_new_tokens=5", "--num_samples=1")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def experiment_cfg(*args):
    defaults = {**train.defaults(), **{k: getattr(experiment, k) for k in experiment.EXPERIMENT_KEYS}}
    return SimpleNamespace(**configure([*TINY_MOE, *args], defaults))


def test_sweep_below_warmup_warns(capsys):
    cfg = experiment_cfg("--warmup_iters=50", "--sweep=max_iters=20,50,100", "--seeds=2")
    experiment.check_knobs(cfg, experiment.parse_sweep(cfg.sweep, vars(cfg)))
    assert capsys.readouterr().out.splitlines() == [  # once per sweep point whose runs never reach learning_rate
        f"warning: warmup_iters (50) >= max_iters ({n}): the learning rate never reaches learning_rate"
        for n in (20, 50)]


def test_experiment_progress_line():
    assert experiment.progress(0, 6, 0, 3000, 5.0) == "0 of 6 runs done, 0 of 3,000 steps"
    assert experiment.progress(2, 6, 1000, 3000, 150.0) == "2 of 6 runs done, 1,000 of 3,000 steps, about 5.0 min left"
    assert experiment.progress(6, 6, 3000, 3000, 450.0) == "6 of 6 runs done, 3,000 of 3,000 steps"


@pytest.mark.slow
def test_experiment_says_where_it_stands(data_root, tmp_path):
    args = [*TINY_MOE, f"--data_root={data_root}", "--max_iters=3", "--seeds=1", "--match=active", "--name=e"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiment.py"), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)  # out/ goes to the current directory
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.startswith("warning: ")]  # max_iters <= warmup
    assert lines[0] == "0 of 2 runs already finished; 2 to go"
    log = os.path.join("out", "e", "moe-s1337", "train.log")
    assert lines[1].startswith(f"start moe seed 1337 (1 of 2, log in {log}): ")
    done = [line for line in lines if line.startswith("done ")]
    assert len(done) == 2 and re.search(r"1 of 2 runs done, 3 of 6 steps, about \d+s left$", done[0])
    assert done[1].endswith("2 of 2 runs done, 6 of 6 steps")
    assert (tmp_path / "out" / "e" / "report.md").exists()
    assert open(tmp_path / log).read().strip().splitlines()[-1].startswith("finished 3 iterations in ")

"""Faults: killed and interrupted runs resume exactly, checkpoints survive failed writes, non-finite
steps are skipped, bad input stops with one line, and multi-process runs stay in step."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_MOE, one_line_error, run_script

import runtime
import train
from configurator import UserError, configure
from model import GPT


def train_cmd(data_root, out_dir, *extra):
    return [sys.executable, "train.py", *TINY_MOE, f"--data_root={data_root}", f"--out_dir={out_dir}", *extra]


def step_losses(out_dir):
    """{iter: loss} of the training steps logged in out_dir."""
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def val_losses(out_dir):
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]


def logged_iters(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return max((json.loads(line).get("iter", 0) for line in open(path) if line.strip()), default=0)


def start_and_wait(cmd, out_dir, until_iter, timeout=120):
    """Start a training process and return it once it has logged `until_iter` steps."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while logged_iters(out_dir) < until_iter:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training did not progress"
        time.sleep(0.02)
    return proc


def run_until_done(cmd, timeout=300):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """An uninterrupted 60-step run to compare against."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_until_done(train_cmd(data_root, out, "--max_iters=60", "--eval_interval=10", "--balance=aux_free"))
    return out


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(data_root, tmp_path, straight):
    out = tmp_path / "killed"
    cmd = train_cmd(data_root, out, "--max_iters=60", "--eval_interval=10", "--balance=aux_free")
    proc = start_and_wait(cmd, out, until_iter=random.randint(13, 37))
    proc.kill()  # SIGKILL: no handler, no checkpoint, maybe mid-write
    proc.wait()
    assert 0 < logged_iters(out) < 60
    run_until_done(cmd + ["--init_from=resume"])
    assert step_losses(out) == step_losses(straight)  # every step, before and after the kill, bit for bit
    assert val_losses(out) == val_losses(straight)
    a = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(straight / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)  # the aux_free biases included
    assert any("expert_bias" in k for k in b)
    assert not [f for f in os.listdir(out) if ".tmp" in f]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_resumes_exactly(data_root, tmp_path, straight, sig):
    out = tmp_path / "stopped"
    cmd = train_cmd(data_root, out, "--max_iters=60", "--eval_interval=10", "--balance=aux_free")
    proc = start_and_wait(cmd, out, until_iter=15)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr  # interrupted: not a finished run, for the shell or experiment.py
    assert "checkpoint written" in stderr and "--init_from=resume" in stderr and "Traceback" not in stderr
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    assert 15 <= stopped_at < 60 and logged_iters(out) == stopped_at  # a checkpoint of the step it stopped at
    run_until_done(cmd + ["--init_from=resume"])
    assert step_losses(out) == step_losses(straight)


def in_process_cfg(data_root, out_dir, *extra):
    return SimpleNamespace(**configure([*TINY_MOE, f"--data_root={data_root}", f"--out_dir={out_dir}", *extra],
                                       train.defaults()))


class PoisonedGPT(GPT):
    """A GPT whose training loss is NaN on chosen forward calls (counted from 1)."""
    poison, calls = set(), 0

    def forward(self, idx, targets=None):
        logits, loss, stats = super().forward(idx, targets)
        if self.training and targets is not None:
            PoisonedGPT.calls += 1
            if PoisonedGPT.calls in PoisonedGPT.poison:
                loss = loss * float("nan")
        return logits, loss, stats


def test_non_finite_steps_are_skipped(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "GPT", PoisonedGPT)
    poison = {3, 4}  # one training forward a step (no gradient accumulation): steps 3 and 4 go bad
    PoisonedGPT.poison, PoisonedGPT.calls = poison, 0
    cfg = in_process_cfg(data_root, tmp_path, "--max_iters=8", "--eval_interval=4")
    assert train.train(cfg).best_val_loss < float("inf")
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["skipped_steps"] for r in steps] == [sum(p <= r["iter"] for p in poison) for r in steps]
    assert steps[-1]["skipped_steps"] == len(poison)
    finite = [r["loss"] for r in steps if r["iter"] not in poison]
    assert all(abs(x) < 100 for x in finite)
    assert all(abs(r["val_loss"]) < 100 for r in records if "val_loss" in r)


def test_too_many_bad_steps_stop_and_keep_the_checkpoint(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "GPT", PoisonedGPT)
    PoisonedGPT.poison, PoisonedGPT.calls = set(range(1, 1000)), 0
    cfg = in_process_cfg(data_root, tmp_path, "--max_iters=20", "--eval_interval=10", "--max_bad_steps=3")
    with pytest.raises(UserError, match="3 steps in a row had a non-finite loss") as e:
        train.train(cfg)
    assert "iteration 0" in str(e.value)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["iter_num"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    runtime.save_checkpoint(str(path), {"format": runtime.CHECKPOINT_FORMAT, "iter_num": 1})
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        runtime.save_checkpoint(str(path), {"format": runtime.CHECKPOINT_FORMAT, "iter_num": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.slow
def test_checkpoint_with_foreign_weights_is_rejected(data_root, tmp_path):
    out = tmp_path / "run"
    run_until_done(train_cmd(data_root, out, "--max_iters=1"))
    state = torch.load(out / "ckpt.pt", weights_only=True)
    del state["model"]["wte.weight"]
    torch.save(state, out / "ckpt.pt")
    one_line_error(run_script(*train_cmd(data_root, out, "--max_iters=2", "--init_from=resume")[1:]),
                   "does not hold the weights of the model it describes")
    one_line_error(run_script("sample.py", f"--out_dir={out}"), "does not hold the weights")


@pytest.mark.slow
def test_dataset_vocabulary_changed_since_checkpoint(data_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(data_root, "tiny"), data / "tiny")
    out = tmp_path / "run"
    run_until_done(train_cmd(str(data), out, "--max_iters=1", "--vocab_size=1024"))
    meta = json.load(open(data / "tiny" / "meta.json"))
    trained_on = meta["vocab_size"]
    meta["vocab_size"] = trained_on + 88
    json.dump(meta, open(data / "tiny" / "meta.json", "w"))
    one_line_error(run_script(*train_cmd(str(data), out, "--max_iters=2", "--init_from=resume")[1:]),
                   f"the resumed run was trained on one of {trained_on}")


@pytest.mark.parametrize("extra, message", [
    (["--n_embd=36", "--n_head=4"], "must be even for rotary embeddings"),
    (["--match=total", "--n_experts=0"], "needs an MoE config"),
    (["--init_from=continue"], "init_from must be one of scratch, resume"),
    (["--dtype=float16"], "dtype must be one of auto, float32, bfloat16"),
    (["--compile=maybe"], "compile must be one of auto, true, false"),
])
@pytest.mark.slow
def test_more_user_errors(data_root, tmp_path, extra, message):
    one_line_error(run_script(*train_cmd(data_root, tmp_path / "run", "--max_iters=1", *extra)[1:]), message)


@pytest.mark.slow
def test_out_dir_not_writable(data_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    one_line_error(run_script(*train_cmd(data_root, blocker / "run", "--max_iters=1")[1:]), "is not writable")


def torchrun(data_root, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
            *TINY_MOE, f"--data_root={data_root}", f"--out_dir={out}", "--gradient_accumulation_steps=2",
            "--balance=aux_free", *extra]


@pytest.mark.slow
def test_two_processes_on_cpu(data_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_until_done(torchrun(data_root, straight, "--max_iters=6", "--eval_interval=3"))
    run_until_done(torchrun(data_root, resumed, "--max_iters=3", "--eval_interval=3"))
    state = torch.load(resumed / "ckpt.pt", weights_only=True)
    assert len(state["data_rng"]) == 2 and not torch.equal(state["data_rng"][0], state["data_rng"][1])
    r = run_until_done(torchrun(data_root, resumed, "--max_iters=6", "--eval_interval=3", "--init_from=resume"))
    assert "2 process(es)" in r.stdout
    # only rank 0 logs: one record per step; and a resumed 2-process run continues exactly
    assert sorted(step_losses(straight)) == [1, 2, 3, 4, 5, 6]
    assert step_losses(resumed) == step_losses(straight)
    # resuming with another number of processes is refused with a clear line
    one_line_error(run_script(*train_cmd(data_root, resumed, "--max_iters=8", "--init_from=resume")[1:]),
                   "written by 2 process(es)")


# -----------------------------------------------------------------------------
# #23: OS errors on writes, in real processes: a full disk (a small tmpfs, as root) and a file-size limit


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB tmpfs (needs root; skipped where mount is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: the write errors are tested in-process (test_bad_inputs.py)")
    yield disk
    subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_prepare_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk, tmp_path):
    text = tmp_path / "big.txt"
    words = ["tiny", "model", "story", "learned", "every", "day", "and", "then", "slept"]
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(12_000)))
    r = run_script("prepare.py", f"--input={text}", "--name=big", "--vocab_size=260", f"--data_root={small_disk}")
    one_line_error(r, "No space left on device")
    assert "big" in r.stderr and os.listdir(small_disk) in ([], [".big.lock"]), os.listdir(small_disk)


@pytest.mark.slow
def test_file_size_limit_during_a_checkpoint_keeps_nothing_half_written(data_root, tmp_path):
    """RLIMIT_FSIZE (a quota's stand-in): the write fails with EFBIG, not SIGXFSZ's death; one line, no temp file."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    out = tmp_path / "run"
    r = subprocess.run(train_cmd(data_root, out, "--max_iters=2", "--eval_interval=2", "--n_embd=64",
                                 "--expert_hidden=64"), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    one_line_error(r, "ckpt.pt")
    assert "File too large" in r.stderr and not [n for n in os.listdir(out) if "tmp" in n], os.listdir(out)

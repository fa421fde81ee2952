"""Soak test (skipped by default; run with `python -m pytest -m soak`, a few minutes): a tiny MoE
with aux_free balancing and token dropping trains 4,000 steps while being killed with SIGKILL at
random moments and resumed, and ends bit-identical to an uninterrupted run. The moments scale with
the start-up and training times measured on the uninterrupted run, so that a busy or a fast machine
still sees kills before, during and after start-up, and progress in between."""

import json
import random
import subprocess
import time

import pytest
import torch
from test_faults import ROOT, logged_iters, run_until_done, step_losses, train_cmd, val_losses

STEPS = 4000


@pytest.mark.soak
@pytest.mark.slow
def test_kill_and_resume_soak(data_root, tmp_path):
    args = [f"--max_iters={STEPS}", "--eval_interval=100", "--log_interval=10", "--balance=aux_free",
            "--capacity_factor=1.25"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launched = time.time()
    run_until_done(train_cmd(data_root, straight, *args), timeout=3600)
    times = [json.loads(line)["time"] for line in open(straight / "metrics.jsonl") if '"time"' in line]
    startup, training = times[0] - launched, times[-1] - times[0]  # until the start record; then training
    rng = random.Random(0)
    kills = 0
    while True:
        if (killed / "ckpt.pt").exists() and STEPS in [i for i, _ in val_losses(killed)]:
            break  # killed after its last checkpoint: nothing is left to resume (a resume would be refused)
        # resume once a checkpoint exists (a kill may come before the first one is written)
        resume = ["--init_from=resume"] if (killed / "ckpt.pt").exists() else ["--overwrite=True"]
        proc = subprocess.Popen(train_cmd(data_root, killed, *args, *resume), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            # a kill before, during or after start-up, and at most a quarter of the training later: both
            # scale with this machine's speed, so a busy or a fast machine still sees kills and progress
            proc.wait(timeout=rng.uniform(0.5, 1.5) * startup + rng.uniform(0, 0.25) * training)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            assert kills <= 200, f"no end after {kills} kills: the killed run makes no progress"
            continue
        assert proc.returncode == 0, proc.stderr.read()
        break
    assert kills >= 5, "the run finished before it could be killed a few times"
    assert logged_iters(killed) == STEPS
    # every scheduled log step (each 10th) in both, with the same loss; a resumed run also logs its first step
    # (and any run a step where log_seconds would pass): where both logged a step, the same loss too
    killed_losses, straight_losses = step_losses(killed), step_losses(straight)
    scheduled = lambda losses: {i: v for i, v in losses.items() if i % 10 == 0}
    assert scheduled(killed_losses) == scheduled(straight_losses) and len(scheduled(straight_losses)) == STEPS // 10
    assert all(killed_losses[i] == straight_losses[i] for i in killed_losses.keys() & straight_losses.keys())
    assert val_losses(killed) == val_losses(straight)
    a = torch.load(killed / "ckpt.pt", weights_only=True)
    b = torch.load(straight / "ckpt.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][i][k], v) for k, v in s.items())
    print(f"soak: {kills} kills over {STEPS} steps, final state identical ({time.strftime('%X')})")

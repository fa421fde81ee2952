"""Soak test (skipped by default; run with `python -m pytest -m soak`, a few minutes): a tiny MoE
with aux_free balancing and token dropping trains 4,000 steps while being killed with SIGKILL at
random moments and resumed, and ends bit-identical to an uninterrupted run. The moments scale with
the start-up time measured on the uninterrupted run, so that a busy machine still sees kills
before, during and after start-up, and progress in between."""

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
    startup = json.loads(open(straight / "metrics.jsonl").readline())["time"] - launched  # until the start record
    # kills after 2 to 10 s where start-up takes 3 s (longer on a busy machine): before, during and after it
    slower = max(1.0, startup / 3)
    rng = random.Random(0)
    kills = 0
    while True:
        # resume once a checkpoint exists (a kill may come before the first one is written)
        resume = ["--init_from=resume"] if (killed / "ckpt.pt").exists() else ["--overwrite=True"]
        proc = subprocess.Popen(train_cmd(data_root, killed, *args, *resume), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=rng.uniform(2, 10) * slower)
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
    assert step_losses(killed) == step_losses(straight)
    assert val_losses(killed) == val_losses(straight)
    a = torch.load(killed / "ckpt.pt", weights_only=True)
    b = torch.load(straight / "ckpt.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][i][k], v) for k, v in s.items())
    print(f"soak: {kills} kills over {STEPS} steps, final state identical ({time.strftime('%X')})")

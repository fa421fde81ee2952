"""Every shipped config: it builds, counts its parameters exactly, matches dense baselines within
tolerance, and trains a few steps (shrunk to toy width) without NaN."""

import glob
import json
import math
import os

import pytest
import torch
from conftest import ROOT, TINY_MOE, run_script

import train
from configurator import configure
from model import GPT, GPTConfig, count_params, match_dense, model_fields

CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "config", "*.py")))


def model_config(path, vocab_size):
    cfg = configure([os.path.join(ROOT, path), f"--vocab_size={vocab_size}"], train.defaults())
    return GPTConfig(**{k: cfg[k] for k in model_fields()})


def test_expected_configs_ship():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"moe_e4k2.py", "cpu_moe.py", "moe_e8k2.py", "moe_e16k4_fine.py", "moe_e64k8_fine.py", "moe_shared.py",
            "moe_hetero.py", "moe_auxfree.py", "moe_capacity.py"} <= names


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("vocab_size", [50257, 4096])
def test_config_counts_and_matches(path, vocab_size):
    cfg = model_config(path, vocab_size)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(cfg)
    counts = count_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    if cfg.n_experts:
        active = sum(p.numel() * (cfg.top_k / cfg.n_experts if ".experts." in n else 1)
                     for n, p in model.named_parameters())
        assert counts["active"] == pytest.approx(active)
        for target in ("active", "total"):
            dense = match_dense(cfg, target)
            assert abs(count_params(dense)["total"] / counts[target] - 1) < 0.001


def test_headline_config_is_under_25m():
    assert count_params(model_config("config/moe_e4k2.py", 50257))["total"] < 25_000_000


def test_fine_grained_configs_keep_active_params():
    base = count_params(model_config("config/moe_e4k2.py", 50257))["active"]
    for name in ("moe_e8k2", "moe_e16k4_fine", "moe_e64k8_fine", "moe_shared", "moe_hetero"):
        active = count_params(model_config(f"config/{name}.py", 50257))["active"]
        assert abs(active / base - 1) < 0.01, name  # equal up to the router's size


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if "moe_" in p])
def test_config_trains_without_nan(path, data_root, tmp_path):
    out = tmp_path / "run"
    shrink = [a for a in TINY_MOE if a.split("=")[0] in ("--dataset", "--n_layer", "--n_head", "--n_embd",
                                                         "--block_size", "--batch_size", "--eval_iters", "--device")]
    r = run_script("train.py", path, *shrink, f"--data_root={data_root}", f"--out_dir={out}", "--max_iters=3",
                   "--eval_interval=3", "--log_interval=1")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [x for x in records if "loss" in x]
    assert len(steps) == 3 and all(math.isfinite(x["loss"]) for x in steps)
    state = torch.load(out / "ckpt.pt", weights_only=False)
    cfg = GPTConfig(**state["model_args"])
    routing = [x for x in records if "routing" in x][-1]["routing"]
    assert len(routing) == cfg.n_layer
    for layer in routing:
        assert len(layer["load"]) == cfg.n_experts and 0 < layer["entropy"] <= math.log(cfg.n_experts) + 1e-6
    model = GPT(cfg)
    model.load_state_dict(state["model"])  # the checkpoint holds this config's weights...
    assert sum(p.numel() for p in model.parameters()) == records[0]["params"]["total"]  # ...and the logged count


@pytest.mark.parametrize("n_experts, top_k", [(1, 1), (128, 8), (256, 8), (256, 256)])
def test_many_experts(n_experts, top_k):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=n_experts, top_k=top_k,
                    expert_hidden=8)
    model = GPT(cfg)
    idx = torch.randint(0, 64, (2, 16))
    _, loss, _ = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())

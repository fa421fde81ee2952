"""train.py and sample.py end to end on a tiny dataset, and the functions train.py is made of."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_MOE, one_line_error, run_script, tiny_arg

import train
from configurator import UserError
from model import GPTConfig, count_params, flops_per_token
from runtime import CHECKPOINT_FORMAT, CHECKPOINT_KEYS, load_checkpoint, peak_flops, save_checkpoint


def train_args(data_root, out_dir, *extra):
    return ["train.py", *TINY_MOE, f"--data_root={data_root}", f"--out_dir={out_dir}", *extra]


def records(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_train_moe_end_to_end(data_root, tmp_path):
    out = tmp_path / "moe"
    r = run_script(*train_args(data_root, out, "--max_iters=3", "--eval_interval=2"))
    assert r.returncode == 0, r.stderr
    table = {line.split()[0]: line for line in r.stdout.splitlines()[:4]}  # the parameter table
    assert list(table)[1:] == ["moe", "dense-active", "dense-total"] and table["moe"].endswith("<- trains")
    tokens = int(r.stdout.split("tokens per iteration: ")[1].split()[0].replace(",", ""))
    assert tokens == tiny_arg("batch_size") * tiny_arg("block_size")
    assert "iter 3: loss" in r.stdout and "moe layer 1: load max/mean" in r.stdout
    logs = records(out)
    assert logs[0]["event"] == "start" and logs[0]["params"]["total"] > logs[0]["params"]["active"]
    steps = [r for r in logs if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    for key in ("tokens", "loss", "ce", "aux", "z", "lr", "ms_per_iter", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in steps), key
    # achieved FLOP/s from the active parameters (model.flops_per_token), not from the first step, whose time
    # includes start-up; no MFU on CPU
    assert logs[0]["flops_per_token"] == flops_per_token(GPTConfig(**logs[0]["model_args"]))
    assert "flops_per_s" not in steps[0] and "(start-up included)" in r.stdout.split("iter 1: loss")[1].splitlines()[0]
    assert all(r["flops_per_s"] == pytest.approx(logs[0]["flops_per_token"] * r["tokens_per_s"]) for r in steps[1:])
    assert "FLOP/s" in r.stdout.split("iter 3: loss")[1].splitlines()[0] and "MFU not shown on CPU" in r.stdout
    assert not any("mfu" in r for r in steps)
    evals = [r for r in logs if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 2, 3]
    assert len(evals[-1]["routing"]) == 2 and len(evals[-1]["routing"][0]["load"]) == 4
    state = torch.load(out / "ckpt.pt", weights_only=False)
    assert state["format"] == CHECKPOINT_FORMAT and state["iter_num"] == 3
    assert state["model_args"]["n_experts"] == 4 and state["config"]["max_iters"] == 3
    assert state["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert not any(k.startswith("_orig_mod") for k in state["model"])

    samples = {}
    for cache in (True, False):  # greedy: the same text with and without the KV cache
        r = run_script("sample.py", f"--out_dir={out}", "--max_new_tokens=10", "--num_samples=1", "--start=KING",
                       "--top_k=1", f"--use_cache={cache}")
        assert r.returncode == 0 and r.stdout.startswith("KING"), r.stderr
        assert r.stdout.splitlines()[-1].endswith(f"tokens/s on cpu, {'with' if cache else 'without'} the KV cache")
        samples[cache] = r.stdout.split("---------------")[0]
    assert samples[True] == samples[False]
    r = run_script("sample.py", f"--out_dir={out}", "--start=the king", "--show_routing=True", "--layer=1")
    assert r.returncode == 0, r.stderr
    assert "MoE layer 1" in r.stdout and "-> e" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("match", ["active", "total"])
def test_train_matched_dense(data_root, tmp_path, match):
    out = tmp_path / match
    r = run_script(*train_args(data_root, out, "--max_iters=2", f"--match={match}"))
    assert r.returncode == 0, r.stderr
    state = torch.load(out / "ckpt.pt", weights_only=False)
    assert state["model_args"]["n_experts"] == 0
    trained = sum(v.numel() for k, v in state["model"].items() if k != "lm_head.weight")  # tied to wte.weight
    moe, _ = train.model_configs(SimpleNamespace(**state["config"]))  # the MoE the config describes
    goal = count_params(moe)[match]
    assert trained == records(out)[0]["params"]["total"] and abs(trained - goal) / goal < 0.005


@pytest.mark.slow
def test_dry_run_prints_table_only(data_root, tmp_path):
    r = run_script(*train_args(data_root, tmp_path / "dry", "--dry_run=True"))
    assert r.returncode == 0 and "mismatch" in r.stdout and "moe" in r.stdout
    assert not (tmp_path / "dry").exists()


@pytest.mark.slow
def test_resume_continues_exactly(data_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_script(*train_args(data_root, straight, "--max_iters=6", "--eval_interval=3")).returncode == 0
    assert run_script(*train_args(data_root, resumed, "--max_iters=3", "--eval_interval=3")).returncode == 0
    r = run_script(*train_args(data_root, resumed, "--max_iters=6", "--eval_interval=3", "--init_from=resume"))
    assert r.returncode == 0, r.stderr
    losses = lambda out: [(x["iter"], x["loss"]) for x in records(out) if "loss" in x]
    assert losses(resumed) == losses(straight)  # bit-identical on CPU
    vals = lambda out: [(x["iter"], x["val_loss"]) for x in records(out) if "val_loss" in x]
    assert vals(resumed) == vals(straight)


@pytest.mark.slow
def test_refuses_to_overwrite_a_run(data_root, tmp_path):
    out = tmp_path / "run"
    assert run_script(*train_args(data_root, out, "--max_iters=1")).returncode == 0
    one_line_error(run_script(*train_args(data_root, out, "--max_iters=1")), "--overwrite=True")
    assert run_script(*train_args(data_root, out, "--max_iters=1", "--overwrite=True")).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--n_expert=4"], "unknown config key 'n_expert'; did you mean n_experts?"),
    (["--max_iters=ten"], "cannot parse 'ten'"),
    (["--top_k=5"], "top_k (5) must be between 1 and n_experts (4)"),
    (["--dataset=nothing"], "python prepare.py"),
    (["--n_head=3"], "divisible by n_head"),
    (["--init_from=resume"], "no checkpoint at"),
    (["--block_size=100000"], "fewer than block_size"),
    (["--vocab_size=100"], "larger than the model's vocab_size 100"),
    (["config/does_not_exist.py"], "config file not found"),
])
def test_user_errors_are_one_line(data_root, tmp_path, extra, message):
    one_line_error(run_script(*train_args(data_root, tmp_path / "err", "--max_iters=1", *extra)), message)


@pytest.mark.slow
def test_sample_on_missing_or_corrupt_checkpoint(tmp_path):
    one_line_error(run_script("sample.py", f"--out_dir={tmp_path}"), "no checkpoint at")
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    one_line_error(run_script("sample.py", f"--out_dir={tmp_path}"), "cannot read checkpoint")


def test_lr_schedule():
    cfg = SimpleNamespace(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, lr_decay_iters=0)
    lrs = [train.get_lr(it, cfg) for it in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < cfg.learning_rate and lrs[10] == pytest.approx(cfg.learning_rate)
    midway = (cfg.warmup_iters + cfg.max_iters) // 2  # cos(pi / 2) = 0: halfway between the two rates
    assert lrs[midway] == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2)
    assert lrs[110] == lrs[119] == cfg.min_lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_get_batch_is_deterministic_and_shifted():
    data = np.arange(1000, dtype=np.uint16)
    x1, y1 = train.get_batch(data, 4, 8, torch.Generator().manual_seed(3), torch.device("cpu"))
    x2, _ = train.get_batch(data, 4, 8, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(x1, x2) and torch.equal(y1, x1 + 1) and x1.shape == (4, 8)


def test_checkpoint_is_atomic_and_validated(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    state = {"format": CHECKPOINT_FORMAT, **dict.fromkeys(CHECKPOINT_KEYS), "model": {}, "iter_num": 1,
             "model_args": {"vocab_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8}}
    save_checkpoint(path, state)
    assert load_checkpoint(path)["iter_num"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint(path)
    torch.save({"weights": 1}, path)
    with pytest.raises(UserError, match="not a tinymoe checkpoint"):
        load_checkpoint(path)
    del state["data_rng"]
    save_checkpoint(path, state)  # the right format, a key missing: foreign
    with pytest.raises(UserError, match="not a tinymoe checkpoint of format 1: it has no data_rng"):
        load_checkpoint(path)


def test_peak_flops_by_exact_device_name():
    """MFU's peak: the exact name torch reports, so that an L40S is not taken for an L4, nor an H100 PCIe for
    an SXM; bf16 peaks only; none on CPU. The note names the peak used."""
    bf16 = torch.bfloat16
    assert peak_flops("NVIDIA L4", bf16)[0] == 121e12 and peak_flops("NVIDIA L40S", bf16)[0] == 362e12
    assert peak_flops("NVIDIA H100 80GB HBM3", bf16)[0] == 989e12 and peak_flops("NVIDIA H100 PCIe", bf16)[0] == 756e12
    peak, note = peak_flops("NVIDIA H100 PCIe", bf16)
    assert "NVIDIA H100 PCIe" in note and "756 TFLOP/s" in note
    for name in ("NVIDIA L40", "NVIDIA H100", "Tesla T4"):  # near misses and unknown cards: no guess
        peak, note = peak_flops(name, bf16)
        assert peak is None and name in note
    assert peak_flops("NVIDIA L4", torch.float32)[0] is None  # the table holds bf16 peaks
    assert peak_flops("cpu", bf16)[0] is None and peak_flops("cpu", torch.float32)[0] is None


# -----------------------------------------------------------------------------
# a user's first hour (#25): live output, threads, experiment tracking


class ByteTokenizer:
    """Token i is byte i: a sample's text may end inside a multi-byte character, as a byte-level BPE's can."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("use_cache", [True, False])
def test_sample_streams_the_tokens_generate_draws(use_cache, capsys):
    import sample
    from model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256, n_experts=4, top_k=2,
                          expert_hidden=48)).eval()
    prompt = torch.tensor([list("é a".encode())])
    torch.manual_seed(7)
    plain = model.generate(prompt, 24, 1.5, None, use_cache)  # past block_size: the cache refills once
    torch.manual_seed(7)
    seen, stream = [], sample.Stream(ByteTokenizer())
    stream(prompt)
    streamed = model.generate(prompt, 24, 1.5, None, use_cache, lambda idx: (seen.append(idx.clone()), stream(idx)))
    stream.end(streamed)
    assert torch.equal(plain, streamed)  # the same draws, bit for bit
    assert [s.shape[1] for s in seen] == list(range(5, 29)) and torch.equal(seen[-1], streamed)
    assert capsys.readouterr().out == ByteTokenizer().decode(streamed[0].tolist()) + "\n"


def test_train_logs_by_time_first_step_and_threads(data_root, tmp_path, monkeypatch, capsys):
    """log_seconds=0: lines by iteration only, plus one after the run's first step; a tiny log_seconds: a line
    after every step. --threads sets torch's threads and the start-up line says so. With wandb_log, the records of
    metrics.jsonl go to W&B too (here a stand-in module), routing as flat keys."""
    logged = []
    fake = SimpleNamespace(init=lambda **kw: SimpleNamespace(log=lambda row, step: logged.append((step, row)),
                                                             finish=lambda: logged.append("finished")))
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    threads = torch.get_num_threads()
    try:
        for log_seconds, iters in ((0, [1, 4]), (1e-9, [1, 2, 3, 4])):
            out = tmp_path / str(log_seconds)
            train.main([*train_args(data_root, out)[1:], "--log_interval=100", "--max_iters=4", "--eval_interval=2",
                        f"--log_seconds={log_seconds}", "--threads=1", "--wandb_log=True"])
            assert [r["iter"] for r in records(out) if "loss" in r] == iters
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "CPU threads: 1 (threads); change with --threads=N or OMP_NUM_THREADS=N" in text
    assert "at least every 1e-09s; first an evaluation on 2 validation batches" in text
    assert text.count("  evaluating: 1 of 2 validation batches\n") == 3  # log_seconds=1e-9: evaluations at 0, 2, 4
    assert "first step " in text.split("iter 1: loss")[1].splitlines()[1] and "the 3 step(s) left take ~" in text
    rows = [r for r in logged if r != "finished"][-len([r for r in records(out) if "iter" in r]):]
    assert logged[-1] == "finished" and len(rows) == 7  # evaluations at 0, 2, 4 and 4 steps
    for (step, row), rec in zip(rows, [r for r in records(out) if "iter" in r]):
        assert step == rec["iter"] and all(row[k] == v for k, v in rec.items() if k not in ("iter", "routing"))
        for layer, summary in enumerate(rec.get("routing", [])):
            assert row[f"routing/layer{layer}/cv"] == summary["cv"]
            assert [row[f"routing/layer{layer}/load/e{e}"] for e in range(4)] == summary["load"]


def test_pace_note_once_when_steps_slow_down(capsys):
    run = SimpleNamespace(fastest=(float("inf"), 0), system=SimpleNamespace(device=torch.device("cpu")))
    cfg = SimpleNamespace(max_iters=100, eval_interval=50)
    for it, dt in ((1, 2.0), (10, 0.2), (20, 0.3), (30, 0.7), (40, 0.9)):
        train.pace_note(run, cfg, it, dt, first_iter=1, eval_s=5.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "first step 2.00s (start-up included): the 99 step(s) left take ~3.3 min at this pace, " \
                       "+ 2 evaluation(s) of ~5s"
    assert len(lines) == 2 and lines[1].startswith("note: steps take 3.5x as long as by iteration 10 (700 against 200")


def test_wandb_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match=r"^wandb_log=True needs the wandb package: pip install wandb"):
        train.open_tracker(SimpleNamespace(wandb_project="p", wandb_run_name="", out_dir="out"))


@pytest.mark.slow
def test_wandb_offline_run(data_root, tmp_path):
    pytest.importorskip("wandb", reason="wandb is optional (not in requirements.txt): pip install wandb")
    out = tmp_path / "tracked"
    r = run_script(*train_args(data_root, out, "--max_iters=2", "--wandb_log=True", "--wandb_run_name=t"),
                   env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # the history, to `wandb sync` later
    data = runs[0].read_bytes()
    assert all(key in data for key in (b"val_loss", b"ms_per_iter", b"routing/layer1/load/e3", b"max_mean"))

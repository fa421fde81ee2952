"""Bad inputs and faults, as a new user meets them: every entry point (train.py, sample.py, prepare.py,
experiment.py, bench.py) stops on a mistake with one line that names the knob or file, a non-zero exit and no
traceback, and loses nothing: a checkpoint, log or dataset that was there stays byte-identical.

The tables call each script's main() in-process: sys.exit("error: ...") carries the exit status and the line
a process prints, and any other exception is the traceback a process would show. What needs a real process
(signals, two runs on one out_dir, kills, a full disk) starts one, in the tests marked slow at the end.

A failing case names its class first: LOST (a file that was there changed), TRACEBACK, WENT_ON (exit 0, or a
checkpoint written with the bad input), UNCLEAR (it stopped, but not with one line naming the knob or file)."""

import errno
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_MOE, corpus_text, one_line_error

import bench
import experiment
import guard
import prepare
import runtime
import sample
import train

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
BASE = [*TINY_MOE, "--max_iters=2", "--eval_interval=2"]  # the tiny MoE, 2 steps


def case(id, args, names, marks=(), **setup):
    """A table row: the arguments, the words the error line must hold (the knob or file), and setup: `files`
    {name: text} written to the test's folder ({tmp} in args), `data` and `run` functions that spoil a copy of
    the tiny dataset or of a finished run before the script runs."""
    return pytest.param(args, names, setup, id=id, marks=marks)


def outcome(main, argv, capsys):
    """(exit status, error line, all output) of main(argv) as a process would end: "traceback" for any
    exception but SystemExit."""
    try:
        main(argv)
        status, line = 0, ""
    except SystemExit as e:
        status, line = (1, e.code) if isinstance(e.code, str) else (e.code or 0, "")
    except Exception as e:
        status, line = "traceback", f"{type(e).__name__}: {e}"
    captured = capsys.readouterr()
    return status, line, captured.out + captured.err


def snapshot(*folders):
    """{path: sha256} of every file under folders (a missing folder is empty)."""
    digests = {}
    for folder in folders:
        for parent, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(parent, name)
                digests[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digests


def check_refused(status, line, output, names, before=None, after=None):
    """The script stopped with one line naming every one of names, a non-zero exit, no traceback, no new
    checkpoint; and every file there before is byte-identical after."""
    if before is not None and any(after.get(path) != digest for path, digest in before.items()):
        changed = sorted(os.path.basename(path) for path, digest in before.items() if after.get(path) != digest)
        pytest.fail(f"LOST {changed} changed; exit {status}: {line}")
    if status == "traceback" or "Traceback" in output:
        pytest.fail(f"TRACEBACK {line}")
    written = [path for path in after or {} if path not in before and os.path.basename(path) == "ckpt.pt"]
    if status == 0 or written:
        pytest.fail(f"WENT_ON with the bad input: exit {status}, new checkpoints {written}, {line!r}")
    missing = [name for name in names if name not in line]
    if missing or len(line.strip().splitlines()) != 1:
        pytest.fail(f"UNCLEAR {line!r} does not name {missing}")


def write_files(tmp_path, files):
    for name, text in (files or {}).items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())


def fill(args, **places):
    return [a.format(**places) for a in args]


# -----------------------------------------------------------------------------
# fixtures: a finished run to resume, overwrite and sample from; a spoilable copy of the dataset


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """out_dir of a finished 2-step run of the tiny MoE."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={out}"])
    return out


@pytest.fixture(scope="module")
def trained_dense(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "dense"
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={out}", "--n_experts=0", "--max_iters=1"])
    return out


def spoiled_data(tmp_path, data_root, spoil):
    """data_root, or a copy of it in tmp_path with spoil(dataset folder) applied."""
    if spoil is None:
        return data_root
    shutil.copytree(data_root, tmp_path / "data")
    spoil(tmp_path / "data" / "tiny")
    return str(tmp_path / "data")


def spoiled_run(tmp_path, trained, spoil):
    shutil.copytree(trained, tmp_path / "run")
    if spoil:
        spoil(tmp_path / "run")
    return tmp_path / "run"


# --- ways to spoil a dataset folder ---


def edit_meta(**changes):
    def spoil(folder):
        meta = json.load(open(folder / "meta.json"))
        meta.update(changes)
        json.dump({k: v for k, v in meta.items() if v is not None}, open(folder / "meta.json", "w"))
    return spoil


def write(name, content):
    def spoil(folder):
        (folder / name).write_bytes(content)
    return spoil


def remove(name):
    def spoil(folder):
        (folder / name).unlink()
    return spoil


def make_folder(name):
    def spoil(folder):
        (folder / name).unlink()
        (folder / name).mkdir()
    return spoil


def append_bytes(name, extra):
    def spoil(folder):
        with open(folder / name, "ab") as f:
            f.write(extra)
    return spoil


def token_out_of_range(name):
    def spoil(folder):
        tokens = np.memmap(folder / name, dtype=np.uint16, mode="r+")
        tokens[len(tokens) // 2] = 60000  # the vocabulary has 512 tokens
        tokens.flush()
    return spoil


def keep_tokens(split, n):
    def spoil(folder):
        (folder / f"{split}.bin").write_bytes(np.fromfile(folder / f"{split}.bin", dtype=np.uint16)[:n].tobytes())
        edit_meta(**{f"{split}_tokens": n})(folder)
    return spoil


def other_tokenizer(folder):
    """The same vocabulary size, another BPE: two merges swapped."""
    spec = json.load(open(folder / "tokenizer.json"))
    spec["merges"][0], spec["merges"][1] = spec["merges"][1], spec["merges"][0]
    json.dump(spec, open(folder / "tokenizer.json", "w"))


# --- ways to spoil a run's out_dir ---


def edit_checkpoint(change):
    def spoil(run):
        state = torch.load(run / "ckpt.pt", weights_only=True)
        change(state)
        torch.save(state, run / "ckpt.pt")
    return spoil


def without(key):
    return edit_checkpoint(lambda state: state.pop(key))


def nan_weight(state):
    state["model"]["wte.weight"][0, 0] = float("nan")


def corrupt_log_middle(run):
    lines = open(run / "metrics.jsonl").read().splitlines()
    lines[1] = lines[1][:20]
    open(run / "metrics.jsonl", "w").write("\n".join(lines) + "\n")


def truncate_file(name):
    def spoil(run):
        data = open(run / name, "rb").read()
        open(run / name, "wb").write(data[:len(data) // 2])
    return spoil


# -----------------------------------------------------------------------------
# train.py: every knob, each tried on a fresh out_dir and with --overwrite=True over a finished run


TRAIN_KNOBS = [
    case("batch_size=0", ["--batch_size=0"], ["batch_size"]),
    case("batch_size<0", ["--batch_size=-4"], ["batch_size"]),
    case("block_size=0", ["--block_size=0"], ["block_size"]),
    case("eval_interval=0", ["--eval_interval=0"], ["eval_interval"]),
    case("eval_iters=0", ["--eval_iters=0"], ["eval_iters"]),
    case("log_interval=0", ["--log_interval=0"], ["log_interval"]),
    case("gradient_accumulation_steps=0", ["--gradient_accumulation_steps=0"], ["gradient_accumulation_steps"]),
    case("max_iters<0", ["--max_iters=-1"], ["max_iters"]),
    case("learning_rate<0", ["--learning_rate=-0.001"], ["learning_rate"]),
    case("learning_rate=inf", ["--learning_rate=1e999"], ["learning_rate"]),
    case("learning_rate=nan", ["{tmp}/nan.py"], ["learning_rate"], files={"nan.py": "learning_rate = float('nan')"}),
    case("min_lr<0", ["--min_lr=-0.0001"], ["min_lr"]),
    case("min_lr>learning_rate", ["--min_lr=0.01"], ["min_lr", "learning_rate"]),
    case("beta1=1", ["--beta1=1.0"], ["beta1"]),
    case("beta1<0", ["--beta1=-0.1"], ["beta1"]),
    case("beta2>1", ["--beta2=1.5"], ["beta2"]),
    case("grad_clip<0", ["--grad_clip=-1.0"], ["grad_clip"]),
    case("grad_clip=inf", ["--grad_clip=1e999"], ["grad_clip"]),
    case("weight_decay<0", ["--weight_decay=-0.1"], ["weight_decay"]),
    case("warmup_iters<0", ["--warmup_iters=-1"], ["warmup_iters"]),
    case("lr_decay_iters<0", ["--lr_decay_iters=-5"], ["lr_decay_iters"]),
    case("lr_decay_iters<warmup_iters", ["--warmup_iters=10", "--lr_decay_iters=5"],
         ["lr_decay_iters", "warmup_iters"]),
    case("max_bad_steps=0", ["--max_bad_steps=0"], ["max_bad_steps"]),
    case("seed<0", ["--seed=-1"], ["seed"]),
    case("seed=2**64", ["--seed=18446744073709551616"], ["seed"]),
    case("device=cuda", ["--device=cuda"], ["device", "cuda"], marks=NO_CUDA),
    case("device=cuda:7", ["--device=cuda:7"], ["device", "cuda:7"], marks=NO_CUDA),
    case("device=mps", ["--device=mps"], ["device", "mps"], marks=NO_MPS),
    case("device=tpu", ["--device=tpu"], ["device", "tpu"]),
    case("device=meta", ["--device=meta"], ["device", "meta"]),
    case("device=empty", ["--device="], ["device"]),
    case("dtype=float16", ["--dtype=float16"], ["dtype"]),
    case("compile=maybe", ["--compile=maybe"], ["compile"]),
    case("init_from=continue", ["--init_from=continue"], ["init_from"]),
    case("match=all", ["--match=all"], ["match"]),
    case("match=total, dense", ["--match=total", "--n_experts=0"], ["match", "n_experts"]),
    case("dataset=../tiny", ["--dataset=../tiny"], ["dataset"]),
    case("dataset=empty", ["--dataset="], ["dataset"]),
    case("out_dir=empty", ["--out_dir="], ["out_dir"]),
    case("data_root=empty", ["--data_root="], ["data_root"]),
    case("n_layer=0", ["--n_layer=0"], ["n_layer"]),
    case("n_head=0", ["--n_head=0"], ["n_head"]),
    case("n_embd<0", ["--n_embd=-32"], ["n_embd"]),
    case("n_head=3", ["--n_head=3"], ["n_head"]),
    case("odd head size", ["--n_embd=36", "--n_head=4"], ["n_embd", "rotary"]),
    case("vocab_size<0", ["--vocab_size=-1"], ["vocab_size"]),
    case("vocab_size<dataset", ["--vocab_size=100"], ["vocab_size"]),
    case("ffn_hidden<0", ["--ffn_hidden=-1"], ["ffn_hidden"]),
    case("rope_theta=0", ["--rope_theta=0"], ["rope_theta"]),
    case("rope_theta<0", ["--rope_theta=-10000.0"], ["rope_theta"]),
    case("rope_theta=inf", ["--rope_theta=1e999"], ["rope_theta"]),
    case("norm_eps=0", ["--norm_eps=0"], ["norm_eps"]),
    case("norm_eps<0", ["--norm_eps=-1e-5"], ["norm_eps"]),
    case("tie_embeddings=1", ["--tie_embeddings=1"], ["tie_embeddings"]),
    case("n_experts<0", ["--n_experts=-2"], ["n_experts"]),
    case("top_k=0", ["--top_k=0"], ["top_k"]),
    case("top_k>n_experts", ["--top_k=5"], ["top_k", "n_experts"]),
    case("expert_hidden<0", ["--expert_hidden=-48"], ["expert_hidden"]),
    case("expert_groups flat", ["--expert_groups=(4, 48)"], ["expert_groups"]),
    case("expert_groups of three", ["--expert_groups=((2, 48, 1),)"], ["expert_groups"]),
    case("expert_groups count 0", ["--expert_groups=((0, 48), (2, 32))"], ["expert_groups"]),
    case("expert_groups text", ["--expert_groups=((2, 'wide'),)"], ["expert_groups"]),
    case("expert_groups fraction", ["--expert_groups=((2, 48.5),)"], ["expert_groups"]),
    case("n_shared_experts<0", ["--n_shared_experts=-1"], ["n_shared_experts"]),
    case("shared_expert_hidden<0", ["--n_shared_experts=1", "--shared_expert_hidden=-8"], ["shared_expert_hidden"]),
    case("router_score=relu", ["--router_score=relu"], ["router_score"]),
    case("balance=always", ["--balance=always"], ["balance"]),
    case("moe_impl=fast", ["--moe_impl=fast"], ["moe_impl"]),
    case("aux_loss_coef<0", ["--aux_loss_coef=-0.01"], ["aux_loss_coef"]),
    case("z_loss_coef=inf", ["--z_loss_coef=1e999"], ["z_loss_coef"]),
    case("bias_update_rate<0", ["--bias_update_rate=-0.001"], ["bias_update_rate"]),
    case("capacity_factor<0", ["--capacity_factor=-1.0"], ["capacity_factor"]),
    case("capacity_factor=inf", ["--capacity_factor=1e999"], ["capacity_factor"]),
    case("unknown key", ["--n_expert=4"], ["n_expert"]),
    case("unparsable value", ["--max_iters=ten"], ["max_iters"]),
    case("wrong type", ["--max_iters=1.5"], ["max_iters"]),
    case("missing config file", ["config/nope.py"], ["config/nope.py"]),
    case("config file error", ["{tmp}/broken.py"], ["broken.py"], files={"broken.py": "n_layer = (\n"}),
    case("config file typo", ["{tmp}/typo.py"], ["n_layers"], files={"typo.py": "n_layers = 2\n"}),
    # numbers that cannot train, refused by range at the knob (#23)
    case("norm_eps huge", ["--norm_eps=1e6"], ["norm_eps"]),
    case("rope_theta vanishing", ["--rope_theta=1e-300"], ["rope_theta"]),
    case("bias_update_rate overflows", ["--balance=aux_free", "--bias_update_rate=1e300"], ["bias_update_rate"]),
    case("aux_loss_coef huge", ["--aux_loss_coef=1e30"], ["aux_loss_coef"]),
    case("z_loss_coef huge", ["--z_loss_coef=1e30"], ["z_loss_coef"]),
    # config values of no usable kind: the key named, never str(None) or a skipped function (#23)
    case("config None for a path", ["{tmp}/none.py"], ["out_dir", "None"], files={"none.py": "out_dir = None\n"}),
    case("config function for a number", ["{tmp}/fn.py"], ["learning_rate", "function"],
         files={"fn.py": "def learning_rate():\n    return 1e-3\n"}),
    case("config class for a number", ["{tmp}/cls.py"], ["n_layer"], files={"cls.py": "class n_layer:\n    pass\n"}),
    case("config bool for a path", ["{tmp}/b.py"], ["dataset"], files={"b.py": "dataset = True\n"}),
]


@pytest.mark.parametrize("world", ["fresh", "overwrite"])
@pytest.mark.parametrize("args, names, setup", TRAIN_KNOBS)
def test_train_knob(args, names, setup, world, data_root, trained, tmp_path, capsys):
    write_files(tmp_path, setup.get("files"))
    if world == "fresh":
        out, extra = tmp_path / "out", []
    else:  # --overwrite=True checks every knob before it truncates anything
        out, extra = spoiled_run(tmp_path, trained, None), ["--overwrite=True"]
    before = snapshot(tmp_path)
    argv = [*BASE, f"--data_root={data_root}", f"--out_dir={out}", *extra, *fill(args, tmp=tmp_path)]
    status, line, output = outcome(train.main, argv, capsys)
    check_refused(status, line, output, names, before, snapshot(tmp_path))


# -----------------------------------------------------------------------------
# train.py: data files (fresh runs), then resumed runs: changed knobs, changed data, spoilt checkpoints and logs

REMAKE = "python prepare.py --input=FILE --name=tiny --vocab_size=512"  # what remakes the tiny dataset
REMAKE_ANY = "python prepare.py --input=FILE --name=tiny"  # the same, when meta.json cannot tell the vocabulary

TRAIN_DATA = [
    case("no dataset", ["--dataset=absent"], ["absent", "python prepare.py"]),
    case("meta.json missing", [], ["meta.json", REMAKE_ANY], data=remove("meta.json")),
    case("meta.json not JSON", [], ["meta.json", REMAKE_ANY], data=write("meta.json", b"{\"vocab_size\": 5")),
    case("meta.json a list", [], ["meta.json", REMAKE_ANY], data=write("meta.json", b"[512]")),
    case("meta.json a folder", [], ["meta.json"], data=make_folder("meta.json")),
    case("meta.json no dtype", [], ["meta.json", "dtype", "prepare.py"], data=edit_meta(dtype=None)),
    case("meta.json no vocab_size", [], ["meta.json", "vocab_size", "prepare.py"], data=edit_meta(vocab_size=None)),
    case("meta.json no tokenizer", [], ["meta.json", "tokenizer", "prepare.py"], data=edit_meta(tokenizer=None)),
    case("meta.json dtype float64", [], ["meta.json", "float64"], data=edit_meta(dtype="float64")),
    case("meta.json dtype int7", [], ["meta.json", "int7"], data=edit_meta(dtype="int7")),
    case("meta.json vocab_size text", [], ["meta.json", "vocab_size"], data=edit_meta(vocab_size="lots")),
    case("meta.json vocab_size 0", [], ["meta.json", "vocab_size"], data=edit_meta(vocab_size=0)),
    case("meta.json dtype too narrow", [], ["meta.json", "uint16"], data=edit_meta(vocab_size=70000)),
    case("train.bin missing", [], ["train.bin", REMAKE], data=remove("train.bin")),
    case("val.bin missing", [], ["val.bin", REMAKE], data=remove("val.bin")),
    case("train.bin empty", [], ["train.bin", REMAKE], data=write("train.bin", b"")),
    case("val.bin empty", [], ["val.bin", REMAKE], data=write("val.bin", b"")),
    case("train.bin odd length", [], ["train.bin", REMAKE], data=append_bytes("train.bin", b"\x01")),
    case("val.bin odd length", [], ["val.bin", REMAKE], data=append_bytes("val.bin", b"\x01")),
    case("train.bin token >= vocab", [], ["train.bin", "60000", REMAKE], data=token_out_of_range("train.bin")),
    case("val.bin token >= vocab", [], ["val.bin", "60000", REMAKE], data=token_out_of_range("val.bin")),
    case("train.bin shorter than a block", [], ["train.bin", "block_size"], data=keep_tokens("train", 20)),
    case("train.bin shorter than meta.json says", [], ["train.bin", "meta.json", REMAKE],
         data=edit_meta(train_tokens=10**6)),
    case("train.bin a folder", [], ["train.bin"], data=make_folder("train.bin")),
    case("tokenizer.json missing", [], ["tokenizer.json", REMAKE], data=remove("tokenizer.json")),
    case("tokenizer.json not JSON", [], ["tokenizer.json", REMAKE], data=write("tokenizer.json", b"{\"merges\"")),
    case("tokenizer.json no merges", [], ["tokenizer.json", REMAKE], data=write("tokenizer.json", b"{}")),
]


@pytest.mark.parametrize("args, names, setup", TRAIN_DATA)
def test_train_data(args, names, setup, data_root, tmp_path, capsys):
    root = spoiled_data(tmp_path, data_root, setup.get("data"))
    before = snapshot(tmp_path)
    argv = [*BASE, f"--data_root={root}", f"--out_dir={tmp_path / 'out'}", *args]
    status, line, output = outcome(train.main, argv, capsys)
    check_refused(status, line, output, names, before, snapshot(tmp_path))


TRAIN_RESUME = [
    # a command line that changes the model, its matching, the data order or the optimizer's settings
    case("n_experts changed", ["--n_experts=8"], ["n_experts", "ckpt.pt"]),
    case("n_embd changed", ["--n_embd=64"], ["n_embd"]),
    case("vocab_size changed", ["--vocab_size=1024"], ["vocab_size"]),
    case("match changed", ["--match=active"], ["match"]),
    case("top_k changed", ["--top_k=1"], ["top_k"]),
    case("balance changed", ["--balance=aux_free"], ["balance"]),
    case("expert_groups changed", ["--expert_groups=((2, 48), (2, 32))"], ["expert_groups"]),
    case("seed changed", ["--seed=7"], ["seed"]),
    case("weight_decay changed", ["--weight_decay=0.0"], ["weight_decay"]),
    case("beta2 changed", ["--beta2=0.99"], ["beta2"]),
    case("bad knob on resume", ["--eval_iters=0"], ["eval_iters"]),
    # the dataset since the checkpoint
    case("other tokenizer", [], ["tokenizer"], data=other_tokenizer),
    case("other vocabulary", [], ["vocab"], data=edit_meta(vocab_size=600)),
    case("val.bin odd length", [], ["val.bin", REMAKE], data=append_bytes("val.bin", b"\x01")),
    case("train.bin token >= vocab", [], ["train.bin", REMAKE], data=token_out_of_range("train.bin")),
    case("dataset gone", ["--dataset=absent"], ["absent", "prepare.py"]),
    # the checkpoint and the log
    case("no checkpoint", [], ["ckpt.pt"], run=lambda run: (run / "ckpt.pt").unlink()),
    case("checkpoint truncated", [], ["ckpt.pt"], run=truncate_file("ckpt.pt")),
    case("checkpoint random bytes", [], ["ckpt.pt"], run=lambda run: (run / "ckpt.pt").write_bytes(os.urandom(999))),
    case("checkpoint a folder", [], ["ckpt.pt"], run=make_folder("ckpt.pt")),
    case("checkpoint format 99", [], ["ckpt.pt", "format"], run=edit_checkpoint(lambda s: s.update(format=99))),
    case("checkpoint no optimizer", [], ["ckpt.pt", "not a tinymoe checkpoint"], run=without("optimizer")),
    case("checkpoint no data_rng", [], ["ckpt.pt", "not a tinymoe checkpoint"], run=without("data_rng")),
    case("checkpoint no model_args", [], ["ckpt.pt", "not a tinymoe checkpoint"], run=without("model_args")),
    case("checkpoint no config", [], ["ckpt.pt", "not a tinymoe checkpoint"], run=without("config")),
    case("checkpoint no iter_num", [], ["ckpt.pt", "not a tinymoe checkpoint"], run=without("iter_num")),
    case("checkpoint no tokenizer", [], ["ckpt.pt", "not a tinymoe checkpoint"], run=without("tokenizer")),
    case("checkpoint unknown model field", [], ["ckpt.pt", "not a tinymoe checkpoint"],
         run=edit_checkpoint(lambda s: s["model_args"].update(n_wings=2))),
    case("checkpoint impossible model", [], ["ckpt.pt", "not a tinymoe checkpoint"],
         run=edit_checkpoint(lambda s: s["model_args"].update(n_head=3))),
    case("checkpoint missing a weight", [], ["ckpt.pt", "weights"],
         run=edit_checkpoint(lambda s: s["model"].pop("wte.weight"))),
    case("checkpoint NaN weights", [], ["ckpt.pt", "non-finite"], run=edit_checkpoint(nan_weight)),
    case("metrics.jsonl spoilt mid-file", [], ["metrics.jsonl", "line 2"], run=corrupt_log_middle),
]


@pytest.mark.parametrize("args, names, setup", TRAIN_RESUME)
def test_train_resume(args, names, setup, data_root, trained, tmp_path, capsys):
    root = spoiled_data(tmp_path, data_root, setup.get("data"))
    run = spoiled_run(tmp_path, trained, setup.get("run"))
    before = snapshot(tmp_path)
    argv = [*BASE, f"--data_root={root}", f"--out_dir={run}", "--max_iters=4", "--init_from=resume", *args]
    status, line, output = outcome(train.main, argv, capsys)
    check_refused(status, line, output, names, before, snapshot(tmp_path))


TRAIN_OUT_DIR = [
    case("fresh run over a run", [], ["ckpt.pt", "--overwrite=True"], run=None),
    case("out_dir is a file", ["--out_dir={tmp}/afile"], ["afile"], files={"afile": "x"}),
    case("out_dir below a file", ["--out_dir={tmp}/afile/run"], ["afile"], files={"afile": "x"}),
]


@pytest.mark.parametrize("args, names, setup", TRAIN_OUT_DIR)
def test_train_out_dir(args, names, setup, data_root, trained, tmp_path, capsys):
    write_files(tmp_path, setup.get("files"))
    run = spoiled_run(tmp_path, trained, None)
    before = snapshot(tmp_path)
    argv = [*BASE, f"--data_root={data_root}", f"--out_dir={run}", *fill(args, tmp=tmp_path)]
    status, line, output = outcome(train.main, argv, capsys)
    check_refused(status, line, output, names, before, snapshot(tmp_path))


# -----------------------------------------------------------------------------
# sample.py

SAMPLE = [
    case("temperature=0", ["--temperature=0"], ["temperature"]),
    case("temperature<0", ["--temperature=-1"], ["temperature"]),
    case("temperature=inf", ["--temperature=1e999"], ["temperature"]),
    case("max_new_tokens<0", ["--max_new_tokens=-1"], ["max_new_tokens"]),
    case("num_samples=0", ["--num_samples=0"], ["num_samples"]),
    case("top_k<0", ["--top_k=-1"], ["top_k"]),
    case("seed<0", ["--seed=-1"], ["seed"]),
    case("seed=2**64", ["--seed=18446744073709551616"], ["seed"]),
    case("device=cuda", ["--device=cuda"], ["device", "cuda"], marks=NO_CUDA),
    case("device=tpu", ["--device=tpu"], ["device", "tpu"]),
    case("layer<0", ["--show_routing=True", "--layer=-1"], ["layer"]),
    case("layer too deep", ["--show_routing=True", "--layer=2"], ["layer"]),
    case("routing of a dense model", ["--show_routing=True", "--out_dir={dense}"], ["dense"]),
    case("unknown key", ["--temp=0.5"], ["temp"]),
    case("unparsable value", ["--num_samples=many"], ["num_samples"]),
    case("missing config file", ["nope.py"], ["nope.py"]),
    case("out_dir=empty", ["--out_dir="], ["out_dir"]),
    case("no checkpoint", ["--out_dir={tmp}"], ["ckpt.pt"]),
    case("checkpoint truncated", [], ["ckpt.pt"], run=truncate_file("ckpt.pt")),
    case("checkpoint no tokenizer", [], ["ckpt.pt", "not a tinymoe checkpoint"], run=without("tokenizer")),
    case("checkpoint no model", [], ["ckpt.pt", "not a tinymoe checkpoint"], run=without("model")),
    case("checkpoint tokenizer spoilt", [], ["ckpt.pt", "tokenizer"],
         run=edit_checkpoint(lambda s: s["tokenizer"].pop("merges"))),
    case("prompt file missing", ["--start=FILE:{tmp}/none.txt"], ["none.txt"]),
    case("prompt file not UTF-8", ["--start=FILE:{tmp}/latin.txt"], ["latin.txt"],
         files={"latin.txt": "café".encode("latin-1")}),
    case("prompt file a folder", ["--start=FILE:{tmp}"], [" "]),
    case("empty prompt", ["--start="], ["prompt"]),
]


@pytest.mark.parametrize("args, names, setup", SAMPLE)
def test_sample(args, names, setup, trained, trained_dense, tmp_path, capsys):
    write_files(tmp_path, setup.get("files"))
    run = spoiled_run(tmp_path, trained, setup.get("run"))
    before = snapshot(tmp_path)
    argv = [f"--out_dir={run}", "--device=cpu", "--max_new_tokens=3", "--num_samples=1", "--start=KING",
            *fill(args, tmp=tmp_path, dense=trained_dense)]
    status, line, output = outcome(sample.main, argv, capsys)
    check_refused(status, line, output, names, before, snapshot(tmp_path))


def test_sample_says_a_long_prompt_was_cropped(trained, capsys):
    sample.main([f"--out_dir={trained}", "--device=cpu", "--max_new_tokens=2", "--num_samples=1",
                 "--start=" + "the king and the queen " * 20])
    err = capsys.readouterr().err
    assert "note: the prompt has" in err and "more than block_size 32" in err and "cropped" in err


# -----------------------------------------------------------------------------
# experiment.py: refused before any run starts

EXPERIMENT = [
    case("seeds=0", ["--seeds=0"], ["seeds"]),
    case("seeds<0", ["--seeds=-2"], ["seeds"]),
    case("jobs=0", ["--jobs=0"], ["jobs"]),
    case("match=all", ["--match=all"], ["match"]),
    case("name=../x", ["--name=../x"], ["name"]),
    case("name=a/b", ["--name=a/b"], ["name"]),
    case("sweep without values", ["--sweep=n_experts"], ["sweep"]),
    case("sweep without key", ["--sweep==1,2"], ["sweep"]),
    case("sweep unknown key", ["--sweep=n_expert=4,8"], ["n_expert"]),
    case("sweep impossible model", ["--sweep=top_k=9"], ["top_k"]),
    case("sweep wrong type", ["--sweep=top_k=1.5"], ["top_k"]),
    case("sweep bad learning_rate", ["--sweep=learning_rate=-1.0,0.001"], ["learning_rate"]),
    case("sweep bad eval_interval", ["--sweep=eval_interval=0,2"], ["eval_interval"]),
    case("seed<0", ["--seed=-5"], ["seed"]),
    case("seed too large", ["--seed=9223372036854775807", "--seeds=2"], ["seed"]),
    case("eval_interval=0", ["--eval_interval=0"], ["eval_interval"]),
    case("learning_rate<0", ["--learning_rate=-1.0"], ["learning_rate"]),
    case("batch_size=0", ["--batch_size=0"], ["batch_size"]),
    case("beta2=1", ["--beta2=1.0"], ["beta2"]),
    case("device=tpu", ["--device=tpu"], ["device"]),
    case("n_head=3", ["--n_head=3"], ["n_head"]),
    case("no dataset", ["--dataset=absent"], ["absent", "prepare.py"]),
    case("train.bin missing", [], ["train.bin", "prepare.py"], data=remove("train.bin")),
    case("unknown key", ["--seed_count=3"], ["seed_count"]),
    # sweeps checked before the first training; knobs the experiment sets for each run refused, not ignored (#23)
    case("sweep duplicate point", ["--sweep=top_k=1,1"], ["top_k", "twice"]),
    case("sweep duplicate key", ["--sweep=top_k=1;top_k=2"], ["top_k", "twice"]),
    case("sweep over seed", ["--sweep=seed=1,2"], ["seed"]),
    case("sweep over out_dir", ["--sweep=out_dir=a,b"], ["out_dir"]),
    case("sweep over an experiment knob", ["--sweep=seeds=1,2"], ["seeds"]),
    case("sweep a missing dataset", ["--sweep=dataset=tiny,absent"], ["absent", "prepare.py"]),
    case("out_dir given", ["--out_dir=elsewhere"], ["out_dir", "--name"]),
    case("init_from given", ["--init_from=resume"], ["init_from"]),
    case("dry_run given", ["--dry_run=True"], ["dry_run"]),
]


@pytest.mark.parametrize("args, names, setup", EXPERIMENT)
def test_experiment(args, names, setup, data_root, tmp_path, monkeypatch, capsys):
    root = spoiled_data(tmp_path, data_root, setup.get("data"))
    monkeypatch.chdir(tmp_path)  # out/ goes here
    tiny = [a for a in BASE if not a.startswith("--log_interval")]
    before = snapshot(tmp_path)
    status, line, output = outcome(experiment.main, [*tiny, f"--data_root={root}", "--seeds=1", *args], capsys)
    check_refused(status, line, output, names, before, snapshot(tmp_path))


# -----------------------------------------------------------------------------
# bench.py: refused before any timing (the shapes are made tiny, so that a case that is not refused ends soon)

BENCH = [
    case("repeats=0", ["--repeats=0"], ["repeats"]),
    case("repeats<0", ["--repeats=-1"], ["repeats"]),
    case("warmup<0", ["--warmup=-1"], ["warmup"]),
    case("dtype=float16", ["--dtype=float16"], ["dtype"]),
    case("compile=maybe", ["--compile=maybe"], ["compile"]),
    case("device=tpu", ["--device=tpu"], ["device", "tpu"]),
    case("device=cuda", ["--device=cuda"], ["device", "cuda"], marks=NO_CUDA),
    case("device=cuda:7", ["--device=cuda:7"], ["device"], marks=NO_CUDA),
    case("json_path in a missing folder", ["--json_path={tmp}/nowhere/b.json"], ["json_path", "nowhere"]),
    case("json_path a folder", ["--json_path={tmp}"], ["json_path"]),
    case("unknown key", ["--repeat=3"], ["repeat"]),
    case("unparsable value", ["--repeats=lots"], ["repeats"]),
]


@pytest.mark.parametrize("args, names, setup", BENCH)
def test_bench(args, names, setup, tmp_path, monkeypatch, capsys):
    from model import GPTConfig
    tiny = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16, n_experts=4, top_k=2,
                     expert_hidden=32)
    monkeypatch.setattr(bench, "shapes", lambda quick: (tiny, 1))
    monkeypatch.setattr(bench, "data_cost", lambda *args: 1e-6)
    argv = ["--device=cpu", "--compile=false", "--repeats=1", "--warmup=0", *fill(args, tmp=tmp_path)]
    status, line, output = outcome(bench.main, argv, capsys)
    check_refused(status, line, output, names)


# -----------------------------------------------------------------------------
# prepare.py: refused before anything is read, downloaded or written; an existing dataset stays whole

PREPARE = [
    case("vocab_size too small", ["--vocab_size=100"], ["--vocab_size"]),
    case("vocab_size too large", ["--vocab_size=2097152"], ["--vocab_size"]),
    case("val_fraction=0", ["--val_fraction=0"], ["--val_fraction"]),
    case("val_fraction=1", ["--val_fraction=1"], ["--val_fraction"]),
    case("slice_mb=0", ["--slice_mb=0"], ["--slice_mb"]),
    case("unknown corpus", ["--input=", "--corpus=wikipedia"], ["--corpus"]),
    case("name=../x", ["--name=../x"], ["--name"]),
    case("name=.hidden", ["--name=.hidden"], ["--name"]),
    case("url not http", ["--url=ftp://example.com/"], ["--url"]),
    case("input missing", ["--input={tmp}/none.txt"], ["none.txt"]),
    case("input empty", ["--input={tmp}/empty.txt"], ["empty.txt"], files={"empty.txt": ""}),
    case("input binary", ["--input={tmp}/b.bin"], ["b.bin"], files={"b.bin": b"\x89PNG\x00\x00IHDR"}),
    case("input not UTF-8", ["--input={tmp}/l.txt"], ["l.txt"], files={"l.txt": "café".encode("latin-1")}),
    case("input names no file", ["--input= , "], ["--input"]),
    case("data_root a file", ["--data_root={tmp}/afile"], ["afile"], files={"afile": "x"}),
    case("dataset folder holds other files", ["--name=ds"], ["notes.txt"], files={"data/ds/notes.txt": "mine"}),
    case("unknown key", ["--vocab=300"], ["vocab"]),
    case("value without =", ["--input", "x.txt"], ["--input"]),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data root holding dataset 'ds', and the text it was made from."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "text.txt").write_text(corpus_text(30_000))
    prepare.main([f"--input={root / 'text.txt'}", "--name=ds", "--vocab_size=300", f"--data_root={root / 'data'}"])
    return root


@pytest.mark.parametrize("args, names, setup", PREPARE)
def test_prepare(args, names, setup, prepared, tmp_path, capsys):
    shutil.copytree(prepared, tmp_path, dirs_exist_ok=True)
    os.makedirs(tmp_path / "data" / "ds", exist_ok=True)
    write_files(tmp_path, setup.get("files"))
    before = snapshot(tmp_path)
    argv = [f"--input={tmp_path / 'text.txt'}", "--name=ds", "--vocab_size=300", f"--data_root={tmp_path / 'data'}",
            *fill(args, tmp=tmp_path)]
    status, line, output = outcome(prepare.main, argv, capsys)
    check_refused(status, line, output, names, before, snapshot(tmp_path))


# -----------------------------------------------------------------------------
# what resuming allows, and what it keeps


def test_resume_allows_safe_changes_and_records_the_resolved_config(data_root, trained, tmp_path, capsys):
    run = spoiled_run(tmp_path, trained, None)
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={run}", "--init_from=resume", "--max_iters=4",
                "--eval_interval=1", "--eval_iters=1", "--batch_size=2", "--learning_rate=0.002",
                "--log_interval=2", "--grad_clip=0.5", "--compile=false", "--max_bad_steps=2"])
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert state["iter_num"] == 4 and state["config"]["max_iters"] == 4 and state["config"]["batch_size"] == 2
    assert state["config"]["vocab_size"] == 512  # as trained, not 0 (take it from the dataset)
    first = capsys.readouterr().out
    # a bare resume (no model knobs given) takes the model from the checkpoint and prints the same table
    train.main([f"--data_root={data_root}", "--dataset=tiny", f"--out_dir={run}", "--init_from=resume",
                "--max_iters=4", "--device=cpu", "--dry_run=True"])
    second = capsys.readouterr().out
    table = lambda out: [line for line in out.splitlines() if line.startswith(("model ", "moe ", "dense-"))]
    assert len(table(first)) == 4 and table(first) == table(second)
    records = runtime.read_log(str(run / "metrics.jsonl"))
    assert records[0]["event"] == "start" and [r["iter"] for r in records if "val_loss" in r] == [0, 2, 3, 4]


def test_resume_keeps_the_start_record_of_a_run_stopped_after_its_first_evaluation(data_root, tmp_path):
    out = tmp_path / "run"
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={out}", "--max_iters=0"])
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={out}", "--init_from=resume"])
    records = runtime.read_log(str(out / "metrics.jsonl"))
    assert records[0]["event"] == "start" and sum(r.get("event") == "start" for r in records) == 1


def test_truncated_last_log_line_is_dropped_with_a_warning(data_root, trained, tmp_path, capsys):
    run = spoiled_run(tmp_path, trained, None)
    kept = open(run / "metrics.jsonl").read()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 3, "loss": 4.1')  # a kill or a full disk mid-write
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={run}", "--init_from=resume", "--max_iters=3"])
    assert "warning" in capsys.readouterr().out
    text = open(run / "metrics.jsonl").read()
    assert text.startswith(kept) and all(json.loads(line) for line in text.splitlines())


def test_warmup_longer_than_the_run_is_a_warning(data_root, tmp_path, capsys):
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={tmp_path / 'run'}", "--warmup_iters=10"])
    out = capsys.readouterr().out
    assert "warning: warmup_iters (10) >= max_iters (2)" in out and (tmp_path / "run" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# checkpoints never hold bad state; interrupts in-process


def test_non_finite_weights_are_not_checkpointed(data_root, trained, tmp_path, monkeypatch, capsys):
    run = spoiled_run(tmp_path, trained, None)
    before = snapshot(run)
    real_step = torch.optim.AdamW.step

    def blow_up(self, *args, **kwargs):  # as a huge learning rate would: finite gradients, infinite weights
        result = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    status, line, output = outcome(train.main, [*BASE, f"--data_root={data_root}", f"--out_dir={run}",
                                                "--init_from=resume", "--max_iters=4"], capsys)
    check_refused(status, line, output, ["non-finite", f"Last good checkpoint: {run / 'ckpt.pt'} (iteration 2)"])
    after = snapshot(run)
    assert {k: v for k, v in after.items() if "ckpt" in k} == {k: v for k, v in before.items() if "ckpt" in k}


def test_non_finite_validation_loss_is_not_a_best_nor_checkpointed(data_root, trained, tmp_path, monkeypatch,
                                                                   capsys):
    run = spoiled_run(tmp_path, trained, None)
    ckpt = open(run / "ckpt.pt", "rb").read()
    monkeypatch.setattr(train, "evaluate", lambda *args: (float("nan"), None))
    status, line, output = outcome(train.main, [*BASE, f"--data_root={data_root}", f"--out_dir={run}",
                                                "--init_from=resume", "--max_iters=4"], capsys)
    check_refused(status, line, output, ["validation loss", "Last good checkpoint:", "(iteration 2)"])
    assert open(run / "ckpt.pt", "rb").read() == ckpt
    assert all(not math.isnan(r.get("best_val_loss", 0)) for r in runtime.read_log(str(run / "metrics.jsonl")))


def test_second_signal_does_not_claim_a_checkpoint_that_does_not_exist(data_root, tmp_path, monkeypatch, capsys):
    def interrupted_twice(*args):  # Ctrl-C twice during the first evaluation of a fresh run
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the second signal must stop at once")

    monkeypatch.setattr(train, "evaluate", interrupted_twice)
    status, line, output = outcome(train.main, [*BASE, f"--data_root={data_root}", f"--out_dir={tmp_path / 'run'}"],
                                   capsys)
    assert status == 130 and "Traceback" not in output
    assert "last checkpoint: none" in output + line and not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("script, patch", [
    ("train", lambda monkeypatch: monkeypatch.setattr(train, "load_data", interrupt)),
    ("sample", lambda monkeypatch: monkeypatch.setattr(sample.GPT, "generate", interrupt)),
    ("bench", lambda monkeypatch: monkeypatch.setattr(bench, "Worker", interrupt)),
])
def test_ctrl_c_in_process_is_quiet(script, patch, data_root, trained, tmp_path, monkeypatch, capsys):
    patch(monkeypatch)
    argv = {"train": [*BASE, f"--data_root={data_root}", f"--out_dir={tmp_path / 'run'}"],
            "sample": [f"--out_dir={trained}", "--device=cpu"],
            "bench": ["--device=cpu", "--compile=false"]}[script]
    status, line, output = outcome({"train": train.main, "sample": sample.main, "bench": bench.main}[script], argv,
                                   capsys)
    assert status == 130 and "Traceback" not in output + line and "interrupted" in output + line


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt  # what Python's default SIGINT handler raises


def test_lock_of_a_dead_process_is_taken_over(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / runtime.LOCK_FILE).write_text(dead.stdout)  # left by a killed run: no process holds it
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={out}", "--max_iters=1"])
    assert (out / "ckpt.pt").exists() and not (out / runtime.LOCK_FILE).exists()  # released on exit


def test_lock_refuses_a_second_run(data_root, trained, tmp_path, capsys):
    run = spoiled_run(tmp_path, trained, None)
    # a run holding out_dir, as runtime.out_dir_lock does (without importing torch, which takes seconds)
    hold = (f"import fcntl, os, time\nfd = os.open({str(run / runtime.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
            f"fcntl.lockf(fd, fcntl.LOCK_EX)\nos.write(fd, b'%d' % os.getpid())\nprint('locked', flush=True)\n"
            f"time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(run)
        for extra in (["--init_from=resume", "--max_iters=4"], ["--overwrite=True"]):
            status, line, output = outcome(train.main, [*BASE, f"--data_root={data_root}", f"--out_dir={run}",
                                                        *extra], capsys)
            check_refused(status, line, output, [str(run), f"pid {holder.pid}"], before, snapshot(run))
    finally:
        holder.kill()
        holder.wait()


# -----------------------------------------------------------------------------
# real processes: signals, two runs on one out_dir, kills at random moments, a diverging run, a full disk


def train_cmd(data_root, out, *extra):
    return [sys.executable, "-u", "train.py", *BASE, f"--data_root={data_root}", f"--out_dir={out}", *extra]


def start(cmd, **kwargs):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(proc, text, timeout=300):
    """Read proc's stdout until a line holding text; return the lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"{text!r} never came: {lines} {proc.stderr.read()}")
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} did not come in {timeout}s")


def quiet_stop(proc, code=130):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code and "Traceback" not in err, (proc.returncode, err)
    return out, err


@pytest.mark.slow
def test_interrupts_of_each_script_as_processes(data_root, trained, tmp_path):
    # train.py: Ctrl-C during start-up (the parameter table is printed, the data not yet loaded)
    p = start(train_cmd(data_root, tmp_path / "startup"))
    wait_for(p, "mismatch")
    p.send_signal(signal.SIGINT)
    _, err = quiet_stop(p)
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err
    # train.py: twice during the first evaluation of a fresh run: no checkpoint exists, none is claimed
    p = start(train_cmd(data_root, tmp_path / "eval", "--eval_iters=100000"))
    wait_for(p, "tokens per iteration")
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    out, err = quiet_stop(p)
    assert "last checkpoint: none" in out + err and not (tmp_path / "eval" / "ckpt.pt").exists()
    # sample.py during generation (of the second of many samples)
    p = start([sys.executable, "-u", "sample.py", f"--out_dir={trained}", "--device=cpu", "--max_new_tokens=20",
               "--num_samples=100000", "--start=KING"])
    wait_for(p, "---------------")
    p.send_signal(signal.SIGINT)
    _, err = quiet_stop(p)
    assert "interrupted" in err
    # bench.py while timing
    p = start([sys.executable, "-u", "bench.py", "--quick", "--device=cpu", "--repeats=1000"])
    wait_for(p, "torch")
    p.send_signal(signal.SIGINT)
    _, err = quiet_stop(p)
    assert "interrupted" in err


def long_experiment(data_root, tmp_path):
    """experiment.py training one long run, started and waited for until the run has written a checkpoint:
    (its process, the run's folder)."""
    tiny = [a for a in BASE if not a.startswith("--log_interval") and not a.startswith("--max_iters")]
    cmd = [sys.executable, "-u", os.path.join(ROOT, "experiment.py"), *tiny, f"--data_root={data_root}", "--seeds=1",
           "--match=none", "--max_iters=100000", "--name=long"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(p, "start moe")
    run = tmp_path / "out" / "long" / "moe-s1337"
    deadline = time.time() + 300
    while not (run / "ckpt.pt").exists():
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.5)
    return p, run


@pytest.mark.slow
def test_experiment_ctrl_c_stops_its_runs_with_a_checkpoint(data_root, tmp_path):
    p, run = long_experiment(data_root, tmp_path)
    p.send_signal(signal.SIGINT)
    _, err = quiet_stop(p)
    assert "interrupted" in err and len(err.strip().splitlines()) == 1
    assert "stopped at iteration" in open(run / "train.log").read()  # the run finished its step and saved it
    assert not (run / runtime.LOCK_FILE).exists()


@pytest.mark.slow
def test_two_runs_on_one_out_dir(data_root, tmp_path):
    out = tmp_path / "run"
    first = start(train_cmd(data_root, out, "--max_iters=100000", "--eval_interval=5"))
    try:
        wait_for(first, "iter 5: val loss")
        ckpt_before = None
        for extra in ([], ["--overwrite=True"], ["--init_from=resume"]):
            r = subprocess.run(train_cmd(data_root, out, *extra), cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
            one_line_error(r, f"pid {first.pid}")
            ckpt_before = ckpt_before or torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.kill()  # SIGKILL: its lock file stays, held by no process
        first.wait()
    assert (out / runtime.LOCK_FILE).exists()
    goal = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] + 2  # a little more than it trained
    r = subprocess.run(train_cmd(data_root, out, "--init_from=resume", f"--max_iters={goal}"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (out / runtime.LOCK_FILE).exists() and torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == goal


@pytest.mark.slow
def test_kills_at_random_moments_leave_a_whole_checkpoint_and_log(data_root, tmp_path):
    out = tmp_path / "run"
    args = ["--max_iters=40", "--eval_interval=2", "--log_interval=1"]
    rng = random.Random(0)
    finished = lambda: (out / "metrics.jsonl").exists() and any(
        r.get("iter") == 40 and "val_loss" in r for r in runtime.read_log(str(out / "metrics.jsonl")))
    for _ in range(4):
        if finished():  # on a fast machine a run can end before its kill: nothing is left to resume
            break
        resume = ["--init_from=resume"] if (out / "ckpt.pt").exists() else ["--overwrite=True"]
        p = start(train_cmd(data_root, out, *args, *resume))
        wait_for(p, "tokens per iteration")
        time.sleep(rng.uniform(0, 3))
        p.kill()
        p.wait()
        if (out / "ckpt.pt").exists():
            runtime.load_checkpoint(str(out / "ckpt.pt"))  # whole, whenever the kill came
        runtime.read_log(str(out / "metrics.jsonl"))  # at most a cut last line, dropped
    if not finished():
        r = subprocess.run(train_cmd(data_root, out, *args, "--init_from=resume"), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[0]["event"] == "start" and sum("event" in r for r in records) == 1
    steps = [r["iter"] for r in records if "loss" in r]
    assert steps == list(range(1, 41))  # every step once, in order, whatever the kills dropped


@pytest.mark.slow
def test_diverging_run_keeps_the_last_good_checkpoint(data_root, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(train_cmd(data_root, out, "--max_iters=4"), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    good = open(out / "ckpt.pt", "rb").read()
    # the weights blow up, the loss goes non-finite, steps are skipped until max_bad_steps stops the run (or the
    # last evaluation finds a non-finite loss): before any checkpoint could be written over the good one
    r = subprocess.run(train_cmd(data_root, out, "--init_from=resume", "--max_iters=40", "--eval_interval=1000",
                                 "--learning_rate=1e30", "--min_lr=0.0"), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    one_line_error(r, f"Last good checkpoint: {out / 'ckpt.pt'} (iteration 4)")
    assert open(out / "ckpt.pt", "rb").read() == good
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs (needs root; skipped where mount is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command: a full disk is tested with a simulated ENOSPC only (tests/test_faults.py)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): a full disk is tested with a simulated "
                    f"ENOSPC only (tests/test_faults.py)")
    yield disk
    subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint(data_root, tiny_disk):
    # a checkpoint of this model takes 0.68 MB: the first fits on the 1 MB disk, a second beside it does not
    out = tiny_disk / "run"
    r = subprocess.run(train_cmd(data_root, out, "--max_iters=10", "--n_embd=64", "--expert_hidden=64"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    one_line_error(r, "No space left on device); the previous checkpoint is intact")
    state = runtime.load_checkpoint(str(out / "ckpt.pt"))
    assert state["iter_num"] == 0 and not [f for f in os.listdir(out) if ".tmp" in f]
    runtime.read_log(str(out / "metrics.jsonl"))


# -----------------------------------------------------------------------------
# #23, by class: one error boundary (guard.run_main), one way to write a file (guard.write_file), runs that
# know their settings, processes that clean up, downloads checked before they are kept



def boundary(main, capsys, argv=()):
    """(exit status, stderr) of guard.run_main(main) as a process ends."""
    with pytest.raises(SystemExit) as e:
        guard.run_main(main, list(argv))
    return e.value.code, capsys.readouterr().err


def raising(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("error, status, words", [
    (OSError(errno.ENOSPC, "No space left on device", "out/ckpt.pt"), 1, ["cannot write out/ckpt.pt", "No space"]),
    (OSError(errno.EROFS, "Read-only file system", "out/report.md"), 1, ["cannot write out/report.md", "Read-only"]),
    (PermissionError(errno.EACCES, "Permission denied", "data/x"), 1, ["cannot write data/x", "Permission denied"]),
    (OSError(errno.ENOSPC, "No space left on device"), 1, ["cannot write", "No space left on device"]),
    (MemoryError(), 1, ["out of memory"]),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory"), 1,
     ["out of memory"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
    (runtime.UserError("n_layer must be positive"), 1, ["error: n_layer must be positive"]),
    (ValueError("invalid literal for int() with base 10: 'abc'"), 1, ["ValueError", "abc", "report"]),
    (SystemExit("error: said by the script"), 1, ["error: said by the script"]),
])
def test_error_boundary_maps_each_class_to_one_line(error, status, words, capsys, monkeypatch):
    monkeypatch.delenv("TINYMOE_TRACEBACK", raising=False)
    code, err = boundary(raising(error), capsys)
    assert code == status and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (code, err)
    assert all(w in err for w in words), err


def test_out_of_memory_names_the_knobs_of_what_was_built(data_root, tmp_path, capsys, monkeypatch):
    def too_big(config):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(train, "GPT", too_big)
    code, err = boundary(train.main, capsys, [*BASE, f"--data_root={data_root}", f"--out_dir={tmp_path / 'o'}"])
    assert code == 1 and err.strip().splitlines() == [
        "error: out of memory while building the model: lower n_layer, n_embd, n_experts, expert_hidden or vocab_size"]


def test_broken_pipe_is_quiet(capsys):
    code, err = boundary(raising(BrokenPipeError(errno.EPIPE, "Broken pipe")), capsys)
    assert code == 1 and err == ""


def test_write_file_leaves_the_old_file_or_nothing(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")

    def full_disk(f):
        f.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as e:
        guard.write_file(path, full_disk)
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC  # the destination, not the temporary
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.md"]
    with pytest.raises(KeyboardInterrupt):
        guard.write_file(tmp_path / "new.md", raising(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == ["report.md"]
    guard.write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["report.md"]


def test_leftover_temporary_files_of_a_killed_run_are_removed(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = out / f"{guard.TMP_PREFIX}{dead.pid}-ckpt.pt"
    leftover.write_bytes(b"half a checkpoint")
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={out}", "--max_iters=0"])
    assert not leftover.exists() and not [n for n in os.listdir(out) if n.startswith(guard.TMP_PREFIX)]


def test_fresh_run_refuses_an_earlier_runs_log_without_its_checkpoint(data_root, trained, tmp_path, capsys):
    out = spoiled_run(tmp_path, trained, lambda run: (run / "ckpt.pt").unlink())
    before = snapshot(out)
    status, line, output = outcome(train.main, [*BASE, f"--data_root={data_root}", f"--out_dir={out}"], capsys)
    check_refused(status, line, output, ["metrics.jsonl", "--overwrite=True"], before, snapshot(out))
    train.main([*BASE, f"--data_root={data_root}", f"--out_dir={out}", "--overwrite=True", "--max_iters=0"])
    assert len([r for r in runtime.read_log(str(out / "metrics.jsonl")) if r.get("event") == "start"]) == 1


def test_resume_with_nothing_left_to_train_says_so(data_root, trained, tmp_path, capsys):
    out = spoiled_run(tmp_path, trained, None)
    for max_iters in (2, 1):  # the checkpoint is at iteration 2, evaluated
        status, line, output = outcome(train.main, [*BASE, f"--data_root={data_root}", f"--out_dir={out}",
                                                    "--init_from=resume", f"--max_iters={max_iters}"], capsys)
        check_refused(status, line, output, ["iteration 2", f"max_iters={max_iters}", "nothing to train"])


def test_bench_refuses_to_replace_its_json_and_checks_it_can_write_first(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text("{}")
    status, line, output = outcome(bench.main, ["--device=cpu", f"--json_path={old}"], capsys)
    check_refused(status, line, output, ["old.json", "--overwrite=True"])
    assert old.read_text() == "{}"


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root writes through chmod, not through a read-only mount); skipped where mount is refused."""
    folder = tmp_path / "ro"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)])


def test_read_only_destinations_are_one_line_before_the_work(read_only_dir, trained, tmp_path, capsys):
    status, line, output = outcome(bench.main, ["--device=cpu", f"--json_path={read_only_dir}/b.json"], capsys)
    check_refused(status, line, output, ["b.json", "Read-only"])
    code, err = boundary(experiment.main, capsys, ["--plot_run=" + str(spoiled_run(tmp_path, trained, None))])
    assert code in (0, 1) and "Traceback" not in err  # matplotlib may be absent: then a one-line error
    import export
    code, err = boundary(export.main, capsys, [f"--out_dir={trained}", f"--to={read_only_dir}/hf"])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "hf" in err and "Traceback" not in err, err


# --- runs know what made them


def fake_finished_run(exp, label, config, iters=2):
    """A run folder as train.py leaves it: its metrics.jsonl's start record holds config."""
    run = exp / label
    run.mkdir(parents=True)
    records = [{"event": "start", "config": config}, {"iter": iters, "val_loss": 5.0, "tokens": 1, "time": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.mark.parametrize("change, names", [
    ({"learning_rate": 0.01}, ["learning_rate=0.01", "--name"]),
    ({"n_embd": 64}, ["n_embd=64"]),
    ({"dataset": "other"}, ["dataset='other'"]),
    ({"max_iters": 3}, ["trained 3 iterations", "max_iters=2", "not shrink"]),
])
def test_experiment_rerun_with_other_settings_is_refused(change, names, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [*BASE, f"--data_root={data_root}", "--seeds=1", "--match=none", "--name=exp"]
    run = experiment.plan(SimpleNamespace(**{**train.defaults(), **experiment.configure(argv, {
        **train.defaults(), **{k: getattr(experiment, k) for k in experiment.EXPERIMENT_KEYS}}), "match": "none"}),
        [{}], [a for a in argv if not a.startswith(("--seeds", "--match", "--name"))], "out/exp")[0]
    recorded = experiment.settings(run.args)
    iters = change.pop("max_iters", 2)
    fake_finished_run(tmp_path / "out" / "exp", os.path.basename(run.out_dir), {**recorded, **change}, iters)
    before = snapshot(tmp_path / "out")
    status, line, output = outcome(experiment.main, argv, capsys)
    check_refused(status, line, output, names, before, snapshot(tmp_path / "out"))


def test_experiment_does_not_report_an_earlier_log_as_this_runs_error(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "out" / "e" / "moe-s1337"
    run.mkdir(parents=True)
    (run / "train.log").write_text("error: a failure of an earlier run\n")
    monkeypatch.setattr(experiment, "command", lambda r: [sys.executable, "-c", "import os; os._exit(3)"])
    status, line, output = outcome(experiment.main, [*BASE, f"--data_root={data_root}", "--seeds=1",
                                                     "--match=none", "--name=e"], capsys)
    assert status == 1 and "exit status 3, no output" in line and "earlier" not in line, line


# --- downloads are what they claim


@pytest.fixture
def misbehaving_server():
    """(base URL, handler) of a server on 127.0.0.1 whose answer handler.answer(handler) writes."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            type(self).answer(self)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", Handler
    httpd.shutdown()


def answer(body, status=200, headers=None, length=None):
    def write(h):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)) if length is None else length)
        h.end_headers()
        h.wfile.write(body)
    return write


def redirect_to_itself(h):
    h.send_response(302)
    h.send_header("Location", h.path)
    h.send_header("Content-Length", "0")
    h.end_headers()


STORY = "Once upon a time there was a tiny model.\n<|endoftext|>\nIt learned a little every day.\n".encode()


@pytest.mark.parametrize("reply, names", [
    (answer(b"<!DOCTYPE html><html><body>Sign in</body></html>", headers={"Content-Type": "text/html"}),
     ["web page"]),
    (answer(b"<!doctype html>\n<html>rate limited</html>"), ["web page"]),
    (answer(b""), ["empty"]),
    (answer(STORY, length="lots"), ["Content-Length", "not a number"]),
    (answer("Café au lait, une histoire.\n".encode("latin-1") * 50), ["not UTF-8"]),
    (answer(STORY, length=str(len(STORY) + 500)), ["bytes announced"]),
    (redirect_to_itself, ["redirect"]),
])
def test_bad_downloads_are_refused_and_not_kept(reply, names, misbehaving_server, tmp_path, capsys):
    url, handler = misbehaving_server
    handler.answer = staticmethod(reply)
    argv = ["--corpus=shakespeare", f"--url={url}/shakespeare.txt", f"--data_root={tmp_path}", "--vocab_size=300"]
    status, line, output = outcome(prepare.main, argv, capsys)
    check_refused(status, line, output, names)
    kept = [n for n in os.listdir(tmp_path / "_downloads") if not n.endswith(".part")]
    assert kept == [] and not (tmp_path / "shakespeare").exists(), kept
    if "bytes announced" not in names:  # a cut body is kept as .part, to resume; anything else is not
        assert os.listdir(tmp_path / "_downloads") == []


def test_slice_that_rounds_to_nothing_is_refused(tmp_path, capsys):
    argv = ["--corpus=tinystories_slice", "--slice_mb=1e-9", "--url=http://127.0.0.1:9/", f"--data_root={tmp_path}",
            "--vocab_size=300"]
    status, line, output = outcome(prepare.main, argv, capsys)
    check_refused(status, line, output, ["slice_mb", "0 bytes"])


@pytest.mark.parametrize("inputs, names", [
    (["a.txt", "a.txt"], ["same text twice"]),
    (["a.txt", "copy.txt"], ["same text twice"]),
    (["tiny.txt"], ["val split", "too few"]),
])
def test_prepare_refuses_data_that_cannot_validate(inputs, names, tmp_path, capsys):
    text = corpus_text(20_000)
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "copy.txt").write_text(text)
    (tmp_path / "tiny.txt").write_text("Once upon a time.<|endoftext|>" * 3 + "End.")  # val: 5 tokens
    argv = [f"--input={','.join(str(tmp_path / i) for i in inputs)}", "--name=d", f"--data_root={tmp_path / 'data'}",
            "--vocab_size=260"]
    status, line, output = outcome(prepare.main, argv, capsys)
    check_refused(status, line, output, names)


def test_reprepare_through_a_symlinked_dataset_folder(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(corpus_text(20_000))
    elsewhere, root = tmp_path / "disk2" / "t", tmp_path / "data"
    argv = [f"--input={tmp_path / 't.txt'}", f"--data_root={root}", "--vocab_size=260"]
    prepare.main(argv)
    elsewhere.parent.mkdir()
    shutil.move(root / "t", elsewhere)
    os.symlink(elsewhere, root / "t")
    prepare.main(argv)
    assert (root / "t").is_symlink() and (elsewhere / "meta.json").exists()
    assert sorted(os.listdir(root)) == [".t.lock", "t"]


# --- process faults: signals from the first line, a closed stdout, SIGTERM to experiment.py


def caught_sigterm(pid):
    """Whether the process has a SIGTERM handler yet (guard's, installed by a script's first line): Linux only."""
    try:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    except OSError:
        return False
    return bool(int(fields["SigCgt"].strip(), 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/<pid>/status (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_the_libraries_load_is_quiet(sig):
    """A signal at any moment from a script's first line on (timed from the moment its SIGTERM handler is in
    place, read from /proc, not from the clock: so it holds on a fast machine as on a loaded one), during the
    standard-library imports or torch's: 'interrupted' and 130, never a traceback. At once (delay 0) no script
    can have finished loading; later, --help may have ended the run first (0, or the signal's own silent death
    while Python shuts down)."""
    scripts = ["train.py", "sample.py", "prepare.py", "bench.py", "experiment.py", "export.py"]
    for delay in (0, 0.3):
        for script in scripts:
            p = start([sys.executable, script, "--help"])
            deadline = time.time() + 60
            while not caught_sigterm(p.pid) and p.poll() is None and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(delay)
            p.send_signal(sig)
            out, err = p.communicate(timeout=120)
            # -sig: --help done, the signal came while Python shut down (it resets the handlers there), silently
            assert "Traceback" not in err and p.returncode in (0, 130, -sig), (script, delay, p.returncode, err)
            assert p.returncode == 0 or err.strip() == "interrupted", (script, err)
            assert delay > 0 or p.returncode == 130, (script, p.returncode)


@pytest.mark.slow
def test_closed_stdout_and_stderr_exit_quietly(tmp_path):
    for script in ("prepare.py", "experiment.py"):
        r = subprocess.run(f"{shlex.quote(sys.executable)} {script} --bogus=1 2>&- >&-; echo $?", shell=True,
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == "1", (script, r.stdout, r.stderr)
        r = subprocess.run(f"{shlex.quote(sys.executable)} {script} --help | head -1", shell=True, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert "Traceback" not in r.stderr and r.stderr.strip() == "", (script, r.stderr)


@pytest.mark.slow
def test_experiment_sigterm_stops_its_runs_with_a_checkpoint(data_root, tmp_path):
    p, run = long_experiment(data_root, tmp_path)
    pid = int(open(run / runtime.LOCK_FILE).read())
    p.send_signal(signal.SIGTERM)
    _, err = quiet_stop(p)
    assert "interrupted" in err and len(err.strip().splitlines()) == 1
    assert "stopped at iteration" in open(run / "train.log").read()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # no training left running


@pytest.mark.parametrize("record", [{"iter": "2", "val_loss": 5.0}, {"iter": 2, "val_loss": "low"},
                                    {"iter": None, "loss": 1.0}, {"iter": 2, "time": True}])
def test_malformed_numbers_in_a_log_record_are_one_line(record, data_root, trained, tmp_path, capsys):
    out = spoiled_run(tmp_path, trained, None)
    lines = open(out / "metrics.jsonl").read().splitlines()
    lines.insert(1, json.dumps(record))
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(out)
    status, line, output = outcome(train.main, [*BASE, f"--data_root={data_root}", f"--out_dir={out}",
                                                "--init_from=resume", "--max_iters=4"], capsys)
    check_refused(status, line, output, ["metrics.jsonl", "line 2", "not a number"], before, snapshot(out))

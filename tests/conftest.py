import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TIKTOKEN_CACHE = os.path.join(SHARED, "tiktoken-cache")
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
sys.path.insert(0, ROOT)
# Started in the background of a non-interactive shell (`pytest &`, nohup), pytest inherits SIGINT ignored, and so
# would every script the tests start and then interrupt: those that leave Ctrl-C to Python (sample.py, bench.py,
# prepare.py, experiment.py) would not stop. A handler, unlike "ignored", is not inherited: the scripts start with
# SIGINT at its default, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

needs_gpt2 = pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE),
                                reason="GPT-2 BPE files not found at ../shared/tiktoken-cache (offline machine)")
SHAKESPEARE = os.path.join(SHARED, "data", "shakespeare.txt")
TINYSTORIES_SAMPLE = os.path.join(SHARED, "data", "tinystories-sample.txt")


def run_script(*args, timeout=600, **kwargs):
    """Run one of the repo's scripts in a subprocess; return the CompletedProcess (text)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def one_line_error(r, message):
    """A script stopped on a user's mistake: non-zero exit, the message as one line, no traceback."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def corpus_text(n_chars=300_000):
    """Real English text for tests: Shakespeare from ../shared when present, else a generated corpus."""
    if os.path.exists(SHAKESPEARE):
        return open(SHAKESPEARE, encoding="utf-8").read()[:n_chars]
    import random
    rng = random.Random(0)  # 2,000 made-up words of 1 to 4 syllables: enough pairs for a 512-token BPE
    syllables = [a + b for a in "bcdfghklmnprstvw" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(2000)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_chars // 60))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root holding 'tiny': ~300k characters of text with a 512-token BPE."""
    import prepare

    root = tmp_path_factory.mktemp("data")
    docs = prepare.documents(corpus_text())
    train, val = prepare.split_train_val(docs, 0.1)
    prepare.prepare(str(root / "tiny"), train, val, ["test corpus"], vocab_size=512)
    return str(root)


# the smallest model worth testing: train.py arguments
TINY_MOE = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--n_experts=4",
            "--top_k=2", "--expert_hidden=48", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--device=cpu"]


def tiny_arg(key):
    """The value TINY_MOE gives key, as a number."""
    return next(int(a.split("=")[1]) for a in TINY_MOE if a.startswith(f"--{key}="))

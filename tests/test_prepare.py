"""prepare.py: the BPE trainer, tokenizer round trips, dataset files, knob checks, downloads of the named
corpora from a local server (resume, wrong lengths, range requests), atomic replacement under kills, Ctrl-C,
offline GPT-2, and the laptop TinyStories config end to end."""

import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, TINYSTORIES_SAMPLE, corpus_text, needs_gpt2, one_line_error, run_script

import prepare
from configurator import UserError, configure

needs_sample = pytest.mark.skipif(not os.path.exists(TINYSTORIES_SAMPLE),
                                  reason=f"TinyStories-format sample not found at {TINYSTORIES_SAMPLE}")


def sample_stories(n):
    """n TinyStories-format stories: the sample's five, numbered so that each is distinct."""
    docs = prepare.documents(open(TINYSTORIES_SAMPLE, encoding="utf-8").read())
    return [f"{docs[i % len(docs)]} (Story {i}.)" for i in range(n)]


def tinystories_file(stories):
    """Stories laid out as in TinyStoriesV2-GPT4-*.txt: each followed by a line <|endoftext|>."""
    return "".join(s + "\n<|endoftext|>\n" for s in stories).encode()


def decoded_documents(folder, split):
    """The documents of data_root/<name>/<split>.bin, decoded with the dataset's own tokenizer."""
    meta = json.load(open(os.path.join(folder, "meta.json")))
    tokens = np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=meta["dtype"]).tolist()
    enc = prepare.encoding(prepare.load_spec(folder))
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == meta["eot_token"]:
            docs.append(enc.decode(tokens[start:i]))
            start = i + 1
    assert start == len(tokens)  # every document ends with end-of-text
    return docs


def folder_bytes(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def knobs(**overrides):
    return {**prepare.defaults(), **overrides}


# -----------------------------------------------------------------------------
# the BPE trainer and tokenizers


def test_bpe_merges_are_fixed():
    # the classic example: aa -> Z, ab -> Y, ZY -> X; then a tie of ones goes to the lowest ids (a, c)
    merges = prepare.train_bpe(prepare.count_words(["aaabdaaabac"]), vocab_size=257 + 4)
    assert merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab"), (b"a", b"c")]


def test_bpe_counts_words_across_documents():
    words = prepare.count_words(["the cat", "the hat"])
    assert words == {b"the": 2, b" cat": 1, b" hat": 1}
    merges = prepare.train_bpe(words, vocab_size=257 + 2)
    # 'at', 'he' and 'th' all occur twice: ties go to the lowest ids, a=97 t=116, h=104 e=101, t h
    assert merges == [(b"a", b"t"), (b"h", b"e")]


@pytest.mark.parametrize("text", ["Hello, world!", "naïve café 🤖 \u0000\u00ff\n\t  tabs", "ROMEO:\nWhat light",
                                  "".join(chr(c) for c in range(1, 3000, 7))])
def test_bpe_round_trips_any_text(text):
    enc = prepare.bpe_encoding(prepare.train_bpe(prepare.count_words([corpus_text(20_000)]), 300))
    assert enc.n_vocab == 300 and enc.eot_token == 299
    assert enc.decode(enc.encode_ordinary(text)) == text  # bytes never seen in training still encode


def test_bpe_stops_when_no_pair_is_left():
    merges = prepare.train_bpe(prepare.count_words(["abc abc"]), 1000)
    # ab and bc both twice: ab (lower ids); then ab+c twice; then ' '+abc once; then nothing is left
    assert merges == [(b"a", b"b"), (b"ab", b"c"), (b" ", b"abc")]


def test_bpe_too_small_vocab():
    with pytest.raises(UserError, match="at least 257"):
        prepare.train_bpe({b"ab": 1}, 100)


def test_split_train_val():
    train, val = prepare.split_train_val([f"doc {i}" for i in range(20)], 0.1)
    assert len(train) == 18 and val == ["doc 18", "doc 19"]
    train, val = prepare.split_train_val(["line one\nline two\nline three\nline four"], 0.25)
    assert train[0] + val[0] == "line one\nline two\nline three\nline four" and val[0].startswith("\n")
    train, val = prepare.split_train_val(["a", "b"], 0.9)  # rounds to 2 held out: one document stays to train
    assert train == ["a"] and val == ["b"]


def test_prepare_writes_dataset(tmp_path, data_root):
    meta = json.load(open(os.path.join(data_root, "tiny", "meta.json")))
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    train = np.memmap(os.path.join(data_root, "tiny", "train.bin"), dtype=np.uint16, mode="r")
    assert len(train) == meta["train_tokens"] and train.max() < 512
    enc = prepare.encoding(prepare.load_spec(os.path.join(data_root, "tiny")))
    assert enc.n_vocab == 512


@needs_sample
def test_tinystories_format_with_local_input(tmp_path):
    r = run_script("prepare.py", f"--input={TINYSTORIES_SAMPLE}", "--name=ts", "--vocab_size=300",
                   f"--data_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    docs = prepare.documents(open(TINYSTORIES_SAMPLE, encoding="utf-8").read())
    assert len(docs) == 5  # so 4 train and 1 val, each ending in <|endoftext|>
    assert decoded_documents(tmp_path / "ts", "train") == docs[:4]
    assert decoded_documents(tmp_path / "ts", "val") == docs[4:]


def test_several_input_files(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"part{i}.txt")
        paths[-1].write_text(f"first of file {i}<|endoftext|>second of file {i}, long enough for a block")
    prepare.run(knobs(input=",".join(map(str, paths)), vocab_size=300, data_root=str(tmp_path)))
    # named after the first file; the last of the six documents is held out
    assert decoded_documents(tmp_path / "part0", "train") == [
        f"first of file {i}" if w == "first" else f"second of file {i}, long enough for a block" for i in range(3)
        for w in ("first", "second")][:5]


@needs_gpt2
@needs_sample
def test_gpt2_tokenizer(tmp_path):
    r = run_script("prepare.py", f"--input={TINYSTORIES_SAMPLE}", "--name=ts", f"--data_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "M tokens/s" in r.stdout
    meta = json.load(open(tmp_path / "ts" / "meta.json"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_token"] == 50256
    assert not (tmp_path / "ts" / "tokenizer.json").exists()


# -----------------------------------------------------------------------------
# knobs: --help, ranges checked up front, bad input files


def test_help_lists_every_knob_with_default_and_doc(capsys):
    prepare.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith(prepare.__doc__.strip().splitlines()[0])
    comments = {}
    for line in open(prepare.__file__):
        m = re.match(r"(\w+) = .*  # (.*)", line)
        if m and m[1] in prepare.defaults():
            comments[m[1]] = m[2]
    assert set(comments) == set(prepare.KNOBS)  # each knob has its one-line doc
    for key, value in prepare.defaults().items():
        assert re.search(rf"--{key}={re.escape(str(value))} +{re.escape(comments[key])}", out), key


@pytest.mark.slow
def test_help_as_a_process():
    r = run_script("prepare.py", "-h")
    assert r.returncode == 0 and "--vocab_size=0" in r.stdout and not r.stderr


def test_config_file_and_key_values(tmp_path):
    (tmp_path / "laptop_data.py").write_text('corpus = "tinystories_slice"\nvocab_size = 4096\n')
    cfg = configure([str(tmp_path / "laptop_data.py"), "--slice_mb=5", "--input=a.txt,b.txt"], prepare.defaults())
    assert cfg["corpus"] == "tinystories_slice" and cfg["vocab_size"] == 4096 and cfg["slice_mb"] == 5.0
    assert cfg["input"] == "a.txt,b.txt"


@pytest.mark.parametrize("overrides, message", [
    (dict(vocab_size=256), "--vocab_size must be 0 (GPT-2's tokenizer) or from 257"),
    (dict(vocab_size=-1), "--vocab_size must be 0"),
    (dict(vocab_size=(1 << 20) + 1), "to 1,048,576, got 1048577"),
    (dict(val_fraction=0.0), "--val_fraction must be between 0 and 1"),
    (dict(val_fraction=1.0), "--val_fraction must be between 0 and 1"),
    (dict(val_fraction=float("nan")), "--val_fraction must be between 0 and 1"),
    (dict(slice_mb=0.0), "--slice_mb must be a positive number"),
    (dict(slice_mb=float("inf")), "--slice_mb must be a positive number"),
    (dict(corpus="tinystorie"), "--corpus must be one of tinystories, tinystories_slice, shakespeare"),
    (dict(input=" , "), "--input names no file"),
    (dict(url="huggingface.co/mirror"), "--url must start with http:// or https://"),
    (dict(name="../escape"), "--name must be a plain folder name"),
    (dict(name="a/b"), "--name must be a plain folder name"),
    (dict(name="/abs"), "--name must be a plain folder name"),
    (dict(name=".hidden"), "--name must be a plain folder name"),
    (dict(name=".."), "--name must be a plain folder name"),
    (dict(name="_downloads"), "--name must be a plain folder name"),
])
def test_knob_ranges(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        prepare.check_knobs(knobs(**overrides))


def test_valid_knobs_pass():
    prepare.check_knobs(knobs(name="my-data_2.v1", vocab_size=257, val_fraction=0.5, slice_mb=0.001,
                              url="http://127.0.0.1:8000/mirror/", corpus="shakespeare"))


@pytest.mark.slow
def test_knob_error_as_a_process(tmp_path):
    one_line_error(run_script("prepare.py", "--val_fraction=1.5", f"--data_root={tmp_path}"), "--val_fraction")
    one_line_error(run_script("prepare.py", "--input", "a.txt"), "expected --input=value")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    (None, "input file not found"),
    (b"", "input file is empty"),
    (b"  \n<|endoftext|>\n ", "hold no text besides <|endoftext|>"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary"),
    ("café".encode("latin-1"), "not UTF-8"),
])
def test_bad_input_files(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    good = tmp_path / "good.txt"
    good.write_text("some text")
    with pytest.raises(UserError, match=message):  # checked before anything is written, a good file first or not
        prepare.run(knobs(input=f"{good},{path}", vocab_size=300, data_root=str(tmp_path / "data")))
    assert not (tmp_path / "data").exists()


def test_downloaded_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "TinyStoriesV2-GPT4-train.txt"
    path.write_bytes("a story<|endoftext|>caf\u00e9".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text .*: delete it to download it again"):
        list(prepare.stream_documents(str(path)))


def test_input_folder_and_unnamed_input(tmp_path):
    with pytest.raises(UserError, match="input file not found"):
        prepare.run(knobs(input=str(tmp_path), vocab_size=300, data_root=str(tmp_path / "data")))
    spaced = tmp_path / "my text.txt"
    spaced.write_text("some text")
    with pytest.raises(UserError, match=r"the name 'my text' of .* give the dataset one with --name=NAME"):
        prepare.run(knobs(input=str(spaced), vocab_size=300, data_root=str(tmp_path / "data")))


def test_data_root_must_be_creatable(tmp_path):
    (tmp_path / "file").write_text("x")
    text = tmp_path / "t.txt"
    text.write_text("some text")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare.run(knobs(input=str(text), vocab_size=300, data_root=str(tmp_path / "file")))
    with pytest.raises(UserError, match=r"--data_root=.*below cannot be created \(Not a directory\)"):
        prepare.run(knobs(input=str(text), vocab_size=300, data_root=str(tmp_path / "file" / "below")))


@pytest.mark.slow
def test_offline_gpt2_says_what_to_do(tmp_path):
    # no GPT-2 files in the cache and no way out (a proxy that refuses): the state of a machine without network
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    text = tmp_path / "t.txt"
    text.write_text("some text")
    for args in ([f"--input={text}"], ["--corpus=shakespeare"]):
        r = run_script("prepare.py", *args, f"--data_root={tmp_path / 'data'}", env=env)
        one_line_error(r, "TIKTOKEN_CACHE_DIR")
        assert "--vocab_size=" in r.stderr
        assert not (tmp_path / "data").exists()  # no empty dataset folder, nothing downloaded


# -----------------------------------------------------------------------------
# atomic replacement, the lock, interrupts


def test_recover_finishes_or_undoes_a_swap(tmp_path):
    out = tmp_path / "ds"
    new, old = tmp_path / ".ds.new", tmp_path / ".ds.old"
    # killed between the two renames: the old dataset goes back in place, the unplaced new one is dropped
    old.mkdir()
    (old / "meta.json").write_text("old")
    new.mkdir()
    prepare.recover(str(out))
    assert (out / "meta.json").read_text() == "old" and not old.exists() and not new.exists()
    # killed after the new one was placed: the old one is deleted
    old.mkdir()
    prepare.recover(str(out))
    assert (out / "meta.json").read_text() == "old" and not old.exists()


TEN_WORDS = "a b c d e f g h i j"  # enough tokens for one block of each split (prepare.MIN_SPLIT_TOKENS)


@pytest.mark.slow
def test_a_second_prepare_on_the_same_name_is_refused(tmp_path):
    hold = (f"import prepare, time\nwith prepare.dataset_lock({str(tmp_path / 'ds')!r}):\n"
            f"    print('locked', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(UserError, match="another prepare.py is writing"):
        prepare.prepare(str(tmp_path / "ds"), [TEN_WORDS], [TEN_WORDS[::-1]], [], vocab_size=300)
    holder.kill()
    holder.wait()
    # the dead holder's lock is gone
    prepare.prepare(str(tmp_path / "ds"), [TEN_WORDS], [TEN_WORDS[::-1]], [], vocab_size=300)
    assert sorted(os.listdir(tmp_path / "ds")) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_refuses_to_replace_a_folder_holding_other_files(tmp_path):
    (tmp_path / "ds" / "raw").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds files prepare.py did not write \(raw\)"):
        prepare.prepare(str(tmp_path / "ds"), [TEN_WORDS], [TEN_WORDS[::-1]], [], vocab_size=300)
    assert os.listdir(tmp_path / "ds") == ["raw"] and not (tmp_path / ".ds.new").exists()


def start_prepare(*args):
    return subprocess.Popen([sys.executable, "-u", "prepare.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def old_and_new(tmp_path):
    """(data root, the knobs of an old dataset 'ds', those of a new one from other text, the files of each):
    the data root holds the old one."""
    old_text, new_text = tmp_path / "old.txt", tmp_path / "new.txt"
    old_text.write_text("an old text, short\n" * 50)
    new_text.write_text(corpus_text(200_000).replace("\n\n", "\n<|endoftext|>\n"))
    old_args = [f"--input={old_text}", "--name=ds", "--vocab_size=300", f"--data_root={tmp_path / 'data'}"]
    new_args = [f"--input={new_text}", "--name=ds", "--vocab_size=400", f"--data_root={tmp_path / 'data'}"]
    prepare.run(configure(new_args[:-1] + [f"--data_root={tmp_path / 'reference'}"], prepare.defaults()))
    prepare.run(configure(old_args, prepare.defaults()))
    return (str(tmp_path / "data"), old_args, new_args, folder_bytes(tmp_path / "data" / "ds"),
            folder_bytes(tmp_path / "reference" / "ds"))


@pytest.mark.slow
def test_killed_at_random_moments_leaves_old_or_new(old_and_new):
    data_root, old_args, args, old, new = old_and_new
    start = time.time()
    r = run_script("prepare.py", *args)
    seconds = time.time() - start
    assert r.returncode == 0, r.stderr
    assert f"{data_root}/ds exists: the new dataset replaces it once complete" in r.stdout  # re-preparing says so
    assert folder_bytes(os.path.join(data_root, "ds")) == new
    assert run_script("prepare.py", *old_args).returncode == 0
    rng, seen = random.Random(0), []
    for _ in range(8):
        p = start_prepare(*args)
        time.sleep(rng.uniform(0, seconds))
        p.kill()
        p.wait()
        now = folder_bytes(os.path.join(data_root, "ds"))
        assert now in (old, new)  # never a mix, whenever the kill came
        seen.append("old" if now == old else "new")
    r = run_script("prepare.py", *args)  # the next run cleans up after the kills
    assert r.returncode == 0, r.stderr
    assert folder_bytes(os.path.join(data_root, "ds")) == new
    assert sorted(os.listdir(data_root)) == [".ds.lock", "ds"]
    print("states after the kills:", seen)


@pytest.mark.slow
def test_ctrl_c_during_prepare_is_quiet(old_and_new):
    data_root, _, args, old, new = old_and_new
    rng = random.Random(1)
    for _ in range(5):
        p = start_prepare(*args)
        first = p.stdout.readline()  # in main: the interrupt is prepare.py's to handle from here on
        assert "exists: the new dataset replaces it" in first
        time.sleep(rng.uniform(0, 0.8))
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert folder_bytes(os.path.join(data_root, "ds")) in (old, new) and "Traceback" not in err
        assert sorted(os.listdir(data_root)) == [".ds.lock", "ds"]  # no partial new dataset left
        if "val tokens, vocab 400" in out:  # it had finished: the signal came as Python shut down
            assert p.returncode in (0, -signal.SIGINT) and not err
        else:
            assert p.returncode == 130 and err.splitlines() == [
                "interrupted: no partial dataset was left; run the same command again to finish (downloads resume)"]


# -----------------------------------------------------------------------------
# downloads: a local HTTP server standing in for Hugging Face and GitHub


class FileServer(http.server.BaseHTTPRequestHandler):
    """Serves files with HTTP Range support (bytes=a- and bytes=a-b), recording the Range headers. mode:
    "ignore_range" answers 200 with the whole file; "short" announces the full length but sends half and hangs
    up; "wrong_start" answers a range from byte 0; "slow" sends 64 kB every 20 ms."""
    files, ranges, mode = {}, [], ""

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.ranges.append(rng)
        start, end = 0, len(body) - 1
        if rng and self.mode != "ignore_range":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start, end = int(m[1]), min(int(m[2]), end) if m[2] else end
            if start >= len(body):
                self.send_error(416)
                return
        sent_from = 0 if self.mode == "wrong_start" else start
        chunk = body[sent_from:end + 1]
        self.send_response(206 if rng and self.mode != "ignore_range" else 200)
        if rng and self.mode != "ignore_range":
            self.send_header("Content-Range", f"bytes {sent_from}-{end}/{len(body)}")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        try:
            if self.mode == "short":
                self.wfile.write(chunk[:len(chunk) // 2])
            elif self.mode == "slow":
                for i in range(0, len(chunk), 1 << 16):
                    self.wfile.write(chunk[i:i + (1 << 16)])
                    time.sleep(0.02)
            else:
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-download
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(base URL, handler class) of a fresh file server on 127.0.0.1."""
    handler = type("Handler", (FileServer,), {"files": {}, "ranges": [], "mode": ""})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/", handler
    httpd.shutdown()


def test_download_resumes_a_partial_file(tmp_path, server):
    url, handler = server
    body = os.urandom(3_000_000)
    handler.files = {"/big.txt": body}
    dest = tmp_path / "big.txt"
    (tmp_path / "big.txt.part").write_bytes(body[:1_234_567])
    prepare.download(url + "big.txt", str(dest))
    assert dest.read_bytes() == body and not (tmp_path / "big.txt.part").exists()
    assert handler.ranges == ["bytes=1234567-"]


def test_download_cut_short_is_refused_then_resumed(tmp_path, server):
    # the server announces 3,000,000 bytes and hangs up after half: a wrong length, kept to resume from
    url, handler = server
    body = os.urandom(3_000_000)
    handler.files, handler.mode = {"/big.txt": body}, "short"
    dest = tmp_path / "big.txt"
    with pytest.raises(UserError, match=r"stopped \(got 1,500,000 of the 3,000,000 bytes announced\): run the same "
                                        r"command again to resume it"):
        prepare.download(url + "big.txt", str(dest))
    part = (tmp_path / "big.txt.part").read_bytes()
    assert not dest.exists() and len(part) == 1_500_000 and body.startswith(part)
    handler.mode = ""
    prepare.download(url + "big.txt", str(dest))
    assert dest.read_bytes() == body and handler.ranges == [None, "bytes=1500000-"]


def test_download_refuses_a_range_from_the_wrong_start(tmp_path, server):
    url, handler = server
    body = os.urandom(100_000)
    handler.files, handler.mode = {"/big.txt": body}, "wrong_start"
    (tmp_path / "big.txt.part").write_bytes(body[:40_000])
    with pytest.raises(UserError, match="asked for bytes from 40,000, the server sent them from 0"):
        prepare.download(url + "big.txt", str(tmp_path / "big.txt"))
    assert (tmp_path / "big.txt.part").read_bytes() == body[:40_000]  # nothing appended


def test_download_starts_over_when_the_server_ignores_ranges(tmp_path, server):
    url, handler = server
    body = os.urandom(200_000)
    handler.files, handler.mode = {"/big.txt": body}, "ignore_range"
    (tmp_path / "big.txt.part").write_bytes(b"stale bytes")
    prepare.download(url + "big.txt", str(tmp_path / "big.txt"))
    assert (tmp_path / "big.txt").read_bytes() == body
    # a slice from a server that sends the whole file anyway: only the slice is kept
    prepare.download(url + "big.txt", str(tmp_path / "slice"), limit=50_000)
    assert (tmp_path / "slice").read_bytes() == body[:50_000]


def test_download_errors_name_the_url(tmp_path, server):
    url, _ = server
    with pytest.raises(UserError, match=rf"download of {url}missing.txt failed \(HTTP 404 .*--input=FILE.txt"):
        prepare.download(url + "missing.txt", str(tmp_path / "missing.txt"))
    r = run_script("prepare.py", "--url=http://127.0.0.1:9/", "--vocab_size=300", f"--data_root={tmp_path}")
    one_line_error(r, "download of http://127.0.0.1:9/TinyStoriesV2-GPT4-train.txt failed")
    assert "--input" in r.stderr


@needs_sample
def test_tinystories_download_end_to_end(tmp_path, server):
    url, handler = server
    stories = sample_stories(30)
    handler.files = {"/TinyStoriesV2-GPT4-train.txt": tinystories_file(stories[:25]),
                     "/TinyStoriesV2-GPT4-valid.txt": tinystories_file(stories[25:])}
    r = run_script("prepare.py", f"--url={url}", "--vocab_size=300", f"--data_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "tinystories" / "meta.json"))
    assert meta["source"] == [url + "TinyStoriesV2-GPT4-train.txt", url + "TinyStoriesV2-GPT4-valid.txt"]
    assert decoded_documents(tmp_path / "tinystories", "train") == stories[:25]
    assert decoded_documents(tmp_path / "tinystories", "val") == stories[25:]
    assert sorted(os.listdir(tmp_path / "_downloads")) == ["TinyStoriesV2-GPT4-train.txt",
                                                           "TinyStoriesV2-GPT4-valid.txt"]


@needs_sample
def test_tinystories_slice_is_a_range_cut_after_a_whole_story(tmp_path, server):
    url, handler = server
    stories = sample_stories(40)
    train_file = tinystories_file(stories)
    n_bytes = len(tinystories_file(stories[:12])) + 100  # 100 bytes into story 12
    handler.files = {"/TinyStoriesV2-GPT4-train.txt": train_file,
                     "/TinyStoriesV2-GPT4-valid.txt": tinystories_file(stories[:3])}
    r = run_script("prepare.py", "--corpus=tinystories_slice", f"--slice_mb={n_bytes / 1e6}", f"--url={url}",
                   "--vocab_size=300", f"--data_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert handler.ranges == [f"bytes=0-{n_bytes - 1}", None]  # only the slice was asked for
    assert decoded_documents(tmp_path / "tinystories_slice", "train") == stories[:12]
    assert decoded_documents(tmp_path / "tinystories_slice", "val") == stories[:3]
    meta = json.load(open(tmp_path / "tinystories_slice" / "meta.json"))
    assert f"its first {n_bytes:,} bytes" in meta["source"][0]
    # a slice longer than the file: the whole file, its last story kept
    r = run_script("prepare.py", "--corpus=tinystories_slice", "--slice_mb=1", f"--url={url}", "--name=whole",
                   "--vocab_size=300", f"--data_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert decoded_documents(tmp_path / "whole", "train") == stories
    # a slice shorter than one story: after the download's progress bar, one line
    r = run_script("prepare.py", "--corpus=tinystories_slice", "--slice_mb=0.0001", f"--url={url}", "--name=none",
                   "--vocab_size=300", f"--data_root={tmp_path}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.fullmatch(r"error: the first 100 bytes of \S+ hold no whole document: raise --slice_mb",
                        r.stderr.strip().splitlines()[-1])


def test_shakespeare_download_end_to_end(tmp_path, server):
    url, handler = server
    text = corpus_text(100_000)
    handler.files = {"/input.txt": text.encode()}
    r = run_script("prepare.py", "--corpus=shakespeare", f"--url={url}", "--vocab_size=300", f"--data_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    train, val = (decoded_documents(tmp_path / "shakespeare", split) for split in ("train", "val"))
    assert len(train) == len(val) == 1 and train[0] + val[0] == text.strip()  # one text, cut at a line break
    assert val[0].startswith("\n") and 0.08 < len(val[0]) / len(text) < 0.12
    assert json.load(open(tmp_path / "shakespeare" / "meta.json"))["source"] == [url + "input.txt"]


@pytest.mark.slow
def test_ctrl_c_during_a_download_then_resume(tmp_path, server):
    url, handler = server
    text = (corpus_text(300_000) * 10).encode()  # 3 MB, sent in 64 kB pieces every 20 ms
    handler.files, handler.mode = {"/input.txt": text}, "slow"
    part = tmp_path / "_downloads" / "input.txt.part"
    args = ["--corpus=shakespeare", f"--url={url}", "--vocab_size=300", f"--data_root={tmp_path}"]
    p = start_prepare(*args)
    while not (part.exists() and part.stat().st_size > 0):
        assert p.poll() is None, p.communicate()
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")
    have = part.stat().st_size
    assert 0 < have < len(text) and text.startswith(part.read_bytes())
    assert not (tmp_path / "shakespeare").exists()
    handler.mode = ""
    r = run_script("prepare.py", *args)
    assert r.returncode == 0, r.stderr
    assert handler.ranges == [None, f"bytes={have}-"]
    assert (tmp_path / "_downloads" / "input.txt").read_bytes() == text


# -----------------------------------------------------------------------------
# the laptop TinyStories config: prepare the slice from the "network", then train a few steps


@needs_sample
@pytest.mark.slow
def test_laptop_config_end_to_end(tmp_path, server):
    url, handler = server
    stories = sample_stories(120)
    handler.files = {"/TinyStoriesV2-GPT4-train.txt": tinystories_file(stories[:100] * 3),
                     "/TinyStoriesV2-GPT4-valid.txt": tinystories_file(stories[100:])}
    config = os.path.join(ROOT, "config", "tinystories_laptop.py")
    prepare_line = next(line for line in open(config) if "python prepare.py" in line).split("#")[1].split()
    assert prepare_line[:2] == ["python", "prepare.py"]  # the command the config's comment gives, as written
    r = run_script(*prepare_line[1:], f"--url={url}", f"--data_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = run_script("train.py", config, f"--data_root={tmp_path}", f"--out_dir={out}", "--max_iters=3",
                   "--eval_interval=3", "--eval_iters=2", "--log_interval=1", "--device=cpu")
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 3 and all(np.isfinite(s["loss"]) for s in steps)
    assert (out / "ckpt.pt").exists()

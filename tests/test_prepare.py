"""prepare.py: the BPE trainer, tokenizer round trips, dataset files, downloads, bad inputs."""

import http.server
import json
import os
import threading

import numpy as np
import pytest
from conftest import TINYSTORIES_SAMPLE, corpus_text, needs_gpt2, one_line_error, run_script

import prepare
from configurator import UserError


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


def test_prepare_writes_dataset(tmp_path, data_root):
    meta = json.load(open(os.path.join(data_root, "tiny", "meta.json")))
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    train = np.memmap(os.path.join(data_root, "tiny", "train.bin"), dtype=np.uint16, mode="r")
    assert len(train) == meta["train_tokens"] and train.max() < 512
    enc = prepare.encoding(prepare.load_spec(os.path.join(data_root, "tiny")))
    assert enc.n_vocab == 512


def test_tinystories_format_with_local_input(tmp_path):
    r = run_script("prepare.py", "--input", TINYSTORIES_SAMPLE, "--name", "ts", "--vocab_size", "300",
                   "--data_root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "ts" / "meta.json"))
    train = np.fromfile(tmp_path / "ts" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "ts" / "val.bin", dtype=np.uint16)
    # 5 documents: 4 to train, 1 to val, each ending in <|endoftext|>
    assert (train == meta["eot_token"]).sum() == 4 and (val == meta["eot_token"]).sum() == 1
    assert train[-1] == meta["eot_token"] and val[-1] == meta["eot_token"]
    enc = prepare.encoding(prepare.load_spec(str(tmp_path / "ts")))
    first = enc.decode(train[: list(train).index(meta["eot_token"])].tolist())
    assert first == prepare.documents(open(TINYSTORIES_SAMPLE, encoding="utf-8").read())[0]


@needs_gpt2
def test_gpt2_tokenizer(tmp_path):
    r = run_script("prepare.py", "--input", TINYSTORIES_SAMPLE, "--name", "ts", "--data_root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "M tokens/s" in r.stdout
    meta = json.load(open(tmp_path / "ts" / "meta.json"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_token"] == 50256


@pytest.mark.parametrize("content, message", [
    (None, "input file not found"),
    (b"", "input file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary"),
    ("café".encode("latin-1"), "not UTF-8"),
])
def test_bad_input_files(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    one_line_error(run_script("prepare.py", "--input", str(path), "--data_root", str(tmp_path)), message)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves FILES with HTTP Range support, and records the requests' Range headers."""
    files, ranges = {}, []

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            self.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()


def test_download_resumes_a_partial_file(tmp_path, server):
    body = os.urandom(3_000_000)
    RangeHandler.files = {"/big.txt": body}
    RangeHandler.ranges = []
    dest = tmp_path / "big.txt"
    (tmp_path / "big.txt.part").write_bytes(body[:1_234_567])
    prepare.download(server + "big.txt", str(dest))
    assert dest.read_bytes() == body and not (tmp_path / "big.txt.part").exists()
    assert RangeHandler.ranges == ["bytes=1234567-"]


def test_tinystories_download_end_to_end(tmp_path, server):
    sample = open(TINYSTORIES_SAMPLE, "rb").read()
    docs = sample.split(b"<|endoftext|>")
    RangeHandler.files = {"/" + prepare.TINYSTORIES_FILES["train"]: sample,
                          "/" + prepare.TINYSTORIES_FILES["val"]: b"<|endoftext|>".join(docs[:2])}
    r = run_script("prepare.py", "--url", server, "--vocab_size", "300", "--data_root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "tinystories" / "meta.json"))
    assert meta["source"][0].startswith(server) and meta["train_tokens"] > meta["val_tokens"] > 0


def test_offline_download_says_what_to_do(tmp_path):
    r = run_script("prepare.py", "--url", "http://127.0.0.1:9/", "--data_root", str(tmp_path))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "download of http://127.0.0.1:9/TinyStoriesV2-GPT4-train.txt failed" in r.stderr
    assert "--input" in r.stderr

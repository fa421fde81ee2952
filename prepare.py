"""
Make a dataset for train.py: download a named corpus (or read local text), tokenize it and write
data_root/<name>/{train.bin, val.bin, meta.json, tokenizer.json}. Relative paths (data_root, input files,
config files) are taken from the current directory, as in train.py.

    python prepare.py                                               # TinyStories (~2 GB), GPT-2's tokenizer
    python prepare.py --corpus=tinystories_slice --vocab_size=4096  # its first 20 MB, a 4096-token BPE
    python prepare.py --corpus=shakespeare --vocab_size=2048        # tiny Shakespeare (1 MB)
    python prepare.py --input=a.txt,b.txt --name=mine --vocab_size=2048  # local text: no network needed
    python prepare.py --help                                        # every knob, its default and what it does

Corpora (downloads go to data_root/_downloads/, with a progress bar; an interrupted one resumes
where it stopped when the command is run again, and each must add up to the size the server announced):
- tinystories: the V2 stories written by GPT-4 (roneneldan/TinyStories on Hugging Face), its train
  file (~2 GB) for training and its valid file (~20 MB) for validation.
- tinystories_slice: the first slice_mb MB of that train file, fetched with an HTTP range request
  and cut after its last whole story, validated on the whole valid file. Why a slice of the train
  file rather than the valid file split in two: the validation stories are then the very ones the
  full corpus (and the study this repo reproduces) validates on, never trained on, and the size is
  a free knob rather than capped at the valid file's ~20 MB.
- shakespeare: tiny Shakespeare, the 1 MB char-rnn input.txt that nanoGPT uses; the last
  val_fraction of it (cut at a line break) is held out.
Local files (--input) are read whole; documents are separated by <|endoftext|> (as in TinyStories)
and the last val_fraction of them is held out (a single document is cut at a line break).

A mirror (--url=BASE) must hold the corpus's files under their own names, fetched as BASE/NAME:
TinyStoriesV2-GPT4-train.txt and TinyStoriesV2-GPT4-valid.txt (tinystories, tinystories_slice),
input.txt (shakespeare). It need not answer range requests: for the slice, a whole file sent is read
up to slice_mb.

TinyStories files already on disk: put them, or links to them, in data_root/_downloads/ under those
names; the named corpus then uses them as they are, without downloading. The train file's slice has a
name of its own, with the slice's size in bytes, and must hold only the file's first slice_mb MB:
    mkdir -p data/_downloads && cd data/_downloads
    ln -s /path/to/TinyStoriesV2-GPT4-train.txt /path/to/TinyStoriesV2-GPT4-valid.txt .
    head -c 20000000 TinyStoriesV2-GPT4-train.txt > TinyStoriesV2-GPT4-train.txt.first-20000000-bytes
    cd ../..
    python prepare.py                                               # the whole of TinyStories
    python prepare.py --corpus=tinystories_slice --vocab_size=4096  # its first 20 MB (slice_mb=20)
(--input=/path/to/TinyStoriesV2-GPT4-train.txt would also work, but reads the 2 GB into memory and
validates on its last val_fraction instead of on the valid file.)

Each document is followed by the end-of-text token in the .bin files; tokens are uint16 when the
vocabulary fits, else uint32. The tokenizer is GPT-2's (tiktoken: it fetches its files once, so
offline it needs TIKTOKEN_CACHE_DIR), or with --vocab_size a byte-level BPE trained here on the
training text with GPT-2's pre-tokenization, saved as tokenizer.json and loaded back as a
tiktoken.Encoding. The dataset is written into a temporary folder and renamed into place only when
complete, so a run killed at any moment leaves the old dataset or the new one, never a mix.
"""

import guard  # isort: skip  (first: from here on a Ctrl-C or SIGTERM exits quietly, never a traceback)

import base64
import codecs
import errno
import hashlib
import heapq
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from multiprocessing import Pool

import numpy as np
import regex
import tiktoken
from tqdm import tqdm

from configurator import UserError, check, configure, print_help, usage

EOT = "<|endoftext|>"
MIN_SPLIT_TOKENS = 9  # a split must hold one block of 8 tokens and its target: no smaller block is worth training
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
TINYSTORIES = (TINYSTORIES_URL + "TinyStoriesV2-GPT4-train.txt", TINYSTORIES_URL + "TinyStoriesV2-GPT4-valid.txt")
CORPORA = {  # name: (train file URL, validation file URL or None: hold out val_fraction of the train file)
    "tinystories": TINYSTORIES,
    "tinystories_slice": TINYSTORIES,
    "shakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt", None),
}
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DATASET_FILES = ("train.bin", "val.bin", "meta.json", "tokenizer.json")
MAX_VOCAB = 1 << 20
PLAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a dataset name: one folder, not hidden, no path

# -----------------------------------------------------------------------------
# config: defaults, overridden by config files and --key=value (see configurator.py)
corpus = "tinystories"  # what to download: tinystories, tinystories_slice or shakespeare (see above)
input = ""  # local UTF-8 text files to use instead, comma-separated: --input=a.txt,b.txt
name = ""  # the dataset folder data_root/<name>; default: the corpus's name, or the first input file's
vocab_size = 0  # 0: GPT-2's tokenizer (50,257 tokens); else train a byte-level BPE of this size (257 to 2^20)
val_fraction = 0.1  # share held out for validation where the corpus has no validation file
slice_mb = 20.0  # tinystories_slice: the first this many MB (10^6 bytes) of the train file
data_root = "data"  # where dataset folders go (and downloads, in data_root/_downloads)
url = ""  # download from this base URL (a mirror holding the same file names) instead of the corpus's own
# -----------------------------------------------------------------------------
KNOBS = [k for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
         and isinstance(v, (int, float, bool, str))]


def defaults():
    return {k: globals()[k] for k in KNOBS}


def check_knobs(cfg):
    """The valid range of every knob, checked before anything is read, downloaded or written."""
    check(cfg["input"] or cfg["corpus"] in CORPORA,
          f"--corpus must be one of {', '.join(CORPORA)} (or give --input=FILE), got {cfg['corpus']!r}")
    check(not cfg["input"] or [path for path in cfg["input"].split(",") if path.strip()],
          "--input names no file: give one or more, comma-separated (--input=a.txt,b.txt)")
    check(cfg["vocab_size"] == 0 or 257 <= cfg["vocab_size"] <= MAX_VOCAB,
          f"--vocab_size must be 0 (GPT-2's tokenizer) or from 257 (256 bytes + end-of-text) to {MAX_VOCAB:,}, "
          f"got {cfg['vocab_size']}")
    check(0 < cfg["val_fraction"] < 1,
          f"--val_fraction must be between 0 and 1 (the share held out), got {cfg['val_fraction']}")
    check(0 < cfg["slice_mb"] < float("inf"), f"--slice_mb must be a positive number of MB, got {cfg['slice_mb']}")
    check(not cfg["url"] or cfg["url"].startswith(("http://", "https://")),
          f"--url must start with http:// or https://, got {cfg['url']!r}")
    check(not cfg["name"] or re.fullmatch(PLAIN_NAME, cfg["name"]),  # so data_root/<name> cannot point elsewhere
          f"--name must be a plain folder name (letters, digits, '.', '_', '-', starting with a letter or digit), "
          f"got {cfg['name']!r}")


# -----------------------------------------------------------------------------
# Getting text


def download(url, dest, limit=0, text=False):
    """Fetch url (only its first `limit` bytes if limit > 0) to dest with a progress bar, resuming a
    partial download (dest + '.part'). The bytes received must add up to the size the server announced; a web
    page, an empty body, a malformed header or (text) a body that is not UTF-8 text is refused and not kept."""
    part = dest + ".part"
    if os.path.exists(dest) and text and open(dest, "rb").read(512).lstrip().lower().startswith(
            (b"<!doctype html", b"<html")):  # a web page an older version kept: fetch the file again
        os.remove(dest)
    if os.path.exists(dest):
        return
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if limit and have >= limit:  # complete, but killed before the rename
        os.replace(part, dest)
        return
    headers = {"Range": f"bytes={have}-{limit - 1 if limit else ''}"} if have or limit else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the partial file is already whole
            os.replace(part, dest)
            return
        reason = str(e.reason).splitlines()[0] if str(e.reason) else ""  # a redirect loop's is several lines
        raise UserError(download_failed(url, f"HTTP {e.code} {reason}")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise UserError(download_failed(url, getattr(e, "reason", e))) from None
    if response.status == 206:  # the range we asked for; check it starts where the partial file ends
        start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if start and int(start[1]) != have:
            raise UserError(f"download of {url} failed: asked for bytes from {have:,}, the server sent them from "
                            f"{int(start[1]):,}; delete {part} to download the file whole")
    else:  # the whole file: start over (and stop at limit)
        have = 0
    announced = header_number(response, "Content-Length", url, part)
    kind = response.headers.get("Content-Type", "")
    if "html" in kind.lower():  # an error or login page served with status 200: not the file
        refuse_download(url, part, f"the server sent a web page ({kind}), not the text file")
    total = min(have + announced, limit or have + announced) if announced else limit  # 0: unknown
    try:
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total or None, initial=have, unit="B", unit_scale=True, desc=os.path.basename(dest)
        ) as bar:
            while chunk := response.read(min(1 << 20, total - f.tell()) if total else 1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except (OSError, http.client.HTTPException) as e:
        raise UserError(download_stopped(url, e)) from None
    got = os.path.getsize(part)
    if got == 0:
        refuse_download(url, part, "the server sent an empty body")
    if announced and got != total:
        raise UserError(download_stopped(url, f"got {got:,} of the {total:,} bytes announced"))
    if text:
        check_downloaded_text(url, part, whole=not limit)
    os.replace(part, dest)


def header_number(response, name, url, part):
    """A whole-number header (0 if absent); a malformed one refuses the download."""
    text = response.headers.get(name)
    if text is None:
        return 0
    if not text.strip().isdigit():
        refuse_download(url, part, f"its {name} header is not a number: {text[:40]!r}")
    return int(text)


def refuse_download(url, part, reason):
    """A download that is not the file: nothing of it is kept (so the next run fetches it afresh), UserError."""
    if os.path.exists(part):
        os.remove(part)
    raise UserError(f"download of {url} refused: {reason}; nothing was kept. Check --url, or tokenize local "
                    f"text files instead: python prepare.py --input=FILE.txt --name=NAME")


def check_downloaded_text(url, part, whole):
    """The download must be UTF-8 text, not a web page: checked before it is kept or tokenized (a slice, not
    whole, may end inside a character)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(part, "rb") as f:
        head = f.read(512).lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html")):
            refuse_download(url, part, "the server sent a web page, not the text file")
        f.seek(0)
        offset = 0
        try:
            while block := f.read(1 << 24):
                decoder.decode(block)
                offset += len(block)
            decoder.decode(b"", final=whole)
        except UnicodeDecodeError as e:
            refuse_download(url, part, f"the file is not UTF-8 text (bad byte near offset {offset + e.start:,})")
        if b"\x00" in head:
            refuse_download(url, part, "the file is binary (NUL bytes), not text")


def download_failed(url, reason):
    return (f"download of {url} failed ({reason}). Without a network, tokenize local text files "
            f"instead: python prepare.py --input=FILE.txt --name=NAME")


def download_stopped(url, reason):
    return f"download of {url} stopped ({reason}): run the same command again to resume it"


def corpus_documents(corpus_name, base_url, downloads, slice_bytes, val_fraction):
    """Download a named corpus into downloads/; return (train docs, val docs, source). The docs are
    lists, or for the full TinyStories callables that stream a fresh pass over the file."""
    urls = [u for u in CORPORA[corpus_name] if u]
    if base_url:  # a mirror: the same file names under another base URL
        urls = [base_url.rstrip("/") + "/" + u.rsplit("/", 1)[1] for u in urls]
    paths = [os.path.join(downloads, u.rsplit("/", 1)[1]) for u in urls]
    source = list(urls)
    if corpus_name == "tinystories_slice":
        check(slice_bytes >= 1, "--slice_mb rounds to 0 bytes: give at least 0.000001 (one byte), or use "
                                "--corpus=tinystories for the whole file")
        paths[0] += f".first-{slice_bytes}-bytes"
        download(urls[0], paths[0], limit=slice_bytes, text=True)
        train = slice_documents(paths[0], slice_bytes)
        source[0] += f" (its first {slice_bytes:,} bytes, cut after the last whole story)"
    else:
        download(urls[0], paths[0], text=True)
        train = lambda: stream_documents(paths[0])
    if len(urls) == 1:
        return *split_train_val(documents(read_text(paths[0])), val_fraction), source
    download(urls[1], paths[1], text=True)
    return train, lambda: stream_documents(paths[1]), source


def slice_documents(path, slice_bytes):
    """The whole documents of the first slice_bytes of a file: a story cut short at the end is dropped."""
    data = open(path, "rb").read()
    if len(data) >= slice_bytes:  # cut, unless the file ended before the slice did
        end = data.rfind(EOT.encode())
        if end < 0:
            raise UserError(f"the first {slice_bytes:,} bytes of {path} hold no whole document: raise --slice_mb")
        data = data[:end]
    try:
        return documents(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): delete it to download it "
                        f"again") from None


def read_text(path):
    """The whole of a UTF-8 text file; a missing, unreadable, empty, binary or non-UTF-8 file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"input file not found: {path}")
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise UserError(f"input file cannot be read ({e.strerror}): {path}") from None
    if not data.strip():
        raise UserError(f"input file is empty: {path}")
    if b"\x00" in data:
        raise UserError(f"input file looks binary (it contains NUL bytes), not text: {path}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"input file is not UTF-8 text (bad byte at offset {e.start}): {path}") from None


def read_documents(paths):
    """The documents of some local text files, each file checked before anything else happens; a file given
    twice (by two names or two copies) is refused, as it would put training text into the validation split."""
    docs, seen = [], {}
    for path in paths:
        key = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else path
        check(key not in seen, f"--input gives the same text twice ({seen.get(key)} and {path}): its validation "
                               f"split would be training text; give each file once")
        seen[key] = path
        file_docs = documents(read_text(path))
        if not file_docs:
            raise UserError(f"input file holds no text besides <|endoftext|> separators: {path}")
        docs += file_docs
    return docs


def documents(text):
    """The non-empty documents of a text, split on <|endoftext|>."""
    return [d.strip() for d in text.split(EOT) if d.strip()]


def stream_documents(path, chunk_chars=1 << 24):
    """The documents of a large text file, read a chunk at a time."""
    rest = ""
    with open(path, encoding="utf-8") as f:
        try:
            while chunk := f.read(chunk_chars):
                *whole, rest = (rest + chunk).split(EOT)
                yield from (d.strip() for d in whole if d.strip())
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason}): delete it to download it again") from None
    if rest.strip():
        yield rest.strip()


def split_train_val(docs, val_fraction):
    """Hold out the last val_fraction of the documents; a single document is cut at a line break. Validation
    documents that all occur in the training ones (a text repeated) are refused: the loss would measure recall."""
    if len(docs) >= 2:
        n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
        train, val = docs[:-n_val], docs[-n_val:]
        check(not set(val) <= set(train), "every validation document also occurs in the training text (the same "
                                          "text given twice?): the validation loss would measure recall")
        return train, val
    text = docs[0]
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
    return [text[:cut]], [text[cut:]]


# -----------------------------------------------------------------------------
# Tokenizers: GPT-2's, or a byte-level BPE trained here (GPT-2 style): it counts pre-tokenized words
# once, then repeatedly merges the most frequent adjacent pair, updating only the words that contain it.


def count_words(docs):
    """Counter of the pre-tokenized words (as bytes) of some documents."""
    counts = Counter()
    for doc in docs:
        counts.update(regex.findall(GPT2_SPLIT, doc))
    return Counter({w.encode("utf-8"): n for w, n in counts.items()})


def train_bpe(word_counts, vocab_size):
    """Merges [(bytes_a, bytes_b), ...] for a vocabulary of 256 bytes + merges + <|endoftext|>.
    Ties between equally frequent pairs go to the pair of lowest token ids, so the result is fixed."""
    n_merges = vocab_size - 257
    if n_merges < 0:
        raise UserError(f"--vocab_size must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
    words = [list(w) for w in word_counts]
    freq = list(word_counts.values())
    pairs, where = Counter(), {}  # pair -> count, pair -> ids of the words containing it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([b]) for b in range(256)]
    merges = []
    while len(merges) < n_merges and heap:
        n, pair = heapq.heappop(heap)
        if -n != pairs.get(pair, 0) or n == 0:
            continue  # a stale heap entry: the pair's count changed since it was pushed
        new = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        merges.append((token_bytes[pair[0]], token_bytes[pair[1]]))
        changed = Counter()
        for i in where.pop(pair):
            w, f, out, j = words[i], freq[i], [], 0
            for p in zip(w, w[1:]):
                changed[p] -= f
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                changed[p] += f
                where.setdefault(p, set()).add(i)
        for p, d in changed.items():
            if d:
                pairs[p] += d
                heapq.heappush(heap, (-pairs[p], p))
        del pairs[pair]
    return merges


def bpe_encoding(merges, name="bpe"):
    """A tiktoken.Encoding from a merge list: bytes are ranks 0-255, merge i is rank 256 + i."""
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in merges:
        ranks.setdefault(a + b, len(ranks))
    return tiktoken.Encoding(name, pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def tokenizer_spec(merges):
    """A JSON-able description of a trained BPE (saved as tokenizer.json and in checkpoints)."""
    return {"type": "bpe", "pattern": GPT2_SPLIT, "special": EOT,
            "merges": [[base64.b64encode(a).decode(), base64.b64encode(b).decode()] for a, b in merges]}


def load_spec(data_dir):
    """The tokenizer description of a prepared dataset: {"type": "gpt2"} or a tokenizer_spec."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    if meta["tokenizer"] == "gpt2":
        return {"type": "gpt2"}
    return json.load(open(os.path.join(data_dir, meta["tokenizer_file"])))


def encoding(spec):
    """The tiktoken.Encoding of a tokenizer description."""
    if spec["type"] == "gpt2":
        return gpt2_encoding()
    return bpe_encoding([(base64.b64decode(a), base64.b64decode(b)) for a, b in spec["merges"]])


def gpt2_encoding():
    """GPT-2's tiktoken encoding. tiktoken downloads its files on first use, so offline they must be in its cache."""
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError):  # requests' connection errors are OSErrors
        raise UserError("GPT-2's tokenizer files could not be fetched (no network?): point TIKTOKEN_CACHE_DIR at a "
                        "folder that holds them, or train a BPE on your text instead with --vocab_size=4096") from None


# -----------------------------------------------------------------------------
# Writing a dataset, atomically: into data_root/.<name>.new, then renamed to data_root/<name> (the
# old one, if any, first renamed to .<name>.old and deleted after). recover() finishes or undoes an
# interrupted swap, under a lock, so a kill at any moment leaves the old dataset or the new one.


def write_tokens(docs, enc, path, dtype, batch_docs=4096):
    """Encode documents (each followed by end-of-text) into a flat binary file; return the token count."""
    try:
        return write_token_file(docs, enc, path, dtype, batch_docs)
    except OSError as e:  # numpy's tofile says "N requested and M written", without the file or errno
        if e.errno is None and shutil.disk_usage(os.path.dirname(path)).free < 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
        raise OSError(e.errno, e.strerror or str(e), path) from None


def write_token_file(docs, enc, path, dtype, batch_docs):
    n, start, batch = 0, time.time(), []
    with open(path, "wb") as f:
        def flush():
            nonlocal n
            for ids in enc.encode_ordinary_batch(batch, num_threads=os.cpu_count()):
                ids.append(enc.eot_token)
                np.array(ids, dtype=dtype).tofile(f)
                n += len(ids)
            batch.clear()

        for doc in docs:
            batch.append(doc)
            if len(batch) == batch_docs:
                flush()
        flush()
        f.flush()
        os.fsync(f.fileno())
    seconds = time.time() - start
    print(f"{os.path.basename(path)}: {n:,} tokens, {n / max(seconds, 1e-9) / 1e6:.2f}M tokens/s")
    return n


def write_json(obj, path, **kwargs):
    guard.write_text(path, json.dumps(obj, **kwargs))


def prepare(out_dir, train_docs, val_docs, source, vocab_size=0):
    """Tokenize train_docs and val_docs (iterables, or callables returning a fresh iterable when the BPE
    trainer needs a first pass) into the dataset folder out_dir, replacing it atomically; return meta."""
    out_dir = os.path.realpath(out_dir)  # a symlinked dataset folder: replace the folder it points to, keep the link
    new, old = partner(out_dir, "new"), partner(out_dir, "old")
    with dataset_lock(out_dir):
        recover(out_dir)
        if os.path.exists(out_dir):
            check_replaceable(out_dir)
            print(f"{out_dir} exists: the new dataset replaces it once complete")
        os.makedirs(new)
        try:
            meta = write_dataset(new, train_docs, val_docs, source, vocab_size)
            with guard.signals_deferred():  # the swap and the old folder's removal are not cut half-way
                if os.path.exists(out_dir):
                    os.rename(out_dir, old)
                os.rename(new, out_dir)
                fsync_dir(os.path.dirname(out_dir))
                recover(out_dir)
        finally:
            with guard.signals_deferred():
                recover(out_dir)  # an interrupted write: drop the partial new dataset, keep the old one
    return meta


def write_dataset(folder, train_docs, val_docs, source, vocab_size):
    """Train the tokenizer if asked, then write train.bin, val.bin, tokenizer.json and meta.json (last) into folder."""
    fresh = lambda docs: docs() if callable(docs) else docs
    meta = {"source": source}
    if vocab_size:
        t = time.time()
        # pre-tokenize and count words in parallel, 256 documents a task; Ctrl-C is the main process's to handle
        with Pool(initializer=guard.worker_signals) as pool:
            counts = Counter()
            for c in pool.imap_unordered(count_words, chunks(fresh(train_docs), 256)):
                counts.update(c)
        merges = train_bpe(counts, vocab_size)
        write_json(tokenizer_spec(merges), os.path.join(folder, "tokenizer.json"))
        enc = bpe_encoding(merges)
        print(f"trained a {enc.n_vocab}-token BPE on {len(counts):,} distinct words in {time.time() - t:.1f}s"
              + (f" (no pair left to merge after {len(merges)} merges)" if enc.n_vocab < vocab_size else ""))
        meta.update(tokenizer="bpe", tokenizer_file="tokenizer.json")
    else:
        enc = gpt2_encoding()
        meta.update(tokenizer="gpt2")
    dtype = np.uint16 if enc.n_vocab <= 1 << 16 else np.uint32
    meta.update(vocab_size=enc.n_vocab, eot_token=enc.eot_token, dtype=np.dtype(dtype).name)
    meta["train_tokens"] = write_tokens(fresh(train_docs), enc, os.path.join(folder, "train.bin"), dtype)
    meta["val_tokens"] = write_tokens(fresh(val_docs), enc, os.path.join(folder, "val.bin"), dtype)
    for split in ("train", "val"):  # train.py draws blocks of block_size + 1 tokens
        check(meta[f"{split}_tokens"] >= MIN_SPLIT_TOKENS,
              f"the {split} split holds {meta[f'{split}_tokens']} token(s), too few to draw one block from: give "
              f"more text" + (" or a larger --val_fraction" if split == "val" else ""))
    write_json(meta, os.path.join(folder, "meta.json"), indent=2)
    fsync_dir(folder)
    return meta


def partner(out_dir, role):
    """data_root/.<name>.new (being written), .<name>.old (being replaced) or .<name>.lock."""
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.{role}")


def recover(out_dir):
    """Undo or finish an interrupted write: drop a partial new dataset; put an old one being replaced back if the
    new one never reached its place, else delete it."""
    new, old = partner(out_dir, "new"), partner(out_dir, "old")
    if os.path.exists(old):
        if os.path.exists(out_dir):
            shutil.rmtree(old)
        else:
            os.rename(old, out_dir)
    if os.path.exists(new):
        shutil.rmtree(new)


def check_replaceable(out_dir):
    """Only a folder of dataset files is replaced whole: anything else in it would be lost."""
    if not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a dataset folder: move it away or pick another --name")
    others = sorted(set(os.listdir(out_dir)) - set(DATASET_FILES))
    if others:
        raise UserError(f"{out_dir} holds files prepare.py did not write ({', '.join(others)}), which replacing it "
                        f"would delete: move them away or pick another --name")


@contextmanager
def dataset_lock(out_dir):
    """One prepare.py at a time per dataset. A POSIX lock: the BPE's worker processes do not inherit it, and
    it goes with the process however that ends."""
    import fcntl  # Unix only: imported here so that train.py and sample.py, which import this module, load anywhere

    with open(partner(out_dir, "lock"), "w") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another prepare.py is writing {out_dir}: wait for it to finish") from None
        yield


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chunks(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# The script


def run(cfg):
    """Check the inputs, get the text and write the dataset, in that order; return (dataset folder, meta)."""
    inputs = [path.strip() for path in cfg["input"].split(",") if path.strip()]
    dataset_name = cfg["name"] or (os.path.splitext(os.path.basename(inputs[0]))[0] if inputs else cfg["corpus"])
    if not re.fullmatch(PLAIN_NAME, dataset_name):  # the name of an input file
        raise UserError(f"the name {dataset_name!r} of {inputs[0]} is not a plain folder name: give the dataset "
                        f"one with --name=NAME")
    if inputs:
        train_docs, val_docs = split_train_val(read_documents(inputs), cfg["val_fraction"])
    if not cfg["vocab_size"]:
        gpt2_encoding()  # offline, fail now: before downloading or creating anything
    if os.path.isfile(cfg["data_root"]):
        raise UserError(f"--data_root={cfg['data_root']} is a file, not a folder")
    try:
        os.makedirs(cfg["data_root"], exist_ok=True)
    except OSError as e:
        raise UserError(f"--data_root={cfg['data_root']} cannot be created ({e.strerror})") from None
    if not inputs:
        downloads = os.path.join(cfg["data_root"], "_downloads")
        os.makedirs(downloads, exist_ok=True)
        train_docs, val_docs, inputs = corpus_documents(cfg["corpus"], cfg["url"], downloads,
                                                        round(cfg["slice_mb"] * 1e6), cfg["val_fraction"])
    out_dir = os.path.join(cfg["data_root"], dataset_name)
    return out_dir, prepare(out_dir, train_docs, val_docs, inputs, cfg["vocab_size"])


def main(argv):
    if "-h" in argv or "--help" in argv:
        print_help(usage(__doc__, defaults(), [__file__]))
        return
    try:
        cfg = configure(argv, defaults())
        check_knobs(cfg)
        with guard.phase("reading and tokenizing the text", "lower --vocab_size or --slice_mb, or split --input"):
            out_dir, meta = run(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        # prepare() left the old dataset or the complete new one; a partial download stays, to resume
        print("interrupted: no partial dataset was left; run the same command again to finish (downloads resume)",
              file=sys.stderr)
        sys.exit(130)
    print(f"{out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']} ({meta['tokenizer']})")


if __name__ == "__main__":
    guard.run_main(main)

"""
Tokenize a text corpus into data/<name>/{train.bin, val.bin, meta.json} for train.py.

    python prepare.py                                    # download TinyStories (V2, GPT-4 stories)
    python prepare.py --vocab_size 4096                  # ... with a BPE tokenizer trained on it
    python prepare.py --input a.txt b.txt --name mine    # local text files instead
    python prepare.py --input ../shared/data/shakespeare.txt --name shakespeare --vocab_size 2048

Documents are separated by <|endoftext|> (as in TinyStories); each is followed by the end-of-text
token in the .bin files. Tokens are uint16 when the vocabulary fits, else uint32. The tokenizer is
GPT-2's (tiktoken), or with --vocab_size a byte-level BPE trained here on the training text with
GPT-2's pre-tokenization, saved as tokenizer.json and loaded back as a tiktoken.Encoding.
"""

import argparse
import base64
import heapq
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from multiprocessing import Pool

import numpy as np
import regex
import tiktoken
from tqdm import tqdm

from configurator import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
EOT = "<|endoftext|>"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
TINYSTORIES_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# -----------------------------------------------------------------------------
# Reading text


def download(url, dest):
    """Fetch url to dest with a progress bar, resuming a partial download (dest + '.part')."""
    if os.path.exists(dest):
        return
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the partial file is already whole
            os.replace(part, dest)
            return
        raise UserError(download_failed(url, f"HTTP {e.code} {e.reason}")) from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(download_failed(url, getattr(e, "reason", e))) from None
    if have and response.status != 206:  # the server ignored the range: start over
        have = 0
    total = have + int(response.headers.get("Content-Length", 0))
    try:
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total or None, initial=have, unit="B", unit_scale=True, desc=os.path.basename(dest)
        ) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise UserError(download_failed(url, e) + " Run the same command again to resume.") from None
    if total and os.path.getsize(part) != total:
        raise UserError(download_failed(url, f"got {os.path.getsize(part)} of {total} bytes")
                        + " Run the same command again to resume.")
    os.replace(part, dest)


def download_failed(url, reason):
    return (f"download of {url} failed ({reason}). Without a network, tokenize local text files "
            f"instead: python prepare.py --input FILE.txt --name NAME")


def read_text(path):
    """The whole of a UTF-8 text file; a missing, empty, binary or non-UTF-8 file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"input file not found: {path}")
    data = open(path, "rb").read()
    if not data.strip():
        raise UserError(f"input file is empty: {path}")
    if b"\x00" in data:
        raise UserError(f"input file looks binary (it contains NUL bytes), not text: {path}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"input file is not UTF-8 text (bad byte at offset {e.start}): {path}") from None


def documents(text):
    """The non-empty documents of a text, split on <|endoftext|>."""
    return [d.strip() for d in text.split(EOT) if d.strip()]


def stream_documents(path, chunk_chars=1 << 24):
    """The documents of a large text file, read a chunk at a time."""
    rest = ""
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(chunk_chars):
            *whole, rest = (rest + chunk).split(EOT)
            yield from (d.strip() for d in whole if d.strip())
    if rest.strip():
        yield rest.strip()


def split_train_val(docs, val_fraction):
    """Hold out the last val_fraction of the documents; a single document is cut at a line break."""
    if len(docs) >= 2:
        n_val = max(1, round(len(docs) * val_fraction))
        return docs[:-n_val], docs[-n_val:]
    text = docs[0]
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
    return [text[:cut]], [text[cut:]]


# -----------------------------------------------------------------------------
# A byte-level BPE trainer (GPT-2 style): counts pre-tokenized words once, then repeatedly merges
# the most frequent adjacent pair, updating only the words that contain it.


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
        return tiktoken.get_encoding("gpt2")
    return bpe_encoding([(base64.b64decode(a), base64.b64decode(b)) for a, b in spec["merges"]])


# -----------------------------------------------------------------------------
# Writing tokens


def write_tokens(docs, enc, path, dtype, batch_docs=4096):
    """Encode documents (each followed by end-of-text) into a flat binary file; return the token count."""
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
    seconds = time.time() - start
    print(f"{path}: {n:,} tokens, {n / max(seconds, 1e-9) / 1e6:.2f}M tokens/s")
    return n


def prepare(out_dir, train_docs, val_docs, source, vocab_size=0):
    """Tokenize train_docs and val_docs (iterables, or callables returning a fresh iterable when
    the BPE trainer needs a first pass) into out_dir; return meta."""
    os.makedirs(out_dir, exist_ok=True)
    fresh = lambda docs: docs() if callable(docs) else docs
    meta = {"source": source}
    if vocab_size:
        t = time.time()
        with Pool() as pool:  # pre-tokenize and count words in parallel, 256 documents a task
            counts = Counter()
            for c in pool.imap_unordered(count_words, chunks(fresh(train_docs), 256)):
                counts.update(c)
        merges = train_bpe(counts, vocab_size)
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            json.dump(tokenizer_spec(merges), f)
        enc = bpe_encoding(merges)
        print(f"trained a {enc.n_vocab}-token BPE on {len(counts):,} distinct words in {time.time() - t:.1f}s")
        meta.update(tokenizer="bpe", tokenizer_file="tokenizer.json")
    else:
        enc = tiktoken.get_encoding("gpt2")
        meta.update(tokenizer="gpt2")
    dtype = np.uint16 if enc.n_vocab <= 1 << 16 else np.uint32
    meta.update(vocab_size=enc.n_vocab, eot_token=enc.eot_token, dtype=np.dtype(dtype).name)
    meta["train_tokens"] = write_tokens(fresh(train_docs), enc, os.path.join(out_dir, "train.bin"), dtype)
    meta["val_tokens"] = write_tokens(fresh(val_docs), enc, os.path.join(out_dir, "val.bin"), dtype)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def chunks(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="local UTF-8 text files instead of downloading TinyStories")
    p.add_argument("--name", help="dataset name: data/<name>/ (default: tinystories, or the first input's name)")
    p.add_argument("--vocab_size", type=int, default=0, help="train a BPE of this size (default: GPT-2's)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of local text held out (default 0.1)")
    p.add_argument("--data_root", default=os.path.join(ROOT, "data"), help="where dataset folders go")
    p.add_argument("--url", default=TINYSTORIES_URL, help="where to download TinyStories from")
    args = p.parse_args(argv)
    try:
        if args.input:
            name = args.name or os.path.splitext(os.path.basename(args.input[0]))[0]
            docs = [d for path in args.input for d in documents(read_text(path))]
            if not docs:
                raise UserError("the input files hold no text besides <|endoftext|> separators")
            train, val = split_train_val(docs, args.val_fraction)
            meta = prepare(os.path.join(args.data_root, name), train, val, args.input, args.vocab_size)
        else:
            name = args.name or "tinystories"
            raw = os.path.join(args.data_root, name, "raw")
            os.makedirs(raw, exist_ok=True)
            paths = {}
            for split, file in TINYSTORIES_FILES.items():
                paths[split] = os.path.join(raw, file)
                download(args.url + file, paths[split])
            meta = prepare(os.path.join(args.data_root, name), lambda: stream_documents(paths["train"]),
                           lambda: stream_documents(paths["val"]),
                           [args.url + f for f in TINYSTORIES_FILES.values()], args.vocab_size)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"data/{name}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']} ({meta['tokenizer']})")


if __name__ == "__main__":
    main()

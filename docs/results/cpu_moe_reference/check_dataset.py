"""Offline check that a local copy of tiny Shakespeare gives the dataset `python prepare.py --corpus=shakespeare
--vocab_size=2048` makes from the download. Serves the file on 127.0.0.1 and prepares it three ways, each into
its own temporary data_root:

  download: prepare.py's main with the user's exact arguments; its one urlopen call, to the real GitHub URL, is
            answered by the local server instead (the URL it asked for is checked)
  url:      --corpus=shakespeare --url=http://127.0.0.1:PORT/  (prepare.py's mirror knob)
  input:    --input=FILE --name=shakespeare

then prints each file's sha256 and which files match the download route's.

    python docs/results/cpu_moe_reference/check_dataset.py input.txt
"""

import functools
import hashlib
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402

SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # char-rnn's input.txt, 1,115,394 bytes
FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def serve(folder):
    """An HTTP server on 127.0.0.1 (a free port) serving folder, in a daemon thread; returns its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


def prepare_in(data_root, argv, redirect_to=None):
    """prepare.main(argv + --data_root), with urlopen's requests for the real URL sent to redirect_to."""
    real = prepare.CORPORA["shakespeare"][0]
    urlopen = urllib.request.urlopen

    def redirected(request, *args, **kwargs):
        assert request.full_url == real, f"prepare.py asked for {request.full_url}, not {real}"
        return urlopen(urllib.request.Request(redirect_to, headers=dict(request.headers)), *args, **kwargs)

    if redirect_to:
        urllib.request.urlopen = redirected
    try:
        prepare.main([*argv, f"--data_root={data_root}"])
    finally:
        urllib.request.urlopen = urlopen
    return os.path.join(data_root, "shakespeare")


def main(path):
    print(f"{path}: {os.path.getsize(path):,} bytes, sha256 {sha256(path)}"
          + (" (char-rnn's)" if sha256(path) == SHA256 else f" (NOT char-rnn's {SHA256})"))
    with tempfile.TemporaryDirectory() as tmp:
        served = os.path.join(tmp, "served")
        os.makedirs(served)
        shutil.copy(path, os.path.join(served, "input.txt"))
        base = serve(served)
        bpe = ["--vocab_size=2048"]
        routes = {
            "download": prepare_in(os.path.join(tmp, "a"), ["--corpus=shakespeare", *bpe], base + "input.txt"),
            "url": prepare_in(os.path.join(tmp, "b"), ["--corpus=shakespeare", f"--url={base}", *bpe]),
            "input": prepare_in(os.path.join(tmp, "c"), [f"--input={path}", "--name=shakespeare", *bpe]),
        }
        print()
        for name, folder in routes.items():
            print(f"{name:9s}" + "  ".join(f"{f} {sha256(os.path.join(folder, f))[:12]}" for f in FILES))
        for name in ("url", "input"):
            same = [f for f in FILES if sha256(os.path.join(routes[name], f)) ==
                    sha256(os.path.join(routes["download"], f))]
            print(f"{name} route: {', '.join(same) or 'no file'} identical to the download route's")
        for name, folder in routes.items():
            print(f"{name} meta.json source: {json.load(open(os.path.join(folder, 'meta.json')))['source']}")
        print("download route meta.json:", open(os.path.join(routes["download"], "meta.json")).read())


if __name__ == "__main__":
    main(sys.argv[1])

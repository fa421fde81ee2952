"""
Sample text from a trained model, or show which experts the tokens of a prompt are routed to.

    python sample.py --out_dir=out/cpu_moe --start="ROMEO:"
    python sample.py --out_dir=out/cpu_moe --start="ROMEO: What light" --show_routing=True --layer=2
    python sample.py --help    # every knob, its default and what it does
"""

import guard  # isort: skip  (first: from here on a Ctrl-C or SIGTERM exits quietly, never a traceback)

import math
import sys
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

import torch

from configurator import UserError, check, configure, print_help, usage
from model import GPT, GPTConfig
from moe_kernels import grouped_note
from prepare import encoding
from runtime import check_device, load_checkpoint, load_weights, pick_device, set_threads

# -----------------------------------------------------------------------------
out_dir = "out"  # the run whose out_dir/ckpt.pt to load
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 3  # samples to draw
max_new_tokens = 200  # tokens per sample
temperature = 0.8  # > 0; < 1 sharper, > 1 more random
top_k = 200  # sample among the k most likely tokens only; 0: all
use_cache = True  # keep the keys and values of earlier positions (KV cache); False: rerun the whole context per token
threads = 0  # CPU threads of torch (torch.set_num_threads); 0: torch's default (OMP_NUM_THREADS)
seed = 1337  # of the sampling, so that the same command draws the same text (0 to 2**63 - 1)
device = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device like "cpu", "cuda:1"
show_routing = False  # instead of sampling, print the experts each prompt token goes to in `layer`
layer = 0  # which MoE layer --show_routing shows
# -----------------------------------------------------------------------------
KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def check_knobs(cfg):
    """The valid range of every knob above, checked before the checkpoint is loaded (layer: once it is)."""
    check(cfg.out_dir != "", "out_dir must name the folder of a run")
    check(cfg.num_samples >= 1, f"num_samples must be at least 1, got {cfg.num_samples}")
    check(cfg.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {cfg.max_new_tokens}")
    check(0 < cfg.temperature < math.inf, f"temperature must be a positive finite number, got {cfg.temperature}")
    check(cfg.top_k >= 0, f"top_k must be >= 0 (0: all tokens), got {cfg.top_k}")
    check(0 <= cfg.seed < 2**63, f"seed must be a whole number from 0 to 2**63 - 1, got {cfg.seed}")
    check(cfg.layer >= 0, f"layer must be >= 0, got {cfg.layer}")
    check(cfg.threads >= 0, f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    check_device(cfg.device)


def load_model(out_dir, device):
    """(model, tokenizer) from out_dir/ckpt.pt."""
    path = f"{out_dir}/ckpt.pt"
    state = load_checkpoint(path)
    model = GPT(GPTConfig(**state["model_args"]))
    load_weights(model, state, path)
    try:
        tokenizer = encoding(state["tokenizer"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path} is not a tinymoe checkpoint: its tokenizer cannot be built ({type(e).__name__}: "
                        f"{e})") from None
    return model.to(device).eval(), tokenizer


def routing(model, idx, layer):
    """For MoE layer `layer`: the experts (T, K) each token of idx (1, T) goes to, and their weights
    (0 for a slot dropped over capacity)."""
    if not model.moe_layers:
        raise UserError("this checkpoint is a dense model: it has no routing to show")
    if not 0 <= layer < len(model.moe_layers):
        raise UserError(f"layer must be between 0 and {len(model.moe_layers) - 1}, got {layer}")
    moe = model.moe_layers[layer]
    inputs = []  # the MoE block's input, (1, T, C), caught on its way in
    hook = moe.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        model(idx)
        hook.remove()
        x = inputs[0].reshape(-1, inputs[0].size(-1))  # (T, C)
        _, _, weights, experts = moe.route(x)  # (T, K), (T, K)
        if moe.config.capacity_factor > 0:
            weights = weights * moe.within_capacity(experts, weights)
    return experts, weights


def print_routing(tokens, experts, weights, layer, n_experts):
    print(f"MoE layer {layer}: each token's experts (weight)")
    by_expert = defaultdict(Counter)  # expert -> how often each token text has it as first choice
    for text, chosen, chosen_weights in zip(tokens, experts.tolist(), weights.tolist()):
        print(f"  {text!r:>16} -> " + ", ".join(f"e{e} ({w:.2f})" for e, w in zip(chosen, chosen_weights)))
        by_expert[chosen[0]][text] += 1
    print("tokens whose first choice each expert is:")
    for e in range(n_experts):
        common = ", ".join(repr(t) for t, _ in by_expert[e].most_common(12))
        print(f"  e{e}: {sum(by_expert[e].values())} tokens: {common}")


class Stream:
    """Prints a sample as it is generated (GPT.generate's on_token): the text decoded so far, less what is
    already shown, held back while it ends in a partial character (a byte-level BPE token may hold part of one)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.shown = tokenizer, ""

    def __call__(self, idx):  # idx (1, T): the prompt and the tokens sampled so far
        text = self.tokenizer.decode(idx[0].tolist())
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def end(self, idx):
        """The rest of the sample, and the line that ends it."""
        text = self.tokenizer.decode(idx[0].tolist())
        print(text[len(self.shown):] if text.startswith(self.shown) else f"\n{text}")


def read_prompt(start):
    """The prompt: start itself, or with "FILE:" the UTF-8 text of that file."""
    if not start.startswith("FILE:"):
        return start
    try:
        return open(start[5:], encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"cannot read the prompt file {start[5:]}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt file {start[5:]} is not UTF-8 text (bad byte at offset {e.start})") from None


def main(argv):
    if "-h" in argv or "--help" in argv:
        print_help(usage(__doc__, {k: globals()[k] for k in KEYS}, [__file__]))
        return
    try:
        cfg = SimpleNamespace(**configure(argv, {k: globals()[k] for k in KEYS}))
        check_knobs(cfg)
        prompt = read_prompt(cfg.start)
        device = pick_device(cfg.device)
        threads_line = set_threads(cfg.threads)
        with guard.phase("loading the model", "sample on --device=cpu, or on a machine with more memory"):
            model, tokenizer = load_model(cfg.out_dir, device)
        if note := grouped_note(model.config, torch.device(device), torch.float32, compiled=False):
            print(note)  # a checkpoint trained with moe_impl=grouped, sampled where grouped_mm cannot run
        ids = tokenizer.encode(prompt, allowed_special="all")
        if not ids:
            raise UserError("the prompt is empty")
        if len(ids) > model.config.block_size:  # the model sees block_size tokens at most
            print(f"note: the prompt has {len(ids)} tokens, more than block_size {model.config.block_size}: "
                  f"its first {len(ids) - model.config.block_size} tokens were cropped", file=sys.stderr)
            ids = ids[-model.config.block_size:]
        idx = torch.tensor([ids], device=device)
        if cfg.show_routing:
            experts, weights = routing(model, idx, cfg.layer)
            print_routing([tokenizer.decode([i]) for i in ids], experts, weights, cfg.layer, model.config.n_experts)
            return
        if torch.device(device).type == "cpu":
            print(threads_line, file=sys.stderr)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        for _ in range(cfg.num_samples):  # each streamed as it is sampled
            stream = Stream(tokenizer)
            stream(idx)  # the prompt
            out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.use_cache, stream)
            stream.end(out)
            print("---------------")
        tokens_per_s = cfg.num_samples * cfg.max_new_tokens / (time.perf_counter() - t0)
        print(f"{tokens_per_s:.1f} tokens/s on {device}, {'with' if cfg.use_cache else 'without'} the KV cache")
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    guard.run_main(main)

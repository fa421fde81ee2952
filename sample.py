"""
Sample text from a trained model, or show which experts the tokens of a prompt are routed to.

    python sample.py --out_dir=out/cpu_moe --start="ROMEO:"
    python sample.py --out_dir=out/cpu_moe --start="ROMEO: What light" --show_routing=True --layer=2
"""

import sys
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

import torch

from configurator import UserError, configure
from model import GPT, GPTConfig
from prepare import encoding
from runtime import load_checkpoint, load_weights, pick_device

# -----------------------------------------------------------------------------
out_dir = "out"  # the run whose out_dir/ckpt.pt to load
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 3  # samples to draw
max_new_tokens = 200  # tokens per sample
temperature = 0.8  # < 1 sharper, > 1 more random
top_k = 200  # sample among the k most likely tokens only; 0: all
use_cache = True  # keep the keys and values of earlier positions (KV cache); False: rerun the whole context per token
seed = 1337
device = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device like "cpu", "cuda:1"
show_routing = False  # instead of sampling, print the experts each prompt token goes to in `layer`
layer = 0  # which MoE layer --show_routing shows
# -----------------------------------------------------------------------------
KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def load_model(out_dir, device):
    """(model, tokenizer) from out_dir/ckpt.pt."""
    state = load_checkpoint(f"{out_dir}/ckpt.pt")
    model = GPT(GPTConfig(**state["model_args"]))
    load_weights(model, state, f"{out_dir}/ckpt.pt")
    return model.to(device).eval(), encoding(state["tokenizer"])


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


def main(argv):
    try:
        cfg = SimpleNamespace(**configure(argv, {k: globals()[k] for k in KEYS}))
        device = pick_device(cfg.device)
        model, tokenizer = load_model(cfg.out_dir, device)
        prompt = cfg.start
        if prompt.startswith("FILE:"):
            try:
                prompt = open(prompt[5:], encoding="utf-8").read()
            except OSError as e:
                raise UserError(f"cannot read the prompt file {prompt[5:]}: {e.strerror}") from None
        ids = tokenizer.encode(prompt, allowed_special="all")[-model.config.block_size:]
        if not ids:
            raise UserError("the prompt is empty")
        idx = torch.tensor([ids], device=device)
        if cfg.show_routing:
            experts, weights = routing(model, idx, cfg.layer)
            print_routing([tokenizer.decode([i]) for i in ids], experts, weights, cfg.layer, model.config.n_experts)
            return
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        for _ in range(cfg.num_samples):
            out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.use_cache)
            print(tokenizer.decode(out[0].tolist()))
            print("---------------")
        tokens_per_s = cfg.num_samples * cfg.max_new_tokens / (time.perf_counter() - t0)
        print(f"{tokens_per_s:.1f} tokens/s on {device}, {'with' if cfg.use_cache else 'without'} the KV cache")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])

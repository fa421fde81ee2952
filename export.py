"""
Export a trained checkpoint to a Hugging Face transformers folder (config.json, weights in
safetensors, tokenizer files) that AutoModelForCausalLM and AutoTokenizer.from_pretrained load.

    python export.py --out_dir=out/cpu_moe --to=hf/cpu_moe
    python -c "from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('hf/cpu_moe'))"

Only exact counterparts are written, and each export is checked: the folder is loaded back with
transformers and its logits compared with tinymoe's before it is moved into place.

    tinymoe model                                             transformers class
    dense                                                     LlamaForCausalLM
    softmax router, renormalised top-k, experts of one size   MixtralForCausalLM
    sigmoid router (with or without the aux_free selection    Glm4MoeForCausalLM: DeepSeek-V3's MoE block
    bias, renormalised or not, with or without shared            (one group, routed scaling 1, no dense first
    experts), experts of one size                                 layers) with ordinary multi-head attention

Refused, with the reason: capacity_factor > 0 (transformers never drops tokens), experts of unequal
sizes, softmax without renormalisation (OLMoE, the class for it, normalises queries and keys),
softmax with shared experts or with the aux_free bias. DeepseekV3ForCausalLM itself cannot hold
tinymoe's attention: its multi-head latent attention normalises a key/value latent (kv_a_layernorm)
and shares one rotary key across heads.

Beside the weights, what makes the folder behave like a GPT-2-tokenizer model from the Hub:
- the tokenizer pads with end-of-text, on the left, so generate() on a padded batch and
  pipeline("text-generation") with several prompts give each prompt its unbatched continuation. The
  model's config has no pad_token_id: transformers would make it the embedding's padding_idx, whose row
  fine-tuning then never updates. The price of pad = end-of-text, as for GPT-2: transformers'
  DataCollatorForLanguageModeling sets the label of every end-of-text to -100 (ignored), real ones
  included, so a model fine-tuned through it never learns to end a text; mask labels by attention_mask.
- generation_config.json holds sample.py's defaults: do_sample=True, temperature=0.8, top_k=200,
  max_new_tokens=200, with end-of-text as eos and pad. Unlike sample.py, generate() stops at
  end-of-text, and past block_size tokens it does not slide a window over the text: it goes on at
  positions the model was never trained on.

Fine-tuning the export in transformers does not optimise tinymoe's training loss:
- config.output_router_logits is False (as in Mixtral's own configs): model(ids, labels=ids) returns
  the cross-entropy alone, without any load-balancing loss. Pass output_router_logits=True (or set it in
  the config) to add router_aux_loss_coef * aux_loss.
- router_aux_loss_coef = aux_loss_coef / top_k. For each expert e of layer l, let f_le be its share of
  the N*K slots (the shares sum to 1) and P_le its mean router probability over the N tokens. tinymoe
  adds aux_loss_coef * mean_l E * sum_e f_le * P_le (Switch's loss per layer, averaged over layers).
  transformers (load_balancing_loss_func) first pools the layers: its shares are of the N tokens, so
  they sum to K, and it adds router_aux_loss_coef * E * sum_e (K * mean_l f_le) * (mean_l P_le). Since
  mean(f P) = mean(f) mean(P) + cov(f, P),
      transformers' term = tinymoe's - aux_loss_coef * E * sum_e cov_l(f_le, P_le)
  with cov_l the covariance over the MoE layers. With one MoE layer the two are equal, and so are their
  gradients. With several they are not, and no coefficient can make them so: the difference depends on
  the batch, and each layer's router is pushed by the pooled shares instead of its own layer's. Measured
  on cpu_moe (4 layers, top_k=2) trained 600 steps: transformers' loss is 1.988 to 1.991 times tinymoe's
  on batches of Shakespeare, not 2, so the weighted term is 0.5-0.6% below tinymoe's.
- transformers has no router z-loss (tinymoe's z_loss_coef), and Glm4MoeForCausalLM no balancing at
  all: no aux loss, and nothing updates e_score_correction_bias as tinymoe's aux_free rule does.

transformers stays optional: only this script needs it. Supported: transformers 5.24.0 with
safetensors 0.8.0 (the versions CI pins), whose MoE classes keep experts stacked (in memory) as
gate_up_proj (E, 2H, C) and down_proj (E, C, H).
"""

import guard  # isort: skip  (first: from here on a Ctrl-C or SIGTERM exits quietly, never a traceback)

import glob
import os
import shutil
import sys
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import sample  # its sampling defaults become generate()'s
from configurator import UserError, configure, print_help, usage
from model import GPT, GPTConfig
from prepare import encoding
from runtime import load_checkpoint, load_weights

INSTALL_HINT = "pip install transformers==5.24.0 safetensors==0.8.0"
CHECK_TOLERANCE = 1e-3  # max |logits difference| (float32) above which the export is a bug, not rounding

# -----------------------------------------------------------------------------
out_dir = "out"  # the run whose out_dir/ckpt.pt to export
to = ""  # the folder to write; "": out_dir/hf
overwrite = False  # replace the files of an earlier export in `to`
# -----------------------------------------------------------------------------
KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and k.islower()
        and isinstance(v, (int, float, bool, str))]


def load_model(path):
    """(GPT with the checkpoint's weights, its tokenizer description) from a train.py checkpoint."""
    state = load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**state["model_args"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} does not describe a model this tinymoe can build ({type(e).__name__}: {e})") from None
    load_weights(model, state, path)
    return model.eval(), state["tokenizer"]


# -----------------------------------------------------------------------------
# Which transformers class, if any, computes exactly what tinymoe computes


def hf_target(cfg):
    """'llama', 'mixtral' or 'glm4_moe' for a GPTConfig, or UserError saying why there is none."""
    if cfg.n_experts == 0:
        return "llama"
    if cfg.capacity_factor > 0:
        raise UserError(f"capacity_factor={cfg.capacity_factor} drops the slots over an expert's capacity; "
                        f"transformers' MoE classes never drop tokens, so no class computes this model")
    if len(set(cfg.expert_sizes)) > 1:
        raise UserError(f"expert_groups={cfg.expert_groups} makes experts of unequal sizes; every transformers "
                        f"MoE class has experts of one size")
    if cfg.router_score == "sigmoid":
        if cfg.n_experts < 2:
            raise UserError("router_score='sigmoid' with n_experts=1: DeepSeek-V3's router ranks expert groups by "
                            "their two best scores and needs n_experts >= 2")
        return "glm4_moe"
    if cfg.balance == "aux_free":
        raise UserError("balance='aux_free' under router_score='softmax': no transformers class adds a selection "
                        "bias to softmax scores (DeepSeek-V3 and GLM-4.5 add it to sigmoid scores)")
    if cfg.n_shared_experts > 0:
        raise UserError(f"n_shared_experts={cfg.n_shared_experts} under router_score='softmax': Mixtral has no "
                        f"shared experts and the DeepSeek-V3 MoE block routes by sigmoid")
    if not cfg.norm_topk_prob:
        raise UserError("norm_topk_prob=False under router_score='softmax': Mixtral renormalises the top-k weights, "
                        "and OLMoE, which does not, normalises queries and keys (q_norm, k_norm), which no "
                        "weights can undo")
    return "mixtral"


def hf_config(transformers, cfg, target, eot):
    """The transformers config of the target class that describes cfg; eot (end-of-text) is bos and eos.
    No pad_token_id here (the tokenizer and generation_config have it): the model classes would make it their
    embedding's padding_idx, and fine-tuning would then never update end-of-text's embedding."""
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, bos_token_id=eot, eos_token_id=eot,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    if target == "llama":
        return transformers.LlamaConfig(intermediate_size=cfg.ffn_hidden, mlp_bias=False, **common)
    if target == "mixtral":
        # transformers' shares of each expert are of the N tokens (they sum to top_k), tinymoe's of the N*K
        # slots (sum 1): / top_k makes the weighted loss tinymoe's for ONE MoE layer; for several, see the docstring
        aux = cfg.aux_loss_coef / cfg.top_k if cfg.balance == "switch" else 0.0
        return transformers.MixtralConfig(
            intermediate_size=cfg.expert_sizes[0], num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=aux, router_jitter_noise=0.0, sliding_window=None, **common)
    common["rope_parameters"]["partial_rotary_factor"] = 1.0  # GLM-4.5 rotates half of each head by default
    return transformers.Glm4MoeConfig(
        intermediate_size=cfg.expert_sizes[0], moe_intermediate_size=cfg.expert_sizes[0],
        n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, n_shared_experts=shared_units(cfg),
        norm_topk_prob=cfg.norm_topk_prob, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        first_k_dense_replace=0, use_qk_norm=False, num_mtp_layers=0, **common)


def hf_generation_config(transformers, eot):
    """generate()'s defaults: sample.py's, with end-of-text as eos (generation stops there) and as pad."""
    return transformers.GenerationConfig(
        do_sample=True, temperature=sample.temperature, top_k=sample.top_k, max_new_tokens=sample.max_new_tokens,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)


def shared_units(cfg):
    """GLM-4.5/DeepSeek-V3 size their fused shared experts in multiples of the routed expert's hidden
    size H: tinymoe's n_shared_experts * shared_expert_hidden, rounded up to a multiple of H."""
    return -(-cfg.n_shared_experts * cfg.shared_expert_hidden // cfg.expert_sizes[0])


# -----------------------------------------------------------------------------
# The weight mapping. nn.Linear weights are (out, in) on both sides; C = n_embd, H = expert hidden,
# E = n_experts, V = vocab_size; transformers' names are those of its modules in memory (5.24).
#
#   tinymoe (model.py)                           transformers
#   wte.weight (V, C)                            model.embed_tokens.weight (V, C)
#   blocks.i.attn_norm.weight (C,)               model.layers.i.input_layernorm.weight
#   blocks.i.attn.wqkv.weight (3C, C)            ...self_attn.q_proj / k_proj / v_proj.weight (C, C): its row thirds
#   blocks.i.attn.wo.weight (C, C)               ...self_attn.o_proj.weight
#   blocks.i.ffn_norm.weight (C,)                ...post_attention_layernorm.weight
#   dense  blocks.i.mlp.w1 / w3 / w2.weight      ...mlp.gate_proj / up_proj / down_proj.weight
#   MoE    blocks.i.mlp.router.weight (E, C)     ...mlp.gate.weight (E, C)
#          mlp.experts.w1, w3 (E, C, H), x @ W   ...mlp.experts.gate_up_proj (E, 2H, C), W @ x: [w1^T; w3^T]
#          mlp.experts.w2 (E, H, C)              ...mlp.experts.down_proj (E, C, H) = w2^T
#          mlp.expert_bias (E,) (aux_free)       ...mlp.gate.e_score_correction_bias (E,) (GLM-4.5; else zeros)
#          mlp.shared.w1 / w3 / w2.weight        ...mlp.shared_experts.gate_proj / up_proj / down_proj.weight,
#                                                   zero-padded to a multiple of H units (see shared_units)
#   norm.weight (C,)                             model.norm.weight
#   lm_head.weight (V, C) (wte's when tied)      lm_head.weight
#
# Rotary embeddings need no permutation of q and k: tinymoe rotates the pairs (x_j, x_{j+hs/2}) of
# each head (half-split), as transformers' rotate_half does, with the same frequencies
# theta^(-2j/hs). save_pretrained writes each expert as its own weights (experts.e.w1 / w3 / w2
# for Mixtral, experts.e.gate_proj / up_proj / down_proj for GLM-4.5), the layout on the Hub.


def hf_state_dict(model, target):
    """model's weights under the names and in the layouts of the target class (the table above)."""
    cfg = model.config
    C = cfg.n_embd
    sd = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.wqkv.weight.split(C)  # (C, C) each
        sd.update({p + "input_layernorm.weight": block.attn_norm.weight,
                   p + "post_attention_layernorm.weight": block.ffn_norm.weight,
                   p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": block.attn.wo.weight})
        mlp = block.mlp
        if target == "llama":
            sd.update({p + "mlp.gate_proj.weight": mlp.w1.weight, p + "mlp.up_proj.weight": mlp.w3.weight,
                       p + "mlp.down_proj.weight": mlp.w2.weight})
            continue
        w1, w3, w2 = mlp.experts.stacked()  # (E, C, H), (E, C, H), (E, H, C)
        sd.update({p + "mlp.gate.weight": mlp.router.weight,
                   p + "mlp.experts.gate_up_proj": torch.cat((w1, w3), dim=2).transpose(1, 2),  # (E, 2H, C)
                   p + "mlp.experts.down_proj": w2.transpose(1, 2)})  # (E, C, H)
        if target == "glm4_moe":
            bias = mlp.expert_bias if cfg.balance == "aux_free" else torch.zeros_like(mlp.expert_bias)
            sd[p + "mlp.gate.e_score_correction_bias"] = bias
            # zero units add exactly nothing: silu(0) * 0 = 0, through zero columns of down_proj
            width = shared_units(cfg) * cfg.expert_sizes[0]
            if mlp.shared is None:
                g, u, d = torch.zeros(0, C), torch.zeros(0, C), torch.zeros(C, 0)
            else:
                g, u, d = mlp.shared.w1.weight, mlp.shared.w3.weight, mlp.shared.w2.weight
            pad = width - g.shape[0]
            sd.update({p + "mlp.shared_experts.gate_proj.weight": F.pad(g, (0, 0, 0, pad)),
                       p + "mlp.shared_experts.up_proj.weight": F.pad(u, (0, 0, 0, pad)),
                       p + "mlp.shared_experts.down_proj.weight": F.pad(d, (0, pad))})
    return {name: t.detach().contiguous() for name, t in sd.items()}


# -----------------------------------------------------------------------------
# The tokenizer: tiktoken's byte-level BPE (GPT-2's, or prepare.py's) as a `tokenizers` BPE


def hf_tokenizer(transformers, enc, block_size):
    """A transformers tokenizer that encodes as the tiktoken.Encoding enc does (allowed_special="all").

    tiktoken merges, inside each pre-tokenized piece, the adjacent pair whose concatenation has the
    lowest rank, and takes a piece that is a whole token as it is. `tokenizers` merges by a list of
    pairs: every split (a, b) of every token into two tokens, ordered by the rank of a + b, and
    ignore_merges for whole pieces, give the same tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # tiktoken keeps its constructor's arguments: the ranks, the split pattern, the special tokens
    ranks, pattern, specials = enc._mergeable_ranks, enc._pat_str, enc._special_tokens
    byte_char = bytes_to_unicode()  # byte-level BPE spells each byte as a printable character
    spell = lambda token: "".join(byte_char[b] for b in token)
    merges = sorted((rank, ranks[token[:j]], ranks[token[j:]], spell(token[:j]), spell(token[j:]))
                    for token, rank in ranks.items() for j in range(1, len(token))
                    if token[:j] in ranks and token[j:] in ranks)
    vocab = {**{spell(token): rank for token, rank in ranks.items()}, **specials}
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    eot = "<|endoftext|>"
    # no pad token of its own: end-of-text pads, on the left so that each row's last token is its prompt's
    # last (GPT-2's convention on the Hub); the attention mask keeps the pads out of every real token's view
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot,
                                                padding_side="left", model_max_length=block_size)


# -----------------------------------------------------------------------------


def import_transformers():
    try:
        import safetensors  # noqa: F401  (save_pretrained writes safetensors through it)
        import transformers
    except ImportError:
        raise UserError(f"export.py needs transformers and safetensors: {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    # torch warns when GLM-4.5's zero-width shared experts (a model without them) are initialised
    warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
    transformers.utils.logging.disable_progress_bar()
    return transformers


def summary(cfg, target, eot):
    """What the export does beyond the logits, printed after it: generate()'s defaults, and how fine-tuning it
    in transformers differs from training in tinymoe (the docstring says why)."""
    lines = [f"generate(): sample.py's defaults (do_sample=True, temperature={sample.temperature}, "
             f"top_k={sample.top_k}, max_new_tokens={sample.max_new_tokens}), stops at end-of-text (id {eot}); "
             f"the tokenizer pads with end-of-text, on the left"]
    if target == "mixtral" and cfg.balance == "switch":
        exact = ("exact (one MoE layer)" if cfg.n_layer == 1 else  # every layer of a Mixtral is MoE
                 f"exact for one MoE layer only: over these {cfg.n_layer} transformers pools the layers' counts and "
                 f"probabilities before the product, tinymoe averages per-layer losses (see export.py's docstring)")
        lines += [f"fine-tuning: router_aux_loss_coef = aux_loss_coef / top_k = {cfg.aux_loss_coef / cfg.top_k:g}, "
                  f"{exact}",
                  "fine-tuning: output_router_logits is False in config.json, so model(..., labels=...) returns the "
                  "cross-entropy alone, without the load-balancing loss, unless output_router_logits=True"]
    if target == "glm4_moe":
        lines.append("fine-tuning: Glm4MoeForCausalLM has no load-balancing loss, and nothing updates "
                     "e_score_correction_bias (the aux_free bias) as tinymoe's training does")
    if cfg.n_experts > 0 and cfg.z_loss_coef > 0:
        lines.append(f"fine-tuning: transformers has no router z-loss (tinymoe's z_loss_coef={cfg.z_loss_coef:g})")
    return lines


def current_umask():
    mask = os.umask(0o022)  # reading the umask means setting it
    os.umask(mask)
    return mask


@torch.no_grad()
def max_logits_diff(model, hf_model, idx):
    """max |tinymoe logits - transformers logits| over every position of idx (B, T)."""
    ours, _, _ = model(idx, targets=idx)  # with targets GPT returns every position's logits, not only the last
    return (ours - hf_model(idx).logits).abs().max().item()


def export(out_dir, to, overwrite=False):
    """Write out_dir/ckpt.pt as a transformers folder `to`; return (class name, max logits difference,
    the summary's lines)."""
    model, spec = load_model(os.path.join(out_dir, "ckpt.pt"))
    cfg = model.config
    target = hf_target(cfg)  # refuses before transformers is even needed
    transformers = import_transformers()
    to = to or os.path.join(out_dir, "hf")
    if os.path.isdir(to) and os.listdir(to) and not overwrite:
        raise UserError(f"{to} is not empty: choose another --to, or replace its files with --overwrite=True")
    parent = os.path.dirname(os.path.abspath(to))
    try:  # before the minutes of building and checking the export
        guard.check_writable(parent)
    except OSError as e:
        raise UserError(f"cannot write {to}: {e.strerror}") from None
    for stale in glob.glob(f"{glob.escape(to.rstrip(os.sep))}.tmp[0-9]*"):  # of a killed export (its pid gone)
        pid = stale.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not guard.alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    enc = encoding(spec)
    config = hf_config(transformers, cfg, target, enc.eot_token)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf_model.generation_config = hf_generation_config(transformers, enc.eot_token)
    try:
        hf_model.load_state_dict(hf_state_dict(model, target), strict=True)
    except RuntimeError as e:
        raise UserError(f"transformers {transformers.__version__} lays out {type(hf_model).__name__} differently "
                        f"({str(e).splitlines()[1].strip()}); export.py supports: {INSTALL_HINT}") from None

    # write into a temporary folder beside `to`, load it back, compare, then move the files into place
    tmp = f"{to.rstrip(os.sep)}.tmp{os.getpid()}"
    try:
        hf_model.save_pretrained(tmp)
        hf_tokenizer(transformers, enc, cfg.block_size).save_pretrained(tmp)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        idx = torch.randint(cfg.vocab_size, (2, min(cfg.block_size, 64)), generator=torch.Generator().manual_seed(0))
        diff = max_logits_diff(model, loaded, idx)
        if not diff <= CHECK_TOLERANCE:
            raise UserError(f"the exported {type(loaded).__name__} computes logits {diff:.2e} away from tinymoe's "
                            f"(transformers {transformers.__version__}); nothing written. Please report this")
        os.makedirs(to, exist_ok=True)
        mode = 0o666 & ~current_umask()  # safetensors writes its file 0600: give every file a new file's mode
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), mode)
            os.replace(os.path.join(tmp, name), os.path.join(to, name))
    except OSError as e:
        raise UserError(f"could not write {to}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return type(loaded).__name__, diff, summary(cfg, target, enc.eot_token)


def main(argv):
    defaults = {k: globals()[k] for k in KEYS}
    if "-h" in argv or "--help" in argv:
        print_help(usage(__doc__, defaults, [__file__]))
        return
    try:
        cfg = SimpleNamespace(**configure(argv, defaults))
        name, diff, notes = export(cfg.out_dir, cfg.to, cfg.overwrite)
        print(f"wrote {cfg.to or os.path.join(cfg.out_dir, 'hf')}: {name}, loaded back by transformers, "
              f"max |logits difference| {diff:.1e} against tinymoe (float32)")
        print("\n".join(f"  {line}" for line in notes))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    guard.run_main(main)

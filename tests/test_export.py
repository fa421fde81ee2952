"""export.py: checkpoints become transformers models (Llama, Mixtral, GLM-4.5) that compute the same
logits and greedy generations, with tokenizers that encode as tiktoken does; the rest is refused
with one line."""

import importlib.util
import os
import sys
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT, TINY_MOE, corpus_text, needs_gpt2, one_line_error, run_script

import export
import prepare
import runtime
import train
from configurator import UserError, configure
from model import GPT, GPTConfig, model_fields

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason=f"transformers is not installed ({export.INSTALL_HINT})")
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=48)
KINDS = {  # name: (GPTConfig overrides, the transformers class it must become)
    "dense": (dict(tie_embeddings=False), "LlamaForCausalLM"),
    "mixtral": (dict(n_experts=4, top_k=2, expert_hidden=48, aux_loss_coef=0.02), "MixtralForCausalLM"),
    # two groups of one size are experts of one size
    "mixtral_groups": (dict(expert_groups=((2, 40), (2, 40)), top_k=1), "MixtralForCausalLM"),
    # 1 x 40 shared units are padded with zeros to 1 x 48 (GLM sizes them in multiples of the expert's 48)
    "sigmoid_auxfree_shared": (dict(n_experts=4, top_k=2, expert_hidden=48, router_score="sigmoid",
                                    balance="aux_free", n_shared_experts=1, shared_expert_hidden=40,
                                    norm_topk_prob=False), "Glm4MoeForCausalLM"),
    "sigmoid_renorm": (dict(n_experts=6, top_k=3, expert_hidden=32, router_score="sigmoid",
                            tie_embeddings=False), "Glm4MoeForCausalLM"),
}
PROMPTS = ["ROMEO: What light", "First Citizen:\nWe are accounted poor", "the king"]


@pytest.fixture(scope="module")
def bpe_spec():
    docs = prepare.documents(corpus_text(100_000))
    return prepare.tokenizer_spec(prepare.train_bpe(prepare.count_words(docs), 400))


def save_checkpoint(path, model, spec):
    """A checkpoint as train.py writes it (export.py reads model_args, model and tokenizer; the rest describe
    a run that was never trained)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"format": runtime.CHECKPOINT_FORMAT, "model_args": asdict(model.config), "tokenizer": spec,
                "model": model.state_dict(), "config": {}, "dataset_vocab_size": model.config.vocab_size,
                "optimizer": {}, "data_rng": [], "iter_num": 0, "best_val_loss": float("inf"), "evaluated_iter": -1,
                "skipped_steps": 0}, path)


def tiny_model(vocab_size, **overrides):
    """A random model whose routing is decisive (a strong router, a large random aux_free bias), so
    that a mapping that dropped the bias or swapped experts could not pass unnoticed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, **{**TINY, **overrides}))
    for moe in model.moe_layers:
        torch.nn.init.normal_(moe.router.weight, std=0.5)
        if moe.config.balance == "aux_free":
            moe.expert_bias.normal_(std=0.3)
    return model.eval()


# -----------------------------------------------------------------------------
# what maps and what is refused (no transformers needed)


def shipped(name, vocab_size=2048):
    cfg = configure([os.path.join(ROOT, "config", name), f"--vocab_size={vocab_size}"], train.defaults())
    return GPTConfig(**{k: cfg[k] for k in model_fields()})


@pytest.mark.parametrize("name, target", [("moe_e4k2.py", "mixtral"), ("cpu_moe.py", "mixtral"),
                                          ("moe_e64k8_fine.py", "mixtral")])
def test_shipped_configs_that_map(name, target):
    assert export.hf_target(shipped(name)) == target


@pytest.mark.parametrize("cfg, message", [
    (shipped("moe_capacity.py"), "capacity_factor=1.25 drops the slots"),
    (shipped("moe_hetero.py"), "experts of unequal sizes"),
    (shipped("moe_shared.py"), "n_shared_experts=1 under router_score='softmax'"),
    (shipped("moe_auxfree.py"), "balance='aux_free' under router_score='softmax'"),
    (GPTConfig(vocab_size=64, n_experts=4, norm_topk_prob=False), "OLMoE, which does not, normalises queries"),
    (GPTConfig(vocab_size=64, n_experts=1, top_k=1, router_score="sigmoid"), "needs n_experts >= 2"),
])
def test_refusals_say_why(cfg, message):
    with pytest.raises(UserError, match=message):
        export.hf_target(cfg)


@pytest.mark.slow
def test_refusal_is_one_line(tmp_path, bpe_spec):
    save_checkpoint(str(tmp_path / "run" / "ckpt.pt"), tiny_model(400, n_experts=4, capacity_factor=1.0), bpe_spec)
    r = run_script("export.py", f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}")
    one_line_error(r, "capacity_factor=1.0 drops the slots over an expert's capacity")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="no checkpoint at"):
        export.export(str(tmp_path / "nothing"), "")


def test_help_lists_the_knobs(capsys):
    export.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("Export a trained checkpoint")
    assert "--to=" in out and "the folder to write" in out and "--overwrite=False" in out


def test_missing_transformers_gives_install_hint(tmp_path, bpe_spec, monkeypatch):
    save_checkpoint(str(tmp_path / "ckpt.pt"), tiny_model(400), bpe_spec)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(UserError, match="pip install transformers==5.24.0 safetensors==0.8.0"):
        export.export(str(tmp_path), str(tmp_path / "hf"))


# -----------------------------------------------------------------------------
# exports, loaded back with transformers


@needs_transformers
@pytest.mark.parametrize("kind", KINDS)
def test_export_is_exact(kind, tmp_path, bpe_spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides, cls = KINDS[kind]
    model = tiny_model(400, **overrides)
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, bpe_spec)
    assert export.export(str(tmp_path), str(tmp_path / "hf"))[0] == cls
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == cls and hf.dtype == torch.float32
    if cls == "MixtralForCausalLM":  # for one layer transformers' Switch loss is top_k times tinymoe's
        assert hf.config.router_aux_loss_coef == pytest.approx(model.config.aux_loss_coef / model.config.top_k)
    enc = prepare.encoding(bpe_spec)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            assert ids == enc.encode(prompt)
            idx = torch.tensor([ids])
            ours, _, _ = model(idx, targets=idx)  # (1, T, V): every position
            assert (ours - hf(idx).logits).abs().max().item() < 1e-5
            # greedy: sample.py with top_k=1 against generate(do_sample=False), which stops at end-of-text
            want = model.generate(idx, 24, top_k=1)[0].tolist()
            got = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=24,
                              pad_token_id=enc.eot_token)[0].tolist()
            assert got == want[:len(got)] and (len(got) == len(want) or got[-1] == enc.eot_token)


def export_and_load(tmp_path, spec, model):
    """Export model (with tokenizer spec) through a checkpoint; return (folder, transformers model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_checkpoint(str(tmp_path / "ckpt.pt"), model, spec)
    export.export(str(tmp_path), str(tmp_path / "hf"))
    return tmp_path / "hf", AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), \
        AutoTokenizer.from_pretrained(tmp_path / "hf")


@needs_transformers
@pytest.mark.parametrize("kind", ["dense", "mixtral", "sigmoid_auxfree_shared"])
def test_batched_generation_pads_left(kind, tmp_path, bpe_spec):
    """Prompts of different lengths, padded into one batch, continue as each does alone: through
    generate() and through a text-generation pipeline (which refuses to batch without a pad token)."""
    from transformers import pipeline

    model = tiny_model(400, **KINDS[kind][0])
    folder, hf, tokenizer = export_and_load(tmp_path, bpe_spec, model)
    eot = prepare.encoding(bpe_spec).eot_token
    assert (tokenizer.pad_token_id, tokenizer.padding_side, hf.generation_config.pad_token_id) == (eot, "left", eot)
    assert hf.config.pad_token_id is None  # else Llama & co. make it padding_idx: eot's embedding would never train
    n_new = 12
    alone = []  # tinymoe's greedy continuation of each prompt, up to the first end-of-text (where generate stops)
    for prompt in PROMPTS:
        new = model.generate(torch.tensor([tokenizer(prompt)["input_ids"]]), n_new, top_k=1)[0, -n_new:].tolist()
        alone.append(new[:new.index(eot) + 1] if eot in new else new)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert len({len(tokenizer(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)  # every row padded differently
    with torch.no_grad():
        out = hf.generate(**batch, do_sample=False, max_new_tokens=n_new)[:, batch["input_ids"].shape[1]:]
    for row, want in zip(out.tolist(), alone):
        assert row[:len(want)] == want and set(row[len(want):]) <= {eot}  # a row that stopped is padded
    texts = pipeline("text-generation", model=str(folder))(PROMPTS, batch_size=len(PROMPTS), do_sample=False,
                                                           max_new_tokens=n_new, return_full_text=False)
    assert [t[0]["generated_text"] for t in texts] == [tokenizer.decode(want, skip_special_tokens=True)
                                                       for want in alone]


@needs_transformers
def test_generate_defaults_are_sample_py_s(tmp_path, bpe_spec):
    """generation_config.json holds sample.py's defaults, so generate() with no arguments samples as sample.py
    does: the same tokens from the same seed (until end-of-text, where generate stops)."""
    import json

    import sample

    model = tiny_model(400, block_size=256, **KINDS["mixtral"][0])  # the prompt and 200 tokens fit in a block
    folder, hf, tokenizer = export_and_load(tmp_path, bpe_spec, model)
    eot = prepare.encoding(bpe_spec).eot_token
    written = json.loads((folder / "generation_config.json").read_text())
    assert {k: written.get(k) for k in ("do_sample", "temperature", "top_k", "max_new_tokens", "pad_token_id",
                                        "eos_token_id")} == dict(do_sample=True, temperature=0.8, top_k=200,
                                                                 max_new_tokens=200, pad_token_id=eot, eos_token_id=eot)
    assert (sample.temperature, sample.top_k, sample.max_new_tokens) == (0.8, 200, 200)  # else update the docs
    batch = tokenizer([PROMPTS[0]], return_tensors="pt")
    idx = batch["input_ids"]
    lengths = []
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            got = hf.generate(**batch)[0, idx.shape[1]:].tolist()
        torch.manual_seed(seed)
        want = model.generate(idx, sample.max_new_tokens, sample.temperature, sample.top_k)[0, idx.shape[1]:].tolist()
        assert got == want[:len(got)] and (len(got) == len(want) or got[-1] == eot)
        lengths.append(len(got))
    assert max(lengths) > 20  # not transformers' own default of 20 tokens (no end-of-text came that soon)


@needs_transformers
@pytest.mark.parametrize("n_layer", [1, 4])
def test_aux_loss_convention(n_layer, tmp_path, bpe_spec):
    """transformers' own load-balancing loss, weighted by the exported router_aux_loss_coef, against tinymoe's
    weighted Switch loss: equal for one MoE layer; for several, smaller by aux_loss_coef * E * sum_e cov_l(f, P)
    (export.py's docstring), a difference that is not zero and that no coefficient could absorb."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = dict(n_layer=n_layer, n_experts=4, top_k=2, expert_hidden=48, aux_loss_coef=0.02)
    model = tiny_model(400, **cfg)
    _, hf, _ = export_and_load(tmp_path, bpe_spec, model)
    idx = torch.randint(400, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, stats = model(idx, targets=idx)
        out = hf(idx, labels=idx, output_router_logits=True)
    logits = out.router_logits  # n_layer x (N, E)
    assert len(logits) == n_layer and logits[0].shape == (idx.numel(), 4)
    hf_aux = load_balancing_loss_func(logits, 4, 2)
    assert out.aux_loss.item() == pytest.approx(hf_aux.item(), rel=1e-6)  # what labels= adds, with the flag
    ours = model.config.aux_loss_coef * stats["aux"].item()
    theirs = hf.config.router_aux_loss_coef * hf_aux.item()
    # per layer l and expert e: f = share of the N*K slots, P = mean router probability
    probs = torch.stack(logits).softmax(-1)  # (L, N, E)
    f = torch.nn.functional.one_hot(probs.topk(2, dim=-1).indices, 4).sum(2).float().mean(1) / 2  # (L, E)
    P = probs.mean(1)  # (L, E)
    cov = ((f - f.mean(0)) * (P - P.mean(0))).mean(0).sum().item()  # sum_e cov_l(f_le, P_le)
    assert theirs == pytest.approx(ours - model.config.aux_loss_coef * 4 * cov, rel=1e-5, abs=1e-9)
    if n_layer == 1:
        assert theirs == pytest.approx(ours, rel=1e-6)
    else:
        assert abs(theirs - ours) > 1e-3 * ours  # pooled over layers is not the mean of per-layer losses
    print(f"n_layer={n_layer}: transformers {theirs:.6f}, tinymoe {ours:.6f}, ratio {theirs / ours:.4f}")


@pytest.mark.parametrize("overrides, says, not_says", [
    (dict(n_layer=1, n_experts=4, aux_loss_coef=0.02), ["aux_loss_coef / top_k = 0.01, exact (one MoE layer)",
                                                        "unless output_router_logits=True", "no router z-loss"], []),
    (dict(n_layer=4, n_experts=4, top_k=1), ["aux_loss_coef / top_k = 0.01, exact for one MoE layer only: over "
                                             "these 4 transformers pools"], []),
    (dict(n_experts=4, balance="none", z_loss_coef=0.0), [], ["router_aux_loss_coef", "output_router_logits",
                                                               "z-loss"]),
    (dict(n_experts=4, router_score="sigmoid"), ["Glm4MoeForCausalLM has no load-balancing loss"], ["router_aux"]),
    (dict(), ["temperature=0.8, top_k=200, max_new_tokens=200", "pads with end-of-text, on the left"],
     ["fine-tuning"]),
])
def test_summary_says_what_fine_tuning_leaves_out(overrides, says, not_says):
    cfg = GPTConfig(vocab_size=64, **overrides)
    text = "\n".join(export.summary(cfg, export.hf_target(cfg), 63))
    assert all(s in text for s in says) and not any(s in text for s in not_says), text


@needs_transformers
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_have_a_new_file_s_mode(umask, tmp_path, bpe_spec):
    """safetensors writes its file 0600; every exported file gets what the umask gives a new file (0644 at 022)."""
    old = os.umask(umask)
    try:
        save_checkpoint(str(tmp_path / "ckpt.pt"), tiny_model(400, **KINDS["mixtral"][0]), bpe_spec)
        export.export(str(tmp_path), str(tmp_path / "hf"))
    finally:
        os.umask(old)
    modes = {name: oct((tmp_path / "hf" / name).stat().st_mode & 0o777) for name in os.listdir(tmp_path / "hf")}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes


@needs_transformers
def test_export_refuses_to_overwrite(tmp_path, bpe_spec):
    save_checkpoint(str(tmp_path / "ckpt.pt"), tiny_model(400), bpe_spec)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not empty"):
        export.export(str(tmp_path), str(tmp_path / "hf"))
    assert export.export(str(tmp_path), str(tmp_path / "hf"), overwrite=True)[0] == "LlamaForCausalLM"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "hf"]  # no temporary folder left behind


@needs_transformers
@pytest.mark.slow
def test_train_then_export_script(data_root, tmp_path):
    """train.py's own checkpoint, exported by the script (default folder out_dir/hf), loaded by transformers."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "moe"
    r = run_script("train.py", *TINY_MOE, f"--data_root={data_root}", f"--out_dir={out}", "--max_iters=3")
    assert r.returncode == 0, r.stderr
    r = run_script("export.py", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "MixtralForCausalLM" in r.stdout and "max |logits difference|" in r.stdout
    # the summary: generate()'s defaults, and what fine-tuning in transformers leaves out
    assert "temperature=0.8, top_k=200, max_new_tokens=200" in r.stdout
    assert "router_aux_loss_coef = aux_loss_coef / top_k = 0.005, exact for one MoE layer only" in r.stdout
    assert "without the load-balancing loss, unless output_router_logits=True" in r.stdout
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 4


# -----------------------------------------------------------------------------
# tokenizers


TRICKY = ["héllo wörld 123 4567 ☃ 日本語 🤖\n\n  x  \t\t y<|endoftext|>z's they'll", "   leading spaces",
          "end<|endoftext|>", "\r\n\r\nwindows lines", "<|endoftext|><|endoftext|>"]


def check_tokenizer(enc, tmp_path, text):
    from transformers import AutoTokenizer

    export.hf_tokenizer(export.import_transformers(), enc, 64).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.eos_token_id == enc.eot_token and len(tokenizer) == enc.n_vocab
    for s in [text, *TRICKY]:
        ids = tokenizer(s)["input_ids"]
        assert ids == enc.encode(s, allowed_special="all"), s[:40]
        assert tokenizer.decode(ids) == s
    # the text of every token, each encoded alone
    texts = [enc.decode([i]) for i in range(enc.n_vocab)]
    assert tokenizer(texts)["input_ids"] == enc.encode_batch(texts, allowed_special="all")


@needs_transformers
def test_bpe_tokenizer_encodes_as_tiktoken(tmp_path, bpe_spec):
    check_tokenizer(prepare.encoding(bpe_spec), tmp_path, corpus_text(200_000)[100_000:])


@needs_transformers
@needs_gpt2
@pytest.mark.slow
def test_gpt2_tokenizer_encodes_as_tiktoken(tmp_path):
    check_tokenizer(prepare.encoding({"type": "gpt2"}), tmp_path, corpus_text(60_000))

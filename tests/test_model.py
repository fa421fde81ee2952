"""model.py on toy shapes: parameter accounting, matching, MoE dispatch, router losses, invariants."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import model
import moe_kernels
from model import (
    GPT,
    MAX_FFN_RATIO,
    MLP,
    GPTConfig,
    KVCache,
    MoE,
    count_params,
    flops_per_token,
    match_dense,
    slots_per_expert,
)
from train import routing_summary

TOY = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)
VARIANTS = {
    "dense": dict(),
    "dense_untied": dict(tie_embeddings=False, ffn_hidden=40),
    "moe_e4k2": dict(n_experts=4, top_k=2, expert_hidden=48),
    "moe_e8k1_sigmoid": dict(n_experts=8, top_k=1, expert_hidden=16, router_score="sigmoid", norm_topk_prob=False),
    "moe_shared": dict(n_experts=4, top_k=2, expert_hidden=24, n_shared_experts=2, shared_expert_hidden=16),
    "moe_hetero": dict(top_k=2, expert_groups=((2, 16), (2, 48)), tie_embeddings=False),
    "moe_capacity": dict(n_experts=4, top_k=2, expert_hidden=24, capacity_factor=1.0),
    "moe_auxfree": dict(n_experts=4, top_k=2, expert_hidden=24, balance="aux_free"),
}


def toy(**kw):
    return GPTConfig(**{**TOY, **kw})


def numel(model, active=False):
    """Parameters counted from the module; active = routed experts scaled by K / E."""
    n = 0
    for name, p in model.named_parameters():
        if active and ".experts." in name:
            n += p.numel() * model.config.top_k / model.config.n_experts
        else:
            n += p.numel()
    return n


@pytest.mark.parametrize("name", VARIANTS)
def test_count_params_equals_numel(name):
    cfg = toy(**VARIANTS[name])
    model = GPT(cfg)
    counts = count_params(cfg)
    assert counts["total"] == numel(model)
    assert counts["active"] == pytest.approx(numel(model, active=True), abs=1e-6)
    assert counts["embedding"] == model.wte.weight.numel() * (1 if cfg.tie_embeddings else 2)
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]


def test_router_counts_as_active():
    """Active = every parameter outside the routed experts, the router included, + K/E of the experts."""
    cfg = toy(n_experts=4, top_k=2, expert_hidden=48)
    params = dict(GPT(cfg).named_parameters())
    router = sum(p.numel() for name, p in params.items() if ".router." in name)
    experts = sum(p.numel() for name, p in params.items() if ".experts." in name)
    assert router == cfg.n_layer * cfg.n_experts * cfg.n_embd
    assert count_params(cfg)["active"] == sum(p.numel() for p in params.values()) - experts * (1 - 2 / 4)


def test_flops_per_token_by_hand():
    """TOY shapes (V 97, C 32, L 2, T 16), 6 FLOPs per multiply-add of a training step (forward 2, backward 4)."""
    attention = 3 * 2 * 2 * 32 * 16 * 2  # q @ k^T and weights @ v over the full T x T: 2 x T x C per token per layer
    output = 97 * 32  # tied or not, the output layer is a matmul; the embedding lookup is not
    dense = 6 * (2 * (4 * 32 * 32 + 3 * 32 * 96) + output) + attention  # ffn_hidden 96 = 8/3 * 32 rounded up to 16
    assert flops_per_token(toy()) == dense == 190_656
    assert flops_per_token(toy(tie_embeddings=False, ffn_hidden=40)) == 6 * (2 * (4096 + 3 * 32 * 40) + output) + 12288
    # MoE: the router (E x C) and K = 2 of the 4 experts of 48, not all 4
    moe = 6 * (2 * (4 * 32 * 32 + 4 * 32 + 2 * 3 * 32 * 48) + output) + attention
    assert flops_per_token(toy(n_experts=4, top_k=2, expert_hidden=48)) == moe == 192_192
    # shared experts count in full; unequal experts at their mean size (as count_params's active)
    shared = toy(n_experts=4, top_k=2, expert_hidden=24, n_shared_experts=2, shared_expert_hidden=16)
    assert flops_per_token(shared) == 6 * (2 * (4096 + 128 + 2 * 3 * 32 * 24 + 2 * 3 * 32 * 16) + output) + attention
    hetero = toy(top_k=2, expert_groups=((2, 16), (2, 48)))
    assert flops_per_token(hetero) == 6 * (2 * (4096 + 128 + 2 * 3 * 32 * 32) + output) + attention


def test_flops_per_token_at_moe_e4k2_shapes():
    """The output layer (6 x 50257 x 256 per token) is most of the count at the study's shapes."""
    cfg = GPTConfig(vocab_size=50257, block_size=256, n_layer=6, n_head=8, n_embd=256, n_experts=4, top_k=2,
                    expert_hidden=512)
    output = 6 * 50257 * 256
    without_output = flops_per_token(cfg) - output
    assert without_output == 6 * 6 * (4 * 256 * 256 + 4 * 256 + 2 * 3 * 256 * 512) + 12 * 6 * 256 * 256
    assert flops_per_token(cfg) / without_output == pytest.approx(2.82, abs=0.01)


@pytest.mark.parametrize("name", ["dense", "dense_untied", "moe_e4k2", "moe_shared"])
def test_flops_per_token_equals_counted_matmuls(name):
    """A training step's matmul FLOPs as torch's FlopCounterMode counts them, on the loop path (it does not count
    grouped_mm), plus attention's (it does not count CPU attention kernels)."""
    cfg = toy(**VARIANTS[name], **({"moe_impl": "loop"} if name.startswith("moe") else {}))
    model = GPT(cfg)
    idx = torch.randint(0, 97, (3, 16))
    with FlopCounterMode(display=False) as counter:
        _, loss, _ = model(idx, idx)
        loss.backward()
    attention = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert counter.get_total_flops() == (flops_per_token(cfg) - attention) * idx.numel()


@pytest.mark.parametrize("name", ["dense", "moe_e4k2", "moe_shared", "moe_hetero", "moe_auxfree"])
def test_kv_cache_generates_as_the_reference(name):
    """Greedy decoding with the KV cache gives the reference's tokens, and each step's logits are close to those
    of the whole context run again, while prompt and sample fit in block_size."""
    torch.manual_seed(0)
    model = GPT(toy(**VARIANTS[name])).eval()
    prompt = torch.randint(0, 97, (2, 5))
    reference = model.generate(prompt, 11, top_k=1, use_cache=False)  # 5 + 11 = block_size
    cached = model.generate(prompt, 11, top_k=1, use_cache=True)
    assert torch.equal(cached, reference)
    cache = [KVCache(model.config, 2, "cpu", torch.float32) for _ in model.blocks]
    with torch.no_grad():
        logits, _, _ = model(reference[:, :5], cache=cache)
        for t in range(5, 16):
            full, _, _ = model(reference[:, :t])
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            logits, _, _ = model(reference[:, t:t + 1], cache=cache)


def test_kv_cache_past_block_size():
    """Past block_size the cache starts again from the last half block: sampling runs on, the tokens up to
    block_size are the reference's."""
    torch.manual_seed(0)
    model = GPT(toy(n_experts=4, top_k=2, expert_hidden=48)).eval()
    prompt = torch.randint(0, 97, (1, 3))
    reference = model.generate(prompt, 40, top_k=1, use_cache=False)
    cached = model.generate(prompt, 40, top_k=1, use_cache=True)
    assert cached.shape == (1, 43)
    assert torch.equal(cached[:, :17], reference[:, :17])  # the 17th token is the last the full cache predicts
    torch.manual_seed(1)
    assert model.generate(torch.randint(0, 97, (1, 20)), 3, use_cache=True).shape == (1, 23)  # a long prompt


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith("moe")])
@pytest.mark.parametrize("target", ["active", "total"])
def test_match_dense(name, target):
    moe = toy(**VARIANTS[name])
    dense = match_dense(moe, target)
    goal = count_params(moe)[target]
    got = count_params(dense)["total"]
    assert dense.n_experts == 0
    assert abs(got - goal) / goal < 0.005
    assert abs(got - goal) <= 3 * dense.n_embd * dense.n_layer / 2  # within half an FFN unit
    for key in ("n_layer", "n_head", "block_size", "vocab_size", "tie_embeddings"):
        assert getattr(dense, key) == getattr(moe, key)
    assert count_params(dense)["total"] == sum(p.numel() for p in GPT(dense).parameters())


def test_match_dense_can_align_the_ffn():
    """match_dense(multiple=8) rounds the FFN width to a multiple of 8, within the tolerance; by default the
    width is the closest match (1025 here)."""
    cfg = toy(vocab_size=50257, n_embd=256, n_head=8, n_layer=6, block_size=256, n_experts=4, top_k=2,
              expert_hidden=512)
    assert match_dense(cfg, "active").ffn_hidden == 1025 and match_dense(cfg, "active", multiple=8).ffn_hidden == 1024


def test_match_dense_resizes_width_only_when_needed():
    moe = GPTConfig(vocab_size=4096, n_layer=6, n_head=8, n_embd=256, n_experts=4, top_k=2, expert_hidden=512)
    assert match_dense(moe, "total").n_embd == 256  # FFN alone suffices: attention identical
    many = GPTConfig(vocab_size=4096, n_layer=6, n_head=8, n_embd=256, n_experts=64, top_k=2, expert_hidden=512)
    wide = match_dense(many, "total")
    assert wide.n_embd > 256 and wide.n_embd % (2 * many.n_head) == 0  # rounded to 2 * n_head
    assert wide.ffn_hidden / wide.n_embd == pytest.approx(MAX_FFN_RATIO, rel=0.1)  # the FFN held at that ratio
    goal = count_params(many)["total"]
    assert abs(count_params(wide)["total"] - goal) / goal < 0.001


def test_one_expert_top1_equals_dense_mlp():
    torch.manual_seed(0)
    cfg = toy(n_experts=1, top_k=1, expert_hidden=40)
    moe, mlp = MoE(cfg), MLP(cfg.n_embd, 40)
    with torch.no_grad():
        moe.experts.w1[0][0].copy_(mlp.w1.weight.T)
        moe.experts.w3[0][0].copy_(mlp.w3.weight.T)
        moe.experts.w2[0][0].copy_(mlp.w2.weight.T)
    x = torch.randn(2, 5, cfg.n_embd)
    for impl in ("grouped", "loop"):
        moe.config.moe_impl = impl
        y, _, _, _ = moe(x)
        torch.testing.assert_close(y, mlp(x))


def run_moe(cfg, x, impl, seed=0):
    torch.manual_seed(seed)
    moe = MoE(replace_impl(cfg, impl))
    with torch.no_grad():  # non-trivial router weights, so that routing is not near-uniform
        moe.router.weight.normal_(0, 1)
        for ws in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
            for w in ws:
                w.normal_(0, 0.1)
    x = x.clone().requires_grad_()
    y, aux, z, _ = moe(x)
    (y.square().sum() + aux + z).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return y, x.grad, grads


def replace_impl(cfg, impl):
    from dataclasses import replace
    return replace(cfg, moe_impl=impl)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith("moe")])
def test_grouped_dispatch_equals_loop(name):
    cfg = toy(**VARIANTS[name])
    x = torch.randn(3, 7, cfg.n_embd)
    assert_same_moe(run_moe(cfg, x, "grouped"), run_moe(cfg, x, "loop"), atol=1e-5)


def assert_same_moe(a, b, atol):
    """run_moe's outputs, input gradients and parameter gradients agree."""
    (y1, gx1, g1), (y2, gx2, g2) = a, b
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=atol)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=atol)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=atol, msg=n)


def test_grouped_dispatch_equals_per_token_reference():
    """The fused path against the MoE written out token by token, straight from the equations."""
    cfg = toy(n_experts=4, top_k=2, expert_hidden=24)
    torch.manual_seed(1)
    moe = MoE(replace_impl(cfg, "grouped"))
    with torch.no_grad():
        moe.router.weight.normal_(0, 1)
        for ws in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
            ws[0].normal_(0, 0.1)
    x = torch.randn(1, 9, cfg.n_embd)
    y, _, _, _ = moe(x)
    w1, w3, w2 = moe.experts.w1[0], moe.experts.w3[0], moe.experts.w2[0]
    for t in range(9):
        p = (x[0, t] @ moe.router.weight.T).softmax(-1)
        top = p.topk(2)
        g = top.values / top.values.sum()
        out = sum(g[i] * (F.silu(x[0, t] @ w1[e]) * (x[0, t] @ w3[e])) @ w2[e] for i, e in enumerate(top.indices))
        torch.testing.assert_close(y[0, t], out, rtol=1e-5, atol=1e-6)


def test_slots_per_expert_counts_like_bincount():
    experts = torch.tensor([[0, 3], [3, 1], [0, 3], [1, 0]])  # (N, K), expert 2 chosen by no token
    assert slots_per_expert(experts, 5).tolist() == [3, 2, 0, 3, 0]
    experts = torch.randint(0, 16, (300, 4))
    assert torch.equal(slots_per_expert(experts, 16), torch.bincount(experts.flatten(), minlength=16))


class EmptyGroupGarbage(torch.autograd.Function):
    """grouped_mm as on SM100 GPUs (pytorch/pytorch#172439): exact forward and input gradient, but the
    weight gradient of every empty group filled with garbage (NaN here, the worst case)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        with torch.enable_grad():
            x_, w_ = x.detach().requires_grad_(), w.detach().requires_grad_()
            gx, gw = torch.autograd.grad(torch._grouped_mm(x_, w_, offs=offs), (x_, w_), grad)
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        gw[sizes == 0] = float("nan")
        return gx, gw, None


@pytest.mark.parametrize("guard", [True, False])
def test_empty_group_guard_zeroes_the_gradient_of_unused_experts(monkeypatch, guard):
    """With a grouped GEMM that writes garbage into empty groups' weight gradients, the guard leaves
    exact zeros for the experts no token chose and the loop's gradients for the others; without it the
    garbage reaches the parameters (so this test can tell the two apart)."""
    cfg = toy(n_experts=4, top_k=1, expert_hidden=16, balance="aux_free")
    x = torch.randn(2, 8, cfg.n_embd)
    grads = {}
    for impl in ("grouped", "loop"):
        torch.manual_seed(0)
        moe = MoE(replace_impl(cfg, impl))
        moe.expert_bias[2:] = -10.0  # a selection bias no score can beat: experts 2 and 3 get no tokens
        monkeypatch.setattr(moe_kernels, "empty_groups_get_gradients", lambda device: guard)
        monkeypatch.setattr(moe_kernels.F, "grouped_mm", lambda a, b, offs: EmptyGroupGarbage.apply(a, b, offs))
        y, _, _, counts = moe(x)
        y.sum().backward()
        grads[impl] = moe.experts.w1[0].grad
    assert counts["load"][2:].sum() == 0 and counts["load"][:2].min() > 0  # the setup: two empty experts
    if guard:
        assert torch.equal(grads["grouped"][2:], torch.zeros_like(grads["grouped"][2:]))
        torch.testing.assert_close(grads["grouped"], grads["loop"], rtol=1e-5, atol=1e-6)
    else:
        assert grads["grouped"][2:].isnan().all()


def test_grouped_bf16_close_to_fp32():
    cfg = toy(n_experts=4, top_k=2, expert_hidden=48)
    x = torch.randn(2, 8, cfg.n_embd)
    y32, _, _ = run_moe(cfg, x, "grouped")
    torch.manual_seed(0)
    y16, _, _ = run_moe(cfg, x.bfloat16(), "grouped")
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)


def test_bf16_slots_weighted_and_summed_in_fp32_as_the_loop():
    """Under bf16 autocast each token's K = 4 expert outputs are weighted by fp32 routing weights and summed in
    fp32, as the loop does: with experts at least as wide as n_embd (weight after the last GEMM) the padded
    grouped path on CPU equals the loop bit for bit (index_add_ sums a token's slots in expert order)."""
    moe = MoE(toy(n_experts=4, top_k=4, expert_hidden=64, moe_impl="grouped"))
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, weights, experts = moe.route(x)
        load = model.slots_per_expert(experts, 4)
        assert torch.equal(moe_kernels.dispatch(moe, x, weights, experts, load), moe.dispatch_loop(x, weights, experts))


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith("moe")])
def test_padded_groups_change_nothing(name, monkeypatch):
    """Groups padded to a multiple of rows (CPU bf16 does it, for oneDNN's kernel cache; see
    group_rows_multiple) give the unpadded outputs and gradients, eagerly (exact length) and as compiled
    (a fixed length: the spare rows join the last group)."""
    cfg = toy(**VARIANTS[name])
    x = torch.randn(3, 7, cfg.n_embd)
    unpadded = run_moe(cfg, x, "grouped")
    for compiling in (False, True):
        monkeypatch.setattr(moe_kernels.torch.compiler, "is_compiling", lambda compiling=compiling: compiling)
        monkeypatch.setattr(moe_kernels, "group_rows_multiple", lambda device_type, dtype: 8)
        assert_same_moe(unpadded, run_moe(cfg, x, "grouped"), atol=1e-6)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith("moe")])
@pytest.mark.parametrize("multiple", [1, 8])
def test_batched_experts_change_nothing(name, multiple, monkeypatch):
    """Every group padded to the largest and run as one torch.bmm (CPU bf16 does it where it pays; see
    batch_experts) gives the outputs and gradients of grouped_mm on unpadded groups."""
    cfg = toy(**VARIANTS[name])
    x = torch.randn(3, 7, cfg.n_embd)
    unpadded = run_moe(cfg, x, "grouped")
    monkeypatch.setattr(moe_kernels, "group_rows_multiple", lambda device_type, dtype: multiple)
    monkeypatch.setattr(moe_kernels, "batch_experts", lambda *args: True)
    bmm = []
    monkeypatch.setattr(moe_kernels.torch, "bmm", lambda a, b: bmm.append(a.shape) or torch.matmul(a, b))
    assert_same_moe(unpadded, run_moe(cfg, x, "grouped"), atol=1e-6)
    E = cfg.n_experts
    assert bmm and all(shape[0] == E and shape[1] % multiple == 0 for shape in bmm)


def test_pad_groups_layout():
    """Every group starts on a multiple of rows and holds its own slots in order; padding slots read token 0
    with weight 0; compiled, the length is fixed and the last group takes the spare rows."""
    experts = torch.tensor([2, 0, 2, 2, 1, 0, 2, 3, 3, 2])  # one slot per token (K = 1)
    order = experts.argsort(stable=True)
    load = torch.bincount(experts, minlength=5)  # expert 4 gets nothing
    gate = torch.arange(1, 11, dtype=torch.float32)[order]
    token, padded_gate, padded = moe_kernels.pad_groups(order, gate, experts[order], load, 4)
    assert padded.tolist() == [4, 4, 8, 4, 0] and token.shape == (20,)
    starts = [0, 4, 8, 16, 20]
    for e in range(5):
        rows = slice(starts[e], starts[e] + int(load[e]))
        assert token[rows].tolist() == torch.where(experts == e)[0].tolist()
        assert padded_gate[rows].tolist() == (torch.where(experts == e)[0] + 1.0).tolist()
        assert padded_gate[starts[e] + int(load[e]):starts[e] + int(padded[e])].eq(0).all()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(model.torch.compiler, "is_compiling", lambda: True)
        token, padded_gate, padded = moe_kernels.pad_groups(order, gate, experts[order], load, 4)
    assert token.shape == (4 * (3 + 5 - 1),) and padded.tolist() == [4, 4, 8, 4, 8] and padded.sum() == 28
    token, padded_gate, padded = moe_kernels.pad_groups(order, gate, experts[order], load, 4, equal=True)
    assert padded.tolist() == [8] * 5 and token.shape == (40,)
    for e in range(5):  # each group at 8 * e, its own slots first, then padding
        assert token[8 * e:8 * e + int(load[e])].tolist() == torch.where(experts == e)[0].tolist()
        assert padded_gate[8 * e + int(load[e]):8 * e + 8].eq(0).all()


def test_batch_experts():
    """One bmm over equal groups on CPU in bf16, eagerly, while padding to the largest group adds fewer rows per
    expert than GROUP_CALL_MACS / width (fewer for wider experts); grouped_mm otherwise, and on every other
    device or dtype."""
    width = 256 * 128  # E64k8 at bench.py --quick's shapes: 128 rows
    rows = moe_kernels.GROUP_CALL_MACS // width
    assert rows == 128 and moe_kernels.GROUP_CALL_MACS // (256 * 512) == 32
    even = torch.full((64,), 256)
    assert moe_kernels.batch_experts("cpu", torch.bfloat16, even, width)
    assert moe_kernels.batch_experts("cpu", torch.bfloat16, torch.tensor([256 + rows, 256 - rows]), width)
    assert not moe_kernels.batch_experts("cpu", torch.bfloat16, torch.tensor([257 + rows, 256 - rows]), width)
    assert not moe_kernels.batch_experts("cpu", torch.bfloat16, torch.tensor([256 + rows, 256 - rows]), 4 * width)
    assert not moe_kernels.batch_experts("cpu", torch.float32, even, width)
    assert not moe_kernels.batch_experts("cuda", torch.bfloat16, even, width)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(model.torch.compiler, "is_compiling", lambda: True)
        assert not moe_kernels.batch_experts("cpu", torch.bfloat16, even, width)


def test_group_rows_multiple():
    """Only CPU bf16 pads: oneDNN compiles a kernel per matmul shape there; MKL's fp32 and CUDA do not."""
    assert moe_kernels.group_rows_multiple("cpu", torch.bfloat16) == 32
    assert moe_kernels.group_rows_multiple("cpu", torch.float32) == 1
    assert moe_kernels.group_rows_multiple("cuda", torch.bfloat16) == 1


def test_router_losses():
    """The Switch loss and z-loss against the formulas written out from the router's own logits."""
    torch.manual_seed(0)
    cfg = toy(n_experts=4, top_k=2, expert_hidden=16)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1)
    x = torch.randn(2, 8, cfg.n_embd)
    _, aux, z, _ = moe(x)
    logits = x.reshape(-1, cfg.n_embd) @ moe.router.weight.T  # (N, E)
    probs = logits.softmax(-1)
    chosen = probs.topk(cfg.top_k, dim=-1).indices  # (N, K)
    f = torch.stack([(chosen == e).float().sum() for e in range(4)]) / chosen.numel()  # fraction of slots
    torch.testing.assert_close(aux, 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(z, (logits.logsumexp(-1) ** 2).mean())
    # uniform router: z = logsumexp(0, ..., 0)^2 = ln(E)^2
    with torch.no_grad():
        moe.router.weight.zero_()
    _, _, z, _ = moe(x)
    assert z.item() == pytest.approx(math.log(4) ** 2, rel=1e-5)
    # every token to experts 0 and 1: f = (1/2, 1/2, 0, 0), P ~ (1/2, 1/2, 0, 0): aux ~ E * 2 * 1/4
    x = torch.zeros(2, 8, cfg.n_embd)
    x[..., 0] = 1.0
    with torch.no_grad():
        moe.router.weight[0, 0] = moe.router.weight[1, 0] = 50.0
    _, aux, _, _ = moe(x)
    assert aux.item() == pytest.approx(4 * 2 * (1 / 2 * 1 / 2), rel=1e-3)


def test_router_runs_in_fp32_under_autocast():
    cfg = toy(n_experts=4, top_k=2, expert_hidden=16)
    moe = MoE(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux, z, _ = moe(torch.randn(2, 8, cfg.n_embd))
    assert aux.dtype == torch.float32 and z.dtype == torch.float32


def test_capacity_drops_lowest_weighted_slots():
    """E=2, K=1, 8 tokens, capacity_factor 0.5 -> each expert takes ceil(0.5 * 8 / 2) = 2 slots."""
    cfg = toy(n_experts=2, top_k=1, expert_hidden=16, capacity_factor=0.5)
    moe = MoE(cfg)
    experts = torch.tensor([[0], [0], [0], [1], [0], [1], [1], [0]])
    weights = torch.tensor([[0.6], [0.9], [0.7], [0.8], [0.95], [0.55], [0.99], [0.51]])
    keep = moe.within_capacity(experts, weights)
    # expert 0 has tokens 0, 1, 2, 4, 7 (weights .6 .9 .7 .95 .51): keeps 1 and 4
    # expert 1 has tokens 3, 5, 6 (weights .8 .55 .99): keeps 3 and 6
    assert keep.flatten().tolist() == [False, True, False, True, True, False, True, False]


def test_capacity_matches_a_per_expert_reference():
    """Random routing with K=2: each expert keeps exactly its `capacity` highest-weighted slots."""
    torch.manual_seed(0)
    cfg = toy(n_experts=4, top_k=2, expert_hidden=16, capacity_factor=0.75)
    moe = MoE(cfg)
    experts = torch.rand(64, 4).argsort(-1)[:, :2]  # (N, K): two distinct experts per token
    weights = torch.rand(64, 2)
    keep = moe.within_capacity(experts, weights)
    capacity = math.ceil(0.75 * 64 * 2 / 4)
    expected = torch.zeros(64, 2, dtype=torch.bool)
    for e in range(4):
        slots = (experts == e).nonzero().tolist()  # [(token, k)]
        for token, k in sorted(slots, key=lambda s: -weights[s[0], s[1]].item())[:capacity]:
            expected[token, k] = True
    assert torch.equal(keep, expected)


def test_capacity_dropped_token_keeps_only_residual():
    torch.manual_seed(0)
    N, E = 8, 2
    cfg = toy(n_experts=E, top_k=1, expert_hidden=16, capacity_factor=0.25)
    served = E * math.ceil(0.25 * N * 1 / E)  # every expert fills its capacity: it has at least that many tokens
    moe = MoE(cfg)
    y, _, _, counts = moe(torch.randn(1, N, cfg.n_embd))
    zero_rows = (y[0].abs().sum(-1) == 0).sum().item()
    assert zero_rows == N - served  # dropped tokens: the MoE adds nothing to them
    assert counts["dropped"].item() == N - served and counts["load"].sum().item() == N


def test_routing_stats():
    """Routing counts and their summary against the routing computed by hand from the router's weights."""
    torch.manual_seed(0)
    cfg = toy(n_experts=4, top_k=2, expert_hidden=16)
    model = GPT(cfg)
    inputs = []  # the input of each MoE layer
    for moe in model.moe_layers:
        moe.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, cfg.n_embd)))
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    _, _, stats = model(idx, idx)
    _, _, stats2 = model(idx, idx)
    routing = [{k: a[k] + b[k] for k in a} for a, b in zip(stats["routing"], stats2["routing"])]  # two batches
    summary = routing_summary(model, routing)
    assert len(summary) == cfg.n_layer
    for moe, x, layer in zip(model.moe_layers, inputs, summary):
        probs = (x @ moe.router.weight.T).softmax(-1)  # (N, E)
        load = torch.bincount(probs.topk(2).indices.flatten(), minlength=4).float()
        share = load / load.sum()
        assert layer["load"] == pytest.approx(share.tolist(), abs=1e-4)
        assert layer["max_mean"] == pytest.approx((share.max() * 4).item())
        assert layer["cv"] == pytest.approx((share.std(unbiased=False) * 4).item())
        assert layer["entropy"] == pytest.approx(-(probs * probs.log()).sum(-1).mean().item(), rel=1e-5)
        assert layer["dropped"] == 0


@pytest.mark.parametrize("name", ["dense", "moe_e4k2"])
def test_causal(name):
    torch.manual_seed(0)
    model = GPT(toy(**VARIANTS[name]))
    idx = torch.randint(0, 97, (1, 16))
    logits1, _, _ = model(idx, idx)
    idx2 = idx.clone()
    idx2[0, 10:] = (idx2[0, 10:] + 1) % 97
    logits2, _, _ = model(idx2, idx2)
    torch.testing.assert_close(logits1[0, :10], logits2[0, :10])
    assert not torch.allclose(logits1[0, 10:], logits2[0, 10:])


@pytest.mark.parametrize("name", ["dense", "moe_e4k2"])
def test_initial_loss_near_uniform(name):
    torch.manual_seed(0)
    model = GPT(toy(**VARIANTS[name]))
    idx, targets = torch.randint(0, 97, (2, 4, 16))
    _, _, stats = model(idx, targets)
    assert stats["ce"].item() == pytest.approx(math.log(97), rel=0.05)


@pytest.mark.parametrize("name", ["dense", "moe_e4k2", "moe_hetero", "moe_auxfree"])
def test_overfits_one_batch(name):
    torch.manual_seed(0)
    model = GPT(toy(**VARIANTS[name]))
    opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 97, (4, 16))
    for _ in range(150):
        _, loss, stats = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_expert_bias(stats["routing"])
    assert stats["ce"].item() < 0.5


def test_aux_free_bias_balances_a_skewed_router():
    torch.manual_seed(0)
    cfg = toy(n_layer=1, n_experts=4, top_k=1, expert_hidden=16, balance="aux_free", bias_update_rate=0.01)
    model = GPT(cfg)
    moe = model.moe_layers[0]
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.02)
        moe.router.weight[0] += 0.5  # expert 0 wins most tokens
    x = torch.randn(4, 32, cfg.n_embd)
    max_mean = lambda: routing_summary(model, [moe(x)[3]])[0]["max_mean"]
    before = max_mean()
    assert before > 1.8, "the test needs a skewed router to start from"
    for _ in range(40):
        model.update_expert_bias([moe(x)[3]])
    assert max_mean() < 1.4
    assert "blocks.0.mlp.expert_bias" in model.state_dict()  # checkpoints keep the bias


@pytest.mark.parametrize("kw, message", [
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_embd=36, n_head=4), "even"),
    (dict(n_experts=4, router_score="relu"), "router_score"),
    (dict(n_experts=4, balance="magic"), "balance"),
    (dict(n_experts=4, moe_impl="fast"), "moe_impl"),
    (dict(expert_groups=((2, 0),)), "expert_groups"),
])
def test_invalid_config_messages(kw, message):
    with pytest.raises(ValueError, match=message):
        toy(**kw)


def test_auto_impl_picks_a_working_path():
    cfg = toy(n_experts=4, top_k=2, expert_hidden=16)
    assert moe_kernels.use_grouped(cfg, torch.randn(2, 32))
    assert moe_kernels.use_grouped(cfg, torch.randn(2, 32).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe_kernels.use_grouped(cfg, torch.randn(2, 32))

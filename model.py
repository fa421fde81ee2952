"""
A LLaMA-style decoder with an optional Mixture-of-Experts feed-forward, in one file.

Read top to bottom: config -> norms and rotary embeddings -> attention -> the dense
SwiGLU MLP -> the MoE block (route -> dispatch -> experts -> combine) -> Block -> GPT,
then closed-form parameter counting and the dense baselines matched to an MoE.

References:
  LLaMA (Touvron et al. 2023): pre-norm RMSNorm, rotary embeddings, SwiGLU, no biases.
  Mixtral (Jiang et al. 2024): softmax router, top-k, the k weights renormalised.
  Switch Transformer (Fedus et al. 2021): load-balancing loss E * sum_i f_i * P_i, capacity.
  ST-MoE (Zoph et al. 2022): router z-loss mean(logsumexp(logits)^2).
  DeepSeekMoE (Dai et al. 2024): fine-grained and shared experts.
  Loss-free balancing (Wang et al. 2024): a per-expert bias used only for top-k selection.
"""

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import moe_kernels


@dataclass
class GPTConfig:
    # --- the decoder ---
    block_size: int = 256  # context length in tokens
    vocab_size: int = 0  # 0: train.py takes it from the dataset's meta.json; may be set larger
    n_layer: int = 6  # transformer blocks
    n_head: int = 8  # attention heads per block
    n_embd: int = 256  # model width C; head size n_embd / n_head must be even (rotary)
    ffn_hidden: int = 0  # dense SwiGLU hidden size; 0: LLaMA's 8/3 * n_embd rounded up to 16
    rope_theta: float = 10000.0  # base of the rotary embeddings' frequencies
    norm_eps: float = 1e-5  # epsilon of RMSNorm
    tie_embeddings: bool = True  # share the token embedding with the output layer
    # --- Mixture of Experts (used when n_experts > 0) ---
    n_experts: int = 0  # routed experts E per layer; 0: dense model
    top_k: int = 2  # experts per token K
    expert_hidden: int = 0  # SwiGLU hidden size of each expert; 0: ffn_hidden (Mixtral-style)
    expert_groups: tuple = ()  # heterogeneous experts ((count, hidden), ...); sets n_experts
    n_shared_experts: int = 0  # always-on experts added to the routed output (DeepSeekMoE)
    shared_expert_hidden: int = 0  # hidden size of each shared expert; 0: expert_hidden
    router_score: str = "softmax"  # "softmax" or "sigmoid" of the router logits
    norm_topk_prob: bool = True  # renormalise the k selected scores to sum to 1
    balance: str = "switch"  # "switch" (aux loss), "aux_free" (selection bias) or "none"
    aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss (balance="switch")
    z_loss_coef: float = 0.001  # weight of the router z-loss, whatever the balancing
    bias_update_rate: float = 0.001  # step of the aux_free bias update per optimizer step
    capacity_factor: float = 0.0  # 0: dropless; else each expert takes ceil(cf * N * K / E) slots
    moe_impl: str = "auto"  # "grouped" (one grouped GEMM), "loop" (per expert) or "auto"

    def __post_init__(self):
        self.validate()  # the fields as given; a hidden size of 0 is filled in with its default below
        self.expert_groups = tuple(tuple(g) for g in self.expert_groups)
        if self.ffn_hidden == 0:
            self.ffn_hidden = 16 * math.ceil(8 * self.n_embd / 3 / 16)
        if self.expert_hidden == 0:
            self.expert_hidden = self.ffn_hidden
        if self.expert_groups:
            self.n_experts = sum(n for n, _ in self.expert_groups)
        if self.shared_expert_hidden == 0:
            self.shared_expert_hidden = self.expert_hidden

    def validate(self):
        """The valid range of every field: ValueError, one line naming the field, for a config that cannot be built."""
        def check(ok, msg):
            if not ok:
                raise ValueError(msg)
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("vocab_size", "ffn_hidden", "n_experts", "expert_hidden", "n_shared_experts",
                     "shared_expert_hidden"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.n_embd % self.n_head == 0,
              f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check((self.n_embd // self.n_head) % 2 == 0,
              f"head size n_embd/n_head = {self.n_embd // self.n_head} must be even for rotary embeddings")
        for name in ("rope_theta", "norm_eps"):
            check(0 < getattr(self, name) < math.inf, f"{name} must be a positive finite number, got "
                                                      f"{getattr(self, name)}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
            check(0 <= getattr(self, name) < math.inf, f"{name} must be a finite number >= 0, got "
                                                       f"{getattr(self, name)}")  # NaN fails too
        # past these a model cannot learn or overflows at its first step (generous around what is used): RMSNorm's
        # inputs have mean square ~1, RoPE's frequencies theta^(-2j/hs) grow and overflow for theta < 1, router
        # scores lie in [0, 1], a loss coefficient over 100 outweighs the language-model loss (~ln vocab)
        for name, ok, why in (("norm_eps", self.norm_eps <= 1, "at most 1 (1e-5 or 1e-6 is usual)"),
                              ("rope_theta", self.rope_theta >= 1, "at least 1 (10000 is usual)"),
                              ("bias_update_rate", self.bias_update_rate <= 1, "at most 1 (1e-3 is usual)"),
                              ("aux_loss_coef", self.aux_loss_coef <= 100, "at most 100"),
                              ("z_loss_coef", self.z_loss_coef <= 100, "at most 100")):
            check(ok, f"{name} must be {why}, got {getattr(self, name)}")
        for name, allowed in (("router_score", ("softmax", "sigmoid")), ("balance", ("switch", "aux_free", "none")),
                              ("moe_impl", ("auto", "grouped", "loop"))):
            check(getattr(self, name) in allowed, f"{name} must be one of {', '.join(allowed)}; got "
                                                  f"{getattr(self, name)!r}")
        check(isinstance(self.expert_groups, (tuple, list)) and all(
            isinstance(g, (tuple, list)) and len(g) == 2 and all(type(v) is int and v > 0 for v in g)
            for g in self.expert_groups),
            f"expert_groups must be ((count, hidden), ...) of positive whole numbers, like ((4, 256), (4, 768)); "
            f"got {self.expert_groups!r}")
        n_experts = sum(n for n, _ in self.expert_groups) or self.n_experts
        if n_experts > 0:
            check(1 <= self.top_k <= n_experts, f"top_k ({self.top_k}) must be between 1 and n_experts ({n_experts})")

    @property
    def expert_sizes(self):
        """Hidden size of each routed expert, in order."""
        groups = self.expert_groups or ((self.n_experts, self.expert_hidden),)
        return [h for n, h in groups for _ in range(n)]


# -----------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021), in the half-split ("rotate_half") layout


def rope_cache(head_size, block_size, theta):
    """cos and sin tables, each (block_size, head_size // 2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_size, 2).float() / head_size)
    angles = torch.outer(torch.arange(block_size).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x1, x2) pair of x (B, nh, T, hs) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """For generation: one layer's keys and values (B, nh, block_size, hs) of the positions seen so far."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled

    def add(self, k, v):
        """Store k, v (B, nh, T, hs) of the next T positions; return those of every position so far."""
        T = k.shape[2]
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]  # (B, nh, length, hs)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.wqkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.wo = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None):
        """x (B, T, C) at the positions of cos and sin (T, hs/2); with a KVCache, x follows the cached positions."""
        B, T, C = x.shape
        q, k, v = self.wqkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.add(k, v)  # (B, nh, positions so far, hs)
        # causal among the T new positions; a lone new token attends to every cached one
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(x w1) * (x w3))."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.w1 = nn.Linear(n_embd, hidden, bias=False)  # gate
        self.w3 = nn.Linear(n_embd, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, n_embd, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# -----------------------------------------------------------------------------
# Mixture of Experts. Legend: N = B*T tokens, E = n_experts, K = top_k, C = n_embd,
# H = expert hidden size. A "slot" is one (token, chosen expert) pair: there are N*K.


def slots_per_expert(experts, n_experts):
    """(E,) how many of the N*K slots chose each expert (a scatter-add, not bincount, whose data-dependent
    length costs a host sync on CUDA and a graph break when compiled)."""
    flat = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class Experts(nn.Module):
    """The routed experts: SwiGLU MLPs with weights stacked (E, ...), one stack per group of equal size."""

    def __init__(self, n_embd, groups):
        super().__init__()
        init = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.02)  # as nn.Linear's in GPT's init
        self.w1 = nn.ParameterList(init(n, n_embd, h) for n, h in groups)  # gate (E, C, H)
        self.w3 = nn.ParameterList(init(n, n_embd, h) for n, h in groups)  # up (E, C, H)
        self.w2 = nn.ParameterList(init(n, h, n_embd) for n, h in groups)  # down (E, H, C)
        self.index = [(g, j) for g, (n, _) in enumerate(groups) for j in range(n)]  # expert -> (group, row)

    def one(self, x, e):
        """Expert e on its tokens x (n, C)."""
        g, j = self.index[e]
        return (F.silu(x @ self.w1[g][j]) * (x @ self.w3[g][j])) @ self.w2[g][j]

    def stacked(self):
        """All experts' weights as (E, C, H), (E, C, H), (E, H, C); unequal experts zero-padded to the widest H,
        which changes nothing: silu(0) * 0 = 0 through zero rows of w2."""
        if len(self.w1) == 1:
            return self.w1[0], self.w3[0], self.w2[0]
        H = max(w.shape[2] for w in self.w1)
        w1 = torch.cat([F.pad(w, (0, H - w.shape[2])) for w in self.w1])
        w3 = torch.cat([F.pad(w, (0, H - w.shape[2])) for w in self.w3])
        w2 = torch.cat([F.pad(w, (0, 0, 0, H - w.shape[1])) for w in self.w2])
        return w1, w3, w2

    def grouped(self, xs, load, gate, matmul=None):
        """All experts on their slots at once: xs (N*K, C) sorted by expert, load (E,) slots per expert,
        gate (N*K,) each slot's routing weight. Returns gate * expert(xs), (N*K, C). Each weight is one grouped
        GEMM: a (rows, in) @ w (E, in, out), expert e's rows times w[e]; moe_kernels passes `matmul`, an
        equivalent for its padded layouts."""
        w1, w3, w2 = self.stacked()
        offs = load.cumsum(0).to(torch.int32)  # (E,) where each expert's group ends
        mm = matmul or (lambda a, w: F.grouped_mm(a, w, offs=offs))
        h = F.silu(mm(xs, w1)) * mm(xs, w3)  # (N*K, H)
        gate = gate[:, None]  # (N*K, 1)
        if h.shape[1] < xs.shape[1]:  # gate * (h @ w2) = (gate * h) @ w2: scale the narrower tensor
            return mm(h * gate, w2)  # (N*K, C)
        return mm(h, w2) * gate


class MoE(nn.Module):
    """Routed experts in place of the dense MLP: route -> dispatch -> experts -> combine."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        E = config.n_experts
        groups = config.expert_groups or ((E, config.expert_hidden),)
        self.router = nn.Linear(config.n_embd, E, bias=False)
        self.experts = Experts(config.n_embd, groups)
        self.shared = None
        if config.n_shared_experts > 0:
            # n always-on SwiGLU experts of hidden h are one SwiGLU of hidden n*h (DeepSeekMoE fuses them so)
            self.shared = MLP(config.n_embd, config.n_shared_experts * config.shared_expert_hidden)
        # aux_free balancing: a bias on the selection scores, learned by the sign rule, not by gradients
        self.register_buffer("expert_bias", torch.zeros(E))

    def forward(self, x):
        """x (B, T, C) -> (output (B, T, C), Switch aux loss, z-loss, routing counts of this batch)."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        logits, scores, weights, experts = self.route(x)  # (N, E), (N, E), (N, K), (N, K)
        load = slots_per_expert(experts, self.config.n_experts)  # (E,) slots per expert
        keep = self.within_capacity(experts, weights) if self.config.capacity_factor > 0 else None  # (N, K)
        if keep is not None:
            weights = weights * keep  # a dropped slot adds nothing: its token keeps only the residual
        aux_loss, z_loss = self.router_losses(logits, scores, load.float())
        counts = self.routing_counts(scores, load.float(), keep)
        # (N, C): each token's K expert outputs, weighted and summed: dispatch_grouped's math, run the fastest
        # way this device allows (moe_kernels.py: grouped GEMM, the per-expert loop, or padded groups)
        y = moe_kernels.dispatch(self, x, weights, experts, load)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, C), aux_loss, z_loss, counts

    def route(self, x):
        """Score the E experts for each token of x (N, C) and choose K: (logits, scores, weights, experts)."""
        logits = moe_kernels.fp32_linear(x, self.router.weight)  # (N, E) fp32 even under autocast (as Switch)
        scores = logits.softmax(-1) if self.config.router_score == "softmax" else logits.sigmoid()  # (N, E)
        # aux_free: the bias steers which experts are chosen, never how much they weigh (Wang et al. 2024)
        select = scores + self.expert_bias if self.config.balance == "aux_free" else scores  # (N, E)
        experts = select.topk(self.config.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(-1, experts)  # (N, K)
        if self.config.norm_topk_prob:  # softmax, top-k, renormalise == top-k of the logits, softmax (Mixtral)
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, weights, experts

    def within_capacity(self, experts, weights):
        """(N, K) mask of the slots each expert can take: at most ceil(cf * N * K / E) per expert,
        keeping its highest-weighted slots (Switch drops by position; by score drops less harm)."""
        N, K = experts.shape
        E = self.config.n_experts
        capacity = math.ceil(self.config.capacity_factor * N * K / E)
        flat_e, flat_w = experts.flatten(), weights.flatten()  # (N*K,)
        by_weight = flat_w.argsort(descending=True, stable=True)
        order = by_weight[flat_e[by_weight].argsort(stable=True)]  # by expert, then by weight descending
        load = slots_per_expert(experts, E)  # (E,)
        starts = load.cumsum(0) - load  # (E,) first sorted position of each expert
        rank = torch.empty_like(order)
        rank[order] = torch.arange(N * K, device=order.device) - starts[flat_e[order]]  # place in its queue
        return (rank < capacity).view(N, K)

    def router_losses(self, logits, scores, load):
        """Switch load-balancing loss (0 unless balance="switch") and router z-loss; load (E,) slots per expert."""
        E = self.config.n_experts
        probs = scores / scores.sum(-1, keepdim=True)  # (N, E) a distribution also for sigmoid scores
        f = load / load.sum()  # (E,) fraction of slots sent to each expert
        P = probs.mean(0)  # (E,) mean router probability of each expert
        aux_loss = E * (f * P).sum() if self.config.balance == "switch" else logits.new_zeros(())  # Switch eq. (4)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()  # ST-MoE eq. (5)
        return aux_loss, z_loss

    @torch.no_grad()
    def routing_counts(self, scores, load, keep):
        """What the router did, as sums over batches (train.routing_summary): load, drops, entropy, tokens."""
        probs = scores / scores.sum(-1, keepdim=True)  # (N, E)
        dropped = (~keep).sum().float() if keep is not None else load.new_zeros(())
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum()
        return {"load": load, "dropped": dropped, "entropy": entropy, "tokens": scores.shape[0]}

    def sort_by_expert(self, weights, experts):
        """The N*K slots grouped by expert: each sorted slot's token, routing weight and expert, (N*K,) each."""
        flat = experts.flatten()  # (N*K,) the expert of each slot
        order = flat.argsort(stable=True)  # (N*K,) slot ids grouped by expert
        return order // experts.shape[1], weights.flatten()[order], flat[order]

    def dispatch_grouped(self, x, weights, experts, load):
        """Sort the N*K slots by expert, gather their tokens, one grouped GEMM per expert weight, weight each
        slot, scatter-add back to its token. Shapes stay (N*K, ...) whatever the routing, so torch.compile
        traces it once."""
        token, gate, _ = self.sort_by_expert(weights, experts)  # (N*K,)
        ys = self.experts.grouped(x.index_select(0, token), load, gate)  # (N*K, C) weighted expert outputs
        return torch.zeros_like(x).index_add_(0, token, ys)  # (N, C)

    def dispatch_loop(self, x, weights, experts):
        """Reference path: one expert at a time over the tokens that chose it."""
        y = torch.zeros_like(x)
        for e in range(self.config.n_experts):
            token, slot = torch.where(experts == e)  # tokens that chose e, and in which of their K slots
            y.index_add_(0, token, (self.experts.one(x[token], e) * weights[token, slot, None]).to(x.dtype))
        return y


# -----------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MoE(config) if config.n_experts > 0 else MLP(config.n_embd, config.ffn_hidden)

    def forward(self, x, cos, sin, cache=None):
        """x (B, T, C) -> (x, aux_loss, z_loss, routing counts); a dense block has no router: 0, 0, None."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        if isinstance(self.mlp, MoE):
            y, aux_loss, z_loss, counts = self.mlp(self.ffn_norm(x))
        else:
            y, aux_loss, z_loss, counts = self.mlp(self.ffn_norm(x)), 0.0, 0.0, None
        return x + y, aux_loss, z_loss, counts


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size > 0, "set vocab_size (train.py takes it from meta.json)"
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = rope_cache(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.moe_layers = [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
        # GPT-2 init: N(0, 0.02), residual output projections scaled down by sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual_out = name.endswith("wo.weight") or ".w2." in name or name.endswith("w2.weight")
                std = 0.02 / math.sqrt(2 * config.n_layer) if residual_out else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> (logits, loss, stats): loss = cross-entropy + the weighted router losses averaged
        over MoE layers; stats (detached): per-layer "routing" counts and the unweighted ce, aux and z. cache: a
        KVCache per layer (generation); idx then holds the positions after those cached."""
        B, T = idx.shape
        start = cache[0].length if cache else 0  # the position of idx's first token
        assert start + T <= self.config.block_size, f"{start + T} positions, block_size is {self.config.block_size}"
        assert start == 0 or T == 1, "after the first call, a cache takes one token at a time"
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.wte(idx)  # (B, T, C)
        aux_loss = z_loss = 0.0
        routing = []  # per MoE layer
        for block, layer_cache in zip(self.blocks, cache or [None] * len(self.blocks)):
            x, aux, z, counts = block(x, cos, sin, layer_cache)
            aux_loss, z_loss = aux_loss + aux, z_loss + z
            if counts is not None:
                routing.append(counts)
        x = self.norm(x)
        if targets is None:  # generation needs the last position only: logits (B, 1, V)
            return self.lm_head(x[:, [-1], :]), None, {"routing": routing}
        logits = self.lm_head(x)  # (B, T, V)
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        n_moe = max(len(self.moe_layers), 1)
        aux_loss, z_loss = aux_loss / n_moe, z_loss / n_moe
        loss = ce + self.config.aux_loss_coef * aux_loss + self.config.z_loss_coef * z_loss
        stats = {"ce": ce.detach(), "aux": torch.as_tensor(aux_loss).detach(), "z": torch.as_tensor(z_loss).detach(),
                 "routing": routing}
        return logits, loss, stats

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (embeddings, linears, expert stacks), not on norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused AdamW (CUDA, CPU, MPS): one kernel for all parameters, on CPU ~5x the per-tensor loop's speed; its
        # step counters live beside the weights (unfused, they stay on the CPU: runtime.finite_state on MPS)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu", "mps"))

    @torch.no_grad()
    def update_expert_bias(self, routing, taken=None):
        """Loss-free balancing (Wang et al. 2024), after each optimizer step: bias_i += rate * sign(mean load -
        load_i) in every MoE layer, the loads (stats["routing"] of the step) summed over processes too. taken: a
        bool tensor, False for a step skipped on the device (the bias then stays exactly as it was)."""
        if self.config.balance != "aux_free" or not self.moe_layers:
            return
        load = torch.stack([counts["load"] for counts in routing])  # (n_moe_layers, E)
        if dist.is_available() and dist.is_initialized():
            on_host = load.device.type == "mps"  # gloo reduces CPU tensors (nccl CUDA ones)
            reduced = load.cpu() if on_host else load
            dist.all_reduce(reduced)
            load = reduced.to(load.device)
        for moe, layer_load in zip(self.moe_layers, load):
            step = self.config.bias_update_rate * torch.sign(layer_load.mean() - layer_load)
            moe.expert_bias += step if taken is None else torch.where(taken, step, 0.0)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, on_token=None):
        """Append max_new_tokens sampled tokens to idx (B, T). Without use_cache (the reference) each step runs the
        whole context (at most block_size tokens) again; with it, a KVCache per layer and one new token per step,
        refilled from the last block_size // 2 tokens once full: the same while prompt and sample fit in
        block_size (with capacity_factor > 0 drops may differ: they depend on the tokens run together).
        on_token(idx), if given, sees idx after each new token (sample.py streams the text with it)."""
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _, _ = self(idx[:, -block_size:])
            elif cache is None or cache[0].length == block_size:  # (re)fill the cache from the context
                context = idx[:, -block_size:] if cache is None else idx[:, -max(1, block_size // 2):]
                cache = [KVCache(self.config, idx.shape[0], idx.device, self.wte.weight.dtype) for _ in self.blocks]
                logits, _, _ = self(context, cache=cache)
            else:
                logits, _, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :] / max(temperature, 1e-6)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat((idx, torch.multinomial(logits.softmax(-1), num_samples=1)), dim=1)
            if on_token is not None:
                on_token(idx)
        return idx


# -----------------------------------------------------------------------------
# Parameter accounting, in closed form from the config (no model is built).


def count_params(cfg):
    """Parameter counts of GPT(cfg): total, active (per token: the router and K of the E experts, of mean size
    when unequal: the expectation under uniform routing), embedding (+ an untied output layer), non_embedding."""
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    attn = 4 * C * C  # wqkv and wo
    norms = 2 * C  # the two RMSNorm weights of a block
    if cfg.n_experts > 0:
        experts = [3 * C * h for h in cfg.expert_sizes]  # w1, w3, w2 of each expert
        router = cfg.n_experts * C
        shared = 3 * C * cfg.n_shared_experts * cfg.shared_expert_hidden
        ffn_total = router + sum(experts) + shared
        ffn_active = router + cfg.top_k * sum(experts) / len(experts) + shared
    else:
        ffn_total = ffn_active = 3 * C * cfg.ffn_hidden
    embedding = V * C * (1 if cfg.tie_embeddings else 2)
    total = embedding + L * (attn + norms + ffn_total) + C  # + final norm
    active = embedding + L * (attn + norms + ffn_active) + C
    active = int(active) if float(active).is_integer() else active
    return {"total": total, "active": active, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(cfg):
    """Training FLOPs per token (3 x the forward's 2 per multiply-add), for FLOP/s and MFU: the ACTIVE parameters
    that multiply a token's activations (counting total would flatter an MoE), the output layer included, plus
    attention over the full T x T as PaLM (appendix B) and nanoGPT count it (a causal kernel does half). What
    the model needs: padded heterogeneous experts and slots dropped over capacity add none."""
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    counts = count_params(cfg)
    norms = (2 * L + 1) * C  # RMSNorm weights: elementwise
    matmul_params = counts["active"] - counts["embedding"] - norms + V * C  # + the output layer
    attention = 2 * 2 * L * C * T  # forward: q @ k^T and weights @ v, T * C multiply-adds each per token per layer
    return 6 * matmul_params + 3 * attention


MIN_FFN_RATIO, MAX_FFN_RATIO = 1.0, 16.0  # a matched dense FFN stays within these multiples of n_embd


def match_dense(moe_cfg, target="active", tolerance=0.005, multiple=1):
    """A dense GPTConfig whose parameter count (embeddings included) equals the MoE's active or total count;
    everything but width is copied. 1. Solve for the FFN hidden size alone (parameters are linear in it).
    2. If that FFN is narrower than MIN_FFN_RATIO or wider than MAX_FFN_RATIO times n_embd, change n_embd too
    with the FFN at that ratio (the quadratic, n_embd rounded to a multiple of 2 * n_head), then solve the FFN
    exactly for it. Rounding leaves under half an FFN unit (3 * n_embd * n_layer / 2), checked against
    `tolerance` (relative). multiple: round the FFN width to a multiple of it instead (8: rows of 16 bytes in
    bf16, as tensor cores like; docs/gpu.md has the mismatch it costs for each config)."""
    if target not in ("active", "total"):
        raise ValueError(f"target must be 'active' or 'total', got {target!r}")
    goal = count_params(moe_cfg)[target]
    dense = replace(moe_cfg, n_experts=0, expert_groups=(), n_shared_experts=0, shared_expert_hidden=0,
                    expert_hidden=0)
    L = moe_cfg.n_layer

    def ffn_for(n_embd):
        base = count_params(replace(dense, n_embd=n_embd, ffn_hidden=1))["total"] - 3 * n_embd * L
        return multiple * round((goal - base) / (3 * n_embd * L * multiple))

    C = moe_cfg.n_embd
    H = ffn_for(C)
    if not MIN_FFN_RATIO * C <= H <= MAX_FFN_RATIO * C:
        r = MIN_FFN_RATIO if H < MIN_FFN_RATIO * C else MAX_FFN_RATIO
        # total(C) = a*C^2 + b*C with the FFN at r*C: a = L*(4 + 3r), b = V*(1 or 2) + 2L + 1
        a = L * (4 + 3 * r)
        b = moe_cfg.vocab_size * (1 if moe_cfg.tie_embeddings else 2) + 2 * L + 1
        C_exact = (-b + math.sqrt(b * b + 4 * a * goal)) / (2 * a)
        step = 2 * moe_cfg.n_head
        C = max(step, step * round(C_exact / step))
        H = max(1, ffn_for(C))
    matched = replace(dense, n_embd=C, ffn_hidden=H, expert_hidden=H)
    got = count_params(matched)["total"]
    mismatch = (got - goal) / goal
    if abs(mismatch) > tolerance:
        raise ValueError(f"cannot match {target} parameters within {tolerance:.2%}: "
                         f"got {got:,} for {goal:,} ({mismatch:+.3%})")
    return matched


def model_fields():
    """Names of the GPTConfig fields (the model's config keys)."""
    return [f.name for f in fields(GPTConfig)]

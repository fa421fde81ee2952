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
        """The valid range of every field: raise ValueError with one line naming the field for a config that
        cannot be built."""
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
        check(self.router_score in ("softmax", "sigmoid"),
              f"router_score must be 'softmax' or 'sigmoid', got {self.router_score!r}")
        check(self.balance in ("switch", "aux_free", "none"),
              f"balance must be 'switch', 'aux_free' or 'none', got {self.balance!r}")
        check(self.moe_impl in ("auto", "grouped", "loop"),
              f"moe_impl must be 'auto', 'grouped' or 'loop', got {self.moe_impl!r}")
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
    """For generation: one attention layer's keys and values (B, nh, block_size, hs) of the positions seen so
    far, so that a new token attends to them instead of recomputing the whole context."""

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
        """x (B, T, C) at the positions of cos and sin (T, hs/2). With a KVCache (generation), x follows the
        cached positions and attends to them too; then T == 1, or the cache is empty."""
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


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's where it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


GROUPED_MM_FALLBACK_SYNCS = 9  # host syncs per MoE layer and step in grouped_mm's fallback: 3 GEMMs, 2 each backward


@torch.compiler.assume_constant_result  # dynamo cannot trace a CUDA query: it calls this once and keeps the answer
def cuda_capability(device):
    """The compute capability (major, minor) of a CUDA device; None elsewhere and on ROCm, whose grouped
    GEMM torch 2.13 runs through the fallback unless an environment variable turns its kernel on."""
    if device.type != "cuda" or torch.version.hip:
        return None
    return torch.cuda.get_device_capability(device)


def use_grouped_mm(device_type, capability, dtype, widths, n_experts, compiling):
    """Whether moe_impl="auto" runs the experts as one grouped GEMM rather than the per-expert loop, from
    the device type, its CUDA capability (cuda_capability), the dtype matmuls run in, the matrix widths
    (n_embd and the expert hidden sizes), n_experts, and whether torch.compile is tracing. In torch 2.13:
    - grouped_mm needs rows aligned to 16 bytes on every device, and compiled it takes bf16 only;
    - on CPU it beats the loop (README, Performance);
    - on CUDA, _grouped_mm_cuda (aten/src/ATen/native/cuda/GroupedBlas.cpp) runs its fused CUTLASS kernel
      for bf16 when the capability's major is 9 or 10 (_scaled_mm_allowed_device(sm90_only, sm100_only):
      H100, H200, B200, GB200); on every other GPU _grouped_mm_fallback copies the group ends to the host
      and runs one matmul per expert, GROUPED_MM_FALLBACK_SYNCS syncs per layer and step where the loop
      syncs once per expert (torch.where). So the loop, unless there are more experts than that."""
    runs = all(w * dtype.itemsize % 16 == 0 for w in widths) and (
        dtype == torch.bfloat16 or (dtype == torch.float32 and not compiling))
    if not runs or device_type not in ("cpu", "cuda"):
        return False
    if device_type == "cpu":
        return True
    fast_kernel = dtype == torch.bfloat16 and capability is not None and capability[0] in (9, 10)
    return fast_kernel or n_experts > GROUPED_MM_FALLBACK_SYNCS


def empty_groups_get_gradients(device):
    """Whether torch's grouped GEMM can give an expert that received no slots a non-zero weight gradient:
    on SM100 (B200-class) GPUs in torch 2.13 (pytorch/pytorch#172439; Hopper and the CPU give zeros)."""
    capability = cuda_capability(device)  # not torch.cuda.get_device_capability: it breaks the compiled graph
    return capability is not None and capability[0] >= 10


def slots_per_expert(experts, n_experts):
    """(E,) int64: how many of the N*K slots chose each expert. A scatter-add into E zeros, not
    torch.bincount, whose output length depends on the data: that costs a device-to-host sync on CUDA
    and a graph break under torch.compile."""
    flat = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def group_rows_multiple(device_type, dtype):
    """The multiple of rows each expert's group is padded to (pad_groups) before the expert GEMMs. On CPU in
    bf16, torch 2.13 runs each expert's matmul through oneDNN, which compiles a kernel for every new shape
    and keeps the last ~1024: a group size the router has not produced before costs ~0.5 ms of compiling
    (against ~0.04 ms for the matmul), and real routing produces new sizes every step. Rounded to 32 rows,
    the sizes repeat. fp32 on CPU (MKL) and CUDA have no per-shape cost: no padding."""
    return 32 if device_type == "cpu" and dtype == torch.bfloat16 else 1


GROUP_CALL_MACS = 2**22  # what one expert's matmul call costs in grouped_mm on CPU in bf16 beyond its work, in
# multiply-adds (~4M: ~10 us at the ~900 GFLOP/s of a large bf16 matmul here; see batch_experts)


def batch_experts(device_type, dtype, load, width):
    """Whether the experts run as one torch.bmm over groups all padded to the largest, rather than one
    grouped_mm over groups of their own sizes; load (E,) slots per expert, width = n_embd * expert hidden
    size (the widest), the multiply-adds of one row of one expert matmul. On CPU in bf16 grouped_mm runs a
    small oneDNN matmul per expert, each with a fixed cost; bmm runs the E equal matmuls as fast as one
    dense matmul of the same FLOPs. Measured, forward and both gradients of one expert weight at bench.py
    --quick's balanced shapes, bmm vs grouped_mm: E64k8 4.2 vs 8.0 ms, E16k4 4.0 vs 5.0, E4k2 3.9 vs 4.3.
    With the router's routing, padding to the largest group costs rows of work: so bmm only while they
    are fewer than GROUP_CALL_MACS / width per expert (128 rows at E64k8's shapes, 32 at E4k2's; more made
    E4k2 slower: README, Performance). Eagerly only: compiled, shapes must not depend on the routing."""
    if device_type != "cpu" or dtype != torch.bfloat16 or torch.compiler.is_compiling():
        return False
    E = load.shape[0]
    return bool(E * load.max() <= load.sum() + E * GROUP_CALL_MACS // width)


def pad_groups(token, gate, expert, load, multiple, equal=False):
    """Pad each expert's group of sorted slots to a multiple of `multiple` rows, and with equal=True all to the
    length of the largest. token, gate, expert (N*K,): each sorted slot's token, routing weight and expert;
    load (E,) slots per expert. A padding slot reads token 0 with weight 0: it adds nothing to the output and
    passes no gradient. Returns the padded token, gate and load."""
    padded = (load + multiple - 1) // multiple * multiple  # (E,)
    if equal:
        padded = padded.max().expand_as(padded)
    if torch.compiler.is_compiling():  # a fixed length that fits any routing, so that shapes stay static:
        rows = multiple * (-(-token.shape[0] // multiple) + load.shape[0] - 1)  # >= padded.sum()
        padded = torch.cat([padded[:-1], rows - padded[:-1].sum(0, keepdim=True)])  # spare rows join the last group
    else:
        rows = int(padded.sum())
    shift = (padded.cumsum(0) - padded) - (load.cumsum(0) - load)  # (E,) how far each group moves down
    row = torch.arange(token.shape[0], device=token.device) + shift[expert]  # (N*K,) each slot's padded row
    token = torch.zeros(rows, dtype=token.dtype, device=token.device).index_copy(0, row, token)
    gate = gate.new_zeros(rows).index_copy(0, row, gate)
    return token, gate, padded


class Experts(nn.Module):
    """The routed experts: SwiGLU MLPs whose weights are stacked (E, ...) so that one grouped
    GEMM runs them all. Heterogeneous experts are stored one stack per group of equal size."""

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
        """All experts' weights as (E, C, H), (E, C, H), (E, H, C). With unequal sizes the narrower
        experts are zero-padded to the widest H: silu(0) * 0 = 0 through zero rows of w2, so padded
        units change nothing (they cost compute, and get no gradient: padding is not a parameter)."""
        if len(self.w1) == 1:
            return self.w1[0], self.w3[0], self.w2[0]
        H = max(w.shape[2] for w in self.w1)
        w1 = torch.cat([F.pad(w, (0, H - w.shape[2])) for w in self.w1])
        w3 = torch.cat([F.pad(w, (0, H - w.shape[2])) for w in self.w3])
        w2 = torch.cat([F.pad(w, (0, 0, 0, H - w.shape[1])) for w in self.w2])
        return w1, w3, w2

    def grouped(self, xs, load, gate, equal=False):
        """All experts on their slots at once: xs (N*K, C) sorted by expert, load (E,) slots per expert,
        gate (N*K,) each slot's routing weight. Returns gate * expert(xs), (N*K, C). With equal=True every
        expert has the same number of slots, and the E matmuls of each weight are one torch.bmm."""
        w1, w3, w2 = self.stacked()
        if empty_groups_get_gradients(xs.device):
            # an expert with no slots must get a zero gradient: pass its weights through a where() (they
            # are unused anyway), whose backward puts exact zeros there whatever the kernel wrote, NaN too
            used = (load > 0)[:, None, None]  # (E, 1, 1)
            w1, w3, w2 = (torch.where(used, w, 0.0) for w in (w1, w3, w2))
        w1, w3, w2 = (w.to(xs.dtype) for w in (w1, w3, w2))
        if equal:  # (E*R, C) as (E, R, C) @ (E, C, H)
            mm = lambda a, w: torch.bmm(a.view(w.shape[0], -1, a.shape[1]), w).flatten(0, 1)
        else:
            offs = load.cumsum(0).to(torch.int32)  # (E,) where each expert's group ends
            mm = lambda a, w: F.grouped_mm(a, w, offs=offs)
        h = F.silu(mm(xs, w1)) * mm(xs, w3)  # (N*K, H)
        gate = gate[:, None].to(xs.dtype)
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
        # bench.py only, for the best case of dispatch (as torchtitan, OLMo-core and megablocks benchmark it):
        # route slot s = n * K + k to expert s mod E, so every expert gets N*K/E slots. Not a config knob, so that
        # no training run can use it: the tokens would go to experts by position, whatever the router says.
        self.force_balance = False

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
        # (N, C): each token's K expert outputs, weighted and summed
        if self.use_grouped(x):
            y = self.dispatch_grouped(x, weights.to(x.dtype), experts, load)
        else:
            y = self.dispatch_loop(x, weights.to(x.dtype), experts)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, C), aux_loss, z_loss, counts

    def route(self, x):
        """Score the E experts for each token of x (N, C) and choose K: (logits, scores, weights, experts)."""
        # fp32 router even under bf16 autocast: softmax and logsumexp^2 are precision-sensitive
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        scores = logits.softmax(-1) if self.config.router_score == "softmax" else logits.sigmoid()  # (N, E)
        # aux_free: the bias steers which experts are chosen, never how much they weigh (Wang et al. 2024)
        select = scores + self.expert_bias if self.config.balance == "aux_free" else scores  # (N, E)
        if self.force_balance:  # round-robin over tokens; a token's K slots go to K different experts
            N, K = x.shape[0], self.config.top_k
            experts = (torch.arange(N * K, device=x.device) % self.config.n_experts).view(N, K)  # (N, K)
        else:
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
        """Switch load-balancing loss (0 unless balance="switch") and router z-loss, from the router's
        logits and scores (N, E) and the slots sent to each expert, load (E,)."""
        E = self.config.n_experts
        probs = scores / scores.sum(-1, keepdim=True)  # (N, E) a distribution also for sigmoid scores
        f = load / load.sum()  # (E,) fraction of slots sent to each expert
        P = probs.mean(0)  # (E,) mean router probability of each expert
        aux_loss = E * (f * P).sum() if self.config.balance == "switch" else logits.new_zeros(())  # Switch eq. (4)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()  # ST-MoE eq. (5)
        return aux_loss, z_loss

    @torch.no_grad()
    def routing_counts(self, scores, load, keep):
        """What the router did with this batch, as sums that add up over batches (see GPT.routing_summary):
        slots sent to each expert (E,), slots dropped over capacity, router entropy summed over tokens."""
        probs = scores / scores.sum(-1, keepdim=True)  # (N, E)
        dropped = (~keep).sum().float() if keep is not None else load.new_zeros(())
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum()
        return {"load": load, "dropped": dropped, "entropy": entropy, "tokens": scores.shape[0]}

    def use_grouped(self, x):
        if self.config.moe_impl == "auto":
            return use_grouped_mm(x.device.type, cuda_capability(x.device), compute_dtype(x),
                                  [x.shape[1], *self.config.expert_sizes], self.config.n_experts,
                                  torch.compiler.is_compiling())
        return self.config.moe_impl == "grouped"

    def dispatch_grouped(self, x, weights, experts, load):
        """Sort the N*K slots by expert, run every expert in one grouped GEMM (or one bmm), scatter-add back.
        Shapes stay (N*K, ...) whatever the routing (pad_groups, too, gives a fixed length when compiled),
        so torch.compile traces it once."""
        K, dtype = experts.shape[1], compute_dtype(x)
        flat = experts.flatten()  # (N*K,) the expert of each slot
        order = flat.argsort(stable=True)  # (N*K,) slot ids grouped by expert
        token, gate = order // K, weights.flatten()[order]  # (N*K,) each sorted slot's token and routing weight
        multiple = group_rows_multiple(x.device.type, dtype)
        equal = batch_experts(x.device.type, dtype, load, x.shape[1] * max(self.config.expert_sizes))
        if multiple > 1 or equal:
            token, gate, load = pad_groups(token, gate, flat[order], load, multiple, equal)
        # grouped_mm is not autocast-aware: cast x to the compute dtype before the gather, on N rows, not N*K
        xc = x.to(dtype)  # (N, C)
        ys = self.experts.grouped(xc.index_select(0, token), load, gate, equal)  # (N*K, C) weighted
        # (N, C) each token's K slots summed, in the compute dtype as torchtitan does (bf16 under autocast)
        return torch.zeros_like(xc).index_add_(0, token, ys).to(x.dtype)

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
        """idx (B, T) token ids -> (logits, loss, stats). With targets, loss = cross-entropy + the weighted
        router losses averaged over MoE layers. stats, detached, for logs and the aux_free update: "routing",
        per MoE layer what its router did (MoE.routing_counts), and with targets the unweighted ce, aux and z.
        cache, for generation: a KVCache per layer; idx then holds the positions after those cached."""
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
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused AdamW: one kernel for all parameters; on CPU ~5x faster than the per-tensor loop, which
        # matters most for an MoE, whose optimizer step touches every expert's weights
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def update_expert_bias(self, routing):
        """Loss-free balancing (Wang et al. 2024), after each optimizer step: in every MoE layer,
        bias_i += rate * sign(mean load - load_i), from `routing` (stats["routing"] summed over the
        step's micro-steps), summed over processes too so that every process keeps the same bias."""
        if self.config.balance != "aux_free" or not self.moe_layers:
            return
        load = torch.stack([counts["load"] for counts in routing])  # (n_moe_layers, E)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        for moe, layer_load in zip(self.moe_layers, load):
            moe.expert_bias += self.config.bias_update_rate * torch.sign(layer_load.mean() - layer_load)

    @torch.no_grad()
    def routing_summary(self, routing):
        """Per MoE layer, the statistics logs show of `routing` (stats["routing"], summed over batches): each
        expert's share of the slots, max/mean load, coefficient of variation, share of slots dropped,
        router entropy per token, and with aux_free balancing the range of the bias."""
        summary = []
        for moe, counts in zip(self.moe_layers, routing):
            slots = counts["load"].sum().clamp_min(1)
            load = counts["load"] / slots  # (E,)
            layer = {
                "load": [round(v, 4) for v in load.tolist()],
                "max_mean": (load.max() / load.mean()).item(),
                "cv": (load.std(unbiased=False) / load.mean()).item(),
                "dropped": (counts["dropped"] / slots).item(),
                "entropy": (counts["entropy"] / max(counts["tokens"], 1)).item(),
            }
            if self.config.balance == "aux_free":
                layer["bias_range"] = [moe.expert_bias.min().item(), moe.expert_bias.max().item()]
            summary.append(layer)
        return summary

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T), each conditioned on at most block_size tokens.
        Without use_cache (the reference), every step runs the model on the whole context again. With it, a
        KVCache per layer keeps the keys and values of the positions seen, and each step runs the new token
        alone; once block_size positions are cached, it starts again from the last block_size // 2 tokens (one
        full forward per block_size // 2 new tokens). So while prompt and sample fit in block_size both compute
        the same; past it a token sees between half and all of a block where the reference sees a full one.
        (With capacity_factor > 0 drops also differ: which slots overflow depends on the tokens run together.)"""
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
        return idx


# -----------------------------------------------------------------------------
# Parameter accounting, in closed form from the config (no model is built).


def count_params(cfg):
    """Parameter counts of GPT(cfg): total, active (per token), embedding, non_embedding.

    The router is counted as active (every token uses all of it); K of the E routed experts are
    active. With experts of unequal sizes, active counts K times the mean expert size: the
    expectation under uniform routing. Embedding = token embedding plus an untied output layer."""
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
    """Training FLOPs per token (forward + backward: 3 x the forward's 2 per multiply-add), the numerator of
    achieved FLOP/s and MFU. Counted on the ACTIVE parameters that multiply a token's activations: attention's
    projections, the router, K of the E experts (of mean size, as count_params's active), shared experts and
    the output layer (V x C: a matmul, tied to the embedding or not; the embedding lookup and the norms do no
    matmul). Counting total parameters would flatter an MoE. Plus attention's scores and weighted sum over the
    full T x T with T = block_size, as PaLM (appendix B) and nanoGPT count it: a causal kernel does about half
    of that, so this overstates it by 6 * n_layer * n_embd * block_size per token. What the model needs, not
    what an implementation spends: zero-padded heterogeneous experts and slots dropped over capacity add none."""
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    counts = count_params(cfg)
    norms = (2 * L + 1) * C  # RMSNorm weights: elementwise
    matmul_params = counts["active"] - counts["embedding"] - norms + V * C  # + the output layer
    attention = 2 * 2 * L * C * T  # forward: q @ k^T and weights @ v, T * C multiply-adds each per token per layer
    return 6 * matmul_params + 3 * attention


MIN_FFN_RATIO, MAX_FFN_RATIO = 1.0, 16.0  # a matched dense FFN stays within these multiples of n_embd


def match_dense(moe_cfg, target="active", tolerance=0.005):
    """A dense GPTConfig whose parameter count equals the MoE's active or total count.

    Everything but width is copied: depth, heads, context, vocabulary, tying. The rule:
    1. Solve for the FFN hidden size alone (attention stays identical); parameters are linear in it.
    2. If that needs an FFN narrower than MIN_FFN_RATIO or wider than MAX_FFN_RATIO times n_embd,
       widen or narrow n_embd too, with the FFN held at that ratio (solve the quadratic, round
       n_embd to a multiple of 2 * n_head), then solve the FFN hidden size exactly for that width.
    All stored parameters are matched, embeddings included; rounding the FFN hidden size to the nearest
    unit leaves a mismatch below half an FFN unit (3 * n_embd * n_layer / 2 parameters), and it is
    checked against `tolerance` (relative)."""
    if target not in ("active", "total"):
        raise ValueError(f"target must be 'active' or 'total', got {target!r}")
    goal = count_params(moe_cfg)[target]
    dense = replace(moe_cfg, n_experts=0, expert_groups=(), n_shared_experts=0, shared_expert_hidden=0,
                    expert_hidden=0)
    L = moe_cfg.n_layer

    def ffn_for(n_embd):
        base = count_params(replace(dense, n_embd=n_embd, ffn_hidden=1))["total"] - 3 * n_embd * L
        return round((goal - base) / (3 * n_embd * L))

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

"""
How the MoE's experts run fast on each device: the index, padding and kernel choices that model.py's math
leaves out (as torchtitan keeps them apart from its MoE model). model.py says *what* an MoE layer computes;
this module says *how* on this device, dtype and compile state, each choice with its measured reason.

MoE.forward calls dispatch(); MoE.route calls fp32_linear(). Every path computes the math of
MoE.dispatch_grouped and MoE.dispatch_loop (tests/test_model.py compares them, outputs and gradients).
Legend as in model.py: N = B*T tokens, E = n_experts, K = top_k, C = n_embd, H = expert hidden size.
"""

import sys

import torch
import torch.nn.functional as F


def dispatch(moe, x, weights, experts, load):
    """dispatch -> experts -> combine for one MoE layer: x (N, C), the router's weights and experts (N, K),
    load (E,) slots per expert -> (N, C). The loop where grouped GEMM cannot run or does not pay
    (use_grouped); MoE.dispatch_grouped as written where nothing needs changing; else its steps in the
    compute dtype, with each expert's group padded (group_rows_multiple, batch_experts) and the
    empty-group gradient guard (empty_groups_get_gradients)."""
    weights = weights.to(x.dtype)
    if not use_grouped(moe.config, x):
        return moe.dispatch_loop(x, weights, experts)
    dtype = compute_dtype(x)
    multiple = group_rows_multiple(x.device.type, dtype)
    equal = batch_experts(x.device.type, dtype, load, x.shape[1] * max(moe.config.expert_sizes))
    guard = empty_groups_get_gradients(x.device)
    if dtype == x.dtype and multiple == 1 and not equal and not guard:
        return moe.dispatch_grouped(x, weights, experts, load)
    # the routing weights stay fp32: each slot is weighted and each token's K slots summed in fp32, as the loop
    # does (a bf16 expert output times an fp32 weight, index_add_ into the fp32 residual stream's dtype)
    token, gate, expert = moe.sort_by_expert(weights, experts)  # (N*K,) each
    if multiple > 1 or equal:
        token, gate, load = pad_groups(token, gate, expert, load, multiple, equal)
    # grouped_mm is not autocast-aware: cast x to the compute dtype before the gather, on N rows, not N*K
    xc = x.to(dtype)  # (N, C)
    mm = expert_matmul(load, equal, guard, dtype)
    ys = moe.experts.grouped(xc.index_select(0, token), load, gate, mm)  # (N*K, C), fp32 under autocast
    return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))  # (N, C)


def expert_matmul(load, equal, guard, dtype):
    """The a (rows, in) @ w (E, in, out) per expert group that Experts.grouped runs, for groups of `load` (E,)
    rows: grouped_mm, or with equal=True (every group the same size) one torch.bmm; a and the weights cast to
    the compute dtype (a arrives in fp32 where the fp32 routing weight scaled it), and with guard=True an
    expert with no rows given exact zero gradients."""
    offs = None if equal else load.cumsum(0).to(torch.int32)  # (E,) where each expert's group ends
    used = (load > 0)[:, None, None] if guard else None  # (E, 1, 1)

    def mm(a, w):
        if guard:  # its weights pass a where(), whose backward writes exact zeros where unused, NaN too
            w = torch.where(used, w, 0.0)
        a, w = a.to(dtype), w.to(dtype)
        if equal:  # (E*R, in) as (E, R, in) @ (E, in, out)
            return torch.bmm(a.view(w.shape[0], -1, a.shape[1]), w).flatten(0, 1)
        return F.grouped_mm(a, w, offs=offs)
    return mm


def fp32_linear(x, weight):
    """x @ weight.T in fp32 even under autocast (the router: softmax and logsumexp^2 are precision-sensitive)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's where it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


# -----------------------------------------------------------------------------
# grouped GEMM or the per-expert loop


def use_grouped(config, x):
    """Whether this layer runs its experts as grouped GEMMs: moe_impl, or with "auto" use_grouped_mm's rule.
    moe_impl="grouped" where torch's grouped_mm cannot run (grouped_mm_runs) takes the loop: grouped_note
    says so once, up front, in train.py and sample.py."""
    args = (x.device.type, cuda_capability(x.device), compute_dtype(x), [x.shape[1], *config.expert_sizes])
    if config.moe_impl == "auto":
        return use_grouped_mm(*args, config.n_experts, torch.compiler.is_compiling())
    return config.moe_impl == "grouped" and grouped_mm_runs(*args, torch.compiler.is_compiling())


def grouped_note(config, device, dtype, compiled):
    """The line train.py and sample.py print where moe_impl="grouped" cannot run on this device in the
    compute dtype (compiled or not) and the loop runs instead; None where nothing changes. The rule every
    script shares (bench.dispatch_paths too): grouped_mm_runs."""
    if config.n_experts == 0 or config.moe_impl != "grouped":
        return None
    widths = [config.n_embd, *config.expert_sizes]
    if grouped_mm_runs(device.type, cuda_capability(device), dtype, widths, compiled):
        return None
    precision = str(dtype).removeprefix("torch.")
    return (f"note: moe_impl=grouped cannot run {'compiled' if compiled else 'eagerly'} in {precision} on "
            f"{device.type} (torch's grouped_mm needs rows of a multiple of 16 bytes, bf16 when compiled, a CPU "
            f"or CUDA device, and on Windows no 9.x/10.x GPU): the experts run as the per-expert loop, the same math")


GROUPED_MM_FALLBACK_SYNCS = 9  # host syncs per MoE layer and step in grouped_mm's fallback: 3 GEMMs, 2 each backward


@torch.compiler.assume_constant_result  # dynamo cannot trace a CUDA query: it calls this once and keeps the answer
def cuda_capability(device):
    """The compute capability (major, minor) of a CUDA device; None elsewhere and on ROCm, whose grouped
    GEMM torch 2.13 runs through the fallback unless an environment variable turns its kernel on."""
    if device.type != "cuda" or torch.version.hip:
        return None
    return torch.cuda.get_device_capability(device)


def grouped_mm_runs(device_type, capability, dtype, widths, compiling):
    """Whether torch 2.13's grouped_mm runs at all here (the test for moe_impl="grouped"; "auto" asks
    use_grouped_mm): rows of the matrix widths (n_embd and the expert hidden sizes) aligned to 16 bytes on
    every device; compiled, bf16 only (torch/_inductor/kernel/mm_grouped.py); CPU or CUDA (no MPS kernel
    is claimed); and not a Windows build on a 9.x/10.x GPU: torch's Windows builds have no grouped kernel
    and stop with an error where the fused kernel would run (docs/gpu.md)."""
    aligned = all(w * dtype.itemsize % 16 == 0 for w in widths)
    dtypes = dtype == torch.bfloat16 or (dtype == torch.float32 and not compiling)
    windows_sm90 = sys.platform == "win32" and capability is not None and capability[0] in (9, 10)
    return aligned and dtypes and device_type in ("cpu", "cuda") and not windows_sm90


def use_grouped_mm(device_type, capability, dtype, widths, n_experts, compiling):
    """Whether moe_impl="auto" runs the experts as one grouped GEMM rather than the per-expert loop, from
    the device type, its CUDA capability (cuda_capability), the dtype matmuls run in, the matrix widths
    (n_embd and the expert hidden sizes), n_experts, and whether torch.compile is tracing. In torch 2.13:
    - grouped_mm must run at all (grouped_mm_runs: alignment, dtype, device, not Windows on 9.x/10.x);
    - on CPU it beats the loop (docs/performance.md);
    - on CUDA, _grouped_mm_cuda (aten/src/ATen/native/cuda/GroupedBlas.cpp) runs its fused CUTLASS kernel
      for bf16 when the capability's major is 9 or 10 (_scaled_mm_allowed_device(sm90_only, sm100_only):
      H100, H200, B200, GB200); on every other GPU _grouped_mm_fallback copies the group ends to the host
      and runs one matmul per expert, GROUPED_MM_FALLBACK_SYNCS syncs per layer and step where the loop
      syncs once per expert (torch.where). So the loop, unless there are more experts than that."""
    if not grouped_mm_runs(device_type, capability, dtype, widths, compiling):
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


# -----------------------------------------------------------------------------
# padding each expert's group of rows (CPU bf16)


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
    E4k2 slower: docs/performance.md). Eagerly only: compiled, shapes must not depend on the routing."""
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

"""The parts of the GPU check (tests/gpu_check.sh runs each under `timeout`). Each prints one verdict line,
PASS, FAIL or SKIP with its reason, and exits with 1 on FAIL. Without a CUDA GPU every part says SKIP; with
GPU_CHECK_REHEARSE=1 the parts run on the CPU as far as they can (no sync debug mode, nothing compiled, no bench),
to try the script itself.

    python tests/gpu_check.py dispatch        # which dispatch "auto" chose here; grouped against the loop
    python tests/gpu_check.py no_sync         # a compiled training step (and a skipped one) syncs nothing
    python tests/gpu_check.py resume_sample   # train.py, a resumed run and sample.py on the GPU
    python tests/gpu_check.py bench           # bench.py --quick in bf16: its ratios to the dense model
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

BF16 = torch.bfloat16
E4K2 = dict(n_head=8, n_embd=256, n_experts=4, top_k=2, expert_hidden=512)  # config/moe_e4k2.py's widths


def verdict(ok, claim, detail):
    print(f"{'PASS' if ok else 'FAIL'} {claim}: {detail}", flush=True)
    return 0 if ok else 1


def skip(claim, why):
    print(f"SKIP {claim}: {why}", flush=True)
    return 0


REHEARSE = os.environ.get("GPU_CHECK_REHEARSE") == "1"


def no_gpu(device):
    """Whether a part skips: no CUDA GPU, unless rehearsing on the CPU."""
    return device.type != "cuda" and not REHEARSE


def sync_debug(mode):
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(mode)


def dispatch(device):
    """moe_kernels.use_grouped_mm's choice on this GPU at moe_e4k2's widths, compiled in bf16, against the
    rule of docs/gpu.md; and the grouped GEMM run eagerly in bf16 against the loop (outputs)."""
    claim = "dispatch"
    if no_gpu(device):
        return skip(claim, "needs a CUDA GPU")
    from model import GPTConfig, MoE
    from moe_kernels import cuda_capability, use_grouped_mm
    capability = cuda_capability(device)
    chose = use_grouped_mm(device.type, capability, BF16, [256, 512], 4, True)
    expected = device.type == "cpu" or capability is not None and capability[0] in (9, 10) and sys.platform != "win32"
    errors = []
    x = torch.randn(8 * 256, 256, device=device, generator=torch.Generator(device).manual_seed(0))
    outputs = {}
    for impl in ("grouped", "loop"):
        torch.manual_seed(1)
        moe = MoE(GPTConfig(vocab_size=64, block_size=256, n_layer=1, moe_impl=impl, **E4K2)).to(device)
        with torch.autocast(device.type, dtype=BF16), torch.no_grad():
            outputs[impl] = moe(x.view(8, 256, 256))[0].float()
    a, b = outputs["grouped"], outputs["loop"]
    error = ((a - b).norm() / b.norm()).item()
    errors.append(error)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return verdict(chose == expected and error < 2e-2, claim,
                   f"auto chose {'grouped GEMM' if chose else 'the loop'} on {name} (capability {capability}), "
                   f"docs/gpu.md says {'grouped GEMM' if expected else 'the loop'}; grouped vs loop in bf16, "
                   f"relative error {error:.1e} (< 2e-2)")


def tiny_training(device, compiled):
    """What train.optimizer_step reads: a 2-layer MoE at moe_e4k2's widths on random tokens, bf16 autocast."""
    import train
    from model import GPT, GPTConfig
    from runtime import System, compile_model
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=256, n_layer=2, **E4K2)).to(device)
    run = SimpleNamespace(raw_model=model, model=compile_model(model) if compiled else model,
                          optimizer=model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), device.type),
                          train_data=np.random.default_rng(0).integers(0, 512, 100_000, dtype=np.uint16),
                          block_size=256, data_rng=torch.Generator().manual_seed(0), accum=2,
                          system=System(device, BF16, torch.autocast(device.type, dtype=BF16), 0, 1),
                          bad=torch.zeros(3, dtype=torch.long, device=device))
    cfg = SimpleNamespace(**{**train.defaults(), "batch_size": 8, "warmup_iters": 0})
    return run, cfg


def no_sync(device):
    """train.optimizer_step on a compiled model under sync_debug("error"): a finite step and
    a step with NaN gradients (skipped on the GPU: weights and optimizer state unchanged), no host sync."""
    claim = "no host sync in a compiled training step"
    if no_gpu(device):
        return skip(claim, "needs a CUDA GPU")
    import train
    from moe_kernels import cuda_capability
    capability = cuda_capability(device)
    if device.type == "cuda" and (capability is None or capability[0] not in (9, 10)):
        return skip(claim, f"capability {capability}: 'auto' takes the loop here, whose torch.where syncs once "
                           f"per expert")
    run, cfg = tiny_training(device, compiled=device.type == "cuda")
    for it in range(2):  # compile, warm up
        train.optimizer_step(run, cfg, it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    state = lambda: [t.clone() for t in run.raw_model.state_dict().values()] + \
        [v.clone() for s in run.optimizer.state.values() for v in s.values()]
    before, nan_grads = None, False
    try:
        sync_debug("error")
        train.count_bad_step(run, train.optimizer_step(run, cfg, 2)[2])
        sync_debug(0)
        before = state()
        forward = run.model
        run.model = lambda x, y: (lambda out: (out[0], out[1] * float("nan"), out[2]))(forward(x, y))
        sync_debug("error")
        train.count_bad_step(run, train.optimizer_step(run, cfg, 3)[2])
        nan_grads = True
    except RuntimeError as e:
        sync_debug(0)
        return verdict(False, claim, f"{'the skipped' if before else 'a finite'} step synced: "
                                     f"{str(e).splitlines()[0][:200]}")
    finally:
        sync_debug(0)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, state(), strict=True))
    counted = run.bad.tolist() == [1, 1, 1]
    return verdict(nan_grads and unchanged and counted, claim,
                   f"finite and NaN steps ran under sync debug mode 'error'; the NaN step left weights and "
                   f"optimizer state {'unchanged' if unchanged else 'CHANGED'}, counted {run.bad.tolist()} "
                   f"(expected [1, 1, 1])")


def corpus(n_words=40_000):
    """Made-up English-like text, enough for a 512-token BPE (as tests/conftest.py makes without Shakespeare)."""
    import random
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvw" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(2000)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_words // 12))


def resume_sample(device):
    """train.py on the GPU for 4 steps, resumed to 6, then sample.py from its checkpoint."""
    claim = "resume and sample.py on CUDA"
    if no_gpu(device):
        return skip(claim, "needs a CUDA GPU")
    import prepare
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    docs = prepare.documents(corpus())
    train_docs, val_docs = prepare.split_train_val(docs, 0.1)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        prepare.prepare(os.path.join(tmp, "tiny"), train_docs, val_docs, ["generated"], vocab_size=512)
    out = os.path.join(tmp, "out")
    args = [sys.executable, "train.py", "--dataset=tiny", f"--data_root={tmp}", f"--out_dir={out}", "--n_layer=2",
            "--n_head=4", "--n_embd=128", "--block_size=64", "--n_experts=4", "--top_k=2", "--expert_hidden=256",
            "--batch_size=8", "--eval_iters=2", "--eval_interval=2", "--log_interval=2", "--warmup_iters=2",
            f"--device={device.type}", "--compile=false"]
    runs = [subprocess.run(args + extra, cwd=ROOT, capture_output=True, text=True)
            for extra in (["--max_iters=4"], ["--max_iters=6", "--init_from=resume"])]
    runs.append(subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", f"--device={device.type}",
                                "--num_samples=1", "--max_new_tokens=20"], cwd=ROOT, capture_output=True, text=True))
    failed = next((r for r in runs if r.returncode != 0), None)
    if failed:
        return verdict(False, claim, f"{' '.join(failed.args[1:3])} failed: {failed.stderr.strip()[-300:]}")
    iters = [r["iter"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "val_loss" in r]
    sampled = f"tokens/s on {device.type}" in runs[2].stdout
    ok = iters == [0, 2, 4, 6] and "resumed from iteration 4" in runs[1].stdout and sampled
    return verdict(ok, claim, f"evaluations at {iters} (expected [0, 2, 4, 6]); sample.py: "
                              f"{runs[2].stdout.strip().splitlines()[-1]}")


def bench(device):
    """bench.py --quick in bf16, eager (13 models compiled would not fit the check's 5 minutes), its ratios."""
    claim = "bench ratios"
    if device.type != "cuda":
        return skip(claim, "needs a CUDA GPU")
    path = os.path.join(tempfile.mkdtemp(prefix="gpu_check_"), "bench.json")
    r = subprocess.run([sys.executable, "bench.py", "--quick", "--dtype=bfloat16", "--compile=false", "--repeats=3",
                        "--warmup=3", f"--json_path={path}"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        return verdict(False, claim, f"bench.py failed: {r.stderr.strip()[-300:]}")
    rows = json.load(open(path))["rows"]
    for row in rows:
        print(f"      {row['model']:<13} {row['moe_impl']:<8} {row['routing']:<9} {row['ms_per_step']:7.1f} ms, "
              f"x dense {row.get('ratio_to_dense') or 1:.2f}, x best {row.get('ratio_to_balanced') or 1:.2f}")
    return verdict(len(rows) > 1, claim, f"{len(rows)} rows timed, ratios above (eager, bf16, --quick shapes)")


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else ""
    parts = {f.__name__: f for f in (dispatch, no_sync, resume_sample, bench)}
    if part not in parts:
        sys.exit(f"usage: python tests/gpu_check.py {'|'.join(parts)}")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(ROOT), "shared", "tiktoken-cache"))
    gpu = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    sys.exit(parts[part](gpu))

"""torch.compile: the whole model in one graph (fullgraph), no recompiles as routing changes, and
compiled output equal to eager. On CPU the grouped GEMM compiles only in bf16; in fp32 the model
falls back to the per-expert loop, which must compile too. Compiling on 2 cores is slow: 2 tests."""

import pytest
import torch
import torch._dynamo

from model import GPT, GPTConfig
from runtime import compile_model

pytestmark = pytest.mark.slow  # compiling takes minutes on 2 cores


@pytest.mark.parametrize("dtype, path", [(torch.bfloat16, "grouped"), (torch.float32, "loop")])
def test_compiles_in_one_graph_without_recompiles(dtype, path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                    expert_hidden=32)
    model = GPT(cfg).to(dtype)
    idx, targets = torch.randint(0, 64, (2, 2, 16))
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):  # as compile_model sets it
        explained = torch._dynamo.explain(model)(idx, targets)  # what dynamo traces, without compiling
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert ("grouped_mm" in explained.graphs[0].code) == (path == "grouped")  # the path "auto" picks
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = compile_model(model, fullgraph=True)  # a graph break would raise
    for _ in range(20):  # new tokens each step: the routing, and so every expert's count, changes
        idx, targets = torch.randint(0, 64, (2, 2, 16))
        _, loss, _ = compiled(idx, targets)
        loss.backward()
        model.zero_grad()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"] and not counters["recompiles"]
    with torch.no_grad():
        eager_logits, eager_loss, _ = model(idx, targets)
        compiled_logits, compiled_loss, _ = compiled(idx, targets)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_logits, eager_logits, **tol)
    torch.testing.assert_close(compiled_loss, eager_loss, **tol)

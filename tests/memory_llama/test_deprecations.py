"""A normal `generate`, a short `Trainer` run and a load raise no FutureWarning or DeprecationWarning from
this package: its code follows the installed transformers' conventions (`cache=`, output names), so no
deprecated path is taken on its behalf."""

import warnings
from pathlib import Path

import pytest
import torch

import modeling_memory
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.training.trainer import MemoryTrainer
from conftest import PAD, tiny_config, train_steps
from training_helpers import tiny_dataset, tiny_training_args

PACKAGE_DIR = str(Path(modeling_memory.__file__).parent)


def deprecations_of_ours(caught) -> list[str]:
    """Deprecation warnings raised in this package's files, or about arguments this package passes."""
    ours = []
    for warning in caught:
        if not issubclass(warning.category, (FutureWarning, DeprecationWarning)):
            continue
        message = str(warning.message)
        if warning.filename.startswith(PACKAGE_DIR) or "past_key_values" in message or "`cache`" in message:
            ours.append(f"{warning.filename}:{warning.lineno}: {message[:200]}")
    return ours


@pytest.fixture
def caught():
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield records


def test_generate_load_and_train_raise_no_deprecation_warnings(tmp_path, caught):
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config()))
    model.save_pretrained(tmp_path / "model")
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    for extra in ({}, {"num_beams": 2}, {"do_sample": True}, {"cache_implementation": "static"}):
        loaded.generate(ids, max_new_tokens=4, pad_token_id=PAD, **extra)
    trainer = MemoryTrainer(model=loaded, args=tiny_training_args(tmp_path / "run", max_steps=2, per_device_train_batch_size=4),
                            train_dataset=tiny_dataset())
    trainer.train()
    assert deprecations_of_ours(caught) == []


def test_the_old_argument_name_still_works_with_the_library_warning(caught):
    """`past_key_values=` is accepted (transformers' own deprecation, until it is removed) and means `cache=`."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config()))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :3], cache=cache, use_cache=True)
        old_name = model(ids[:, 3:], past_key_values=cache, use_cache=True).logits
        full = model(ids).logits[:, 3:]
    torch.testing.assert_close(old_name, full, rtol=1e-4, atol=1e-5)
    assert any("past_key_values" in str(w.message) for w in caught)

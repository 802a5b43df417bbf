"""A keyword argument of MemoryLlamaConfig with a memory prefix that is no field is an error naming the closest
field: PretrainedConfig keeps unknown keyword arguments as attributes, so `engram_layer=[1]` (for `engram_layers`)
would otherwise build a model without Engram. Checkpoints that carry fields renamed earlier still load."""

import json

import pytest

from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
from modeling_memory.memory_llama.configuration_memory_llama import MEMORY_FIELD_PREFIXES
from conftest import tiny_config


@pytest.mark.parametrize(
    "typo, field",
    [
        ("engram_layer", "engram_layers"),
        ("chapter_layer", "chapter_layers"),
        ("pkm_layer", "pkm_layers"),
        ("router_aux_loss_coeff", "router_aux_loss_coef"),
        ("chapter_topk", "chapter_top_k"),
        ("engram_ngram_order", "engram_ngram_orders"),
    ],
)
def test_a_misspelt_memory_field_names_the_closest_one(typo, field):
    with pytest.raises(Exception, match=f"MemoryLlamaConfig has no field `{typo}`; did you mean `{field}`\\?"):
        tiny_config(**{typo: [1]})


def test_every_memory_prefix_is_checked_including_the_reserved_one():
    assert MEMORY_FIELD_PREFIXES == ("chapter_", "engram_", "pkm_", "router_", "mosaic_")
    with pytest.raises(Exception, match="MemoryLlamaConfig has no field `mosaic_window`"):
        tiny_config(mosaic_window=64)


def test_other_unknown_keys_are_kept_as_transformers_keeps_them():
    assert tiny_config(my_note="kept").my_note == "kept"


def test_a_config_json_with_a_misspelt_memory_field_is_refused(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "engram_layer": [1]}))
    with pytest.raises(Exception, match="did you mean `engram_layers`"):
        MemoryLlamaConfig.from_pretrained(tmp_path)


def test_checkpoints_with_fields_moved_out_of_the_config_still_load(tmp_path):
    """engram_lr_multiplier and chapter_bank_lr_multiplier were config fields; they are training arguments now."""
    model = MemoryLlamaForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "engram_lr_multiplier": 5.0, "chapter_bank_lr_multiplier": 2.0}))
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.engram_layers == [0] and not hasattr(loaded.config, "engram_lr_multiplier")

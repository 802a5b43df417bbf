import pytest

from modeling_memory import MemoryLlamaConfig
from conftest import tiny_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(chapter_layers=[3]), "`chapter_layers` entry 3 is out of range"),
        (dict(engram_layers=[-1]), "`engram_layers` entry -1 is out of range"),
        (dict(chapter_layers=[1, 1]), "`chapter_layers` lists \\[1\\] more than once"),
        (dict(chapter_top_k=9), "`chapter_top_k` \\(9\\) must be between 1 and the number of routed chapters"),
        (dict(chapter_size=0), "`chapter_size` must be an integer >= 1"),
        (dict(engram_ngram_orders=[1, 2]), "`engram_ngram_orders` entry 1 is out of range: entries must be >= 2"),
        (dict(engram_ngram_orders=[3, 3]), "`engram_ngram_orders` lists \\[3\\] more than once"),
        (dict(engram_dim=18), "`engram_dim` \\(18\\) must be divisible by the number of Engram heads"),
        (dict(engram_table_size=0), "`engram_table_size` must be an integer >= 1"),
        (dict(chapter_num_heads=5), "`chapter_num_heads` \\(5\\) must divide `hidden_size`"),
        (dict(chapter_num_shared=9), "must exceed `chapter_num_shared`"),
        (dict(chapter_size="4"), "chapter_size"),
        (dict(engram_layers="0"), "engram_layers"),
    ],
)
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


def test_both_memories_off_is_valid():
    config = tiny_config(chapter_layers=[], engram_layers=[])
    assert config.chapter_layers == [] and config.engram_layers == []


def test_save_load_round_trip(tmp_path):
    config = tiny_config(engram_conv_dilation=2, chapter_share_bank=False)
    config.save_pretrained(tmp_path)
    loaded = MemoryLlamaConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.engram_effective_dilation == 2


def test_settings_of_a_memory_kind_that_is_off_are_not_checked():
    config = tiny_config(chapter_layers=[], chapter_top_k=99, engram_layers=[], engram_dim=18)
    assert config.chapter_top_k == 99 and config.engram_dim == 18


def test_cache_layout_marks_engram_layers_hybrid():
    assert tiny_config(engram_layers=[0, 2]).layer_types == ["hybrid", "full_attention", "hybrid"]
    assert tiny_config(engram_layers=[]).layer_types == ["full_attention"] * 3


def test_training_settings_of_older_checkpoints_load_and_are_dropped(tmp_path):
    """Learning-rate multipliers used to live in config.json; they are MemoryTrainingArguments fields now."""
    import json

    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "engram_lr_multiplier": 5.0, "chapter_bank_lr_multiplier": 2.0}))
    loaded = MemoryLlamaConfig.from_pretrained(tmp_path)
    assert "engram_lr_multiplier" not in loaded.to_dict() and "chapter_bank_lr_multiplier" not in loaded.to_dict()

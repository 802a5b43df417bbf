import subprocess
import sys

import pytest
import torch

from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.cli import main
from modeling_memory.summary import parameter_counts
from conftest import tiny_config


def test_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "modeling_memory.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("demo", "info", "generate"):
        assert command in result.stdout


def test_info_reports_layout_and_counts(tmp_path, capsys):
    model = MemoryLlamaForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers (3): E.C" in out
    counts = parameter_counts(model)
    bank = model.config.chapter_num_chapters * model.config.chapter_size * model.config.hidden_size
    assert counts["chapter_bank"] == bank
    tables = sum(int(model.model.layers[0].engram.table_primes.sum()) * model.config.engram_head_dim for _ in [0])
    assert counts["engram_tables"] == tables
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert f"{counts['engram_tables']:,}" in out


def test_info_refuses_plain_llama(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="graft memory onto it first"):
        main(["info", str(tmp_path)])


@pytest.mark.slow
def test_generate_command_on_real_checkpoint(tmp_path, capsys):
    from modeling_memory.grafting import memory_preset
    from modeling_memory.offline_checkpoints import load_smollm2

    base, tokenizer = load_smollm2()
    grafted = MemoryLlamaForCausalLM.from_llama(base, tokenizer=tokenizer, **memory_preset(base.config, "engram"))
    grafted.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "The capital of France is", "--max-new-tokens", "4"]) == 0
    generated = capsys.readouterr().out
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    expected = base.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.strip() == tokenizer.decode(expected[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

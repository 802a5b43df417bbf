"""`--memory-placement` / `--memory-offload-dir` on `generate`, `train` and `eval`: refused at parse time when
they do not go together, and otherwise the same results as tables on the device (the reference: the same command
without the flags), with the tables where the flags say."""

import json
import os

import pytest
import torch

from memory_llama_cli import main
from modeling_memory import MemoryLlamaForCausalLM
from training_helpers import save_tiny_model

COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("placement") / "model", pkm_layers=[1], pkm_num_keys=8, pkm_top_k=4,
                           pkm_heads=2, pkm_key_dim=16)


@pytest.mark.parametrize(
    "command_line, message",
    [
        (["generate", "missing", "--prompt", "x", "--memory-placement", "disk"], "--memory-placement disk needs --memory-offload-dir"),
        (["eval", "missing", "--knowledge-entities", "2", "--memory-offload-dir", "scratch"], "used only with --memory-placement disk"),
        (["train", "missing", "--knowledge-entities", "2", "--memory-placement", "host", "--memory-offload-dir", "scratch"],
         "used only with --memory-placement disk"),
        (["generate", "missing", "--prompt", "x", "--memory-placement", "cloud"], "invalid choice: 'cloud'"),
        (["eval", "missing", "--knowledge-entities", "2", "--memory-placement", "disk", "--memory-offload-dir", ""],
         "--memory-offload-dir is empty"),
    ],
)
def test_flags_that_do_not_go_together_are_refused_before_anything_loads(command_line, message, capsys):
    # "missing" is no checkpoint: a refusal from the parser comes before the command would say so.
    with pytest.raises(SystemExit) as stop:
        main(command_line)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_placements(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "device, host or disk" in capsys.readouterr().out


def test_generate_from_disk_tables_gives_the_device_text(checkpoint, tmp_path, capsys):
    command = ["generate", checkpoint, "--prompt", "Alice plays the", "--max-new-tokens", "8"]
    assert main(command) == 0
    on_device = capsys.readouterr().out
    offload = tmp_path / "offload"
    assert main([*command, "--memory-placement", "disk", "--memory-offload-dir", str(offload)]) == 0
    assert capsys.readouterr().out == on_device
    assert {"model.layers.0.engram.table.weight.safetensors", "model.pkm_values.weight.safetensors"} <= set(os.listdir(offload))


def test_generate_refuses_placement_for_a_model_without_memory(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="without memory tables to place"):
        main(["generate", str(tmp_path), "--prompt", "x", "--memory-placement", "host"])


def test_a_full_offload_disk_is_refused_before_loading(checkpoint, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(SystemExit, match="--memory-placement disk: The tables need .* but its disk has 0 B free"):
        main(["eval", checkpoint, "--knowledge-entities", "2", "--memory-placement", "disk",
              "--memory-offload-dir", str(tmp_path / "offload")])


def test_train_refuses_an_offload_dir_inside_its_output_dir(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="lies inside --output_dir"):
        main(["train", checkpoint, "--knowledge-entities", "2", "--block-size", "32", "--output_dir", str(tmp_path / "run"),
              "--memory-placement", "disk", "--memory-offload-dir", str(tmp_path / "run" / "offload"), *COMMON])
    assert not (tmp_path / "run").exists()


def test_eval_with_host_tables_gives_the_device_numbers(checkpoint, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("Alice plays the violin in the town band.\nBob keeps bees behind the old mill.\n" * 4)
    results = []
    for flags in ([], ["--memory-placement", "host"]):
        path = tmp_path / f"results{len(results)}.json"
        assert main(["eval", checkpoint, "--data", str(text), "--block-size", "32", "--knowledge-entities", "2",
                     "--output-json", str(path), *flags]) == 0
        results.append(json.loads(path.read_text()))
    assert results[0]["perplexity"] == results[1]["perplexity"]
    assert results[0]["knowledge_recall"] == results[1]["knowledge_recall"]


def test_train_with_disk_tables_trains_as_with_device_tables(checkpoint, tmp_path, capsys):
    run = ["train", checkpoint, "--knowledge-entities", "2", "--block-size", "32", "--max_steps", "3",
           "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--save_strategy", "no",
           "--table_optimizer", "rowwise_adagrad", *COMMON]
    assert main([*run, "--output_dir", str(tmp_path / "device")]) == 0
    offload = tmp_path / "offload"
    assert main([*run, "--output_dir", str(tmp_path / "disk"), "--memory-placement", "disk",
                 "--memory-offload-dir", str(offload)]) == 0
    assert "model.pkm_values.weight.safetensors" in os.listdir(offload)  # the working copy, beside the run
    assert not any(name.startswith("memory-") for name in os.listdir(tmp_path / "device"))
    on_device = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "device")
    on_disk = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "disk")  # a plain checkpoint: tables streamed in
    trained = MemoryLlamaForCausalLM.from_pretrained(checkpoint)
    for name, param in on_device.named_parameters():
        torch.testing.assert_close(on_disk.get_parameter(name), param, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(on_disk.model.pkm_values.weight, trained.model.pkm_values.weight)

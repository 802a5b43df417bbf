import os
import subprocess
import sys

import pytest
import torch

from memory_llama_cli import main
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.tools.summary import parameter_counts
from conftest import tiny_config


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


def test_generate_command_greedy_equals_the_models_own(tmp_path, capsys):
    from training_helpers import save_tiny_model, tiny_tokenizer

    checkpoint = save_tiny_model(tmp_path / "model")
    assert main(["generate", checkpoint, "--prompt", "Alice plays the", "--max-new-tokens", "6"]) == 0
    model = MemoryLlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = tiny_tokenizer()
    inputs = tokenizer("Alice plays the", return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_tokens = expected[0][inputs["input_ids"].shape[1] :]
    assert capsys.readouterr().out.strip() == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


# ---- a thin command line ------------------------------------------------------------------------

HEAVY_MODULES = ("torch", "transformers", "peft", "datasets", "accelerate", "matplotlib", "huggingface_hub", "modeling_memory")

# In a fresh interpreter, as the console script runs it: build the parser, then answer help and argument
# errors; print the exit codes and the heavy modules that got imported.
PARSER_ONLY = """
import sys
from memory_llama_cli import build_parser, main
build_parser()
codes = []
for argv in {command_lines}:
    try:
        main(argv)
    except SystemExit as stop:
        codes.append(stop.code)
print(codes)
print(sorted(m for m in sys.modules if m.split(".")[0] in {heavy}))
"""


def test_help_and_argument_errors_import_nothing_heavy():
    command_lines = [
        ["--help"], ["train", "--help"], ["eval", "--help"], ["generate", "--help"], ["graft", "--help"],
        ["export", "--help"], ["push", "--help"], ["info", "--help"], ["demo", "--help"],
        ["merge", "--help"],
        ["bogus"], ["train", "model", "--mode", "bogus"], ["train"], ["generate", "checkpoint"], ["info"],
        ["info", "a", "b"], ["generate", "checkpoint", "--promt", "x"], ["graft", "base", "out", "--preset", "bogus"],
    ]
    code = PARSER_ONLY.format(heavy=HEAVY_MODULES, command_lines=command_lines)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    codes, heavy = result.stdout.strip().splitlines()[-2:]
    assert codes == "[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2]", result.stderr[-2000:]
    assert heavy == "[]"
    assert "demo" in result.stdout and "hyphens or underscores" in result.stdout


def test_console_script_and_module_entry_points():
    """The installed `memory-llama` script and `python -m memory_llama_cli` (what `accelerate launch -m`
    runs) reach the same entry point."""
    import shutil

    script = shutil.which("memory-llama", path=os.path.dirname(sys.executable))
    assert script is not None, "reinstall the package (pip install -e .) to get the memory-llama script"
    result = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "graft" in result.stdout
    result = subprocess.run([sys.executable, "-m", "memory_llama_cli", "info"], capture_output=True, text=True)
    assert result.returncode == 2 and "the following arguments are required: checkpoint" in result.stderr


def test_help_lists_one_spelling_and_both_are_accepted(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--max-new-tokens MAX_NEW_TOKENS" in out and "--max_new_tokens" not in out
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 1"):
        main(["generate", "anything", "--prompt", "x", "--max_new_tokens", "0"])
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 1"):
        main(["generate", "anything", "--prompt", "x", "--max-new-tokens", "0"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "hyphens or underscores" in capsys.readouterr().out


def test_help_names_every_memory_kind_and_training_mode(capsys):
    """The modes and presets the help lists are the library's own tuples (modeling_memory.choices, read by the
    parser without importing the package)."""
    from modeling_memory.choices import GRAFT_PRESETS, TRAINING_MODES

    with pytest.raises(SystemExit):
        main(["--help"])
    overview = " ".join(capsys.readouterr().out.split())
    for kind in ("chapter memory", "Engram", "product-key memory"):
        assert kind in overview
    assert f"modes: {', '.join(TRAINING_MODES)})" in overview and "sparse_memory" in TRAINING_MODES
    with pytest.raises(SystemExit):
        main(["graft", "--help"])
    graft_help = " ".join(capsys.readouterr().out.split())
    assert ", ".join(GRAFT_PRESETS[:-1]) + f" or {GRAFT_PRESETS[-1]}" in graft_help and "product-key memory" in graft_help


def test_the_parser_reads_the_librarys_choices_file():
    """One source for the names: the library imports modeling_memory/choices.py, the parser executes the same file."""
    import modeling_memory.choices
    from memory_llama_cli.parser import library_choices
    from modeling_memory.memory_llama import table_placement
    from modeling_memory.tools import graft, safe_write
    from modeling_memory.training import peft_modes

    assert library_choices().__file__ == modeling_memory.choices.__file__
    assert peft_modes.TRAINING_MODES is modeling_memory.choices.TRAINING_MODES
    assert graft.GRAFT_PRESETS is modeling_memory.choices.GRAFT_PRESETS
    assert safe_write.DEFAULT_MAX_SHARD_SIZE is modeling_memory.choices.DEFAULT_MAX_SHARD_SIZE
    # The run-time module keeps its own copy (a Hub export ships it without choices.py): the same names.
    assert table_placement.MEMORY_PLACEMENTS == modeling_memory.choices.MEMORY_PLACEMENTS


@pytest.mark.parametrize(
    "command_line, line",
    [
        (["generate", "checkpoint", "--promt", "hello"], "memory-llama generate: error: unrecognized arguments: --promt (did you mean --prompt?)"),
        (["info", "checkpoint", "--max-shard-size", "1GB"], "memory-llama info: error: unrecognized arguments: --max-shard-size"),
        (["graft", "base", "out", "--presett=pkm", "--dry-runn"],
         "memory-llama graft: error: unrecognized arguments: --presett (did you mean --preset?), --dry-runn (did you mean --dry-run?)"),
        (["train", "model", "--knowledge-entities", "2", "--max_step", "3"],
         "memory-llama train: error: unrecognized arguments: --max_step (did you mean --max_steps?)"),
    ],
)
def test_a_misspelt_option_gives_one_line_with_the_closest_valid_one(capsys, command_line, line):
    with pytest.raises(SystemExit) as raised:
        main(command_line)
    assert raised.value.code == 2  # as argparse's own errors
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_abbreviations_and_values_with_dashes_are_not_refused(tmp_path):
    """Commands other than `train` accept unique prefixes, as argparse does (`--max-new 0` is --max-new-tokens), and
    a value with a space is a value even when it starts with dashes (argparse reads it so)."""
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 1"):
        main(["generate", str(tmp_path), "--prompt", "x", "--max-new", "0"])
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 1"):
        main(["generate", str(tmp_path), "--prompt", "--promt is not an option here", "--max-new-tokens", "0"])


def test_both_spellings():
    from memory_llama_cli.parser import both_spellings

    assert both_spellings("--max-new-tokens") == ["--max-new-tokens", "--max_new_tokens"]
    assert both_spellings("--output_dir") == ["--output_dir", "--output-dir"]
    assert both_spellings("--mode") == ["--mode"]
    assert both_spellings("-h", "--help") == ["-h", "--help"]


# ---- checkpoints that are not what a command needs: one line, not a traceback ------------------------


def write_tiny_gguf(path):
    """A GGUF file with a 2-layer Llama's metadata and one tensor (enough for its config)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(97)
    writer.add_rope_dimension_count(8)
    writer.add_tensor("token_embd.weight", np.zeros((97, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bad_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "broken.gguf").write_bytes(b"<html>not found</html>")
    return {
        str(tmp_path / "missing"): "no such file or folder",
        str(tmp_path / "missing.gguf"): "no such file or folder",
        "missing-checkpoint": "no such file or folder. Pass a checkpoint folder, a .gguf file or a Hub id (owner/name)",
        "missing-owner/missing-checkpoint": "no such file or folder, and loading it as a Hub id failed",
        str(tmp_path / "empty"): "has no config.json",
        str(tmp_path / "notes.txt"): "is a file: pass the checkpoint folder",
        str(tmp_path / "broken.gguf"): "is not a GGUF file",
    }


@pytest.mark.parametrize("command", ["info", "generate"])
def test_bad_checkpoints_give_one_line_errors(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for checkpoint, message in _bad_checkpoints(tmp_path).items():
        extra = ["--prompt", "hello"] if command == "generate" else []
        with pytest.raises(SystemExit) as raised:
            main([command, checkpoint, *extra])
        error = str(raised.value.code)
        assert error.startswith(f"memory-llama {command}: error: ") and message in error, error
        assert "\n" not in error


def test_a_missing_local_name_is_refused_without_asking_the_hub(tmp_path, monkeypatch):
    """`memory-llama info does-not-exist`: a name without an owner is a local path; refused at once, where asking the
    Hub would retry for about 30 s when the network is unreachable."""
    import transformers

    from modeling_memory.tools.loading import looks_like_hub_id

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    for command in (["info", "does-not-exist"], ["generate", "does-not-exist", "--prompt", "x"],
                    ["export", "does-not-exist", "out"], ["push", "does-not-exist", "me/model"]):
        with pytest.raises(SystemExit) as raised:
            main(command)
        assert str(raised.value.code) == (f"memory-llama {command[0]}: error: does-not-exist: no such file or folder. "
                                          "Pass a checkpoint folder, a .gguf file or a Hub id (owner/name).")
    assert not looks_like_hub_id("does-not-exist") and not looks_like_hub_id("a/b/c") and not looks_like_hub_id("./x")
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M")


def test_layer_strip_marks_every_memory_kind():
    from modeling_memory.tools.summary import memory_layout

    config = tiny_config(num_hidden_layers=6, engram_layers=[0, 3], chapter_layers=[1, 3], pkm_layers=[2, 4],
                         pkm_num_keys=4, pkm_top_k=2, pkm_heads=2, pkm_key_dim=8, mosaic_layers=[5],
                         mosaic_placement="parallel", mosaic_min_delay=8, mosaic_max_delay=16)
    first_line = memory_layout(config).splitlines()[0]
    assert first_line == (
        "layers (6): ECP+PA   (E Engram, C chapter memory, P product-key memory, A associative memory, + several)"
    )
    assert "product-key memory at [2, 4]" in memory_layout(config)
    assert "associative memory at [5] (beside self-attention): long-term, 2 heads of 8;" in memory_layout(config)


def test_info_on_a_gguf_file_says_graft_it_first(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny-llama.gguf")
    with pytest.raises(SystemExit) as raised:
        main(["info", str(gguf_file)])
    error = str(raised.value.code)
    assert "GGUF file holding a plain 'llama' checkpoint (2 layers, hidden size 32)" in error
    assert f"memory-llama graft {gguf_file} OUT" in error


@pytest.mark.slow
def test_generate_accepts_a_gguf_file_and_generates_with_the_base(capsys):
    from modeling_memory.tools.offline_checkpoints import load_smollm2, smollm2_gguf_path

    gguf_file = smollm2_gguf_path()
    assert main(["generate", str(gguf_file), "--prompt", "The capital of France is", "--max_new_tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "GGUF file: generating with its plain base model" in captured.err
    base, tokenizer = load_smollm2()  # the same weights, converted once to a Hugging Face folder
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    expected = base.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert captured.out.strip() == tokenizer.decode(expected[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

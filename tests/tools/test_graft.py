"""`memory-llama graft`: the written checkpoint computes what the base computes (checked against the base
model loaded by transformers itself), bad input fails before any work, and OUT is never left half-written."""

import json
import os
import signal
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import modeling_memory
from conftest import wake_memory
from memory_llama_cli import main
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.tools.canonical_ids import build_canonical_map
from modeling_memory.tools.errors import ToolError
from modeling_memory.tools.graft_to_folder import GraftError, graft_checkpoint
from modeling_memory.tools.graft import MEMORY_FIELDS
from modeling_memory.tools.model_card import read_base_info
from modeling_memory.tools.safe_write import sigterm_as_interrupt

# Keeps the memory small so a graft takes a second; the presets themselves are checked by the dry run.
SMALL_MEMORY = ["engram_table_size=101", "chapter_num_chapters=9", "chapter_size=4"]
PROMPTS = ["Hello, World! The cat sat.", "ABC abc 123", "def f(x):\n    return x"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer of 101 tokens (upper and lower case letters are distinct tokens)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def llama_config(**overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=112,  # more embedding rows than tokens, as in many real checkpoints
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def write_base(directory, model=None, tokenizer=None, **save_kwargs):
    torch.manual_seed(0)
    model = model if model is not None else LlamaForCausalLM(llama_config())
    model.save_pretrained(directory, **save_kwargs)
    (tokenizer or char_tokenizer()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "tiny-llama")


def reference_logits(base_path, tokenizer):
    """The base as transformers loads it, on a left-padded batch (a path the built-in check does not take)."""
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return base, batch, base(**batch).logits


def assert_same_as_base(base_path, out):
    tokenizer = char_tokenizer()
    base, batch, expected = reference_logits(base_path, tokenizer)
    grafted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(grafted, MemoryLlamaForCausalLM)
    with torch.no_grad():
        actual = grafted(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(base.generate(**batch, **kwargs), grafted.generate(**batch, **kwargs))
    return grafted


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_graft_directory_end_to_end(base_dir, tmp_path, capsys):
    out = tmp_path / "tiny-memory"
    args = ["graft", str(base_dir), str(out)] + [x for s in SMALL_MEMORY for x in ("--set", s)]
    assert main(args + ["--set", "chapter_top_k=3", "--set", "engram_layers=[0, 3]"]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference| vs the base on 4 prompts: 0" in printed

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "memory_llama" and "auto_map" not in config
    assert config["engram_layers"] == [0, 3] and config["chapter_layers"] == [1, 2]  # preset both, overridden
    assert config["chapter_top_k"] == 3 and config["engram_table_size"] == 101
    assert leftovers(tmp_path) == []

    grafted = assert_same_as_base(base_dir, out)
    tokenizer = char_tokenizer()
    canonical = grafted.model.engram_canonical_map
    assert torch.equal(canonical, build_canonical_map(tokenizer, 112))
    upper, lower = tokenizer.convert_tokens_to_ids(["Q", "q"])
    assert canonical[upper] == canonical[lower]

    assert "canonical token ids: 84 of 112 (25.0% fewer)" in printed  # 26 letter pairs + 2 whitespace tokens merge
    card = (out / "README.md").read_text()
    assert read_base_info(out) == ("tiny-llama", None, None)
    assert "tiny-llama" in card and "layers (4): ECCE" in card
    assert "memory-llama export" in card and "trust_remote_code=True" in card
    assert "{{" not in card and "base_model_name: tiny-llama" in card


def test_graft_mosaic_preset_computes_what_the_base_computes(base_dir, tmp_path, capsys):
    """The associative memory beside attention (preset "mosaic"): the graft is checked against the base on the
    command line and again here with padding and cached greedy decoding; the card describes it."""
    out = tmp_path / "tiny-mosaic"
    assert main(["graft", str(base_dir), str(out), "--preset", "mosaic"]) == 0
    assert "max |logit difference| vs the base on 4 prompts: 0" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["mosaic_layers"] == [2, 3] and config["mosaic_placement"] == "parallel"
    assert config["engram_layers"] == config["chapter_layers"] == config["pkm_layers"] == []
    grafted = assert_same_as_base(base_dir, out)
    assert grafted.model.layers[2].associative_memory.mosaic_output.weight.abs().max() == 0
    assert "layers (4): ..AA" in (out / "README.md").read_text()


def test_woken_memory_agrees_across_graft_paths_padding_and_the_cache(base_dir, tmp_path):
    """With the memory's zero-initialised projections made non-zero the memory changes the output, so a wrong
    buffer (hash multipliers, table offsets, the canonical-id map), n-gram history that reaches across padding,
    or a cache that loses a window shows. References: the in-memory graft of the same base with the same
    parameters (each model keeps its own buffers), each prompt alone, and uncached generation."""
    out = tmp_path / "tiny-memory"
    assert main(["graft", str(base_dir), str(out), *[x for s in SMALL_MEMORY for x in ("--set", s)]]) == 0
    written = wake_memory(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    tokenizer = char_tokenizer()
    fields = {name: getattr(written.config, name) for name in MEMORY_FIELDS}
    in_memory = modeling_memory.from_llama(LlamaForCausalLM.from_pretrained(base_dir), tokenizer=tokenizer, **fields)
    in_memory.load_state_dict(dict(written.named_parameters()), strict=False)  # parameters only

    base, batch, base_logits = reference_logits(base_dir, tokenizer)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        logits = written(**batch).logits
        assert (logits[valid] - base_logits[valid]).abs().max() > 0.1  # the memory is awake
        torch.testing.assert_close(in_memory(**batch).logits[valid], logits[valid], rtol=0, atol=1e-5)
        for row, prompt in enumerate(PROMPTS):
            alone = written(**tokenizer(prompt, return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[row][valid[row]], alone, rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = written.generate(**batch, **kwargs)
    assert torch.equal(cached, written.generate(**batch, use_cache=False, **kwargs))
    assert torch.equal(cached, in_memory.generate(**batch, **kwargs))


def test_dry_run_prints_the_plan_and_writes_nothing(base_dir, tmp_path, capsys):
    out = tmp_path / "never-written"
    plan = graft_checkpoint(str(base_dir), out, dry_run=True)
    printed = capsys.readouterr().out
    assert not out.exists() and leftovers(tmp_path) == []
    assert "dry run" in printed and "engram layers:   [1, 2]" in printed and "chapter layers:  [1, 2]" in printed

    # Independent count: build both models for real and compare what they hold.
    model = MemoryLlamaForCausalLM(plan.memory_config)
    base_parameters = sum(p.numel() for p in LlamaForCausalLM(llama_config()).parameters())
    new_parameters = sum(p.numel() for p in model.parameters()) - base_parameters
    assert plan.new_parameters == new_parameters
    assert f"base {base_parameters:,} + new {new_parameters:,}" in printed
    assert plan.total_bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_sharded_base_and_sharded_output(tmp_path):
    base = write_base(tmp_path / "sharded-base", max_shard_size="100KB")
    assert (base / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    graft_checkpoint(str(base), out, preset="engram", overrides=SMALL_MEMORY, max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert_same_as_base(base, out)


def test_bfloat16_output(base_dir, tmp_path):
    out = tmp_path / "out"
    graft_checkpoint(str(base_dir), out, preset="engram", overrides=SMALL_MEMORY, dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert dtypes == {"BF16", "I64"}  # floats in bfloat16; Engram's hash buffers stay integer
    # Reference: the base's own weights rounded to bfloat16, computed in float32.
    tokenizer = char_tokenizer()
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).float().eval()
    grafted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(grafted(ids).logits, base(ids).logits, rtol=0, atol=1e-5)


def test_mistral_base(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    fields = llama_config().to_dict()
    fields = {k: v for k, v in fields.items() if k in MistralConfig.__dataclass_fields__ and k != "model_type"}
    fields["tie_word_embeddings"] = True  # lm_head is not stored in the file
    torch.manual_seed(0)
    base = write_base(tmp_path / "mistral", MistralForCausalLM(MistralConfig(**fields, sliding_window=None)))
    out = tmp_path / "out"
    graft_checkpoint(str(base), out, preset="chapters", overrides=SMALL_MEMORY)
    assert_same_as_base(base, out)

    windowed = write_base(tmp_path / "windowed", MistralForCausalLM(MistralConfig(**fields, sliding_window=16)))
    with pytest.raises(GraftError, match=r"Mistral model with sliding-window attention \(sliding_window=16\)"):
        graft_checkpoint(str(windowed), tmp_path / "out2", dry_run=True)


def test_pickle_weights_refused_unless_allowed(tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config())
    base = tmp_path / "pickled"
    llama.config.save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    torch.save(llama.state_dict(), base / "pytorch_model.bin")
    with pytest.raises(ToolError, match="only pickle weights .* --allow-pickle"):
        graft_checkpoint(str(base), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    graft_checkpoint(str(base), tmp_path / "out", preset="engram", overrides=SMALL_MEMORY, allow_pickle=True)
    assert_same_as_base(base, tmp_path / "out")


def _qwen2(path):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64).save_pretrained(path)


def _no_weights(path):
    llama_config().save_pretrained(path)
    char_tokenizer().save_pretrained(path)


def _damaged_weights(path):
    write_base(path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")


def _missing_shard(path):
    write_base(path, max_shard_size="100KB")
    next(path.glob("model-*.safetensors")).unlink()


def _wrong_vocab_in_config(path):
    write_base(path)
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 120
    (path / "config.json").write_text(json.dumps(config))


def _tokenizer_larger_than_embedding(path):
    torch.manual_seed(0)
    write_base(path, LlamaForCausalLM(llama_config(vocab_size=64)))


def _no_tokenizer(path):
    LlamaForCausalLM(llama_config()).save_pretrained(path)


def _already_memory(path):
    from conftest import tiny_config

    MemoryLlamaForCausalLM(tiny_config()).save_pretrained(path)


@pytest.mark.parametrize(
    "make_base, extra, message",
    [
        (_qwen2, {}, r"'qwen2' model; memory can be grafted only onto Llama-layout families: llama, memory_llama, mistral"),
        (_no_weights, {}, r"has no weights: expected model.safetensors"),
        (_damaged_weights, {}, r"Cannot read weight file .*model.safetensors.*damaged or incomplete"),
        (_missing_shard, {}, r"missing weight files \['model-0000"),
        (_wrong_vocab_in_config, {}, r"vocab_size=120 but its embedding has 112 rows"),
        (_tokenizer_larger_than_embedding, {}, r"tokenizer has 101 tokens but the model's embedding has only 64 rows"),
        (_no_tokenizer, {}, r"has no tokenizer files .* pass --tokenizer PATH"),
        (_already_memory, {}, r"already a MemoryLlama with memory layers"),
        (None, {"overrides": ["engram_layers=[1, 4]"]}, r"4 layers, valid layer indices 0..3.*`engram_layers` entry 4"),
        (None, {"overrides": ["chapter_top_k=\"two\""]}, r"Invalid memory settings .*chapter_top_k"),
        (None, {"overrides": ["chapter_topk=2"]}, r"unknown memory field\(s\) \['chapter_topk'\]; valid fields are: chapter_layers"),
        (None, {"overrides": ["chapter_top_k"]}, r"expected FIELD=VALUE"),
        (None, {"preset": "huge"}, r"Unknown preset 'huge'; choose one of engram, chapters, both"),
        (None, {"preset": "mosaic", "overrides": ["mosaic_placement=\"replace\""]}, r"mosaic_placement='replace' swaps"),
        (None, {"preset": "mosaic", "overrides": ["mosaic_max_delay=300"]}, r"mosaic_max_delay.*shorter than the context"),
        (None, {"dtype": "float64"}, r"Unknown dtype 'float64'"),
        (None, {"max_shard_size": "lots"}, r"--max-shard-size 'lots'"),
    ],
)
def test_bad_input_fails_before_any_work(base_dir, tmp_path, monkeypatch, make_base, extra, message):
    base = base_dir
    if make_base is not None:
        base = tmp_path / "base"
        base.mkdir()
        make_base(base)
    # Any attempt to load weights would mean the check came too late.
    monkeypatch.setattr("modeling_memory.tools.graft_to_folder.load_base_model", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(GraftError, match=message):
        graft_checkpoint(str(base), tmp_path / "out", **extra)
    assert not (tmp_path / "out").exists()


def test_memory_json_file(base_dir, tmp_path):
    settings = tmp_path / "memory.json"
    settings.write_text(json.dumps({"engram_layers": [2], "engram_table_size": 97, "chapter_layers": []}))
    plan = graft_checkpoint(str(base_dir), tmp_path / "out", memory_json=str(settings), overrides=["engram_seed=7"], dry_run=True)
    config = plan.memory_config
    assert (config.engram_layers, config.engram_table_size, config.chapter_layers, config.engram_seed) == ([2], 97, [], 7)
    settings.write_text(json.dumps({"engram_tables": 3}))
    with pytest.raises(GraftError, match=r"unknown memory field\(s\) \['engram_tables'\]"):
        graft_checkpoint(str(base_dir), tmp_path / "out", memory_json=str(settings), dry_run=True)
    settings.write_text("[1, 2]")
    with pytest.raises(GraftError, match="must hold a JSON object"):
        graft_checkpoint(str(base_dir), tmp_path / "out", memory_json=str(settings), dry_run=True)


def test_base_that_does_not_exist_and_hub_id_offline(tmp_path):
    with pytest.raises(GraftError, match="does not exist: pass a Hugging Face checkpoint directory"):
        graft_checkpoint(str(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(GraftError, match="no such GGUF file"):
        graft_checkpoint(str(tmp_path / "model.gguf"), tmp_path / "out")
    (tmp_path / "weights.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(ToolError, match="not a GGUF file"):
        graft_checkpoint(str(tmp_path / "weights.gguf"), tmp_path / "out")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(GraftError, match=r"taken as a Hub id, but Hugging Face offline mode is on \(HF_HUB_OFFLINE=1\)"):
        graft_checkpoint("nobody/no-such-model", tmp_path / "out")


def test_non_empty_out_needs_overwrite(base_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit, match="exists and is not empty; pass --overwrite"):
        main(["graft", str(base_dir), str(out), "--dry-run"])
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(SystemExit, match="would overwrite the input"):
        main(["graft", str(base_dir), str(base_dir.parent), "--overwrite"])
    graft_checkpoint(str(base_dir), out, preset="engram", overrides=SMALL_MEMORY, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_failed_verification_leaves_nothing(base_dir, tmp_path, monkeypatch):
    from modeling_memory.tools import graft_to_folder as module

    graft = module.graft

    def grafted_with_live_memory(*args, **kwargs):
        model = graft(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].engram.engram_value.weight.normal_()  # memory no longer adds zero
        return model

    monkeypatch.setattr(module, "graft", grafted_with_live_memory)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(GraftError, match=r"Verification failed: .*differ from the base's by up to .*Nothing was written"):
        graft_checkpoint(str(base_dir), out, preset="engram", overrides=SMALL_MEMORY, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_interrupted_run_leaves_no_partial_out(base_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):  # after the weights are written into the staging directory
        raise KeyboardInterrupt

    monkeypatch.setattr("modeling_memory.tools.model_card.render_model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        graft_checkpoint(str(base_dir), tmp_path / "out", preset="engram", overrides=SMALL_MEMORY)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_becomes_keyboard_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_graft_real_smollm2_from_gguf(tmp_path, capsys):
    """The real checkpoint: graft the GGUF with the default preset; compare with the base as loaded from
    the plain Hugging Face copy (a different loader) on a padded batch and 32 greedy tokens."""
    from modeling_memory.tools.offline_checkpoints import load_smollm2, smollm2_gguf_path

    out = tmp_path / "smollm2-memory"
    assert main(["graft", str(smollm2_gguf_path()), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference| vs the base on 4 prompts: 0" in printed

    base, tokenizer = load_smollm2()
    grafted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert grafted.config.engram_layers == [2, 15] and grafted.config.chapter_layers == [10, 20]
    batch = tokenizer(["The capital of France is", "In 1905, Einstein published"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, actual = base(**batch).logits, grafted(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=0, atol=1e-5)
    inputs = tokenizer("Water boils at a temperature of", return_tensors="pt")
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(base.generate(**inputs, **kwargs), grafted.generate(**inputs, **kwargs))

    canonical = grafted.model.engram_canonical_map
    distinct = int(canonical.unique().numel())
    print(f"SmolLM2 canonical ids: {distinct:,} of {canonical.numel():,} ({1 - distinct / canonical.numel():.1%} fewer)")
    assert canonical.numel() == 49152 and 0.15 < 1 - distinct / 49152 < 0.3  # measured: 38,915, 20.8 % fewer
    card = (out / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and f"{distinct:,} distinct of 49,152" in card


@pytest.mark.slow
def test_model_card_template_ships_with_the_installed_package(tmp_path):
    """Build the wheel from a copy of the project, install it into a bare folder, and render a card there
    with nothing from the repository or the editable install on sys.path."""
    import shutil
    import subprocess
    import sys
    import sysconfig
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(root / name, project / name)
    for folder in ("modeling_memory", "memory_llama_cli", "model_cards"):
        shutil.copytree(root / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(project)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    assert "modeling_memory/tools/model_cards/memory_llama.md" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "installed"), str(wheel)], check=True, capture_output=True)

    script = f"""
import sys
sys.path[:0] = [{str(tmp_path / 'installed')!r}]
sys.path.append({sysconfig.get_paths()['purelib']!r})
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.tools.model_card import render_model_card, template_path
assert template_path().is_relative_to({str(tmp_path / 'installed')!r}), template_path()
sys.path.insert(0, {str(root / 'tests')!r})
from conftest import tiny_config
card = render_model_card(MemoryLlamaForCausalLM(tiny_config()), model_id="me/x", base_name="b", remote_code=True)
print(card.content)
"""
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'from_pretrained("me/x", trust_remote_code=True' in result.stdout

"""`memory-llama train` and `memory-llama eval` end to end on tiny models: bad input refused before any
work, resume from a checkpoint reproducing the uninterrupted run, grafting a Llama checkpoint, and
eval results checked against independent computations (a plain PyTorch perplexity and a one-probe-
at-a-time greedy loop scored with Probe.is_recalled).

Tolerances (fp32): resumed weights equal uninterrupted ones to 1e-6; perplexity to rel 1e-5."""

import json
import os
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, MistralConfig

from memory_llama_cli import main
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.data.knowledge import KnowledgeSet
from modeling_memory.training.peft_modes import load_adapter_with_memory
from training_helpers import save_tiny_model, tiny_tokenizer

COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base") / "model")


def test_help_lists_train_eval_and_training_arguments(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train", "--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    for option in ("--mode", "--knowledge-entities", "--overwrite", "--help-training", "--learning_rate",
                   "--gradient_accumulation_steps", "--table_optimizer", "hyphens or underscores"):
        assert option in out
    with pytest.raises(SystemExit) as raised:
        main(["train", "--help-training"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    for option in ("--mode", "--lr_scheduler_type", "--weight_decay", "--table_optimizer", "--engram_lr_multiplier"):
        assert option in out
    assert "--learning-rate" not in out  # one spelling listed, both accepted
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


def test_train_help_names_real_fields():
    """`train --help` is built without transformers, so its epilog spells out TrainingArguments fields by name."""
    import argparse
    import dataclasses
    import re

    from memory_llama_cli import parser
    from modeling_memory.training.trainer import MemoryTrainingArguments

    own_parser = argparse.ArgumentParser()
    parser.add_train_arguments(own_parser)
    own = {action.dest for action in own_parser._actions} | {"help_training"}
    named = {name.replace("-", "_") for name in re.findall(r"--([\w-]+)", parser.TRAIN_EPILOG)} - own
    fields = {f.name for f in dataclasses.fields(MemoryTrainingArguments)}
    assert {"output_dir", "learning_rate", "table_optimizer"} <= named <= fields, named - fields


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "exactly one training source"),
        (["--data", "missing.txt"], "no such file"),
        (["--knowledge-entities", "3", "--data", "x.txt"], "exactly one training source"),
        (["--knowledge-entities", "0"], "between 1 and 100000"),
        (["--knowledge-entities", "3", "--block-size", "4096"], "max_position_embeddings"),
        (["--knowledge-entities", "3", "--graft", "both"], "already is a MemoryLlama checkpoint"),
        (["--knowledge-entities", "3", "--eval_strategy", "steps"], "takes no evaluation data"),
        (["--knowledge-entities", "3", "--resume_from_checkpoint", "nowhere"], "no such checkpoint"),
        (["--knowledge-entities", "3", "--table_optimizer", "sgd"], "invalid choice"),
        (["--knowledge-entities", "3", "--mode", "bogus"], "invalid choice"),
        (["--knowledge-entities", "3", "--learnig_rate", "1e-3"], "unrecognized arguments: --learnig_rate (did you mean --learning_rate?)"),
        (["--knowledge-entities", "3", "--overwrite", "--resume_from_checkpoint", "last"], "no complete checkpoint"),
    ],
)
def test_train_refuses_bad_input_before_any_work(base, tmp_path, capsys, arguments, message):
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        main(["train", base, "--output_dir", str(output), "--block-size", "32", *arguments, *COMMON])
    assert message in str(raised.value.code) + capsys.readouterr().err
    assert not output.exists()


def test_train_refuses_a_llama_without_graft_and_graft_with_lora(tmp_path):
    llama_dir = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).save_pretrained(llama_dir)
    tiny_tokenizer().save_pretrained(llama_dir)
    with pytest.raises(SystemExit, match="add --graft"):
        main(["train", str(llama_dir), "--knowledge-entities", "2", "--output_dir", str(tmp_path / "o"), *COMMON])
    with pytest.raises(SystemExit, match="graft first"):
        main(["train", str(llama_dir), "--graft", "both", "--mode", "lora", "--knowledge-entities", "2",
              "--output_dir", str(tmp_path / "o"), *COMMON])

    # --graft with full fine-tuning: the result is a MemoryLlama checkpoint with the preset's layout.
    output = tmp_path / "grafted"
    assert main(["train", str(llama_dir), "--graft", "engram", "--knowledge-entities", "2", "--block-size", "32",
                 "--output_dir", str(output), "--max_steps", "1", "--save_strategy", "no", *COMMON]) == 0
    grafted = MemoryLlamaForCausalLM.from_pretrained(output, dtype=torch.float32)
    assert grafted.config.engram_layers and not grafted.config.chapter_layers


def _adapter_state(directory):
    model = load_adapter_with_memory(MemoryLlamaForCausalLM.from_pretrained(_base_of(directory), dtype=torch.float32), str(directory))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _base_of(directory):
    with open(os.path.join(directory, "adapter_config.json")) as handle:
        return json.load(handle)["base_model_name_or_path"]


def _losses(directory):
    with open(os.path.join(directory, "trainer_state.json")) as handle:
        return {entry["step"]: entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry}


def test_resume_reproduces_the_uninterrupted_run(base, tmp_path):
    """LoRA mode, so the adapter, the directly trained memory (memory.safetensors), the optimizer with
    its table groups, the scheduler, the RNG and the data position all have to come back."""
    run = ["train", base, "--knowledge-entities", "6", "--block-size", "48", "--mode", "lora", "--max_steps", "4",
           "--per_device_train_batch_size", "2", "--learning_rate", "2e-2", "--logging_steps", "1",
           "--save_steps", "2", "--lora-dropout", "0.1", *COMMON]
    uninterrupted, resumed = tmp_path / "a", tmp_path / "b"
    assert main([*run, "--output_dir", str(uninterrupted)]) == 0
    assert {"adapter_model.safetensors", "memory.safetensors", "loss_curve.png", "chapter_usage.png", "knowledge.json"} <= set(os.listdir(uninterrupted))
    assert "memory.safetensors" in os.listdir(uninterrupted / "checkpoint-2")
    assert main([*run, "--output_dir", str(resumed), "--resume_from_checkpoint", str(uninterrupted / "checkpoint-2")]) == 0

    expected, actual = _adapter_state(uninterrupted), _adapter_state(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    first, second = _losses(uninterrupted), _losses(resumed)
    assert sorted(second) == sorted(first) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's state
    for step in (3, 4):
        assert second[step] == pytest.approx(first[step], rel=1e-6)
    with open(uninterrupted / "loss_curve.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_bad_input(base, tmp_path):
    with pytest.raises(SystemExit, match="Nothing to evaluate"):
        main(["eval", base])
    with pytest.raises(SystemExit, match="exceeds the model's max_position_embeddings"):
        main(["eval", base, "--data", __file__, "--block-size", "4096"])
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        main(["eval", str(tmp_path / "none"), "--knowledge-entities", "2"])
    with pytest.raises(SystemExit, match="its folder does not exist"):
        main(["eval", base, "--knowledge-entities", "2", "--output-json", str(tmp_path / "no" / "r.json")])


@pytest.mark.slow
def test_train_then_eval_against_independent_computations(base, tmp_path, capsys):
    knowledge = KnowledgeSet.generate(2, seed=3, statements_per_fact=1)
    text_file = tmp_path / "facts.txt"
    text_file.write_text("\n".join(knowledge.training_documents()) + "\n")
    trained = tmp_path / "trained"
    assert main(["train", base, "--data", str(text_file), "--block-size", "64", "--output_dir", str(trained),
                 "--max_steps", "100", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
                 "--warmup_steps", "10", "--logging_steps", "25", "--save_strategy", "no", *COMMON]) == 0
    capsys.readouterr()

    results_path = tmp_path / "results.json"
    assert main(["eval", str(trained), "--data", str(text_file), "--block-size", "64", "--knowledge-entities", "2",
                 "--knowledge-seed", "3", "--probes", "training", "--batch-size", "3", "--output-json", str(results_path)]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "knowledge recall (training)" in table
    results = json.loads(results_path.read_text())

    model = MemoryLlamaForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    tokenizer = tiny_tokenizer()
    # Perplexity: every document once, as packed by the CLI (EOS after each, rows of 64).
    stream = []
    for document in knowledge.training_documents():
        stream += tokenizer.encode(document, add_special_tokens=False) + [tokenizer.eos_token_id]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), 64):
            ids = torch.tensor([stream[start : start + 64]])
            logits = model(ids).logits
            nll += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert results["perplexity"]["num_tokens"] == count
    assert results["perplexity"]["perplexity"] == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-5)

    # Recall: one probe at a time, no padding, greedy decoding by hand.
    recalled = []
    for probe in knowledge.probes(held_out=False):
        ids = torch.tensor([tokenizer.encode(probe.prompt, add_special_tokens=False)])
        with torch.no_grad():
            for _ in range(len(tokenizer.encode(" " + probe.answer, add_special_tokens=False)) + 2):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        continuation = tokenizer.decode(ids[0, len(tokenizer.encode(probe.prompt, add_special_tokens=False)):], skip_special_tokens=True)
        recalled.append(probe.is_recalled(continuation))
    recall = results["knowledge_recall"]
    assert recall["num_probes"] == len(recalled) == 12
    assert recall["exact_match"] == pytest.approx(sum(recalled) / len(recalled))
    assert recall["exact_match"] > 0  # the facts were memorised (at least some)


# ---- --output_dir: one run per folder ------------------------------------------------------------

TINY_RUN = ["--knowledge-entities", "2", "--block-size", "32", "--max_steps", "2", "--save_steps", "1",
            "--logging_steps", "1", *COMMON]


def _stale_run(folder):
    """A folder as an earlier run leaves it: a plot and a checkpoint."""
    (folder / "checkpoint-5").mkdir(parents=True)
    (folder / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    (folder / "loss_curve.png").write_bytes(b"old plot")
    return folder


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_train_refuses_a_non_empty_output_dir_and_leaves_it_untouched(base, tmp_path):
    output = _stale_run(tmp_path / "run")
    before = _snapshot(output)
    with pytest.raises(SystemExit) as raised:
        main(["train", base, *TINY_RUN, "--output_dir", str(output)])
    message = str(raised.value.code)
    assert f"--output_dir {output} is not empty" in message
    assert "--overwrite" in message and "--resume_from_checkpoint last" in message
    assert _snapshot(output) == before
    assert sorted(os.listdir(tmp_path)) == ["run"]

    # Resuming from a checkpoint of another run would mix runs just the same.
    elsewhere = _stale_run(tmp_path / "other")
    with pytest.raises(SystemExit, match="is not empty"):
        main(["train", base, *TINY_RUN, "--output_dir", str(output), "--resume_from_checkpoint", str(elsewhere / "checkpoint-5")])
    assert _snapshot(output) == before


def test_overwrite_replaces_the_previous_run(base, tmp_path):
    output = _stale_run(tmp_path / "run")
    # Hyphens and underscores both work, for Trainer fields and the command's own options alike.
    assert main(["train", base, "--knowledge_entities", "2", "--block_size", "32", "--max-steps", "2", "--save-steps", "1",
                 "--logging-steps", "1", *COMMON, "--output-dir", str(output), "--overwrite"]) == 0
    held = set(os.listdir(output))
    assert "checkpoint-5" not in held and {"checkpoint-1", "checkpoint-2", "model.safetensors", "loss_curve.png"} <= held
    assert (output / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["run"]  # nothing of the old run left beside it


def test_resume_continues_the_run_in_its_own_output_dir(base, tmp_path):
    output = tmp_path / "run"
    assert main(["train", base, *TINY_RUN, "--output_dir", str(output)]) == 0
    longer = [*TINY_RUN, "--max_steps", "3"]  # argparse keeps the last value
    assert main(["train", base, *longer, "--output_dir", str(output), "--resume_from_checkpoint", "last"]) == 0
    assert _losses(output).keys() == {1, 2, 3}
    assert main(["train", base, *longer, "--output_dir", str(output), "--resume_from_checkpoint", str(output / "checkpoint-3")]) == 0


def test_overwrite_never_deletes_what_the_run_reads(base, tmp_path, monkeypatch):
    output = _stale_run(tmp_path / "run")
    before = _snapshot(output)
    with pytest.raises(SystemExit, match="would delete the checkpoint that --resume_from_checkpoint"):
        main(["train", base, *TINY_RUN, "--output_dir", str(output), "--overwrite", "--resume_from_checkpoint",
              str(output / "checkpoint-5")])
    assert _snapshot(output) == before
    model_inside = save_tiny_model(output / "model")
    before = _snapshot(output)
    with pytest.raises(SystemExit, match="would delete MODEL"):
        main(["train", model_inside, *TINY_RUN, "--output_dir", str(output), "--overwrite"])
    assert _snapshot(output) == before
    monkeypatch.chdir(output / "checkpoint-5")
    with pytest.raises(SystemExit, match="holds the current folder"):
        main(["train", base, *TINY_RUN, "--output_dir", str(output), "--overwrite"])
    assert _snapshot(output) == before


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda: GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=384), "is a 'gpt2' checkpoint"),
        (lambda: MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=384, sliding_window=16), "sliding-window attention"),
    ],
)
def test_train_graft_refuses_families_without_the_llama_layout(tmp_path, config, message):
    model_dir = tmp_path / "model"
    config().save_pretrained(model_dir)  # the refusal comes before any weights are read
    tiny_tokenizer().save_pretrained(model_dir)
    with pytest.raises(SystemExit) as raised:
        main(["train", str(model_dir), "--graft", "both", "--knowledge-entities", "2", "--output_dir", str(tmp_path / "o"), *COMMON])
    assert message in str(raised.value.code)
    assert not (tmp_path / "o").exists()


def test_sparse_memory_mode_trains_only_the_ranked_rows(tmp_path, capsys):
    """`--mode sparse_memory`: the ranked rows are saved beside the run, the run reports their weights as what
    trains (not the whole tables), and after training only those rows of the tables differ from the starting
    checkpoint; every other weight is bit-identical."""
    from safetensors.torch import load_file

    model_dir = save_tiny_model(tmp_path / "model", chapter_layers=[], pkm_layers=[1], pkm_num_keys=6,
                                pkm_top_k=3, pkm_heads=2, pkm_key_dim=8)
    background = tmp_path / "background.txt"
    background.write_text("\n".join(f"The river runs past the old mill number {i} at dawn." for i in range(40)))
    out = tmp_path / "run"
    main(["train", model_dir, "--knowledge-entities", "2", "--mode", "sparse_memory", "--sparse-memory-top-t", "5",
          "--background-data", str(background), "--block-size", "32", "--output_dir", str(out), "--max_steps", "3",
          "--per_device_train_batch_size", "2", "--learning_rate", "0.05", "--save_strategy", "no", *COMMON])
    slots = load_file(out / "sparse_memory_slots.safetensors")
    assert set(slots) == {"model.layers.0.engram.table.weight", "model.pkm_values.weight"}
    assert all(0 < rows.numel() <= 5 for rows in slots.values())

    before = MemoryLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    chosen_weights = sum(rows.numel() * before[name].shape[1] for name, rows in slots.items())
    assert f"mode sparse_memory: {chosen_weights:,} trainable parameters (adapter 0, memory {chosen_weights:,} in the " \
           "chosen rows, backbone 0)" in capsys.readouterr().out
    after = MemoryLlamaForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, original in before.items():
        if name not in slots:
            assert torch.equal(after[name], original), name
            continue
        changed = (after[name] != original).any(dim=1)
        chosen = torch.zeros_like(changed)
        chosen[slots[name]] = True
        assert not changed[~chosen].any(), name
        if name == "model.pkm_values.weight":  # a fresh Engram's zero value projection passes its table no gradient
            assert changed[chosen].any(), name


def test_sparse_memory_options_need_the_mode(base, tmp_path):
    with pytest.raises(SystemExit, match="only apply to --mode sparse_memory"):
        main(["train", base, "--knowledge-entities", "2", "--sparse-memory-top-t", "5", "--block-size", "32",
              "--output_dir", str(tmp_path / "x"), *COMMON])
    assert not (tmp_path / "x").exists()


# ---- adapter folders (LoRA modes) are read by every command, and merge into a plain checkpoint ------------


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """The output of a `--mode lora_all` run: LoRA on the backbone's and the memory's projections, the tables and
    banks trained beside the adapter (memory.safetensors)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(["train", base, "--knowledge-entities", "2", "--block-size", "32", "--mode", "lora_all", "--max_steps", "3",
                 "--per_device_train_batch_size", "2", "--learning_rate", "2e-2", "--save_strategy", "no", *COMMON,
                 "--output_dir", str(out)]) == 0
    assert {"adapter_config.json", "memory.safetensors"} <= set(os.listdir(out)) and not (out / "config.json").exists()
    return out


def _adapter_model(base, adapter):
    """The adapter model as PEFT runs it (LoRA unmerged), the reference for everything read from an adapter folder."""
    return load_adapter_with_memory(MemoryLlamaForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)).eval()


def test_merge_writes_a_plain_checkpoint_with_the_adapter_models_logits(base, adapter, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    assert main(["merge", str(adapter), str(out)]) == 0
    assert "max |logit difference| against the adapter model" in capsys.readouterr().out
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "adapter_config.json" not in files

    merged = MemoryLlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no PEFT involved
    reference = _adapter_model(base, adapter)
    plain_base = MemoryLlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert (plain_base(ids).logits - expected).abs().max() > 1e-3  # training changed something to merge
    # The memory trained beside the adapter is in the merged checkpoint, unchanged.
    merged_state = merged.state_dict()
    for name, tensor in load_file(adapter / "memory.safetensors").items():
        assert torch.equal(merged_state[name], tensor), name

    with pytest.raises(SystemExit, match="is not an adapter folder"):
        main(["merge", base, str(tmp_path / "again")])


def test_every_command_that_reads_a_model_accepts_an_adapter_folder(base, adapter, tmp_path, capsys):
    reference = _adapter_model(base, adapter)
    ids = torch.randint(3, reference.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))

    assert main(["info", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert f"adapter: LORA r=16" in out and base in out and "layers (3): E.C" in out

    assert main(["generate", str(adapter), "--prompt", "Alice plays the", "--max-new-tokens", "6"]) == 0
    tokenizer = tiny_tokenizer()
    inputs = tokenizer("Alice plays the", return_tensors="pt")
    expected = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert capsys.readouterr().out.strip() == tokenizer.decode(expected[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    assert main(["eval", str(adapter), "--knowledge-entities", "2"]) == 0
    capsys.readouterr()

    exported = tmp_path / "exported"
    assert main(["export", str(adapter), str(exported)]) == 0
    assert "is an adapter folder: merging it into its base" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    # train: the adapter merged into its base and trained on as a plain model; a new adapter needs a base on disk.
    trained = tmp_path / "trained"
    assert main(["train", str(adapter), "--knowledge-entities", "2", "--block-size", "32", "--max_steps", "1",
                 "--save_strategy", "no", *COMMON, "--output_dir", str(trained)]) == 0
    assert (trained / "config.json").is_file()
    with pytest.raises(SystemExit, match=f"is itself an adapter: merge it first \\(`memory-llama merge {adapter} OUT`\\)"):
        main(["train", str(adapter), "--knowledge-entities", "2", "--mode", "lora", *COMMON, "--output_dir", str(tmp_path / "x")])


def test_sparse_memory_mode_has_defaults_of_its_own_that_the_command_line_overrides():
    from memory_llama_cli.train_command import parse_train_command_line
    from modeling_memory.training.sparse_memory_finetuning import RECOMMENDED_TRAINING_ARGUMENTS

    plain = parse_train_command_line(["MODEL", "--data", "facts.txt", "--output_dir", "out"])
    assert plain.learning_rate == 5e-5 and plain.block_size == 256  # Trainer's and the command's own defaults
    sparse = parse_train_command_line(["MODEL", "--data", "facts.txt", "--output_dir", "out", "--mode", "sparse_memory"])
    for name, value in RECOMMENDED_TRAINING_ARGUMENTS.items():
        assert getattr(sparse, name) == value
    given = parse_train_command_line(["MODEL", "--data", "facts.txt", "--output_dir", "out", "--mode", "sparse_memory",
                                      "--learning-rate", "0.01", "--block_size=32"])
    assert given.learning_rate == 0.01 and given.block_size == 32 and given.num_train_epochs == 10

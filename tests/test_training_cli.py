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
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.cli import main
from modeling_memory.knowledge import KnowledgeSet
from modeling_memory.peft_modes import load_adapter_with_memory
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
    for option in ("--mode", "--knowledge-entities", "--learning_rate", "--gradient_accumulation_steps", "--table_optimizer"):
        assert option in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


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

"""Bad inputs fail early with a message that says what is wrong and how to fix it (README, "Bad inputs")."""

import pytest
import torch

from modeling_memory import MemoryLlamaForCausalLM
from conftest import VOCAB, random_ids, tiny_config, train_steps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return train_steps(MemoryLlamaForCausalLM(tiny_config(max_position_embeddings=32)))


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 50, -1])
def test_token_ids_out_of_vocabulary(model, bad_id):
    ids = random_ids(2, 6, torch.Generator().manual_seed(0))
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"vocabulary has {VOCAB} tokens \(valid ids: 0..{VOCAB - 1}\)"):
        model(ids)


def test_float_token_ids(model):
    with pytest.raises(ValueError, match="must be integer token ids"):
        model(torch.ones(1, 4))


def test_inputs_embeds_only_with_engram(model):
    with pytest.raises(ValueError, match="Pass `input_ids` instead"):
        model(inputs_embeds=torch.zeros(1, 4, 32))


def test_non_finite_inputs_embeds():
    chapters_only = MemoryLlamaForCausalLM(tiny_config(engram_layers=[]))
    embeds = torch.zeros(1, 4, 32)
    embeds[0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        chapters_only(inputs_embeds=embeds)
    embeds[0, 2, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        chapters_only(inputs_embeds=embeds)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence(model, shape):
    with pytest.raises(ValueError, match="at least one row and one token"):
        model(torch.zeros(shape, dtype=torch.long))


def test_sequence_longer_than_max_positions(model):
    with pytest.raises(ValueError, match="max_position_embeddings is 32"):
        model(random_ids(1, 33, torch.Generator()))
    ids = random_ids(1, 30, torch.Generator())
    with pytest.raises(ValueError, match="max_position_embeddings is 32"):
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)


def test_all_zero_attention_row_is_harmless(model):
    """A fully padded row (as in chunked prefill of a left-padded batch) gives finite outputs and does not
    change the other rows."""
    ids = random_ids(2, 6, torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        alone = model(ids[:1]).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:1], alone, rtol=1e-5, atol=1e-5)


def test_memory_on_another_device(model):
    ids = random_ids(1, 4, torch.Generator())
    engram_table = model.model.layers[0].engram.table
    original = engram_table.weight
    engram_table.weight = torch.nn.Parameter(torch.empty(original.shape, device="meta"))
    try:
        with pytest.raises(ValueError, match="Engram table of layer 0 is on meta"):
            model(ids)
    finally:
        engram_table.weight = original
    bank = model.model.chapter_bank
    original = bank.weight
    bank.weight = torch.nn.Parameter(torch.empty(original.shape, device="meta"))
    try:
        with pytest.raises(ValueError, match="chapter bank is on meta"):
            model(ids)
    finally:
        bank.weight = original


def test_inputs_on_another_device(model):
    with pytest.raises(ValueError, match="move the inputs"):
        model(torch.zeros(1, 4, dtype=torch.long, device="meta"))


def test_memory_in_another_dtype_is_cast():
    """Tables and bank kept in float64 next to a float32 backbone: cast at use, same result."""
    torch.manual_seed(0)
    reference = train_steps(MemoryLlamaForCausalLM(tiny_config()))
    mixed = MemoryLlamaForCausalLM(tiny_config())
    mixed.load_state_dict(reference.state_dict())
    mixed.model.chapter_bank.double()
    mixed.model.layers[0].engram.table.double()
    ids = random_ids(2, 7, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(mixed(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_strided_inputs_equal_contiguous(model):
    ids = random_ids(7, 2, torch.Generator().manual_seed(3)).t()  # (2, 7), not contiguous
    mask = torch.ones(7, 2, dtype=torch.long).t()
    assert not ids.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, model(ids.contiguous()).logits)


def test_pickle_only_checkpoint_refused_unless_opted_in(tmp_path, capsys):
    """Every loading path of the package reads safetensors only unless the user opts in: the commands
    (`--allow-pickle`), `from_llama` with a path and the loading helper (`allow_pickle=True`)."""
    from memory_llama_cli import main
    from transformers import LlamaConfig, LlamaForCausalLM

    import modeling_memory
    from modeling_memory.tools.errors import ToolError
    from modeling_memory.tools.loading import from_pretrained

    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(tiny_config())
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    message = "only pickle weights \\(pytorch_model.bin\\), which can run code when loaded.*--allow-pickle"
    with pytest.raises(ToolError, match=message):
        from_pretrained(MemoryLlamaForCausalLM, tmp_path)
    loaded = from_pretrained(MemoryLlamaForCausalLM, tmp_path, allow_pickle=True, dtype=torch.float32)
    ids = random_ids(1, 5, torch.Generator())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    for command in (["export", str(tmp_path), str(tmp_path / "out")], ["eval", str(tmp_path), "--knowledge-entities", "1"]):
        with pytest.raises(SystemExit, match=f"memory-llama {command[0]}: error: .*{message}"):
            main(command)

    llama_dir = tmp_path / "llama"
    fields = {k: v for k, v in tiny_config().to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    llama = LlamaForCausalLM(LlamaConfig(**fields))
    llama.config.save_pretrained(llama_dir)
    torch.save(llama.state_dict(), llama_dir / "pytorch_model.bin")
    with pytest.raises(ToolError, match=message):
        modeling_memory.from_llama(str(llama_dir), engram_layers=[0], engram_table_size=31, engram_dim=16)
    grafted = modeling_memory.from_llama(str(llama_dir), allow_pickle=True, engram_layers=[0], engram_table_size=31, engram_dim=16)
    with torch.no_grad():
        torch.testing.assert_close(grafted(ids).logits, llama.eval()(ids).logits)

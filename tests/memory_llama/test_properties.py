"""Property-based tests (hypothesis): Engram addressing, routing, padding invariance, config round trips."""

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
from modeling_memory.memory_llama.ops_engram import engram_row_ids
from conftest import EOS, PAD, VOCAB, tiny_config, train_steps

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

sequences = st.lists(st.integers(3, VOCAB - 1) | st.just(EOS), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return train_steps(MemoryLlamaForCausalLM(tiny_config(engram_layers=[0, 1])))


def engram_rows(model, ids, mask):
    boundaries = model.model.engram_boundaries(ids, mask.bool())
    result = []
    for layer in model.model.layers:
        if layer.engram is not None:
            e = layer.engram
            token_ids, history_lengths = e.ngram_context(ids, boundaries, None)
            result.append(engram_row_ids(token_ids, history_lengths, e.hashing(model.model.engram_canonical_map)))
    return result


def pad_batch(rows, left: bool):
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), PAD)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


@SETTINGS
@given(rows=st.lists(sequences, min_size=1, max_size=4), left=st.booleans())
def test_engram_rows_independent_of_batch_and_padding(model, rows, left):
    ids, mask = pad_batch(rows, left)
    batched = engram_rows(model, ids, mask)
    for i, row in enumerate(rows):
        alone = engram_rows(model, torch.tensor([row]), torch.ones(1, len(row)))
        for layer_rows, layer_alone, engram in zip(batched, alone, [l.engram for l in model.model.layers if l.engram]):
            assert torch.equal(layer_rows[i][mask[i].bool()], layer_alone[0])
            assert layer_rows.min() >= 0 and layer_rows.max() < engram.table.num_embeddings


@SETTINGS
@given(row=sequences)
def test_engram_rows_independent_of_model_dtype(model, row):
    half = MemoryLlamaForCausalLM(model.config)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    ids = torch.tensor([row])
    for a, b in zip(engram_rows(model, ids, torch.ones_like(ids)), engram_rows(half, ids, torch.ones_like(ids))):
        assert torch.equal(a, b)


@SETTINGS
@given(n_tokens=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_routing_is_valid(model, n_tokens, seed):
    memory = model.model.layers[2].chapter_memory
    hidden = torch.randn(n_tokens, 32, generator=torch.Generator().manual_seed(seed)) * 3
    with torch.no_grad():
        _, _, chapter_ids, chapter_weights = memory.route(hidden)
    shared, k = memory.num_shared, memory.top_k
    assert chapter_ids.shape == (n_tokens, shared + k)
    assert (chapter_ids[:, :shared] == torch.arange(shared)).all()
    routed = chapter_ids[:, shared:]
    assert ((routed >= shared) & (routed < memory.num_chapters)).all()
    assert all(len(set(r.tolist())) == k for r in routed)
    torch.testing.assert_close(chapter_weights[:, shared:].sum(-1), torch.ones(n_tokens))
    assert (chapter_weights >= 0).all()


@SETTINGS
@given(rows=st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=10), min_size=2, max_size=3), left=st.booleans())
def test_padding_invariance_of_logits(model, rows, left):
    ids, mask = pad_batch(rows, left)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(batched[i][mask[i].bool()], alone, rtol=1e-4, atol=1e-5)


layer_lists = st.lists(st.integers(0, 3), unique=True, max_size=4)


@SETTINGS
@given(
    chapter_layers=layer_lists, engram_layers=layer_lists,
    routed=st.integers(1, 16), shared=st.integers(0, 3), size=st.integers(1, 64),
    orders=st.lists(st.integers(2, 5), unique=True, min_size=1, max_size=3), heads=st.integers(1, 4),
    table=st.integers(1, 10**6), share=st.booleans(),
)
def test_valid_configs_round_trip(chapter_layers, engram_layers, routed, shared, size, orders, heads, table, share):
    top_k = max(1, routed // 2)
    config = MemoryLlamaConfig(
        num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        chapter_layers=chapter_layers, engram_layers=engram_layers, chapter_num_chapters=routed + shared,
        chapter_num_shared=shared, chapter_top_k=top_k, chapter_size=size, chapter_num_heads=2,
        engram_ngram_orders=orders, engram_heads_per_order=heads, engram_dim=len(orders) * heads * 4,
        engram_table_size=table, chapter_share_bank=share,
    )
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        assert MemoryLlamaConfig.from_pretrained(folder).to_dict() == config.to_dict()


@SETTINGS
@given(
    field=st.sampled_from(["chapter_layers", "engram_layers", "chapter_top_k", "chapter_size", "engram_ngram_orders",
                           "engram_dim", "engram_table_size", "chapter_num_heads"]),
    data=st.data(),
)
def test_invalid_configs_rejected(field, data):
    bad = {
        "chapter_layers": st.integers(3, 100).map(lambda v: [0, v]),  # the tiny model has layers 0..2
        "engram_layers": st.integers(-5, -1).map(lambda v: [v]),
        "chapter_top_k": st.integers(9, 50),
        "chapter_size": st.integers(-5, 0),
        "engram_ngram_orders": st.integers(-3, 1).map(lambda v: [v]),
        "engram_dim": st.integers(1, 200).filter(lambda v: v % 4 != 0),
        "engram_table_size": st.integers(-100, 0),
        "chapter_num_heads": st.sampled_from([3, 5, 7, 64]),
    }[field]
    with pytest.raises(Exception, match=field):
        tiny_config(**{field: data.draw(bad)})

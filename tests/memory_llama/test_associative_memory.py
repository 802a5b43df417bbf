"""The associative memory (Memory Mosaics v2) in the model: against the naive per-token reference, every generation
mode with the cache against uncached decoding, chunked prefill into a static cache, flex attention, and the
placements' promises (a "parallel" graft computes what Llama computes; "replace" has no self-attention). Causality,
padding, chunked prefill, rows ending early, beam search, sampling, static caches, compiled decoding, cache
cropping and prompt-lookup decoding are test_modeling.py's tests, run on these layouts too (`each_trained_layout`)."""

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

import modeling_memory
from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
from modeling_memory.memory_llama.naive_associative_memory import naive_associative_memory
from conftest import random_ids, tiny_config, train_steps, wake_memory
from test_modeling import MOSAIC, MOSAIC_PARALLEL, MOSAIC_REPLACE, left_padded_batch, llama_config_of, positions_of

FP32_ATOL = 1e-5
LAYOUTS = {"replace": MOSAIC_REPLACE, "parallel": MOSAIC_PARALLEL}


def trained(layout: str, seed: int = 0):
    torch.manual_seed(seed)
    return train_steps(MemoryLlamaForCausalLM(tiny_config(**LAYOUTS[layout])), seed=seed)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def model(request):
    return trained(request.param)


def test_replace_has_no_attention_and_parallel_keeps_it(model):
    for layer in model.model.layers:
        if layer.associative_memory is None:
            continue
        replaced = model.config.mosaic_placement == "replace"
        assert (layer.self_attn is None) == replaced
        assert (layer.associative_memory.short_term is None) != replaced
    names = set(model.state_dict())
    assert any("associative_memory.long_term.mosaic_key_gate.weight" in name for name in names)
    if model.config.mosaic_placement == "replace":
        assert not any("self_attn" in name for name in names)


@pytest.mark.parametrize("training", [False, True])
def test_layer_matches_naive_reference_with_padding(model, training):
    """The layer (log-space scan, masked attention reads, bandwidth from the pairs read) equals the equations
    computed token by token, on a batch with left and right padding; while training each sequence draws its own
    long-term delay, which the reference is given."""
    memory = model.model.layers[1].associative_memory
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 16, 32, generator=generator)
    token_mask = torch.ones(3, 16, dtype=torch.bool)
    token_mask[1, :5] = False  # left padding
    token_mask[2, 12:] = False  # right padding
    memory.train(training)
    try:
        torch.manual_seed(7)
        with torch.no_grad():
            output = memory(hidden, token_mask)
        torch.manual_seed(7)
        delays = memory._long_term_delay(3, hidden.device).tolist()
    finally:
        memory.eval()
    if training:
        assert len(set(delays)) > 1 or memory.max_delay == memory.min_delay
    reference = naive_associative_memory(memory, hidden, token_mask, delays)
    torch.testing.assert_close(output[token_mask].double(), reference[token_mask], rtol=1e-4, atol=1e-5)


def test_chunked_prefill_into_a_static_cache_equals_full_forward(model):
    ids, mask = left_padded_batch(torch.Generator().manual_seed(5), lengths=(16, 12, 9))
    positions = positions_of(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        cache = StaticCache(config=model.config, max_cache_len=24)
        chunks = []
        for start in range(0, 16, 4):
            end = start + 4
            out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                        cache=cache, use_cache=True)
            chunks.append(out.logits)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(chunks, dim=1)[valid], full[valid], rtol=1e-4, atol=FP32_ATOL)


def test_flex_attention_agrees_with_sdpa(model, tmp_path):
    """Eager against sdpa is test_modeling's test_eager_and_sdpa_agree."""
    if model.config.mosaic_placement == "parallel":
        # torch 2.13's inductor emits C++ that does not compile for this model's CPU flex kernels
        # ("cur_kvSplitSize5 was not declared"); the "replace" model covers the flex path on the CPU.
        pytest.skip("torch inductor CPU flex-attention codegen bug")
    model.save_pretrained(tmp_path)
    ids, mask = left_padded_batch(torch.Generator().manual_seed(11))
    logits = {}
    for name in ("sdpa", "flex_attention"):
        loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation=name)
        with torch.no_grad():
            logits[name] = loaded(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    valid = mask.bool()
    torch.testing.assert_close(logits["flex_attention"][valid], logits["sdpa"][valid], rtol=1e-4, atol=FP32_ATOL)


def test_gradients_reach_every_parameter_of_the_memory():
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(**LAYOUTS["replace"])), steps=1)
    model.train()
    ids = random_ids(4, 16, torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if "associative_memory" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_parallel_graft_computes_what_llama_computes_until_trained():
    config = tiny_config(chapter_layers=[], engram_layers=[])
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config_of(config)).eval()
    grafted = modeling_memory.from_llama(llama, mosaic_layers=[0, 2], mosaic_placement="parallel", **MOSAIC)
    ids, mask = left_padded_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(grafted(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits,
                                   rtol=0, atol=FP32_ATOL)
        wake_memory(grafted)
        assert (grafted(ids, attention_mask=mask).logits - llama(ids, attention_mask=mask).logits).abs().max() > 0.01


def test_delay_is_drawn_per_sequence_in_training_and_fixed_at_inference(model):
    memory = model.model.layers[1].associative_memory
    memory.train()
    try:
        drawn = torch.cat([memory._long_term_delay(64, torch.device("cpu")) for _ in range(4)])
    finally:
        memory.eval()
    assert drawn.min() == memory.min_delay and drawn.max() == memory.max_delay
    assert (memory._long_term_delay(8, torch.device("cpu")) == memory.min_delay).all()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(mosaic_placement="beside"), "mosaic_placement"),
        (dict(mosaic_short_window=256), "shorter than the context"),
        (dict(mosaic_max_delay=300), "shorter than the context"),
        (dict(mosaic_min_delay=8, mosaic_max_delay=4), "must not exceed"),
        (dict(mosaic_short_window=1), ">= 2"),
        (dict(mosaic_num_heads=0), "mosaic_num_heads"),
        (dict(mosaic_layers=[3]), "mosaic_layers"),
    ],
)
def test_bad_settings_are_refused_by_name(fields, message):
    with pytest.raises(Exception, match=message):
        tiny_config(mosaic_layers=fields.pop("mosaic_layers", [1]), **fields)


def test_cache_without_the_model_layout_and_flash_attention_are_refused(model):
    ids = random_ids(1, 6, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="keep their \\(key, value\\) pairs in the cache"):
        model(ids, cache=DynamicCache(), use_cache=True)
    original = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            model(ids)
    finally:
        model.config._attn_implementation = original


def test_config_round_trip_names_the_cache_layer_kinds(tmp_path):
    config = tiny_config(**LAYOUTS["replace"])
    assert config.layer_types == ["hybrid_associative_memory", "associative_memory", "associative_memory"]
    config.save_pretrained(tmp_path)
    loaded = MemoryLlamaConfig.from_pretrained(tmp_path)
    assert loaded.mosaic_layers == [0, 1, 2] and loaded.mosaic_short_window == 5

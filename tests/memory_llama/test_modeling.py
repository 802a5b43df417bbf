"""Behaviour of the model as a whole: round trips, equivalence with Llama, causality, padding,
generation with the cache, gradients."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from transformers import DynamicCache

import modeling_memory
from modeling_memory.data.packing import document_position_ids
from modeling_memory import MemoryLlamaForCausalLM, MemoryLlamaModel
from conftest import EOS, PAD, VOCAB, random_ids, tiny_config, train_steps, wake_memory

FP32_ATOL = 1e-5
# A small product-key memory: 36 slots, 2 heads reading 3 each.
PKM = dict(pkm_layers=[1], pkm_num_keys=6, pkm_top_k=3, pkm_heads=2, pkm_key_dim=8)
# Associative memory with windows and delays short enough that 16-token rows exercise every bound: every layer
# replaced (Engram shares layer 0's cache layer), or a long-term branch beside attention in two layers.
MOSAIC = dict(mosaic_short_window=5, mosaic_min_delay=3, mosaic_max_delay=6, mosaic_num_heads=2, mosaic_head_dim=8)
MOSAIC_REPLACE = dict(mosaic_layers=[0, 1, 2], mosaic_placement="replace", chapter_layers=[], **MOSAIC)
MOSAIC_PARALLEL = dict(mosaic_layers=[0, 1], mosaic_placement="parallel", **MOSAIC)


def llama_config_of(config) -> LlamaConfig:
    fields = {k: v for k, v in config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    return LlamaConfig(**fields)


def test_save_and_auto_load_round_trip(tmp_path, trained_model):
    trained_model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded) is MemoryLlamaForCausalLM
    ids = random_ids(2, 12, torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained_model(ids).logits, rtol=0, atol=0)
    original = dict(trained_model.named_buffers())
    for name, buffer in loaded.named_buffers():
        if name in original:
            assert torch.equal(buffer, original[name]), name
    for name, tensor in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert torch.isfinite(tensor.float()).all(), name
    assert isinstance(AutoModel.from_pretrained(tmp_path, dtype=torch.float32), MemoryLlamaModel)


def test_fresh_load_initialises_every_buffer(tmp_path):
    """Buffers missing from a checkpoint are rebuilt exactly (not left as garbage from empty storage)."""
    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(tiny_config())
    state = {k: v for k, v in model.state_dict().items() if "table_primes" not in k and "hash_multipliers" not in k}
    from safetensors.torch import save_file

    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reference = dict(model.named_buffers())
    for name, buffer in loaded.named_buffers():
        if name in reference:
            assert torch.equal(buffer, reference[name]), name


def test_memories_off_is_exactly_llama():
    config = tiny_config(chapter_layers=[], engram_layers=[])
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config_of(config)).eval()
    memory = MemoryLlamaForCausalLM(config).eval()
    assert set(memory.state_dict()) == set(llama.state_dict())
    memory.load_state_dict(llama.state_dict())
    ids = random_ids(2, 10, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(memory(ids).logits, llama(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("share", [True, False])
def test_grafted_model_computes_what_llama_computes(share, tmp_path):
    config = tiny_config(**PKM)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config_of(config)).eval()
    memory_fields = {k: getattr(config, k) for k in ("chapter_layers", "engram_layers", "chapter_num_chapters",
                     "chapter_size", "chapter_num_heads", "engram_heads_per_order", "engram_table_size", "engram_dim")}
    memory_fields.update(chapter_share_bank=share, pkm_share_values=share, **PKM)
    grafted = modeling_memory.from_llama(llama, **memory_fields)
    ids = random_ids(3, 14, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grafted(ids).logits, llama(ids).logits, rtol=0, atol=FP32_ATOL)

    # Woken memory changes the output: the graft of the saved Llama (loaded straight into the MemoryLlama, its
    # buffers built by _init_weights) given the same parameters agrees with it, on a padded batch as row by row.
    llama.save_pretrained(tmp_path)
    from_path = modeling_memory.from_llama(str(tmp_path), **memory_fields)
    from_path.load_state_dict(dict(wake_memory(grafted).named_parameters()), strict=False)  # parameters only
    ids, mask = left_padded_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = grafted(ids, attention_mask=mask).logits
        assert (logits - llama(ids, attention_mask=mask).logits)[mask.bool()].abs().max() > 0.1  # awake
        torch.testing.assert_close(from_path(ids, attention_mask=mask).logits, logits, rtol=0, atol=FP32_ATOL)
        for row in range(ids.shape[0]):
            alone = ids[row : row + 1, mask[row].bool()]
            torch.testing.assert_close(grafted(alone).logits[0], logits[row, mask[row].bool()], rtol=0, atol=FP32_ATOL)


CAUSALITY_LAYOUTS = {
    "engram": dict(engram_layers=[0, 1], chapter_layers=[]),
    "chapters": dict(engram_layers=[], chapter_layers=[0, 2]),
    "product keys": dict(engram_layers=[], chapter_layers=[], **PKM),
    "associative, replace": MOSAIC_REPLACE,
    "associative, parallel": dict(engram_layers=[], chapter_layers=[], **MOSAIC_PARALLEL),
}


@pytest.mark.parametrize("memory", CAUSALITY_LAYOUTS)
@pytest.mark.parametrize("seed", range(4))
def test_causality(memory, seed):
    """Changing tokens after position t never changes logits at positions <= t."""
    layers = CAUSALITY_LAYOUTS[memory]
    torch.manual_seed(seed)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(**layers)), seed=seed)
    generator = torch.Generator().manual_seed(100 + seed)
    ids = random_ids(2, 16, generator)
    cut = int(torch.randint(1, 15, (1,), generator=generator))
    changed = ids.clone()
    changed[:, cut + 1 :] = random_ids(2, 16 - cut - 1, generator)
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, : cut + 1], after[:, : cut + 1], rtol=0, atol=FP32_ATOL)
    assert not torch.allclose(before[:, cut + 1 :], after[:, cut + 1 :])


def test_memory_outputs_are_nonzero_after_training(trained_model):
    layers = trained_model.model.layers
    assert layers[0].engram.engram_value.weight.abs().sum() > 0
    assert layers[2].chapter_memory.memory_output.weight.abs().sum() > 0


def left_padded_batch(generator, lengths=(11, 7, 4)):
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), PAD)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, longest - length :] = random_ids(1, length, generator)
        mask[row, longest - length :] = 1
    return ids, mask


def positions_of(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


TRAINED_LAYOUTS = {"all three": PKM, "associative, replace": MOSAIC_REPLACE, "associative, parallel": MOSAIC_PARALLEL}


@pytest.fixture(params=["engram+chapters", *TRAINED_LAYOUTS])
def each_trained_layout(request, trained_model):
    if request.param == "engram+chapters":
        return trained_model
    torch.manual_seed(0)
    return train_steps(MemoryLlamaForCausalLM(tiny_config(**TRAINED_LAYOUTS[request.param])))


def test_padding_invariance(each_trained_layout):
    trained_model = each_trained_layout
    generator = torch.Generator().manual_seed(3)
    ids, mask = left_padded_batch(generator)
    with torch.no_grad():
        batch_logits = trained_model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        for row in range(ids.shape[0]):
            alone = ids[row][mask[row].bool()].unsqueeze(0)
            alone_logits = trained_model(alone).logits[0]
            torch.testing.assert_close(batch_logits[row][mask[row].bool()], alone_logits, rtol=1e-4, atol=FP32_ATOL)
        # right padding
        right_ids, right_mask = ids.flip(-1).clone(), mask.flip(-1).clone()
        for row in range(ids.shape[0]):
            valid = ids[row][mask[row].bool()]
            right_ids[row] = PAD
            right_ids[row, : valid.numel()] = valid
        right_logits = trained_model(right_ids, attention_mask=right_mask).logits
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            torch.testing.assert_close(right_logits[row, :n], batch_logits[row][mask[row].bool()], rtol=1e-4, atol=FP32_ATOL)


def test_packed_documents_compute_what_each_document_computes_alone(each_trained_layout):
    """Rows packing several documents, with position ids restarting at each (as `tokenize_and_pack(...,
    separate_documents=True)` writes them) and padding at the end: every document gets the logits it gets alone.
    Attention, Engram's n-grams and convolution and the associative memory stay inside documents."""
    model = each_trained_layout
    generator = torch.Generator().manual_seed(5)
    width, packed_rows = 24, []
    for lengths in ((5, 9, 4), (12, 3, 7)):
        documents = [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]
        for document in documents:
            document[-1] = EOS  # the packer ends every document with EOS
        packed_rows.append(documents)
    ids = torch.full((len(packed_rows), width), PAD)
    mask = torch.zeros_like(ids)
    for row, documents in enumerate(packed_rows):
        tokens = torch.cat(documents)
        ids[row, : tokens.numel()], mask[row, : tokens.numel()] = tokens, 1
    positions = torch.tensor([document_position_ids(row.tolist(), EOS) for row in ids])
    with torch.no_grad():
        packed_logits = model(ids, attention_mask=mask, position_ids=positions).logits
        for row, documents in enumerate(packed_rows):
            start = 0
            for document in documents:
                alone = model(document[None]).logits[0]
                torch.testing.assert_close(packed_logits[row, start : start + document.numel()], alone, rtol=1e-4, atol=FP32_ATOL)
                start += document.numel()
        # Without the restarting positions the documents do read each other: the test can fail.
        plain_logits = model(ids, attention_mask=mask).logits
    assert not torch.allclose(plain_logits[0, 5:14], packed_logits[0, 5:14], rtol=1e-4, atol=FP32_ATOL)


def an_eos_that_ends_one_row_early(model, ids, mask, max_new_tokens):
    """A token that uncached greedy decoding emits in the middle of one row's continuation and nowhere in
    another's: used as `eos_token_id`, rows then finish at different steps (padding follows in the finished
    ones) — the case that breaks a cache whose state is not where `generate` looks for it."""
    free = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD,
                          eos_token_id=None, use_cache=False)[:, ids.shape[1]:]
    for row in range(free.shape[0]):
        for token in free[row, 1 : max_new_tokens // 2].tolist():
            if token != PAD and any(token not in free[other].tolist() for other in range(free.shape[0]) if other != row):
                return token
    raise AssertionError("no token ends one row early; pick another seed")


MEMORY_LAYOUTS = {
    "engram+chapters": {},
    "no memory": dict(engram_layers=[], chapter_layers=[]),
    "engram only": dict(chapter_layers=[], engram_layers=[0, 2]),
    "all three": PKM,
    "associative, replace": MOSAIC_REPLACE,
    "associative, parallel": MOSAIC_PARALLEL,
}


@pytest.mark.parametrize("layout", MEMORY_LAYOUTS)
def test_cached_greedy_generation_equals_uncached_with_rows_ending_early(layout):
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(**MEMORY_LAYOUTS[layout])))
    ids, mask = left_padded_batch(torch.Generator().manual_seed(4))
    eos = an_eos_that_ends_one_row_early(model, ids, mask, 24)
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    finished_early = (cached[:, ids.shape[1] :] == eos).any(dim=1)
    assert finished_early.any() and not finished_early.all()
    assert torch.equal(cached, uncached)


def test_static_cache_generation_equals_dynamic(each_trained_layout):
    trained_model = each_trained_layout
    ids, mask = left_padded_batch(torch.Generator().manual_seed(4))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    dynamic = trained_model.generate(ids, **kwargs)
    assert torch.equal(trained_model.generate(ids, cache_implementation="static", **kwargs), dynamic)
    beams = dict(kwargs, num_beams=3)
    assert torch.equal(trained_model.generate(ids, cache_implementation="static", **beams),
                       trained_model.generate(ids, use_cache=False, **beams))


def test_compiled_decoding_with_static_cache_equals_eager(each_trained_layout):
    """`generate` compiles the decode step (whole graph, no breaks) when the cache is static; the eager
    backend checks the traced graph without the C++ build (the inductor build is the same graph)."""
    from transformers import CompileConfig

    trained_model = each_trained_layout
    ids, mask = left_padded_batch(torch.Generator().manual_seed(4))
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    compile_config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles on accelerators only by default
    compiled = trained_model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert hasattr(trained_model, "_compiled_call")
    assert torch.equal(compiled, trained_model.generate(ids, **kwargs))


def test_chunked_prefill_equals_full_forward(each_trained_layout):
    trained_model = each_trained_layout
    ids, mask = left_padded_batch(torch.Generator().manual_seed(5), lengths=(16, 12, 9))
    positions = positions_of(mask)
    with torch.no_grad():
        full = trained_model(ids, attention_mask=mask, position_ids=positions).logits
        cache = DynamicCache(config=trained_model.config)
        chunks = []
        for start in range(0, 16, 4):
            end = start + 4
            out = trained_model(
                ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                cache=cache, use_cache=True,
            )
            chunks.append(out.logits)
    chunked = torch.cat(chunks, dim=1)
    valid = mask.bool()
    torch.testing.assert_close(chunked[valid], full[valid], rtol=1e-4, atol=FP32_ATOL)


def test_beam_search_with_cache_equals_without(each_trained_layout):
    trained_model = each_trained_layout
    ids, mask = left_padded_batch(torch.Generator().manual_seed(6))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(trained_model.generate(ids, use_cache=True, **kwargs), trained_model.generate(ids, use_cache=False, **kwargs))


def test_sampling_with_cache_equals_without(each_trained_layout):
    trained_model = each_trained_layout
    ids = random_ids(2, 6, torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=16, do_sample=True, top_k=0, pad_token_id=PAD)
    torch.manual_seed(0)
    cached = trained_model.generate(ids, use_cache=True, **kwargs)
    torch.manual_seed(0)
    uncached = trained_model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_cache_cropping_prompt_lookup_decoding(each_trained_layout):
    """Prompt-lookup decoding proposes tokens and crops the cache when they are rejected."""
    trained_model = each_trained_layout
    pattern = random_ids(1, 5, torch.Generator().manual_seed(8))
    ids = torch.cat([pattern, pattern, pattern[:, :3]], dim=1)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=PAD)
    assisted = trained_model.generate(ids, prompt_lookup_num_tokens=3, **kwargs)
    assert torch.equal(assisted, trained_model.generate(ids, **kwargs))


def test_cache_crop_restores_memory_state(each_trained_layout):
    trained_model = each_trained_layout
    ids = random_ids(1, 12, torch.Generator().manual_seed(9))
    with torch.no_grad():
        cache = DynamicCache(config=trained_model.config)
        trained_model(ids[:, :8], cache=cache, use_cache=True)
        cache.activate_past_recording()  # as assisted decoding does before it may crop
        trained_model(ids[:, 8:11], cache=cache, use_cache=True)
        cache.crop(-3)
        assert cache.get_seq_length() == 8
        resumed = trained_model(ids[:, 8:], cache=cache, use_cache=True).logits
        full = trained_model(ids).logits[:, 8:]
    torch.testing.assert_close(resumed, full, rtol=1e-4, atol=FP32_ATOL)


def test_gradients_reach_all_memory_after_one_step():
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config()), steps=1)
    model.train()
    ids = random_ids(4, 16, torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    engram, chapters = model.model.layers[0].engram, model.model.layers[2].chapter_memory
    for name, param in [
        ("bank", model.model.chapter_bank.weight),
        ("router", chapters.router.weight),
        ("memory_query", chapters.memory_query.weight),
        ("memory_key", chapters.memory_key.weight),
        ("engram table", engram.table.weight),
        ("engram_key (gate)", engram.engram_key.weight),
        ("gate hidden norm", engram.hidden_norm.weight),
        ("conv", engram.conv.weight),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_same_loss_and_gradients(trained_model):
    ids = random_ids(2, 16, torch.Generator().manual_seed(10))
    trained_model.train()
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            trained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trained_model.zero_grad()
        loss = trained_model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trained_model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_eager_and_sdpa_agree(each_trained_layout, tmp_path):
    trained_model = each_trained_layout
    trained_model.save_pretrained(tmp_path)
    ids, mask = left_padded_batch(torch.Generator().manual_seed(11))
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = MemoryLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation=implementation)
        with torch.no_grad():
            logits[implementation] = model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    valid = mask.bool()
    torch.testing.assert_close(logits["eager"][valid], logits["sdpa"][valid], rtol=1e-4, atol=FP32_ATOL)


def test_output_options(trained_model):
    ids = random_ids(2, 9, torch.Generator().manual_seed(12))
    with torch.no_grad():
        full = trained_model(ids, output_hidden_states=True, output_router_logits=True)
        assert len(full.hidden_states) == trained_model.config.num_hidden_layers + 1
        assert all(h.shape == (2, 9, 32) for h in full.hidden_states)
        assert len(full.router_logits) == 1 and full.router_logits[0].shape == (18, 8)
        assert len(full.router_indices) == 1 and full.router_indices[0].shape == (18, 2)
        as_tuple = trained_model(ids, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], full.logits)
        last = trained_model(ids, logits_to_keep=1).logits
        torch.testing.assert_close(last, full.logits[:, -1:])


RECORDED_MEMORY_OUTPUTS = ("router_logits", "router_indices", "engram_gates", "engram_row_ids", "pkm_indices")


def test_memory_internals_are_recorded_on_request_and_equal_an_independent_recomputation():
    """What the memories return besides their update is recorded only when asked, and is what they computed:
    Engram rows against the naive hashing walk, Engram gates against the formula written out, product-key
    slots against the layer's addressing of its input (captured by hooks here, in the test only)."""
    from modeling_memory.memory_llama.naive_engram import naive_engram_row_ids_of_documents

    torch.manual_seed(0)
    model = wake_memory(MemoryLlamaForCausalLM(tiny_config(**PKM))).eval()
    ids = random_ids(2, 9, torch.Generator().manual_seed(3))
    ids[0, 4] = EOS
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = PAD
    captured = {}
    engram, memory = model.model.layers[0].engram, model.model.layers[1].product_key_memory
    hooks = [
        engram.register_forward_pre_hook(lambda module, args: captured.update(engram_input=args[0])),
        model.model.layers[1].post_attention_layernorm.register_forward_hook(
            lambda module, args, out: captured.update(pkm_input=out)),
    ]
    flags = {f"output_{name}": True for name in RECORDED_MEMORY_OUTPUTS}
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **flags)
    for hook in hooks:
        hook.remove()
    assert all(len(out[name]) == 1 for name in RECORDED_MEMORY_OUTPUTS)
    real = mask.reshape(-1).bool()

    (rows,) = out.engram_row_ids
    hashing = engram.hashing(model.model.engram_canonical_map)
    expected_rows = naive_engram_row_ids_of_documents(ids, mask.bool(), [EOS], hashing).reshape(18, -1)
    assert rows.shape == (18, 4) and torch.equal(rows[real], expected_rows[real])

    def rms_norm(x, weight, eps=model.config.rms_norm_eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    with torch.no_grad():
        keys = engram.lookup(*engram.ngram_context(ids, model.model.engram_boundaries(ids, mask.bool()), None),
                             model.model.engram_canonical_map) @ engram.engram_key.weight.T
        hidden = captured["engram_input"]
        score = (rms_norm(hidden, engram.hidden_norm.weight) * rms_norm(keys, engram.key_norm.weight)).sum(-1) / 32**0.5
        gate = torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt())
    (gates,) = out.engram_gates
    assert gates.shape == (18,) and gates.dtype == torch.float32
    torch.testing.assert_close(gates, gate.reshape(-1), rtol=1e-5, atol=1e-6)

    (slots,) = out.pkm_indices
    with torch.no_grad():
        expected_slots, _ = memory.address(captured["pkm_input"].reshape(18, 32))
    assert slots.shape == (18, 2, 3) and torch.equal(slots, expected_slots)

    # Not asked: nothing recorded (and the Engram kernels write no row ids).
    plain = model(ids, attention_mask=mask)
    assert all(plain.get(name) is None for name in RECORDED_MEMORY_OUTPUTS)
    # Trainer's evaluation gathers every other output tensor as logits.
    assert set(RECORDED_MEMORY_OUTPUTS) <= set(model.config.keys_to_ignore_at_inference)


def test_inputs_embeds_without_ids_needs_no_engram(trained_model):
    embeds = trained_model.get_input_embeddings()(random_ids(1, 5, torch.Generator().manual_seed(13)))
    with pytest.raises(ValueError, match="Engram .* needs `input_ids`"):
        trained_model(inputs_embeds=embeds)
    chapters_only = MemoryLlamaForCausalLM(tiny_config(engram_layers=[]))
    assert chapters_only(inputs_embeds=embeds).logits.shape == (1, 5, VOCAB)


def test_cache_without_the_model_layout_is_refused_with_engram(trained_model):
    with pytest.raises(ValueError, match=r"DynamicCache\(config=model.config\)"):
        trained_model(random_ids(1, 4, torch.Generator()), cache=DynamicCache(), use_cache=True)


def test_eos_resets_ngram_history_in_the_model():
    """Tokens after an EOS read the same Engram rows as the same tokens starting a sequence."""
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(chapter_layers=[], engram_layers=[0, 1, 2])))
    generator = torch.Generator().manual_seed(14)
    first, second = random_ids(1, 6, generator), random_ids(1, 5, generator)
    # The rows read, as the key projection receives them (the table's weight is read by the lookup op directly).
    model.model.layers[1].engram.engram_key.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    captured = []
    with torch.no_grad():
        model(torch.cat([first, torch.tensor([[EOS]]), second], dim=1))
        model(second)
    torch.testing.assert_close(captured[0][:, 7:], captured[1], rtol=1e-5, atol=FP32_ATOL)


def test_from_llama_path_refuses_missing_backbone_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_config(chapter_layers=[], engram_layers=[])
    llama = LlamaForCausalLM(llama_config_of(config))
    llama.save_pretrained(tmp_path)
    grafted = modeling_memory.from_llama(str(tmp_path), engram_layers=[0], engram_table_size=31, engram_dim=16,
                                         engram_heads_per_order=2)
    ids = random_ids(1, 6, torch.Generator())
    with torch.no_grad():
        torch.testing.assert_close(grafted(ids).logits, llama.eval()(ids).logits, rtol=0, atol=FP32_ATOL)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing non-memory keys \\['model.layers.1.mlp.up_proj.weight'\\]"):
        modeling_memory.from_llama(str(tmp_path), engram_layers=[0], engram_table_size=31, engram_dim=16,
                                   engram_heads_per_order=2)

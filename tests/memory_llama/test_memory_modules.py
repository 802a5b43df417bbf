"""Engram and chapter memory against independent references: the naive plain-Python hashing loops of
`naive_engram`, and dense attention over the whole bank with a mask."""

import torch

from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.memory_llama.chapter_memory import router_losses
from modeling_memory.memory_llama.engram import _is_prime
from modeling_memory.memory_llama.naive_engram import naive_engram_row_ids_of_documents, naive_is_prime, naive_primes_from
from modeling_memory.memory_llama.ops_engram import engram_row_ids
from conftest import EOS, PAD, random_ids, tiny_config, train_steps


def test_engram_rows_match_naive_walk_with_eos_and_padding():
    config = tiny_config(engram_layers=[0, 1], engram_ngram_orders=[2, 4], chapter_layers=[])
    model = MemoryLlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    canonical = torch.randint(0, config.vocab_size, (config.vocab_size,), generator=generator)
    model.model.engram_canonical_map.copy_(canonical)
    ids = random_ids(3, 14, generator)
    ids[0, 5] = EOS
    ids[1, 3] = EOS
    ids[1, 4] = EOS
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # left padding
    ids[2, :4] = PAD
    boundaries = model.model.engram_boundaries(ids, mask.bool())
    for layer in (0, 1):
        engram = model.model.layers[layer].engram
        token_ids, history_lengths = engram.ngram_context(ids, boundaries, None)
        rows = engram_row_ids(token_ids, history_lengths, engram.hashing(canonical))
        expected = naive_engram_row_ids_of_documents(ids, mask.bool(), [EOS], engram.hashing(canonical))
        valid = mask.bool()
        assert torch.equal(rows[valid], expected[valid])
        assert rows.min() >= 0 and rows.max() < engram.table.num_embeddings


def test_primes_distinct_across_the_model():
    config = tiny_config(engram_layers=[0, 1, 2], engram_heads_per_order=4, engram_dim=32, engram_table_size=1000)
    model = MemoryLlamaForCausalLM(config)
    primes = torch.cat([model.model.layers[i].engram.table_primes for i in (0, 1, 2)]).tolist()
    assert len(primes) == 24 and len(set(primes)) == 24
    assert primes == naive_primes_from(1000, 24)  # the next unused prime at or above engram_table_size, in order
    assert [_is_prime(n) for n in range(3000)] == [naive_is_prime(n) for n in range(3000)]
    assert [naive_is_prime(n) for n in range(20)] == [n in (2, 3, 5, 7, 11, 13, 17, 19) for n in range(20)]
    multipliers = [model.model.layers[i].engram.hash_multipliers for i in (0, 1, 2)]
    assert all((m % 2 == 1).all() for m in multipliers)
    assert not torch.equal(multipliers[0], multipliers[1])


def dense_chapter_reference(chapter_memory, bank, hidden):
    """Attention over the whole bank, masked to the chapters each token reads, combined the same way."""
    memory = chapter_memory
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = memory.router(flat).float()
    top_logits, top = logits.topk(memory.top_k, dim=-1)
    weights = top_logits.softmax(-1)
    normed = memory.bank_norm(bank)
    heads, head_dim, size = memory.num_heads, memory.head_dim, memory.chapter_size
    keys = memory.memory_key(normed).view(-1, heads, head_dim)
    values = memory.memory_value(normed).view(-1, heads, head_dim)
    query = memory.memory_query(flat).view(-1, heads, head_dim)
    chapter_of_slot = torch.arange(bank.shape[0]) // size
    scores = torch.einsum("nhd,mhd->nhm", query, keys) * head_dim**-0.5
    output = torch.zeros_like(query)
    read = [(c, torch.full((flat.shape[0],), 1.0 / memory.num_shared)) for c in range(memory.num_shared)]
    read = [(torch.full((flat.shape[0],), c), w) for c, w in read]
    read += [(top[:, j] + memory.num_shared, weights[:, j]) for j in range(memory.top_k)]
    for chapters, chapter_weights in read:
        keep = chapter_of_slot[None, :] == chapters[:, None]  # (N, C*T)
        probs = scores.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1)
        output += chapter_weights[:, None, None] * torch.einsum("nhm,mhd->nhd", probs, values)
    return memory.memory_output(output.reshape(hidden.shape))


def test_chapter_memory_matches_dense_masked_reference():
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(chapter_num_shared=2, chapter_top_k=3)))
    chapter_memory = model.model.layers[2].chapter_memory
    hidden = torch.randn(2, 7, 32)
    bank = model.model.chapter_bank
    with torch.no_grad():
        ours, _, _ = chapter_memory(hidden, bank)
        expected = dense_chapter_reference(chapter_memory, bank.weight, hidden)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 1e-4


def test_projected_bank_reused_at_inference_and_never_stale():
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config()))
    memory, bank = model.model.layers[2].chapter_memory, model.model.chapter_bank.weight
    with torch.no_grad():
        first = memory.project_bank(bank, torch.float32)
        assert memory.project_bank(bank, torch.float32)[0] is first[0]  # reused
    train_steps(model, steps=1, seed=5)  # an optimizer step changes the weights in place
    with torch.no_grad():
        after = memory.project_bank(bank, torch.float32)
    assert after[0] is not first[0] and not torch.allclose(after[0], first[0])


def test_training_projects_only_the_chapters_read(monkeypatch):
    """With autograd the bank projection is recomputed every step, for the chapters the batch reads only;
    the result equals the inference path that projects (and caches) the whole bank. The bank's gradient is
    sparse, the rows of the chapters read only, and equals the dense gradient."""
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(chapter_num_chapters=40, chapter_top_k=1)))
    memory, bank_table = model.model.layers[2].chapter_memory, model.model.chapter_bank
    bank = bank_table.weight
    monkeypatch.setattr(memory, "folding_is_cheaper", lambda *args: False)  # the projecting path
    hidden = torch.randn(1, 3, 32)
    projected_rows = []
    hook = memory.memory_key.register_forward_hook(lambda module, args, output: projected_rows.append(args[0].shape[0]))
    with torch.no_grad():
        expected, _, _ = memory(hidden, bank_table)
    trained, _, _ = memory(hidden, bank_table)
    hook.remove()
    _, _, chapter_ids, _ = memory.route(hidden.reshape(-1, 32))
    assert projected_rows == [40 * 5, chapter_ids.unique().numel() * 5]
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)
    trained.sum().backward()
    grad = bank.grad.coalesce()
    read = chapter_ids.unique()
    assert torch.equal(grad.indices()[0], (read[:, None] * 5 + torch.arange(5)).flatten())
    bank.grad = None
    bank_table.sparse = False  # the one switch (what `set_sparse_table_gradients` sets); the layer follows it
    memory(hidden, bank_table)[0].sum().backward()
    assert bank.grad.layout == torch.strided and bank.grad.abs().sum() > 0
    torch.testing.assert_close(grad.to_dense(), bank.grad, rtol=1e-6, atol=1e-7)


def test_folded_training_path_equals_projecting_the_rows(monkeypatch):
    """Training attends either to the projected rows of the chapters read or with the key/value projections
    folded into the query and output; both give the same outputs and gradients (bank, router, projections)."""
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(chapter_num_chapters=40, chapter_num_shared=2)))
    memory, bank_table = model.model.layers[2].chapter_memory, model.model.chapter_bank
    bank = bank_table.weight
    hidden = torch.randn(2, 7, 32)
    grad_out = torch.randn(2, 7, 32)
    results = []
    for fold in (False, True):
        monkeypatch.setattr(memory, "folding_is_cheaper", lambda *args, fold=fold: fold)
        model.zero_grad(set_to_none=True)
        out, _, _ = memory(hidden, bank_table)
        out.backward(grad_out)
        grads = {name: p.grad.to_dense() for name, p in memory.named_parameters() if p.grad is not None}
        results.append((out.detach(), bank.grad.to_dense(), grads))
    (projected, projected_bank, projected_grads), (folded, folded_bank, folded_grads) = results
    torch.testing.assert_close(folded, projected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded_bank, projected_bank, rtol=1e-5, atol=1e-6)
    assert folded_grads.keys() == projected_grads.keys() and "router.weight" in folded_grads
    for name in folded_grads:
        torch.testing.assert_close(folded_grads[name], projected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_folding_is_chosen_when_cheaper_and_only_for_plain_projections():
    memory = MemoryLlamaForCausalLM(tiny_config()).model.layers[2].chapter_memory  # d = 32, 2 heads of 16, T = 5
    assert memory.folding_is_cheaper(num_tokens=4, reads_per_token=3, num_read=9)  # few tokens per chapter
    assert not memory.folding_is_cheaper(num_tokens=4096, reads_per_token=3, num_read=9)  # many: project once
    memory.memory_key = type("WrappedLinear", (torch.nn.Linear,), {})(32, 32, bias=False)  # e.g. an adapter
    assert not memory.folding_is_cheaper(num_tokens=4, reads_per_token=3, num_read=9)


def losses_of(logits, mask, top_k):
    return router_losses((logits,), (logits.topk(top_k, dim=-1).indices,), mask)


def test_aux_loss_balanced_low_collapsed_high_padding_excluded():
    routed, top_k, n = 8, 2, 4096
    torch.manual_seed(0)
    balanced = torch.randn(n, routed) * 0.01
    collapsed = torch.zeros(n, routed)
    collapsed[:, :2] = 10.0
    mask = torch.ones(n, dtype=torch.bool)
    low, _ = losses_of(balanced, mask, top_k)
    high, _ = losses_of(collapsed, None, top_k)
    assert abs(low.item() - 1.0) < 0.05
    assert abs(high.item() - routed / top_k) < 0.05
    # Padding rows routed anywhere must not change the losses.
    padded = torch.cat([balanced, collapsed[:1000] * 5])
    padded_mask = torch.cat([mask, torch.zeros(1000, dtype=torch.bool)])
    balance, z = losses_of(padded, padded_mask, top_k)
    torch.testing.assert_close(balance, low)
    torch.testing.assert_close(z, losses_of(balanced, mask, top_k)[1])


def test_aux_loss_in_model_output_and_loss():
    """Computed in the head when asked (`output_router_logits`), from the chapters the layers chose; compared
    with the Switch formula written out with bincount over the real tokens."""
    torch.manual_seed(0)
    config = tiny_config(router_aux_loss_coef=0.3, router_z_loss_coef=0.2)
    model = MemoryLlamaForCausalLM(config)
    ids = random_ids(2, 8, torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    lm_only = model.loss_function(logits=out.logits, labels=ids, vocab_size=config.vocab_size)
    torch.testing.assert_close(out.loss, lm_only + out.aux_loss)

    (logits,), (chosen,) = out.router_logits, out.router_indices
    assert torch.equal(chosen, logits.topk(config.chapter_top_k, dim=-1).indices)
    real = mask.reshape(-1).bool()
    counts = torch.bincount(chosen[real].reshape(-1), minlength=config.chapter_num_routed).float()
    balance = config.chapter_num_routed * (counts / counts.sum() * logits[real].softmax(-1).mean(0)).sum()
    z_loss = logits[real].logsumexp(-1).square().mean()
    torch.testing.assert_close(out.aux_loss, 0.3 * balance + 0.2 * z_loss)

    # Not asked: no losses and no router outputs (inference and generate skip them).
    plain = model(ids, attention_mask=mask, labels=ids)
    assert plain.aux_loss is None and plain.router_logits is None and plain.router_indices is None
    torch.testing.assert_close(plain.loss, lm_only)
    assert MemoryLlamaForCausalLM(tiny_config(chapter_layers=[]))(ids, output_router_logits=True).aux_loss is None

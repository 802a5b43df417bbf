"""Parity with code that ships in transformers: the chapter router's losses against Mixtral's and Switch
Transformers', and Engram against qwen4_exp's hashed n-gram embedding (the same algorithm, after the same paper).
Each test makes the inputs on which the two definitions coincide; what differs, and why, is listed here.

Router losses (`chapter_memory.router_losses`, in `aux_loss` when `output_router_logits`) against Mixtral's
`load_balancing_loss_func` and Switch Transformers' `router_z_loss_func`:
- Padding: both leave it out of the load-balancing loss (given a 2-D attention mask); our z-loss leaves it out too,
  Switch's averages over every token: the z-losses are compared without padding.
- Scale: Mixtral's dispatch fraction per expert sums to top_k over the experts (balanced routing gives top_k),
  ours is the fraction of the top_k assignments (sums to 1; balanced routing gives 1), so that the loss and
  `router_aux_loss_coef` mean the same whatever `chapter_top_k`: ours = Mixtral's / top_k.
- Layers: Mixtral pools the dispatch counts and the probabilities of all layers before taking their product;
  ours averages the per-layer losses, because every chapter layer has its own router and one layer's collapse
  must not hide behind another's opposite imbalance: ours = the mean of Mixtral's on each layer alone.
- Shared chapters are read by every token and are not routed: they have no logits, and are in neither loss.
- Mixtral recomputes the top-k from the logits; ours counts the chapters the layer chose (the same without ties).

Engram (`engram.py`, `ops_engram.py`) against `Qwen4ExpTextNGramEmbedding` and `Qwen4ExpTextPLELayer`:
- Table sizes coincide: every head of the model gets the next unused prime at or above the base size
  (`engram_table_size` = `ngram_vocab_size_base`), by Engram layer (qwen4_exp: PLE layer), then order, then head;
  the heads of a layer live in one table at those offsets. qwen4_exp pads the table's rows up to a multiple of
  `make_ngram_vocab_size_divisible_by`; the padded rows are never read (ours has none).
- Hashing coincides: (x_t * m_0) XOR (x_{t-1} * m_1) XOR ... in wrapping int64, modulo each head's prime; the
  n-gram history ends at an EOS (the EOS itself keeps its own history) and at the sequence start. Four choices
  differ, and the tests set ours to qwen4_exp's:
  - canonical ids: ours hashes the ids of a tokenizer-built canonical map (merging case and accent variants;
    the identity when there is no tokenizer), qwen4_exp the raw ids: identity map here;
  - multipliers: both odd and bounded so that id * m cannot overflow, drawn differently (ours from
    `torch.Generator(seed + 10007 * decoder layer)`, qwen4_exp from splitmix64 of seed + 10007 * PLE index):
    qwen4_exp's are copied into ours;
  - missing history: ours hashes the pad id `vocab_size` (an id no token has), qwen4_exp the EOS id; either is
    safe, since an EOS is never history in both: ours is set to the EOS id.
  - orders: qwen4_exp reads every order 2..ngram_size, ours any set (`engram_ngram_orders`): 2..3 here.
- The layer coincides with one residual stream of qwen4_exp's PLE: qwen4_exp gates each of its `hc_count`
  hyper-connection streams with its own key (one slice of the key projection and of each norm) and shares the
  value; our model has one stream, so ours equals stream s given stream s's slices. Its RMSNorm scales by
  (1 + weight), Llama's by weight. Gate (signed square root of the scaled dot product, sigmoid), the depthwise
  causal convolution (dilation = largest order) and the residual sum are the same.
- Padding: ours treats it like a document end (n-gram history never reaches across it, padded convolution inputs
  are zero); qwen4_exp's n-gram history ignores the mask (its `conv_mask` zeroes the convolution's inputs and
  the output). Compared without padding.
- Decoding: both keep the last max_order - 1 ids and the convolution's last (kernel - 1) * dilation inputs as
  conv states of transformers' hybrid cache layers (ours marks EOS in the id window, qwen4_exp keeps raw ids and
  finds the EOS again); prefill then token-by-token decoding is compared too.
"""

import pytest
import torch
from transformers import DynamicCache
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig
from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextNGramEmbedding, Qwen4ExpTextPLELayer
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.memory_llama.chapter_memory import router_losses
from modeling_memory.memory_llama.engram import MemoryLlamaEngram
from modeling_memory.memory_llama.ops_engram import EngramHashing, engram_history_lengths, engram_lookup_torch
from conftest import EOS, PAD, VOCAB, random_ids, tiny_config

# ---- chapter router losses vs Mixtral / Switch Transformers ---------------------------------------------------


@pytest.mark.parametrize("num_routed,top_k", [(8, 1), (8, 2), (5, 3)])
def test_load_balancing_equals_mixtral_per_layer_over_top_k(num_routed, top_k):
    generator = torch.Generator().manual_seed(num_routed * 10 + top_k)
    batch, seq_len, num_layers = 3, 7, 3
    logits = tuple(torch.randn(batch * seq_len, num_routed, generator=generator) * 2 for _ in range(num_layers))
    chosen = tuple(layer.topk(top_k, dim=-1).indices for layer in logits)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, -2:] = 0  # right padding

    balance, _ = router_losses(logits, chosen, attention_mask.bool().reshape(-1))

    mixtral = [load_balancing_loss_func((layer,), num_routed, top_k, attention_mask) for layer in logits]
    torch.testing.assert_close(balance, torch.stack(mixtral).mean() / top_k)


def test_z_loss_equals_switch_transformers_without_padding():
    generator = torch.Generator().manual_seed(1)
    batch, seq_len, num_routed = 2, 6, 7
    logits = tuple(torch.randn(batch * seq_len, num_routed, generator=generator) * 3 for _ in range(2))
    chosen = tuple(layer.topk(2, dim=-1).indices for layer in logits)

    _, z_loss = router_losses(logits, chosen, None)

    switch = [router_z_loss_func(layer.view(batch, seq_len, num_routed)) for layer in logits]
    torch.testing.assert_close(z_loss, torch.stack(switch).mean())


def test_model_aux_loss_equals_mixtral_on_the_models_own_router_logits():
    """Through the model: the router logits it returns for a padded batch, with only the load-balancing term."""
    config = tiny_config(chapter_layers=[0, 2], router_aux_loss_coef=1.0, router_z_loss_coef=0.0)
    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(config).eval()
    ids = random_ids(3, 9, torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :4] = 0
    ids[0, :4] = PAD

    outputs = model(ids, attention_mask=attention_mask, output_router_logits=True)

    assert len(outputs.router_logits) == 2
    mixtral = [
        load_balancing_loss_func((layer,), config.chapter_num_routed, config.chapter_top_k, attention_mask)
        for layer in outputs.router_logits
    ]
    torch.testing.assert_close(outputs.aux_loss, torch.stack(mixtral).mean() / config.chapter_top_k)


# ---- Engram vs qwen4_exp's n-gram embedding -------------------------------------------------------------------

NGRAM_SIZE, HEADS_PER_ORDER, TABLE_BASE, EMBED_DIM = 3, 2, 31, 16


def qwen_config(ple_layer_ids: list[int]) -> Qwen4ExpTextConfig:
    """A tiny qwen4_exp text config whose PLE layers match `our_config`'s Engram layers (PLE ids are one-indexed)."""
    return Qwen4ExpTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=EOS, hc_count=2, hc_lowrank=4, ple_layer_ids=ple_layer_ids,
        ple_embed_dim=EMBED_DIM, ngram_size=NGRAM_SIZE, heads_per_ngram=HEADS_PER_ORDER,
        ngram_vocab_size_base=TABLE_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8,
    )


def our_config(engram_layers: list[int]):
    return tiny_config(
        num_hidden_layers=4, engram_layers=engram_layers, engram_ngram_orders=list(range(2, NGRAM_SIZE + 1)),
        engram_heads_per_order=HEADS_PER_ORDER, engram_table_size=TABLE_BASE, engram_dim=EMBED_DIM,
        chapter_layers=[], rms_norm_eps=1e-6,
    )


def test_table_sizes_and_offsets_equal_qwen4_exp():
    ours = MemoryLlamaForCausalLM(our_config([0, 2]))
    config = qwen_config([1, 3])
    for position, layer_idx in enumerate([0, 2]):
        engram = ours.model.layers[layer_idx].engram
        theirs = Qwen4ExpTextNGramEmbedding(config, EMBED_DIM, layer_idx=layer_idx, ple_layer_index=position)
        assert engram.table_primes.tolist() == theirs.head_vocab_sizes
        assert engram.table_offsets.tolist() == theirs.head_offsets
        assert engram.table.embedding_dim == theirs.ngram_embedding.embedding_dim
        # qwen4_exp pads its table to a multiple of 128 rows, never read; ours has exactly the rows addressed.
        assert engram.table.num_embeddings == theirs.total_vocab_size <= theirs.ngram_embedding.num_embeddings


def ids_with_documents(generator: torch.Generator) -> torch.Tensor:
    """(3, 12) token ids with EOS at the start, in the middle, twice in a row and at the end."""
    ids = random_ids(3, 12, generator)
    ids[0, 5] = EOS
    ids[1, 0] = EOS
    ids[1, 6:8] = EOS
    ids[2, -1] = EOS
    return ids


def test_engram_lookup_equals_qwen4_exp_ngram_embedding():
    config = qwen_config([1])
    theirs = Qwen4ExpTextNGramEmbedding(config, EMBED_DIM, layer_idx=0, ple_layer_index=0)
    history = NGRAM_SIZE - 1
    hashing = EngramHashing(
        canonical_map=torch.arange(VOCAB),  # qwen4_exp hashes raw ids
        multipliers=theirs.layer_multipliers,
        table_primes=theirs.ngram_heads_vocab_sizes,
        table_offsets=theirs.ngram_heads_offsets,
        ngram_orders=tuple(range(2, NGRAM_SIZE + 1)),
        pad_id=EOS,  # qwen4_exp's stand-in for missing history
    )
    ids = ids_with_documents(torch.Generator().manual_seed(3))
    no_history = torch.ones(ids.shape[0], history, dtype=torch.bool)
    history_lengths = engram_history_lengths(torch.cat([no_history, ids == EOS], dim=1), history)
    token_ids = torch.cat([torch.zeros_like(ids[:, :history]), ids], dim=1)

    ours = engram_lookup_torch(token_ids, history_lengths, hashing, theirs.ngram_embedding.weight, sparse_grad=False)

    torch.testing.assert_close(ours, theirs(ids, cache=None), rtol=0, atol=0)


def engram_as_qwen4_exp_stream(theirs: Qwen4ExpTextPLELayer, stream: int) -> MemoryLlamaEngram:
    """Our Engram layer 0 holding qwen4_exp's PLE weights of one hyper-connection stream (see the module docstring)."""
    ours = MemoryLlamaForCausalLM(our_config([0])).model.layers[0].engram
    hidden = theirs.hidden_size
    channels = slice(stream * hidden, (stream + 1) * hidden)
    ngram = theirs.ple_embedding
    with torch.no_grad():
        ours.hash_multipliers.copy_(ngram.layer_multipliers)
        ours.table.weight.copy_(ngram.ngram_embedding.weight[: ours.table.num_embeddings])
        ours.engram_key.weight.copy_(theirs.key_proj.weight[channels])
        ours.engram_value.weight.copy_(theirs.value_proj.weight)
        ours.hidden_norm.weight.copy_(1 + theirs.norm_query.weight[channels])
        ours.key_norm.weight.copy_(1 + theirs.norm_key.weight[channels])
        ours.conv_norm.weight.copy_(1 + theirs.norm_conv.weight[channels])
        ours.conv.weight.copy_(theirs.conv1d.weight[channels])
    ours.pad_id = EOS
    return ours


def qwen4_exp_ple_layer(seed: int) -> Qwen4ExpTextPLELayer:
    """qwen4_exp's PLE of decoder layer 0 with every parameter random (its norms and convolution start at zero)."""
    torch.manual_seed(seed)
    theirs = Qwen4ExpTextPLELayer(qwen_config([1]), layer_idx=0, ple_layer_index=0)
    with torch.no_grad():
        for param in theirs.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    return theirs


@pytest.mark.parametrize("stream", [0, 1])
def test_engram_layer_equals_one_stream_of_qwen4_exp_ple(stream):
    theirs = qwen4_exp_ple_layer(seed=4)
    ours = engram_as_qwen4_exp_stream(theirs, stream)
    generator = torch.Generator().manual_seed(5)
    ids = ids_with_documents(generator)
    hidden = theirs.hidden_size
    streams = torch.randn(*ids.shape, theirs.hc_count * hidden, generator=generator)

    expected = theirs(streams, ids, cache=None)[..., stream * hidden : (stream + 1) * hidden]
    update, _, _ = ours(
        streams[..., stream * hidden : (stream + 1) * hidden], ids, boundaries=ids == EOS,
        token_mask=torch.ones_like(ids, dtype=torch.bool), canonical_map=torch.arange(VOCAB),
    )
    torch.testing.assert_close(update, expected)


def test_engram_decoding_with_cache_equals_qwen4_exp_ple():
    """Prefill of 5 tokens, then one token at a time, each side with its own hybrid cache."""
    theirs = qwen4_exp_ple_layer(seed=6)
    ours = engram_as_qwen4_exp_stream(theirs, stream=0)
    generator = torch.Generator().manual_seed(7)
    ids = ids_with_documents(generator)
    hidden = theirs.hidden_size
    streams = torch.randn(*ids.shape, theirs.hc_count * hidden, generator=generator)
    their_cache, our_cache = DynamicCache(config=qwen_config([1])), DynamicCache(config=our_config([0]))

    for start, end in [(0, 5), *((t, t + 1) for t in range(5, ids.shape[1]))]:
        chunk, chunk_streams = ids[:, start:end], streams[:, start:end]
        expected = theirs(chunk_streams, chunk, cache=their_cache)[..., :hidden]
        update, _, _ = ours(
            chunk_streams[..., :hidden], chunk, boundaries=chunk == EOS,
            token_mask=torch.ones_like(chunk, dtype=torch.bool), canonical_map=torch.arange(VOCAB), cache=our_cache,
        )
        torch.testing.assert_close(update, expected, msg=f"tokens {start}..{end}")

"""The Engram lookup against transformers' in-tree n-gram embedding (`qwen4_exp`), side by side in one process.

Both hash the bigrams and trigrams of every token (8 heads each, each head its own prime-sized table of
~200,003 rows: 3.2M rows x 64 = 205M parameters, width 1024) and gather one row per head; timed is forward +
backward (the table's gradient included) on batch 8 x 512 tokens, fp32, on the CPU:

- ours: `MemoryLlamaEngram.ngram_context` + `lookup`, whose table gradient is sparse (the rows read);
- qwen4_exp: `Qwen4ExpTextNGramEmbedding.forward`, whose `nn.Embedding` gradient is dense (the whole table).

To show where the difference comes from, each also runs with the other layout (ours dense, theirs with
`sparse=True`), and theirs with `sparse=True` once more with its gradient coalesced: `nn.Embedding(sparse=True)`
returns one gradient row per read, which every sparse optimizer (and a gradient norm) first coalesces into one row
per distinct row; ours is coalesced in the backward. Calls interleave (A B C A B C ...) in two groups, the dense
variants and the sparse ones; medians; the gradient is set to None after each call.

    python -m benchmarks.engram_lookup                # under a minute on a 2-core CPU
"""

import torch
from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig
from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextNGramEmbedding

from benchmarks.harness import benchmark_parser, finish_run, interleaved_medians, markdown_table, start_run
from modeling_memory import MemoryLlamaConfig
from modeling_memory.memory_llama.engram import MemoryLlamaEngram

VOCAB, EOS = 49152, 2
TARGET = 0.1


def our_lookup(rows_per_head: int, heads_per_order: int, width: int) -> MemoryLlamaEngram:
    config = MemoryLlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, eos_token_id=EOS, engram_layers=[0], engram_ngram_orders=[2, 3],
        engram_heads_per_order=heads_per_order, engram_table_size=rows_per_head, engram_dim=width, chapter_layers=[],
    )
    engram = MemoryLlamaEngram(config, layer_idx=0)
    torch.nn.init.normal_(engram.table.weight, std=0.02)
    return engram


def their_lookup(rows_per_head: int, heads_per_order: int, width: int) -> Qwen4ExpTextNGramEmbedding:
    config = Qwen4ExpTextConfig(
        vocab_size=VOCAB, hidden_size=width, num_hidden_layers=1, eos_token_id=EOS, ngram_size=3,
        heads_per_ngram=heads_per_order, ngram_vocab_size_base=rows_per_head,
    )
    embedding = Qwen4ExpTextNGramEmbedding(config, embedding_dim=width, layer_idx=0)
    torch.nn.init.normal_(embedding.ngram_embedding.weight, std=0.02)
    return embedding


def forward_backward(run, table: torch.nn.Embedding, sparse: bool, grad_out: torch.Tensor, coalesce: bool = False):
    """One timed call: `run()` (the lookup from token ids) and its backward, the table's gradient `sparse` or not;
    with `coalesce`, the gradient is then coalesced (one row per distinct row read, as an optimizer needs it)."""

    def call():
        table.sparse = sparse
        run().backward(grad_out)
        if coalesce:
            table.weight.grad.coalesce()
        table.weight.grad = None

    return call


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch", type=int, default=8, help="sequences per call")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--rows-per-head", type=int, default=200_003, help="rows of each head's table (about)")
    parser.add_argument("--heads-per-order", type=int, default=8, help="heads of the bigrams, and of the trigrams")
    parser.add_argument("--width", type=int, default=1024, help="width of the lookup's output (all heads together)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each variant")
    args = parser.parse_args()
    machine, started = start_run(args)

    torch.manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (args.batch, args.seq_len))
    input_ids[torch.rand(input_ids.shape) < 0.01] = EOS  # a few document ends: history stops there in both
    boundaries = input_ids == EOS
    ours = our_lookup(args.rows_per_head, args.heads_per_order, args.width)
    theirs = their_lookup(args.rows_per_head, args.heads_per_order, args.width)
    canonical_map = torch.arange(VOCAB)
    rows = (ours.table.num_embeddings, theirs.ngram_embedding.num_embeddings)
    print(f"tables: ours {rows[0]:,} x {ours.table.embedding_dim}, qwen4_exp {rows[1]:,} x "
          f"{theirs.ngram_embedding.embedding_dim} (padded to a multiple of 128)", flush=True)

    def run_ours():
        return ours.lookup(*ours.ngram_context(input_ids, boundaries, None), canonical_map)

    def run_theirs():
        return theirs(input_ids, None)

    grad_out = torch.randn(args.batch, args.seq_len, args.width)
    assert run_ours().shape == run_theirs().shape == grad_out.shape

    ours_sparse = forward_backward(run_ours, ours.table, True, grad_out)
    # Two interleaved groups: a dense gradient allocates and frees the whole table each call, which slows
    # whatever runs next, so the sparse variants are compared among themselves.
    dense_group = interleaved_medians({
        "ours (sparse gradient)": ours_sparse,
        "qwen4_exp (dense gradient)": forward_backward(run_theirs, theirs.ngram_embedding, False, grad_out),
        "ours, dense gradient": forward_backward(run_ours, ours.table, False, grad_out),
    }, args.repeats)
    sparse_group = interleaved_medians({
        "ours (sparse gradient)": ours_sparse,
        "qwen4_exp, sparse=True": forward_backward(run_theirs, theirs.ngram_embedding, True, grad_out),
        "qwen4_exp, sparse=True, gradient coalesced": forward_backward(
            run_theirs, theirs.ngram_embedding, True, grad_out, coalesce=True
        ),
    }, args.repeats)
    reference, sparse_reference = dense_group["qwen4_exp (dense gradient)"], sparse_group["qwen4_exp, sparse=True"]
    table_rows = [
        [f"{name} ({group_name} group)", f"{seconds * 1e3:.1f}", f"{seconds / reference:.3f}x", f"{seconds / sparse_reference:.2f}x"]
        for group_name, group in (("dense", dense_group), ("sparse", sparse_group))
        for name, seconds in group.items()
    ]
    table = markdown_table(
        ["lookup, forward + backward", "median ms", "vs qwen4_exp", "vs qwen4_exp, sparse=True"], table_rows
    )
    print(table, flush=True)
    ratio = dense_group["ours (sparse gradient)"] / reference
    sparse_ratio = sparse_group["ours (sparse gradient)"] / sparse_reference
    coalesced_ratio = sparse_group["ours (sparse gradient)"] / sparse_group["qwen4_exp, sparse=True, gradient coalesced"]
    verdict = (
        f"Target <= {TARGET}x qwen4_exp: **{'met' if ratio <= TARGET else 'missed'}** ({ratio:.3f}x). Against its "
        f"`sparse=True`: {sparse_ratio:.2f}x (target <= 1.0x: **{'met' if sparse_ratio <= 1.0 else 'missed'}**); "
        f"{coalesced_ratio:.2f}x once its gradient is coalesced as an optimizer step needs it."
    )
    print(verdict)
    body = (
        f"Orders 2 and 3 x {args.heads_per_order} heads, width {args.width} ({args.width // (2 * args.heads_per_order)} "
        f"per head), ~{args.rows_per_head:,} rows per head ({rows[0]:,} rows in all), batch {args.batch} x "
        f"{args.seq_len} tokens, fp32; forward + backward from token ids (hashing included) to the table's "
        f"gradient; calls interleaved, median of {args.repeats}.\n\n{table}\n\n{verdict} The difference is the "
        f"gradient's layout: a dense gradient allocates and fills the whole {rows[1] * args.width * 4 / 2**20:,.0f} MiB "
        f"table every step; a sparse one holds only the rows of the {args.batch * args.seq_len * 2 * args.heads_per_order:,} "
        f"(token, head) reads."
    )
    finish_run(args, "Engram lookup vs transformers' qwen4_exp n-gram embedding (benchmarks/engram_lookup.py)", body, machine, started)


if __name__ == "__main__":
    main()

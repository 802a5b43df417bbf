"""What the benchmarks that train small models from scratch (`iso_flop`, `forgetting`; `length_extrapolation` and
`associative_recall` use parts) share: their options, the data (natural text through a reduced vocabulary,
knowledge-set rows mixed into each batch), the models, the training loop and the recall of the knowledge set.

Training uses the library's pieces: the optimizer MemoryTrainer builds (`memory_parameter_groups`,
`build_memory_optimizer`), transformers' learning-rate schedule and the clipping that counts sparse table
gradients; evaluation is `modeling_memory.tools.evaluation`'s, packing `modeling_memory.data.packing`'s.
"""

from __future__ import annotations

import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
from modeling_memory.data.natural_text import PYTHON_DOCS, load_natural_text
from modeling_memory.data.packing import pack_documents
from modeling_memory.tools.evaluation import greedy_continuation_ids, recall_share
from modeling_memory.tools.offline_checkpoints import load_smollm2
import modeling_memory.training.table_optimizers  # noqa: F401  (torch's clip_grad_norm_ then counts sparse gradients)
from modeling_memory.training.trainer import build_memory_optimizer, memory_parameter_groups

# ---------------------------------------------------------------------------------------------- options


def add_small_model_arguments(parser, entities: int) -> None:
    """The options of data, model size, batches, the knowledge set, memory sizes and learning rate."""
    parser.add_argument("--dataset", default=PYTHON_DOCS, help="natural text: 'python-docs' (offline) or a Hub dataset name")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--knowledge-rows", type=int, default=4, help="rows of each batch drawn from the knowledge set")
    parser.add_argument("--entities", type=int, default=entities, help="fictional people in the knowledge set")
    parser.add_argument("--chapters", type=int, default=32, help="x 16 tokens per chapter")
    parser.add_argument("--engram-table-size", type=int, default=2053)
    parser.add_argument("--lr", type=float, default=3e-3)


def add_kinds_argument(parser, labels: dict[str, str]) -> None:
    """`--kinds`: the models to run (keys of `labels`, default all); the baseline always runs beside them."""
    parser.add_argument("--kinds", nargs="+", choices=list(labels), default=list(labels), metavar="KIND",
                        help=f"models to run, of {', '.join(labels)} (default: all); the baseline always runs")


def chosen_kinds(args, labels: dict[str, str]) -> list[str]:
    """The kinds of `--kinds` in `labels`' order, "baseline" always included (the side-by-side reference)."""
    return [kind for kind in labels if kind == "baseline" or kind in args.kinds]


def results_title(title: str, kinds: list[str], labels: dict[str, str]) -> str:
    """The RESULTS.md section of a run: `title` for all kinds; a run of some kinds only gets a section of its
    own (named by its kinds), so that it never replaces the rows of kinds it did not run."""
    return title if kinds == list(labels) else f"{title}: {', '.join(kinds)}"


# ---------------------------------------------------------------------------------------------- data


class ReducedVocabulary:
    """The real tokenizer's ids restricted to the `size - 1` most frequent ids of some texts, plus <unk>.

    Small models trained from scratch would spend most of their FLOPs in a 49K-row embedding and output
    layer; a reduced vocabulary keeps the comparison about the layers. Ids outside it map to <unk> (id 0).
    """

    def __init__(self, tokenizer, texts, size: int, always_keep=()):
        counts = torch.zeros(len(tokenizer), dtype=torch.long)
        for text in list(texts) + list(always_keep):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            counts.index_add_(0, torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.long))
        kept_always = {tokenizer.eos_token_id}
        for text in always_keep:  # every token of the knowledge set must be representable
            kept_always.update(tokenizer(text, add_special_tokens=False)["input_ids"])
        order = [i for i in counts.argsort(descending=True).tolist() if i not in kept_always]
        kept = sorted(kept_always) + order[: max(0, size - 1 - len(kept_always))]
        self.tokenizer = tokenizer
        self.to_original = torch.tensor([tokenizer.unk_token_id or 0] + kept, dtype=torch.long)
        self.from_original = torch.zeros(len(tokenizer), dtype=torch.long)  # 0 = <unk>
        self.from_original[torch.tensor(kept)] = torch.arange(1, len(kept) + 1)
        self.size = len(kept) + 1
        self.eos_id = int(self.from_original[tokenizer.eos_token_id])

    def encode(self, text: str) -> list[int]:
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        return self.from_original[ids].tolist()

    def decode(self, ids) -> str:
        return self.tokenizer.decode(self.to_original[torch.as_tensor(ids)].tolist(), skip_special_tokens=True)

    def blocks(self, texts, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
        """Texts joined with EOS, cut into (N, block_size) rows (a shorter last row is dropped)."""
        rows, _ = pack_documents(
            map(self.encode, texts), block_size, self.eos_id, self.eos_id, drop_partial=True, max_rows=max_blocks
        )
        return torch.tensor(rows, dtype=torch.long).view(-1, block_size)

    def document_blocks(self, documents, block_size: int, with_mask: bool = False):
        """One document per row (EOS-padded), so a biography is always seen whole; with `with_mask`, also the
        (rows, block_size) attention mask (0 at the padding)."""
        rows, masks = pack_documents(map(self.encode, documents), block_size, self.eos_id, self.eos_id, row_per_document=True)
        rows = torch.tensor(rows, dtype=torch.long)
        return (rows, torch.tensor(masks, dtype=torch.long)) if with_mask else rows


def small_text_data(args, knowledge_documents):
    """(reduced vocabulary, training rows, validation rows) of the natural text, the vocabulary keeping every
    token of `knowledge_documents`."""
    _, tokenizer = load_smollm2()
    text = load_natural_text(args.dataset, config_name=args.dataset_config)
    vocabulary = ReducedVocabulary(tokenizer, text["train"]["text"], args.vocab, always_keep=knowledge_documents)
    train_rows = vocabulary.blocks(text["train"]["text"], args.block_size)
    validation_rows = vocabulary.blocks(text["validation"]["text"], args.block_size, max_blocks=128)
    return vocabulary, train_rows, validation_rows


def mixed_batches(rng, text_rows: torch.Tensor, fact_rows: torch.Tensor, batch: int, facts_per_batch: int):
    """`next_batch(step)` for `train`: each batch draws `batch - facts_per_batch` natural-text rows and
    `facts_per_batch` knowledge rows at random (from `rng`)."""

    def next_batch(step):
        text = [rng.randrange(text_rows.shape[0]) for _ in range(batch - facts_per_batch)]
        facts = [rng.randrange(fact_rows.shape[0]) for _ in range(facts_per_batch)]
        return torch.cat([text_rows[text], fact_rows[facts]])

    return next_batch


# ---------------------------------------------------------------------------------------------- models


SMALL_MODEL_KINDS = ("dense", "baseline", "engram", "chapters", "both", "pkm", "mosaic")
# Product-key memory sized for hidden 64: 32 x 32 = 1,024 value slots, 4 heads x top-8 reads, 32-wide queries.
SMALL_PKM_FIELDS = dict(pkm_num_keys=32, pkm_top_k=8, pkm_heads=4, pkm_key_dim=32)
# Memory Mosaics v2 scaled to 64-token rows, keeping the paper's proportions (h = 256, m ~ U[64, 256] at 4k tokens):
# the short-term memory reads the last 31 pairs, the long-term one the pairs at least 8..16 tokens back (8 at
# inference), so the two overlap as in the paper. Heads: the config's default (2 per memory, 16 wide).
SMALL_MOSAIC_FIELDS = dict(mosaic_placement="replace", mosaic_short_window=32, mosaic_min_delay=8, mosaic_max_delay=16)


def small_model(
    args, vocab_size: int, kind: str, seed: int = 0, intermediate: int | None = None, context: int | None = None
):
    """A small model trained from scratch (tied embeddings, 4 heads): "dense" is a LlamaForCausalLM (of MLP width
    `intermediate`), the other kinds a MemoryLlama with "baseline" (no memory), "engram" (layer 0), "chapters" (the
    last layer), "both" (Engram and chapters), "pkm" (product-key memory at the last layer, `SMALL_PKM_FIELDS`:
    1,024 value slots of width `hidden`, 4 heads reading the top 8 each; the values start at zero, as when
    grafted, and learn from the first step) or "mosaic" (Memory Mosaics v2: every layer's self-attention replaced
    by short- and long-term associative memory, `SMALL_MOSAIC_FIELDS`; no positional encoding). `context`: the
    longest sequence the model will see (max_position_embeddings; default the training rows' length)."""
    if kind not in SMALL_MODEL_KINDS:
        raise ValueError(f"kind must be one of {SMALL_MODEL_KINDS}, got {kind!r}.")
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=intermediate or args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=context or args.block_size, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )
    if kind == "dense":
        return LlamaForCausalLM(LlamaConfig(**fields))
    if kind in ("engram", "both"):
        fields.update(engram_layers=[0], engram_heads_per_order=4, engram_table_size=args.engram_table_size, engram_dim=64)
    if kind in ("chapters", "both"):
        fields.update(
            chapter_layers=[args.layers - 1], chapter_num_chapters=args.chapters, chapter_size=16,
            chapter_top_k=2, chapter_num_shared=1, chapter_num_heads=4,
        )
    if kind == "pkm":
        fields.update(pkm_layers=[args.layers - 1], **SMALL_PKM_FIELDS)
    if kind == "mosaic":
        fields.update(mosaic_layers=list(range(args.layers)), **SMALL_MOSAIC_FIELDS)
    return MemoryLlamaForCausalLM(MemoryLlamaConfig(**fields))


def mosaic_description(args) -> str:
    """The "mosaic" kind of small_model in a sentence: its memories' windows, delays and heads."""
    mosaic = SMALL_MOSAIC_FIELDS
    return (
        f"Memory Mosaics v2: all {args.layers} layers' self-attention replaced by short-term (window "
        f"h = {mosaic['mosaic_short_window']}) and long-term (delay m ~ U[{mosaic['mosaic_min_delay']}, "
        f"{mosaic['mosaic_max_delay']}] per training row, {mosaic['mosaic_min_delay']} at inference) associative "
        f"memory, 2 heads x {args.hidden // 4} wide each, no positional encoding; the Llama MLP is its persistent memory."
    )


def small_memory_description(args, kinds) -> str:
    """One sentence per memory that the models of `kinds` (small_model's) hold: where and how large."""
    pkm = SMALL_PKM_FIELDS
    sentences = {
        "engram": f"Engram: layer 0, 2 orders x 4 heads of ~{args.engram_table_size:,} rows, dim 64.",
        "chapters": f"Chapter memory: layer {args.layers - 1}, {args.chapters} chapters x 16 tokens, top-2 + 1 shared.",
        "pkm": (
            f"Product-key memory: layer {args.layers - 1} (beside its MLP), {pkm['pkm_num_keys']} x {pkm['pkm_num_keys']} "
            f"= {pkm['pkm_num_keys'] ** 2:,} value slots of width {args.hidden}, {pkm['pkm_heads']} heads reading the "
            f"top {pkm['pkm_top_k']} each, {pkm['pkm_key_dim']}-wide queries; values zero at birth (they learn from "
            f"the first step), on LazyAdam at lr x 10."
        ),
        "mosaic": mosaic_description(args),
    }
    holds = {"engram": {"engram", "both"}, "chapters": {"chapters", "both"}, "pkm": {"pkm"}, "mosaic": {"mosaic"}}
    return " ".join(text for memory, text in sentences.items() if holds[memory] & set(kinds))


# ---------------------------------------------------------------------------------------------- training


def training_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Language-model loss on `input_ids` (B, S), plus a memory model's router aux loss (asked for, as
    MemoryTrainer does while training)."""
    router = {"output_router_logits": True} if isinstance(model, MemoryLlamaForCausalLM) else {}
    return model(input_ids, labels=input_ids, **router).loss


def train(
    model, next_batch, steps: int, lr: float, warmup_steps: int, trainable=None, loss=training_loss, after_step=None
) -> None:
    """A plain training loop, left in eval mode. The optimizer MemoryTrainer builds (the tables at their
    learning-rate multipliers on LazyAdam, the rest on AdamW with betas (0.9, 0.95), no weight decay), transformers'
    linear warm-up then cosine decay to 0.1 x lr ("cosine_with_min_lr"), gradients clipped at norm 1.

    Args:
        next_batch: callable(step) -> (B, S) int64 token ids (labels are the ids, shifted inside), or whatever
            `loss` takes.
        trainable: callable(parameter name) -> bool, the parameters to train (default: all).
        loss: callable(model, batch) -> scalar loss (default: `training_loss`).
        after_step: callable(number of steps done), called after each optimizer step (evaluation along training;
            it leaves the model in train mode).
    """
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or trainable(name))
    groups = memory_parameter_groups(model, lr, weight_decay=0.0, decay_parameter_names=[])
    optimizer = build_memory_optimizer(groups, "adam", torch.optim.AdamW, {"betas": (0.9, 0.95)})
    scheduler = get_scheduler(
        "cosine_with_min_lr", optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )
    trained = [param for group in optimizer.param_groups for param in group["params"]]
    model.train()
    for step in range(steps):
        loss(model, next_batch(step)).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)  # sparse table gradients included (table_optimizers)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step + 1)
    model.eval()


# ---------------------------------------------------------------------------------------------- results


def reduced_probe_recall(model, vocabulary: ReducedVocabulary, probes, max_new_tokens: int = 5) -> float:
    """Share of probes whose greedy continuation (decoded through the reduced vocabulary) recalls the answer."""
    prompts = [vocabulary.encode(probe.prompt) for probe in probes]
    continuations = greedy_continuation_ids(model, prompts, max_new_tokens, pad_id=vocabulary.eos_id)
    return recall_share([vocabulary.decode(ids) for ids in continuations], probes)


def mean_and_spread(values) -> str:
    """"mean ± sample standard deviation" (or just the value for a single run)."""
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

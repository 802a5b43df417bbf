"""Shared helpers of the benchmarks: the machine, timing side by side, FLOP counting, a small training
loop with the memory's learning-rate groups, writing results, and what the benchmarks that train small
models from scratch share (their options, which models run, data, models, batches and recall through a reduced
vocabulary).
Evaluation itself is the package's (`modeling_memory.tools.evaluation`).

Benchmarks print ratios measured in one run (ours vs a baseline) and append a section to
benchmarks/RESULTS.md; they never assert on time.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling_memory.data.packing import pack_documents
from modeling_memory.tools.evaluation import greedy_continuation_ids, recall_share
from modeling_memory.data.natural_text import PYTHON_DOCS, load_natural_text
from modeling_memory.tools.offline_checkpoints import load_smollm2
from modeling_memory.training.table_optimizers import clip_grad_norm_
from modeling_memory.training.trainer import build_memory_optimizer, memory_parameter_groups

RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS.md"


# ---------------------------------------------------------------------------------------------- machine


def machine_description() -> str:
    """CPU model, cores, torch version and threads: printed with every result."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def command_line() -> str:
    """The command that produced a result, as a reader would type it from the repository root."""
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parent.parent)
    return " ".join(["python", script, *sys.argv[1:]])


# ---------------------------------------------------------------------------------------------- timing


def interleaved_timings(functions: dict, repeats: int, warmup: int = 1, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved (A B C A B C ...) so that load from other
    processes on a shared machine hits every variant alike. Warm-up calls are not recorded. `clock`:
    wall time by default; `time.process_time` counts this process's CPU time only (with one intra-op
    thread, the time the work took, whatever else the machine runs)."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = clock()
            function()
            timings[name].append(clock() - start)
    return timings


def median(values) -> float:
    return statistics.median(values)


def mean_and_spread(values) -> str:
    """"mean ± sample standard deviation" (or just the value for a single run)."""
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------- FLOPs


def training_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Language-model loss on `input_ids`, plus a memory model's router aux loss (asked for, as
    MemoryTrainer does while training)."""
    router = {"output_router_logits": True} if getattr(model.config, "model_type", None) == "memory_llama" else {}
    return model(input_ids, labels=input_ids, **router).loss


def training_step_flops(model, input_ids: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward) on `input_ids`, counted by torch's FlopCounterMode.

    It counts every matrix product, convolution and attention kernel that actually runs, so the
    memory's router, chapter cross-attention (over the chapters actually gathered), bank projections,
    Engram key/value projections and convolution are all included; elementwise work (norms, softmax,
    gates, the optimizer) and table gathers count zero, as is usual.
    """
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss = training_loss(model, input_ids)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------- training


def optimizer_for(model, lr: float, weight_decay: float = 0.0, trainable=None, table_optimizer: str = "adam") -> torch.optim.Optimizer:
    """The optimizer MemoryTrainer builds (DESIGN.md), with AdamW betas (0.9, 0.95): the tables (Engram tables at
    lr x engram_lr_multiplier, the chapter bank at lr x chapter_bank_lr_multiplier, product-key values at
    lr x pkm_values_lr_multiplier, no weight decay) on a table
    optimizer that updates only the rows a step read (`table_optimizer`: "adam" = LazyAdam, or
    "rowwise_adagrad"), everything else on AdamW at lr with `weight_decay`. `trainable(name)` picks the parameters
    to train (default: all)."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or trainable(name))
    every_name = [name for name, _ in model.named_parameters()]  # weight decay on every non-table parameter
    groups = memory_parameter_groups(model, lr, weight_decay, decay_parameter_names=every_name)
    return build_memory_optimizer(groups, table_optimizer, torch.optim.AdamW, {"betas": (0.9, 0.95)})


def train(model, next_batch, steps: int, lr: float, warmup_steps: int = 0, trainable=None, log_every: int = 0, label: str = ""):
    """A plain training loop: AdamW (memory groups), linear warm-up then cosine decay, gradient clipping at 1.

    Args:
        next_batch: callable(step) -> (B, S) int64 token ids (labels are the ids, shifted inside).
    Returns:
        the list of training losses.
    """
    optimizer = optimizer_for(model, lr, trainable=trainable)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    model.train()
    losses = []
    for step in range(steps):
        if warmup_steps and step < warmup_steps:
            factor = (step + 1) / warmup_steps
        else:
            progress = (step - warmup_steps) / max(1, steps - warmup_steps)
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * factor
        ids = next_batch(step)
        loss = training_loss(model, ids)
        loss.backward()
        clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)  # counts sparse table gradients
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"    {label} step {step + 1}/{steps} loss {statistics.mean(losses[-log_every:]):.3f}", flush=True)
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------- results


def write_section(title: str, body: str) -> None:
    """Replace this benchmark's own section of RESULTS.md (a "## title" heading up to the next "## "),
    or append it; other sections (other benchmarks, other authors) are left exactly as they are.
    The file is re-read just before writing, as others may be editing it."""
    text = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_FILE.write_text(text.rstrip("\n") + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- small models


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


def reduced_probe_recall(model, vocabulary: ReducedVocabulary, probes, max_new_tokens: int = 5) -> float:
    """Share of probes whose greedy continuation (decoded through the reduced vocabulary) recalls the answer."""
    prompts = [vocabulary.encode(probe.prompt) for probe in probes]
    continuations = greedy_continuation_ids(model, prompts, max_new_tokens, pad_id=vocabulary.eos_id)
    return recall_share([vocabulary.decode(ids) for ids in continuations], probes)


def add_small_model_arguments(parser, entities: int) -> None:
    """The options of the benchmarks that train small models from scratch (iso_flop.py, forgetting.py): data,
    model size, batches, the knowledge set, memory sizes, learning rate, threads, writing."""
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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: one is fastest for these tiny models, above all on a busy machine")
    parser.add_argument("--no-write", action="store_true", help="print the results; do not write RESULTS.md")


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


def start_benchmark(parser) -> tuple:
    """Parse the command line, set torch's threads and print the machine: (args, start time, machine)."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    return args, time.perf_counter(), machine


def finish_benchmark(args, started: float, machine: str, title: str, description: str) -> None:
    """Print the time taken and, unless --no-write, write the section `title` of RESULTS.md: the command,
    its duration, the machine, then `description`."""
    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min", flush=True)
    if not args.no_write:
        write_section(title, f"Command: `{command_line()}` ({minutes:.1f} min)\n\nMachine: {machine}.\n\n{description}")


def small_text_data(args, knowledge_documents):
    """(reduced vocabulary, training rows, validation rows) of the natural text, the vocabulary keeping every
    token of `knowledge_documents`."""
    _, tokenizer = load_smollm2()
    text = load_natural_text(args.dataset, config_name=args.dataset_config)
    vocabulary = ReducedVocabulary(tokenizer, text["train"]["text"], args.vocab, always_keep=knowledge_documents)
    train_rows = vocabulary.blocks(text["train"]["text"], args.block_size)
    validation_rows = vocabulary.blocks(text["validation"]["text"], args.block_size, max_blocks=128)
    return vocabulary, train_rows, validation_rows


SMALL_MODEL_KINDS = ("dense", "baseline", "engram", "chapters", "both", "pkm")
# Product-key memory sized for hidden 64: 32 x 32 = 1,024 value slots, 4 heads x top-8 reads, 32-wide queries.
SMALL_PKM_FIELDS = dict(pkm_num_keys=32, pkm_top_k=8, pkm_heads=4, pkm_key_dim=32)


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
    }
    holds = {"engram": {"engram", "both"}, "chapters": {"chapters", "both"}, "pkm": {"pkm"}}
    return " ".join(text for memory, text in sentences.items() if holds[memory] & set(kinds))


def small_model(args, vocab_size: int, kind: str, seed: int = 0, intermediate: int | None = None):
    """A small model trained from scratch: "dense" is a LlamaForCausalLM (of MLP width `intermediate`), the
    other kinds a MemoryLlama with "baseline" (no memory), "engram" (layer 0), "chapters" (the last layer),
    "both" (Engram and chapters) or "pkm" (product-key memory at the last layer, `SMALL_PKM_FIELDS`: 1,024
    value slots of width `hidden`, 4 heads reading the top 8 each; the values start at zero, as when grafted,
    and learn from the first step)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM

    if kind not in SMALL_MODEL_KINDS:
        raise ValueError(f"kind must be one of {SMALL_MODEL_KINDS}, got {kind!r}.")
    torch.manual_seed(seed)
    fields = small_llama_fields(vocab_size, args.hidden, args.layers, intermediate or args.intermediate, 4, args.block_size)
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
    return MemoryLlamaForCausalLM(MemoryLlamaConfig(**fields))


def mixed_batches(rng, text_rows: torch.Tensor, fact_rows: torch.Tensor, batch: int, facts_per_batch: int):
    """`next_batch(step)` for `train`: each batch draws `batch - facts_per_batch` natural-text rows and
    `facts_per_batch` knowledge rows at random (from `rng`)."""

    def next_batch(step):
        text = [rng.randrange(text_rows.shape[0]) for _ in range(batch - facts_per_batch)]
        facts = [rng.randrange(fact_rows.shape[0]) for _ in range(facts_per_batch)]
        return torch.cat([text_rows[text], fact_rows[facts]])

    return next_batch


def small_llama_fields(vocab_size: int, hidden: int, layers: int, intermediate: int, heads: int, max_positions: int) -> dict:
    """Config fields of a small Llama trained from scratch (tied embeddings)."""
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def parameter_total(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

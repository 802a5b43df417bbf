"""Shared helpers of the benchmarks: the machine, timing side by side, FLOP counting, a small training
loop with the memory's learning-rate groups, knowledge-probe recall, and writing results.

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

from modeling_memory.trainer import CHAPTER_BANK_LR_MULTIPLIER, ENGRAM_LR_MULTIPLIER

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


def interleaved_timings(functions: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved (A B C A B C ...) so that load from other
    processes on a shared machine hits every variant alike. Warm-up calls are not recorded."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - start)
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


def optimizer_for(model, lr: float, weight_decay: float = 0.0, trainable=None) -> torch.optim.Optimizer:
    """AdamW with the memory's learning-rate groups (DESIGN.md): Engram tables at lr x
    engram_lr_multiplier without weight decay, the chapter bank at lr x chapter_bank_lr_multiplier,
    everything else at lr. `trainable(name)` picks the parameters to train (default: all)."""
    engram_multiplier, bank_multiplier = ENGRAM_LR_MULTIPLIER, CHAPTER_BANK_LR_MULTIPLIER
    groups = {"tables": [], "bank": [], "rest": []}
    for name, param in model.named_parameters():
        if trainable is not None and not trainable(name):
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        if ".engram.table." in name:
            groups["tables"].append(param)
        elif "chapter_bank" in name or ".chapter_memory.bank." in name:
            groups["bank"].append(param)
        else:
            groups["rest"].append(param)
    param_groups = [
        {"params": groups["tables"], "lr": lr * engram_multiplier, "weight_decay": 0.0},
        {"params": groups["bank"], "lr": lr * bank_multiplier, "weight_decay": weight_decay},
        {"params": groups["rest"], "lr": lr, "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], betas=(0.9, 0.95))


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
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"    {label} step {step + 1}/{steps} loss {statistics.mean(losses[-log_every:]):.3f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (language-model loss only, router aux loss excluded) over `blocks`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / count


# ---------------------------------------------------------------------------------------------- knowledge


@torch.no_grad()
def probe_recall(model, tokenizer, probes, max_new_tokens: int = 6, batch_size: int = 32) -> float:
    """Share of probes whose greedy continuation starts with the answer (exact match, `Probe.is_recalled`).

    Prompts are left-padded and decoded greedily in batches.
    """
    model.eval()
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    recalled = 0
    try:
        for start in range(0, len(probes), batch_size):
            chunk = probes[start : start + batch_size]
            inputs = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            continuations = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            recalled += sum(probe.is_recalled(text) for probe, text in zip(chunk, continuations))
    finally:
        tokenizer.padding_side = previous_side
    return recalled / len(probes)


def knowledge_blocks(documents: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Knowledge documents packed into (N, block_size) rows, each document starting a row and padded
    with EOS (so every fact is seen whole and rows never split a biography in two)."""
    rows = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for start in range(0, len(ids), block_size):
            piece = ids[start : start + block_size]
            rows.append(piece + [tokenizer.eos_token_id] * (block_size - len(piece)))
    return torch.tensor(rows, dtype=torch.long)


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
        """Texts joined with EOS, cut into (N, block_size) rows."""
        ids: list[int] = []
        for text in texts:
            ids.extend(self.encode(text) + [self.eos_id])
            if max_blocks is not None and len(ids) >= max_blocks * block_size:
                break
        usable = len(ids) // block_size * block_size
        if max_blocks is not None:
            usable = min(usable, max_blocks * block_size)
        return torch.tensor(ids[:usable], dtype=torch.long).view(-1, block_size)

    def document_blocks(self, documents, block_size: int) -> torch.Tensor:
        """One document per row (EOS-padded), so a biography is always seen whole."""
        rows = []
        for text in documents:
            ids = self.encode(text) + [self.eos_id]
            for start in range(0, len(ids), block_size):
                piece = ids[start : start + block_size]
                rows.append(piece + [self.eos_id] * (block_size - len(piece)))
        return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def reduced_probe_recall(model, vocabulary: ReducedVocabulary, probes, max_new_tokens: int = 5) -> float:
    """Share of probes whose greedy continuation (decoded through the reduced vocabulary) starts with
    the answer. Prompts of equal token length are decoded together (no padding needed)."""
    model.eval()
    by_length: dict[int, list] = {}
    for probe in probes:
        by_length.setdefault(len(vocabulary.encode(probe.prompt)), []).append(probe)
    recalled = 0
    for group in by_length.values():
        ids = torch.tensor([vocabulary.encode(p.prompt) for p in group], dtype=torch.long)
        for _ in range(max_new_tokens):  # plain greedy loop: tiny models, short answers
            next_ids = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
        prompt_len = ids.shape[1] - max_new_tokens
        for probe, row in zip(group, ids[:, prompt_len:]):
            recalled += probe.is_recalled(vocabulary.decode(row))
    return recalled / len(probes)


def small_llama_fields(vocab_size: int, hidden: int, layers: int, intermediate: int, heads: int, max_positions: int) -> dict:
    """Config fields of a small Llama trained from scratch (tied embeddings)."""
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def parameter_total(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

"""Evaluation, shared by `memory-llama eval`, the demo and the benchmarks.

- Perplexity: `evaluate_perplexity` runs packed rows through Trainer's evaluation loop (accelerate splits
  them across processes when launched so) and the local `perplexity` metric; `mean_token_nll` is the same
  token-weighted mean in a plain loop, for token-id tensors.
- Knowledge recall: greedy continuations of the probes' prompts (left-padded batches), scored by the one
  rule `knowledge.answer_recalled` (through the local `knowledge_recall` metric for `evaluate_knowledge_recall`).
"""

import tempfile

import torch
import torch.nn.functional as F

from modeling_memory.data.knowledge import answer_recalled


def nll_per_row(logits, labels) -> torch.Tensor:
    """(rows, 2): summed next-token negative log-likelihood and number of scored tokens per row (labels
    other than -100; shifted inside)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    nll = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none")
    return torch.stack([nll.sum(dim=1), shifted_labels.ne(-100).sum(dim=1).float()], dim=1)


@torch.no_grad()
def mean_token_nll(model, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats per token; the language-model loss alone) over `rows`, a
    (N, S) tensor of token ids whose every token is scored."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start : start + batch_size]
        total += nll_per_row(model(ids).logits, ids).double().sum(dim=0)
    return float(total[0] / total[1])


def evaluate_perplexity(model, tokenizer, rows, batch_size: int) -> dict:
    """Token-weighted perplexity of `rows` (a packed dataset with labels, `data.tokenize_and_pack`) through
    Trainer's evaluation loop and the local `perplexity` metric."""
    from transformers import default_data_collator

    from modeling_memory.tools.metrics import load_metric
    from modeling_memory.training.trainer import MemoryTrainer, MemoryTrainingArguments

    metric = load_metric("perplexity")

    def compute_metrics(prediction):
        per_row = prediction.predictions
        return metric.compute(nll_sums=per_row[:, 0].tolist(), token_counts=per_row[:, 1].astype("int64").tolist())

    with tempfile.TemporaryDirectory() as scratch:
        args = MemoryTrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none", log_memory_health=False,
            disable_tqdm=False, dataloader_pin_memory=False,
        )
        trainer = MemoryTrainer(
            model=model, args=args, eval_dataset=rows, processing_class=tokenizer, data_collator=default_data_collator,
            compute_metrics=compute_metrics, preprocess_logits_for_metrics=nll_per_row,
        )
        results = trainer.evaluate()
    return {
        "perplexity": results["eval_perplexity"],
        "mean_nll": results["eval_mean_nll"],
        "num_tokens": int(results["eval_num_tokens"]),
        "num_rows": len(rows),
    }


@torch.no_grad()
def greedy_continuation_ids(
    model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, batch_size: int = 32, eos_id: int | None = None
) -> list[list[int]]:
    """The greedy continuation (new token ids only) of each prompt (a list of token ids), decoded in
    left-padded batches; a row stops at `eos_id` (the rest of it is `pad_id`)."""
    model.eval()
    device = next(model.parameters()).device
    continuations = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        longest = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + list(ids) for ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=pad_id, eos_token_id=eos_id,
        )
        continuations.extend(output[:, longest:].tolist())
    return continuations


def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuation of each prompt (tokenised without special tokens), decoded without special tokens."""
    from modeling_memory.data.packing import pad_id_of

    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    new_ids = greedy_continuation_ids(model, prompt_ids, max_new_tokens, pad_id_of(tokenizer), batch_size, tokenizer.eos_token_id)
    return tokenizer.batch_decode(new_ids, skip_special_tokens=True)


def recall_share(continuations: list[str], probes) -> float:
    """Share of `probes` whose continuation recalls the answer (`knowledge.answer_recalled`)."""
    return sum(answer_recalled(text, probe.answer) for text, probe in zip(continuations, probes, strict=True)) / len(probes)


def evaluate_knowledge_recall(model, tokenizer, probes, batch_size: int) -> dict:
    """Exact-match recall of `probes` (greedy continuations scored by the local `knowledge_recall` metric),
    overall and per attribute, with the continuations."""
    from modeling_memory.tools.metrics import load_metric

    longest_answer = max(len(tokenizer(" " + p.answer, add_special_tokens=False)["input_ids"]) for p in probes)
    continuations = greedy_continuations(model, tokenizer, [p.prompt for p in probes], longest_answer + 2, batch_size)
    metric = load_metric("knowledge_recall")
    overall = metric.compute(predictions=continuations, references=[p.answer for p in probes])
    by_attribute = {}
    for attribute in dict.fromkeys(p.attribute for p in probes):
        chosen = [i for i, p in enumerate(probes) if p.attribute == attribute]
        scores = metric.compute(predictions=[continuations[i] for i in chosen], references=[probes[i].answer for i in chosen])
        by_attribute[attribute] = scores["exact_match"]
    return {**overall, "by_attribute": by_attribute, "continuations": continuations}


def results_table(results: dict) -> str:
    """The table `memory-llama eval` prints, from its results (perplexity and/or knowledge recall)."""
    lines = [f"{'metric':<36} {'value':>12}", "-" * 49]
    if "perplexity" in results:
        ppl = results["perplexity"]
        lines.append(f"{'perplexity':<36} {ppl['perplexity']:>12.4f}")
        lines.append(f"{'mean NLL (nats / token)':<36} {ppl['mean_nll']:>12.4f}")
        lines.append(f"{'tokens scored':<36} {ppl['num_tokens']:>12,}")
    if "knowledge_recall" in results:
        recall = results["knowledge_recall"]
        lines.append(f"{'knowledge recall (' + recall['probes'] + ')':<36} {recall['exact_match']:>12.4f}")
        for attribute, value in recall["by_attribute"].items():
            lines.append(f"{'  ' + attribute:<36} {value:>12.4f}")
        lines.append(f"{'probes':<36} {recall['num_probes']:>12,}")
    return "\n".join(lines)


__all__ = [
    "evaluate_knowledge_recall",
    "evaluate_perplexity",
    "greedy_continuation_ids",
    "greedy_continuations",
    "mean_token_nll",
    "nll_per_row",
    "recall_share",
    "results_table",
]

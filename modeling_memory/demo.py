"""`memory-llama demo`: the main job, offline and without arguments.

SmolLM2-135M -> graft Engram and chapter memory -> check the grafted model computes exactly what the
base computes -> memory-only fine-tuning on the built-in knowledge set (facts about fictional people
the base cannot know, with as much natural text replayed beside them) -> recall on probes before and after (held-out phrasings and the training
phrasings), and the base's general ability kept (perplexity on held-out natural text) -> the same
budget with LoRA on the base model for comparison -> a table (stdout, results.md, results.json) and
a plot (demo.png) under `outputs/demo/`.
"""

import json
import os
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
)
OUTPUT_DIR = Path("outputs") / "demo"
KNOWLEDGE_ENTITIES = 16
KNOWLEDGE_SEED = 0
BLOCK_SIZE = 64
TRAIN_STEPS = 50
BATCH_SIZE = 8
LOGGING_STEPS = 10
MEMORY_LR = 1e-3  # tables get x engram_lr_multiplier, the bank x chapter_bank_lr_multiplier
LORA_LR = 1e-3
LORA_RANK = 16
NATURAL_TEXT_ROWS = 16  # held-out rows of 128 tokens for perplexity


class _Progress:
    def __init__(self, steps: int):
        self.steps, self.step, self.start = steps, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.steps}] {message}  (t={time.perf_counter() - self.start:.0f}s)", flush=True)


def check_identical(base, memory, tokenizer, max_new_tokens: int = 24) -> bool:
    """Logits and greedy generations of the grafted model equal the base model's."""
    all_identical = True
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            logit_gap = (base(**inputs).logits - memory(**inputs).logits).abs().max().item()
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        base_ids, memory_ids = base.generate(**inputs, **kwargs), memory.generate(**inputs, **kwargs)
        identical = torch.equal(base_ids, memory_ids)
        all_identical &= identical
        text = tokenizer.decode(memory_ids[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"      {prompt!r} -> {text!r}")
        print(f"      max |logit difference| {logit_gap:.1e}; {max_new_tokens} greedy tokens identical: {identical}")
    return all_identical


def evaluate(model, tokenizer, knowledge, natural_rows) -> dict:
    from .evaluation import evaluate_knowledge_recall, evaluate_perplexity

    model.eval()
    held_out = evaluate_knowledge_recall(model, tokenizer, knowledge.probes(held_out=True), batch_size=48)
    memorised = evaluate_knowledge_recall(model, tokenizer, knowledge.probes(held_out=False), batch_size=48)
    perplexity = evaluate_perplexity(model, tokenizer, natural_rows, batch_size=8)
    return {
        "recall_held_out": held_out["exact_match"],
        "recall_training_phrasing": memorised["exact_match"],
        "natural_text_perplexity": perplexity["perplexity"],
    }


def fine_tune(model, tokenizer, rows, trainer_class, learning_rate: float, output_dir: str, **extra_args) -> list[float]:
    """`TRAIN_STEPS` steps on `rows`; returns the logged training losses."""
    from transformers import default_data_collator

    from .trainer import MemoryTrainingArguments

    args = MemoryTrainingArguments(
        output_dir=output_dir, max_steps=TRAIN_STEPS, per_device_train_batch_size=BATCH_SIZE,
        learning_rate=learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=10, weight_decay=0.0,
        logging_steps=LOGGING_STEPS, save_strategy="no", report_to="none", seed=0, dataloader_pin_memory=False,
        disable_tqdm=False, **extra_args,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                            processing_class=tokenizer)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def write_outputs(results: dict, losses: dict, facts: dict) -> None:
    from .plots import plot_demo_results

    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / "results.json").write_text(json.dumps({"results": results, "losses": losses, **facts}, indent=1))
    rows = [
        "| model | trainable parameters | recall, held-out phrasing | recall, training phrasing | natural-text perplexity |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        rows.append(
            f"| {name} | {result['trainable_parameters']:,} | {result['recall_held_out']:.1%} | "
            f"{result['recall_training_phrasing']:.1%} | {result['natural_text_perplexity']:.2f} |"
        )
    table = "\n".join(rows)
    (OUTPUT_DIR / "results.md").write_text(table + "\n")
    print(table)

    plot_demo_results(results, losses, OUTPUT_DIR / "demo.png", logging_steps=LOGGING_STEPS)


def run_demo() -> int:
    from datasets import concatenate_datasets
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from .data import knowledge_dataset, tokenize_and_pack
    from .grafting import from_llama, memory_preset
    from .knowledge import KnowledgeSet
    from .natural_text import load_natural_text
    from .offline_checkpoints import load_smollm2
    from .peft_modes import BACKBONE_LORA_TARGETS, prepare_model_for_mode
    from .summary import memory_layout, parameter_counts
    from .trainer import MemoryTrainer

    progress = _Progress(7)
    torch.manual_seed(0)
    progress("loading SmolLM2-135M-Instruct (offline)")
    base, tokenizer = load_smollm2()
    natural_text = load_natural_text()  # fails early, with the install command, if missing

    progress("grafting Engram and chapter memory")
    memory = from_llama(base, tokenizer=tokenizer, **memory_preset(base.config, "both"))
    print(memory_layout(memory.config))
    for key, value in parameter_counts(memory).items():
        print(f"      {key.replace('_', ' '):<18} {value:>13,}")
    canonical = memory.model.engram_canonical_map
    distinct = int(canonical.unique().numel())
    print(f"      canonical token ids: {distinct:,} of {canonical.numel():,} ({1 - distinct / canonical.numel():.1%} fewer)")

    progress("checking the grafted model computes exactly what the base computes")
    if not check_identical(base, memory, tokenizer):
        print("FAILED: the grafted model's outputs differ from the base model's.")
        return 1

    progress("evaluating the base model (knowledge recall, natural-text perplexity)")
    knowledge = KnowledgeSet.generate(KNOWLEDGE_ENTITIES, seed=KNOWLEDGE_SEED)
    knowledge_rows = tokenize_and_pack(knowledge_dataset(knowledge), tokenizer, BLOCK_SIZE)
    # Natural text replayed beside the facts, as much of it as there are fact rows: the usual guard
    # against fine-tuning away general ability, given to both methods alike.
    replay_rows = tokenize_and_pack(natural_text["train"], tokenizer, BLOCK_SIZE).select(range(len(knowledge_rows)))
    training_rows = concatenate_datasets([knowledge_rows, replay_rows])
    natural_rows = tokenize_and_pack(natural_text["validation"], tokenizer, 128).select(range(NATURAL_TEXT_ROWS))
    print(f"      {len(knowledge)} fictional people, {len(knowledge.probes())} facts: {len(knowledge_rows)} rows of "
          f"{BLOCK_SIZE} tokens, trained together with {len(replay_rows)} rows of natural text; "
          f"{NATURAL_TEXT_ROWS} held-out natural-text rows of 128 tokens for perplexity")
    results = {"base SmolLM2-135M": {**evaluate(base, tokenizer, knowledge, natural_rows), "trainable_parameters": 0}}
    losses = {}

    with tempfile.TemporaryDirectory() as scratch:
        progress(f"memory-only fine-tuning: {TRAIN_STEPS} steps x {BATCH_SIZE} rows (backbone frozen)")
        memory = prepare_model_for_mode(memory, "memory_only")
        trainable = sum(p.numel() for p in memory.parameters() if p.requires_grad)
        losses["memory only"] = fine_tune(memory, tokenizer, training_rows, MemoryTrainer, MEMORY_LR, os.path.join(scratch, "memory"))
        results["+ memory (memory-only)"] = {**evaluate(memory, tokenizer, knowledge, natural_rows), "trainable_parameters": trainable}

        progress(f"LoRA (rank {LORA_RANK}) on the base model, same data and steps")
        lora = get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(BACKBONE_LORA_TARGETS)))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        losses["LoRA"] = fine_tune(lora, tokenizer, training_rows, Trainer, LORA_LR, os.path.join(scratch, "lora"))
        results[f"LoRA r={LORA_RANK}"] = {**evaluate(lora, tokenizer, knowledge, natural_rows), "trainable_parameters": trainable}

    progress(f"results (also in {OUTPUT_DIR}/results.md, results.json, demo.png)")
    facts = {"knowledge_entities": KNOWLEDGE_ENTITIES, "train_steps": TRAIN_STEPS, "batch_size": BATCH_SIZE,
             "block_size": BLOCK_SIZE, "memory_lr": MEMORY_LR, "lora_lr": LORA_LR, "seconds": time.perf_counter() - progress.start}
    write_outputs(results, losses, facts)
    print(f"done in {facts['seconds']:.0f}s")
    return 0

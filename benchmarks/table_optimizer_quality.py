"""Quality of the lean table optimizer: the same MemoryTrainer run with the tables (Engram tables, chapter
bank) on LazyAdam (the default) and on RowWiseAdagrad, on the built-in knowledge set.

A small random-initialised MemoryLlama (with a byte-level BPE tokenizer trained on the knowledge text
itself, so the vocabulary and the output layer stay small) learns facts about fictional people; reported per optimizer: the table optimizer's state, the final training loss (mean of the
last logged losses), the loss on the knowledge text afterwards, and exact-match recall on the
memorisation probes (training phrasing) and the held-out probes. Runs on CPU in a few minutes.

    python -m benchmarks.table_optimizer_quality [--entities 200 --steps 300]
"""

import argparse
import json
import tempfile
import time

import torch

from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
from modeling_memory.data.packing import knowledge_dataset, tokenize_and_pack
from modeling_memory.data.knowledge import KnowledgeSet
from modeling_memory.training.table_optimizers import optimizer_state_bytes
from modeling_memory.training.memory_parameters import TABLE_KINDS, memory_parameters
from modeling_memory.training.trainer import MemoryTrainer, MemoryTrainingArguments
from modeling_memory.tools.evaluation import evaluate_knowledge_recall


def build_tokenizer(knowledge: KnowledgeSet, vocab_size: int):
    """A byte-level BPE tokenizer trained on the knowledge set's statements and probes (offline, ~1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = knowledge.training_statements() + [p.prompt for p in knowledge.probes()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_model(vocab_size: int, seed: int) -> MemoryLlamaForCausalLM:
    torch.manual_seed(seed)
    config = MemoryLlamaConfig(
        vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        engram_layers=[1], engram_ngram_orders=[2, 3], engram_heads_per_order=4, engram_table_size=20000, engram_dim=128,
        chapter_layers=[2], chapter_num_chapters=32, chapter_size=8, chapter_num_heads=4,
    )
    return MemoryLlamaForCausalLM(config)


def run(table_optimizer: str, args, tokenizer, rows, knowledge) -> dict:
    model = build_model(len(tokenizer), args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = MemoryTrainingArguments(
            output_dir=scratch, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, warmup_steps=args.steps // 20, lr_scheduler_type="cosine",
            logging_steps=max(1, args.steps // 20), report_to="none", save_strategy="no", disable_tqdm=True,
            seed=args.seed, table_optimizer=table_optimizer, dataloader_pin_memory=False,
        )
        trainer = MemoryTrainer(model=model, args=training_args, train_dataset=rows)
        start = time.time()
        trainer.train()
        seconds = time.time() - start
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        optimizer = trainer.optimizer.optimizer
        tables = {id(p) for p in memory_parameters(model, TABLE_KINDS)}
        table_state = sum(
            v.numel() * v.element_size() for p, s in optimizer.state.items() if id(p) in tables for v in s.values() if torch.is_tensor(v)
        )
        final_eval = trainer.evaluate(rows)["eval_loss"]
    model.eval()
    memorised = evaluate_knowledge_recall(model, tokenizer, knowledge.probes(held_out=False), batch_size=32)
    held_out = evaluate_knowledge_recall(model, tokenizer, knowledge.probes(held_out=True), batch_size=32)
    table_params = sum(p.numel() for p in memory_parameters(model, TABLE_KINDS))
    return {
        "table_optimizer": table_optimizer,
        "table_parameters": table_params,
        "table_state_bytes": table_state,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "final_training_loss": sum(losses[-3:]) / len(losses[-3:]),
        "loss_after_training": final_eval,
        "recall_memorisation": memorised["exact_match"],
        "recall_held_out": held_out["exact_match"],
        "train_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--output-json")
    args = parser.parse_args()

    knowledge = KnowledgeSet.generate(args.entities, seed=args.seed)
    tokenizer = build_tokenizer(knowledge, args.vocab_size)
    rows = tokenize_and_pack(knowledge_dataset(knowledge), tokenizer, args.block_size)
    results = [run(name, args, tokenizer, rows, knowledge) for name in ("adam", "rowwise_adagrad")]

    print(f"{args.entities} people, {len(rows)} rows of {args.block_size} tokens, {args.steps} steps x batch {args.batch_size}")
    print(f"{'tables on':<16} {'table state':>12} {'final loss':>11} {'loss after':>11} {'recall mem.':>12} {'recall held-out':>16}")
    for r in results:
        name = "LazyAdam" if r["table_optimizer"] == "adam" else "RowWiseAdagrad"
        print(
            f"{name:<16} {r['table_state_bytes'] / 2**20:>9.2f} MiB {r['final_training_loss']:>11.4f} "
            f"{r['loss_after_training']:>11.4f} {r['recall_memorisation']:>12.3f} {r['recall_held_out']:>16.3f}"
        )
    text = json.dumps({"settings": vars(args), "results": results}, indent=2)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

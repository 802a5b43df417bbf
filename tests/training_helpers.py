"""Helpers for the training tests: a tiny offline tokenizer, tiny memory models saved with it, and
packed datasets, so that Trainer, PEFT, the CLI and accelerate run end to end in seconds."""

import functools
import os

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import random_ids, tiny_config
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.data.knowledge import KnowledgeSet
from modeling_memory.training.trainer import MemoryTrainingArguments

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per
# matmul can be 100x slower than one (spinning while other processes hold the cores).
torch.set_num_threads(1)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 as in tiny_config (pad, bos, eos)


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    corpus = KnowledgeSet.generate(60, seed=123).training_statements()
    corpus += KnowledgeSet.generate(60, seed=123).probes()[0].prompt.split()
    corpus += ["The quick brown fox jumps over the lazy dog.", "Question: Answer: 0123456789"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory (no download); pad 0, bos 1, eos 2."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    return tokenizer


def tiny_model(seed: int = 0, **overrides) -> MemoryLlamaForCausalLM:
    """tiny_config() sized for tiny_tokenizer()."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=len(tiny_tokenizer()), max_position_embeddings=128)
    fields.update(overrides)
    return MemoryLlamaForCausalLM(tiny_config(**fields))


def save_tiny_model(directory, seed: int = 0, **overrides) -> str:
    """A tiny MemoryLlama checkpoint with its tokenizer, as `memory-llama train` expects."""
    model = tiny_model(seed, **overrides)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return os.fspath(directory)


def tiny_dataset(rows: int = 8, length: int = 12, seed: int = 0, masked_labels: bool = True) -> datasets.Dataset:
    """Random rows with labels; some label positions masked so that rows hold uneven numbers of loss tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = random_ids(rows, length, generator)
    labels = ids.clone()
    if masked_labels:  # an uneven number of loss tokens per row, so per-micro-batch means would differ
        for row in range(rows):
            labels[row, : row % 4] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def tiny_training_args(tmp_path, **overrides) -> MemoryTrainingArguments:
    """Quiet, deterministic arguments for one step, with `overrides` on top."""
    fields = dict(
        output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        learning_rate=1e-2, max_steps=1, train_sampling_strategy="sequential", max_grad_norm=0.0, seed=0,
        dataloader_pin_memory=False,
    )
    fields.update(overrides)
    return MemoryTrainingArguments(**fields)


def train_with_placement(output_dir, offload_dir, max_steps: int, resume=None, table_optimizer: str = "adam"):
    """`MemoryTrainer` on a tiny model whose tables live on disk in `offload_dir`, checkpointing every 2 steps;
    deterministic, so that a run resumed from a checkpoint can be compared with one that never stopped."""
    from modeling_memory.training.trainer import MemoryTrainer

    torch.manual_seed(0)
    config = tiny_config(vocab_size=97, pkm_layers=[1], pkm_num_keys=8, pkm_top_k=4, pkm_heads=2, pkm_key_dim=16)
    model = MemoryLlamaForCausalLM(config).set_memory_placement("disk", os.fspath(offload_dir))
    args = tiny_training_args(
        output_dir, max_steps=max_steps, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
        table_optimizer=table_optimizer, max_grad_norm=1.0,
    )
    trainer = MemoryTrainer(model=model, args=args, train_dataset=tiny_dataset(rows=32, length=12))
    trainer.train(resume_from_checkpoint=resume)
    return model

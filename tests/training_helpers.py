"""Helpers for the training tests: a tiny offline tokenizer, tiny memory models saved with it, and
packed datasets, so that Trainer, PEFT, the CLI and accelerate run end to end in seconds."""

import functools
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_config
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.knowledge import KnowledgeSet

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

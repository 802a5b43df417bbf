import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import modeling_memory  # noqa: F401  (registers the Auto classes)
from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM

VOCAB = 97
EOS = 2
PAD = 0


def tiny_config(**overrides) -> MemoryLlamaConfig:
    """A 3-layer model with Engram at layer 0 and chapter memory at layer 2 unless overridden."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
        chapter_layers=[2],
        chapter_num_chapters=9,
        chapter_size=5,
        chapter_top_k=2,
        chapter_num_shared=1,
        chapter_num_heads=2,
        engram_layers=[0],
        engram_ngram_orders=[2, 3],
        engram_heads_per_order=2,
        engram_table_size=31,
        engram_dim=16,
    )
    fields.update(overrides)
    return MemoryLlamaConfig(**fields)


def random_ids(batch: int, length: int, generator: torch.Generator, low: int = 3) -> torch.Tensor:
    """Token ids that avoid the special ids (pad 0, bos 1, eos 2) unless a test puts them in."""
    return torch.randint(low, VOCAB, (batch, length), generator=generator)


def train_steps(model, steps: int = 3, seed: int = 0, lr: float = 0.05):
    """A few SGD steps on random data, so that zero-initialised memory outputs become non-zero."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids = random_ids(4, 16, generator)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


def wake_memory(model, seed: int = 0, scale: float = 0.05):
    """Give every all-zero parameter (the memory's zero-initialised last projections, and the product-key
    values) seeded random values, the same in every model of one layout (name order), so that the memory
    changes the output: n-gram history, routing, the hash buffers and the canonical-id map then show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.fixture
def trained_model():
    torch.manual_seed(0)
    return train_steps(MemoryLlamaForCausalLM(tiny_config()))

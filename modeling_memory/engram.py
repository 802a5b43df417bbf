"""Engram: hashed n-gram embedding lookup, gated by the hidden state (added to the residual before
self-attention at `config.engram_layers`).

    e = concat of every head's row (rows addressed by hashing canonical n-gram ids)
    k = W_K e, v = W_V e
    s = <RMSNorm(h), RMSNorm(k)> / sqrt(d);  alpha = sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))
    Y = alpha * v + SiLU(DepthwiseCausalConv1d(RMSNorm(alpha * v)))

`engram_value` is zero-initialised, so a fresh Engram adds exactly zero.
"""

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_memory_llama import MemoryLlamaConfig
from .ops_engram import engram_lookup


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (far beyond any table size)."""
    if n < 2:
        return False
    small_primes = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small_primes:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small_primes:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


@functools.cache
def _table_primes(table_size: int, num_tables: int) -> tuple[int, ...]:
    primes, candidate = [], table_size
    while len(primes) < num_tables:
        if _is_prime(candidate):
            primes.append(candidate)
        candidate += 1
    return tuple(primes)


def engram_table_primes(config: MemoryLlamaConfig, layer_idx: int) -> list[int]:
    """Table sizes of one Engram layer: every table of the model gets the next unused prime at or above
    `engram_table_size`, in order of layer, then n-gram order, then head."""
    heads = config.engram_num_heads
    primes = _table_primes(config.engram_table_size, heads * len(config.engram_layers))
    position = sorted(config.engram_layers).index(layer_idx)
    return list(primes[position * heads : (position + 1) * heads])


def engram_hash_multipliers(config: MemoryLlamaConfig, layer_idx: int) -> torch.Tensor:
    """Odd int64 multipliers m_0..m_{max_order-1} of one layer, seeded with seed + 10007 * layer and
    bounded so that (largest canonical id) * m cannot overflow int64."""
    largest_id = config.vocab_size  # canonical ids < vocab_size; vocab_size itself is the pad id
    bound = (2**63 - 1) // (largest_id + 1)
    generator = torch.Generator().manual_seed(config.engram_seed + 10007 * layer_idx)
    halves = torch.randint(0, bound // 2, (config.engram_max_order,), generator=generator, dtype=torch.int64)
    return halves * 2 + 1


@dataclass
class EngramInputs:
    """What every Engram layer of one forward reads; built once by the model from the token ids.

    token_ids: (B, L + S) raw ids, the L = max_order - 1 history tokens first.
    history_lengths: (B, S) usable history per new token (0 after EOS, padding or the start).
    canonical_map: (V,) raw id -> canonical id.
    """

    token_ids: torch.Tensor
    history_lengths: torch.Tensor
    canonical_map: torch.Tensor


class MemoryLlamaEngram(nn.Module):
    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.ngram_orders = list(config.engram_ngram_orders)
        self.pad_id = config.vocab_size
        self.conv_kernel = config.engram_conv_kernel
        self.conv_dilation = config.engram_effective_dilation
        self.conv_history = (self.conv_kernel - 1) * self.conv_dilation

        primes = engram_table_primes(config, layer_idx)
        offsets = [0, *itertools.accumulate(primes)][:-1]
        self.table = nn.Embedding(sum(primes), config.engram_head_dim)
        self.register_buffer("table_primes", torch.tensor(primes, dtype=torch.int64))
        self.register_buffer("table_offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("hash_multipliers", engram_hash_multipliers(config, layer_idx))

        self.engram_key = nn.Linear(config.engram_dim, config.hidden_size, bias=False)
        self.engram_value = nn.Linear(config.engram_dim, config.hidden_size, bias=False)
        self.engram_value.zero_init = True  # function-preserving at birth (see _init_weights)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.key_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv = nn.Conv1d(
            config.hidden_size,
            config.hidden_size,
            kernel_size=self.conv_kernel,
            dilation=self.conv_dilation,
            groups=config.hidden_size,
            bias=False,
        )

    def lookup(self, inputs: EngramInputs) -> torch.Tensor:
        """(B, S, engram_dim) concatenated head embeddings."""
        return engram_lookup(
            inputs.token_ids,
            inputs.history_lengths,
            inputs.canonical_map,
            self.hash_multipliers,
            self.table_primes,
            self.table_offsets,
            self.ngram_orders,
            self.pad_id,
            self.table,
        )

    def gate(self, hidden_states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, S, 1) fp32 gate alpha from the hidden state and the retrieved key."""
        hidden = self.hidden_norm(hidden_states).float()
        keys = self.key_norm(keys).float()
        score = (hidden * keys).sum(-1, keepdim=True) / math.sqrt(self.hidden_size)
        score = score.sign() * score.abs().clamp_min(1e-6).sqrt()
        return torch.sigmoid(score)

    def forward(
        self,
        hidden_states: torch.Tensor,
        inputs: EngramInputs,
        token_mask: torch.Tensor,
        conv_history: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: (B, S, d) residual stream entering the layer.
            inputs: token ids and history shared by all Engram layers.
            token_mask: (B, S) bool, False at padding.
            conv_history: (B, (kernel - 1) * dilation, d) conv inputs of earlier tokens, or None.
        Returns:
            (B, S, d) the residual update and (B, S, d) this chunk's conv inputs (kept by the cache).
        """
        if self.table.weight.device != hidden_states.device:
            raise ValueError(
                f"The Engram table of layer {self.layer_idx} is on {self.table.weight.device} but the hidden states "
                f"are on {hidden_states.device}: move the whole model with `model.to(device)`."
            )
        # A table may be kept in higher precision than the layer; the gate runs in fp32 either way.
        embeddings = self.lookup(inputs).to(hidden_states.dtype)
        alpha = self.gate(hidden_states, self.engram_key(embeddings))
        gated_values = (alpha * self.engram_value(embeddings).float()).to(hidden_states.dtype)

        # Padding must not leak into later tokens through the convolution.
        conv_inputs = self.conv_norm(gated_values) * token_mask.unsqueeze(-1).to(gated_values.dtype)
        if conv_history is None:
            conv_history = conv_inputs.new_zeros(conv_inputs.shape[0], self.conv_history, conv_inputs.shape[2])
        window = torch.cat([conv_history.to(conv_inputs.dtype), conv_inputs], dim=1).transpose(1, 2)
        conv_out = F.conv1d(window, self.conv.weight, dilation=self.conv_dilation, groups=self.hidden_size)
        output = gated_values + F.silu(conv_out.transpose(1, 2))
        return output, conv_inputs


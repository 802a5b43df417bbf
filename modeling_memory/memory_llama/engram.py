"""Engram: hashed n-gram embedding lookup, gated by the hidden state (added to the residual before
self-attention at `config.engram_layers`).

    e = concat of every head's row (rows addressed by hashing canonical n-gram ids)
    k = W_K e, v = W_V e
    s = <RMSNorm(h), RMSNorm(k)> / sqrt(d);  alpha = sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))
    Y = alpha * v + SiLU(DepthwiseCausalConv1d(RMSNorm(alpha * v)))

`engram_value` is zero-initialised (in the model's `_init_weights`, as every parameter and buffer here), so a
fresh Engram adds exactly zero. The table is an `nn.Embedding(sparse=True)`: in training its gradient holds
only the rows a step read (see `ops_table_rows.py`), so a step costs the same whatever the table's size.

Besides the update, the layer returns its gate and the rows it read, which the model records on request
(`output_engram_gates`, `output_engram_row_ids`): training tools read them there instead of recomputing them.
"""

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_memory_llama import MemoryLlamaConfig
from .ops_engram import EngramHashing, engram_history_lengths, engram_lookup, engram_row_ids
from .table_placement import MemoryTable, RowFetch, new_table_device


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


# Marks an EOS or padding token in the cached token window (real ids are >= 0).
BOUNDARY_ID = -1


class MemoryLlamaEngramTable(MemoryTable, nn.Embedding):
    """The rows of every head of one Engram layer: an `nn.Embedding` whose `sparse` flag says whether its gradient
    is sparse (the default), placed on the device, in host RAM or on disk (`table_placement.py`)."""


@dataclass
class EngramRead:
    """What one forward of an Engram layer reads, prepared before the layer runs when its table is off the device
    (the rows depend on the token ids only, so the model fetches them at forward entry while earlier layers run).

    token_ids (B, L + S) and history_lengths (B, S) as `ngram_context` returns them; for a table off the device,
    also row_ids (B, S, H) and the `RowFetch` bringing their distinct rows to the compute device."""

    token_ids: torch.Tensor
    history_lengths: torch.Tensor
    row_ids: torch.Tensor | None = None
    fetch: RowFetch | None = None  # or a ShardedRowFetch, for a table sharded across processes


class MemoryLlamaEngram(nn.Module):
    """Engram of one decoder layer (see the module docstring): its table, hash buffers, gate and short
    convolution. The canonical-id map is the model's (one for all Engram layers), passed to `forward`."""

    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.history = config.engram_max_order - 1
        self.hidden_size = config.hidden_size
        self.ngram_orders = list(config.engram_ngram_orders)
        self.pad_id = config.vocab_size
        self.conv_kernel = config.engram_conv_kernel
        self.conv_dilation = config.engram_effective_dilation
        self.conv_history = (self.conv_kernel - 1) * self.conv_dilation

        primes = engram_table_primes(config, layer_idx)
        offsets = [0, *itertools.accumulate(primes)][:-1]
        # Sparse row gradients (DDP all-reduces them as such because this is an nn.Embedding with sparse=True).
        self.table = MemoryLlamaEngramTable(sum(primes), config.engram_head_dim, sparse=True, device=new_table_device())
        self.register_buffer("table_primes", torch.tensor(primes, dtype=torch.int64))
        self.register_buffer("table_offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("hash_multipliers", engram_hash_multipliers(config, layer_idx))

        self.engram_key = nn.Linear(config.engram_dim, config.hidden_size, bias=False)
        self.engram_value = nn.Linear(config.engram_dim, config.hidden_size, bias=False)
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

    def ngram_context(
        self, input_ids: torch.Tensor, boundaries: torch.Tensor, cache: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids with the L = max_order - 1 tokens before them, and how much of that history each new
        token may use (history never crosses an EOS or padding).

        The cache keeps this layer's last L ids as conv state 0, boundaries marked `BOUNDARY_ID`: a boundary
        token is never history of a later one, so its id need not be kept.

        Returns:
            token_ids (B, L + S) raw ids, history first; history_lengths (B, S) in [0, L].
        """
        marked = input_ids.masked_fill(boundaries, BOUNDARY_ID)
        past = cache.get_conv_state(self.layer_idx, state_idx=0) if cache is not None else None
        if past is None:
            past = marked.new_full((marked.shape[0], self.history), BOUNDARY_ID)
            to_store = torch.cat([past, marked], dim=1)  # the window always holds >= L ids, even after a crop
        else:
            # A copy: the cache overwrites its window in place below. A cache recording its past (to allow
            # cropping) keeps more than L ids.
            past = past[:, -self.history :].clone()
            to_store = marked
        if cache is not None:
            cache.update_conv_state(to_store, self.layer_idx, state_idx=0, conv_kernel_size=self.history)
        token_ids = torch.cat([past.clamp_min(0), input_ids], dim=1)
        history_lengths = engram_history_lengths(torch.cat([past == BOUNDARY_ID, boundaries], dim=1), self.history)
        return token_ids, history_lengths

    def hashing(self, canonical_map: torch.Tensor) -> EngramHashing:
        """This layer's hash buffers with the model's (V,) canonical-id map, as the lookup op takes them."""
        return EngramHashing(
            canonical_map, self.hash_multipliers, self.table_primes, self.table_offsets, tuple(self.ngram_orders),
            self.pad_id,
        )

    @property
    def table_is_offloaded(self) -> bool:
        return isinstance(self.table, MemoryTable) and self.table.is_offloaded

    @property
    def table_reads_by_fetch(self) -> bool:
        """Whether the table's rows are gathered first (a table off the device, or sharded across processes)."""
        return isinstance(self.table, MemoryTable) and self.table.reads_by_fetch

    def prepare_read(
        self,
        input_ids: torch.Tensor,
        boundaries: torch.Tensor,
        canonical_map: torch.Tensor,
        cache: Cache | None,
        background: bool = False,
    ) -> EngramRead:
        """The n-gram context of the new tokens (updating the cache's window) and, for a table off the device, the
        fetch of the rows they read, on a background thread with `background`."""
        token_ids, history_lengths = self.ngram_context(input_ids, boundaries, cache)
        if not self.table_reads_by_fetch:
            return EngramRead(token_ids, history_lengths)
        row_ids = engram_row_ids(token_ids, history_lengths, self.hashing(canonical_map))
        return EngramRead(token_ids, history_lengths, row_ids, self.table.fetch_rows(row_ids, background))

    def lookup(
        self,
        token_ids: torch.Tensor,
        history_lengths: torch.Tensor,
        canonical_map: torch.Tensor,
        return_row_ids: bool = False,
        read: EngramRead | None = None,
    ):
        """(B, S, engram_dim) concatenated head embeddings (and, with `return_row_ids`, the (B, S, H) rows read).

        A table off the device gives the rows its `read` fetched; a plain table goes to the op (the fused kernel
        where it can run), which reads its weight; a table wrapped by an adapter is called as a module on the row
        ids, so that its delta is applied."""
        if read is None and self.table_reads_by_fetch:
            row_ids = engram_row_ids(token_ids, history_lengths, self.hashing(canonical_map))
            read = EngramRead(token_ids, history_lengths, row_ids, self.table.fetch_rows(row_ids))
        if read is not None and read.fetch is not None:
            rows = self.table.read_fetched(read.fetch)
            embeddings = F.embedding(read.fetch.inverse, rows).flatten(-2)
            return (embeddings, read.row_ids) if return_row_ids else embeddings
        hashing = self.hashing(canonical_map)
        if isinstance(self.table, nn.Embedding) and type(self.table).forward is nn.Embedding.forward:
            return engram_lookup(token_ids, history_lengths, hashing, self.table.weight, self.table.sparse, return_row_ids)
        rows = engram_row_ids(token_ids, history_lengths, hashing)
        embeddings = self.table(rows).flatten(-2)
        return (embeddings, rows) if return_row_ids else embeddings

    def gate(self, hidden_states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, S, 1) fp32 gate alpha from the hidden state and the retrieved key."""
        hidden = self.hidden_norm(hidden_states).float()
        keys = self.key_norm(keys).float()
        score = (hidden * keys).sum(-1, keepdim=True) / math.sqrt(self.hidden_size)
        score = score.sign() * score.abs().clamp_min(1e-6).sqrt()
        return torch.sigmoid(score)

    def short_conv(self, conv_inputs: torch.Tensor, cache: Cache | None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU of the depthwise causal convolution; (B, S, d) -> (B, S, d). The cache keeps this layer's
        last (kernel - 1) * dilation inputs as conv state 1. With `documents` (B, S) (packed rows, nothing cached
        before), a tap never reaches into an earlier document."""
        seq_len = conv_inputs.shape[1]
        window = conv_inputs.transpose(1, 2)  # (B, d, S)
        if cache is not None and self.conv_history > 0:
            window = cache.update_conv_state(window, self.layer_idx, state_idx=1, conv_kernel_size=self.conv_history)
        if documents is not None:
            return F.silu(self._conv_within_documents(conv_inputs, documents))
        # Zeros stand for inputs before the sequence start (or a crop that removed them).
        window = F.pad(window, (self.conv_history, 0))[..., -(self.conv_history + seq_len) :]
        return F.silu(self.conv(window)).transpose(1, 2)

    def _conv_within_documents(self, conv_inputs: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """The depthwise causal convolution tap by tap, each tap's input zeroed where it lies in another document
        than the output token: what the convolution gives each document alone. (B, S, d) -> (B, S, d)."""
        seq_len = conv_inputs.shape[1]
        kernel = self.conv.weight.shape[-1]
        dilation = self.conv.dilation[0]
        output = torch.zeros_like(conv_inputs)
        for tap in range(kernel):
            shift = (kernel - 1 - tap) * dilation  # how far back this tap reads
            if shift >= seq_len:
                continue
            shifted = F.pad(conv_inputs, (0, 0, shift, 0))[:, :seq_len]
            same_document = documents == F.pad(documents, (shift, 0), value=-1)[:, :seq_len]
            output = output + shifted * same_document.unsqueeze(-1).to(shifted.dtype) * self.conv.weight[:, 0, tap]
        return output

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        boundaries: torch.Tensor,
        token_mask: torch.Tensor,
        canonical_map: torch.Tensor,
        cache: Cache | None = None,
        documents: torch.Tensor | None = None,
        return_row_ids: bool = False,
        read: EngramRead | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states: (B, S, d) residual stream entering the layer.
            input_ids: (B, S) raw token ids of the new tokens.
            boundaries: (B, S) bool, True at EOS, padding and document ends: n-gram history never reaches across them.
            token_mask: (B, S) bool, False at padding.
            canonical_map: (V,) raw id -> canonical id.
            cache: transformers' cache whose layer `layer_idx` keeps conv states ("hybrid" layer), or None.
            documents: (B, S) the document of each token in packed rows (nothing cached before), or None: the
                convolution then stays inside each document.
            return_row_ids: also return the rows read (the fused kernel writes them only when asked or training).
            read: this forward's `prepare_read`, when the model prepared it ahead (a table off the device).
        Returns:
            (B, S, d) the residual update; (B * S,) fp32 the gate alpha of each token; (B * S, H) int64 the table
            rows each token read, or None unless `return_row_ids` (recorded by the model as `engram_gates` /
            `engram_row_ids`).
        """
        if not self.table_is_offloaded and self.table.weight.device != hidden_states.device:
            raise ValueError(
                f"The Engram table of layer {self.layer_idx} is on {self.table.weight.device} but the hidden states "
                f"are on {hidden_states.device}: move the whole model with `model.to(device)`."
            )
        if read is None:
            read = self.prepare_read(input_ids, boundaries, canonical_map, cache)
        # A table may be kept in higher precision than the layer; the gate runs in fp32 either way.
        looked_up = self.lookup(read.token_ids, read.history_lengths, canonical_map, return_row_ids, read)
        embeddings, row_ids = looked_up if return_row_ids else (looked_up, None)
        embeddings = embeddings.to(hidden_states.dtype)
        alpha = self.gate(hidden_states, self.engram_key(embeddings))
        gated_values = (alpha * self.engram_value(embeddings).float()).to(hidden_states.dtype)
        # Padding must not leak into later tokens through the convolution.
        conv_inputs = self.conv_norm(gated_values) * token_mask.unsqueeze(-1).to(gated_values.dtype)
        update = gated_values + self.short_conv(conv_inputs, cache, documents)
        return update, alpha.flatten(), None if row_ids is None else row_ids.flatten(0, 1)

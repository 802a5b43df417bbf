"""Associative memory (Memory Mosaics v2): short- and long-term memories of (key, value) pairs built from the
sequence itself, read by kernel regression with the query equal to the key.

Per memory (short-term and long-term have parameters of their own) and head, for token T of a sequence:

    kbar_T = g_T W_phi x_T + lambda_T kbar_{T-1}     g = exp(W_g x), lambda = exp(-|W_lambda x|)  (scalars)
    k_T = kbar_T / |kbar_T|                           gated time-variant key; the query IS the key
    v_T = a Norm(gamma W_psi x_T + (1 - gamma) W_psi x_{T+1})            look-ahead value, a = exp(min(|.|, 15))
    y_T = sum_t softmax_t(beta_T k_T . k_t) v_t       over the pairs t the row may read, strictly past
    beta_T = beta1 n_T^alpha + beta0                  adaptive bandwidth, n_T = number of pairs row T reads

The short-term memory of token T reads the pairs T-h+1 .. T-1 (h = `mosaic_short_window`); the long-term memory
the pairs 1 .. T-m, with m drawn uniformly in [`mosaic_min_delay`, `mosaic_max_delay`] per training sequence and
m = `mosaic_min_delay` at inference. Outputs of the memories' heads are concatenated, then `W_o`. No positional
encoding: order enters only through the recurrence and the look-ahead.

Placements (`mosaic_placement`): "replace" (both memories stand in for the layer's self-attention) or "parallel"
(a long-term memory beside the self-attention whose output projection starts at zero, so a graft computes what the
base computed).

The recurrence runs in `ops_mosaic_keys.py` (PyTorch path and Triton kernels, in log-space); the read is
attention on the pairs through transformers' attention interface, with beta folded into the query (scale 1).

Decoding: a pair (k_t, v_t) completes only when token t+1 arrives. The cache (a cache layer kind of this module,
registered with transformers' caches) keeps per position the key, the log-norm of the key state and a real-token
flag, and the value with its projection W_psi x_t, so a step continues the recurrence from the last position,
finishes the pending value and appends its own pairs; cropping, beam reordering and static caches then need
nothing beyond per-position storage.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import (
    DynamicLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndStaticFullAttentionLayer,
    StaticLayer,
)
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .configuration_memory_llama import MemoryLlamaConfig
from .ops_mosaic_keys import mosaic_key_scan

# The paper's parametrisations (v2): a = exp(min(|theta|, 15)), beta0 = beta1 = exp(min(theta, 10)),
# alpha = min(|theta|, 1).
VALUE_SCALE_BOUND = 15.0
BANDWIDTH_LOG_BOUND = 10.0
BANDWIDTH_EXPONENT_BOUND = 1.0
NORM_EPS = 1e-10


# --- cache -----------------------------------------------------------------------------------------------------


class MosaicPairsCacheMixin:
    """Per-position pairs of an associative-memory layer, kept beside whatever else the layer caches (its attention
    keys/values with the "parallel" placement, Engram's windows in a hybrid layer).

    `mosaic_states` is None until the first update, then three tensors over positions T (H counts the heads of
    every memory of the layer):
    - keys (B, H, T, D + 1): the unit key, then 1.0 at a real token (0.0 at padding and at positions not written);
    - log-norms (B, H, T, 1) fp32: log of the key state's norm (the state is exp(log-norm) * key);
    - values (B, H, T, 2D): the value (zero at the last position, whose look-ahead token has not arrived), then
      the projection W_psi x the value is finished from.
    Every operation on the cache (crop, beam reordering, batch expansion) acts on positions alike."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mosaic_states: list[torch.Tensor] | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.mosaic_states is not None:
            self.mosaic_states = [state.index_select(0, beam_idx.to(state.device)) for state in self.mosaic_states]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.mosaic_states is not None:
            self.mosaic_states = [state.repeat_interleave(repeats, dim=0) for state in self.mosaic_states]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.mosaic_states is not None:
            self.mosaic_states = [state[indices, ...] for state in self.mosaic_states]


class MosaicDynamicPairsMixin(MosaicPairsCacheMixin):
    """Pairs in tensors that grow by concatenation (as `DynamicLayer` keeps keys and values)."""

    def mosaic_length(self) -> int:
        return 0 if self.mosaic_states is None else self.mosaic_states[0].shape[-2]

    def mosaic_past(self):
        """(keys, log-norms, values, number of cached positions), or None when nothing is cached."""
        if self.mosaic_states is None:
            return None
        return (*self.mosaic_states, self.mosaic_length())

    def update_mosaic(self, states: list[torch.Tensor], pending_value: torch.Tensor | None):
        """Append the new positions' (keys, log-norms, values); `pending_value` (B, H, 1, 2D) replaces the last
        cached position's values (its value, now finished). Returns every position's three tensors and the first
        new position."""
        past = self.mosaic_length()
        if past == 0:
            self.mosaic_states = list(states)
        else:
            keys, log_norms, values = self.mosaic_states
            new_keys, new_log_norms, new_values = states
            self.mosaic_states = [
                torch.cat([keys, new_keys], dim=-2),
                torch.cat([log_norms, new_log_norms], dim=-2),
                torch.cat([values[..., : past - 1, :], pending_value, new_values], dim=-2),
            ]
        return (*self.mosaic_states, past)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.mosaic_states is not None:
            self.mosaic_states = [state[..., :tokens_to_remove, :] for state in self.mosaic_states]

    def reset(self) -> None:
        super().reset()
        self.mosaic_states = None


class MosaicStaticPairsMixin(MosaicPairsCacheMixin):
    """Pairs in buffers of `max_cache_len` positions written in place (as `StaticLayer` keeps keys and values), so
    a compiled decode step sees fixed shapes and addresses."""

    # The attention part is allocated at its first update, with the shape it is given (a placeholder with
    # "replace"), not ahead of time at the attention's shape.
    supports_early_init = False

    def __init__(self, max_cache_len: int, *args, **kwargs):
        super().__init__(max_cache_len, *args, **kwargs)
        self.mosaic_position = torch.tensor(0, dtype=torch.int64)

    def mosaic_past(self):
        if self.mosaic_states is None:
            return None
        return (*self.mosaic_states, self.mosaic_position)

    def update_mosaic(self, states: list[torch.Tensor], pending_value: torch.Tensor | None):
        if self.mosaic_states is None:
            self.mosaic_states = [
                state.new_zeros(*state.shape[:2], self.max_cache_len, state.shape[-1]) for state in states
            ]
            self.mosaic_position = self.mosaic_position.to(states[0].device)
            if not torch.compiler.is_compiling():
                for tensor in (*self.mosaic_states, self.mosaic_position):
                    torch._dynamo.mark_static_address(tensor)
        start = self.mosaic_position.clone()
        if pending_value is not None:
            # Without a cached position (after `reset`), index 0 is written again just below.
            self.mosaic_states[2].index_copy_(2, (start - 1).clamp(min=0).reshape(1), pending_value)
        positions = torch.arange(states[0].shape[-2], device=start.device) + start
        for buffer, state in zip(self.mosaic_states, states):
            buffer.index_copy_(2, positions, state)
        self.mosaic_position.add_(states[0].shape[-2])
        return (*self.mosaic_states, start)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.mosaic_position.sub_(abs(tokens_to_remove))

    def reset(self) -> None:
        super().reset()
        if self.mosaic_states is not None:
            for buffer in self.mosaic_states:
                buffer.zero_()
        self.mosaic_position.zero_()


# Registered with transformers' caches by `_layer_type` (for `DynamicCache(config=...)` / `StaticCache(config=...)`,
# which build one layer per entry of `config.layer_types`). With "replace" the attention part holds a one-channel
# placeholder per token, so that the layer's length, cropping and reordering stay transformers' own.
class MosaicDynamicLayer(MosaicDynamicPairsMixin, DynamicLayer):
    _layer_type = "associative_memory"


class MosaicStaticLayer(MosaicStaticPairsMixin, StaticLayer):
    _layer_type = "associative_memory"


class MosaicHybridDynamicLayer(MosaicDynamicPairsMixin, LinearAttentionAndFullAttentionLayer):
    """With Engram in the same layer: its two windows (token context, convolution inputs) too."""

    _layer_type = "hybrid_associative_memory"

    def __init__(self, number_of_states: int = 2, **kwargs):
        super().__init__(number_of_states=number_of_states, **kwargs)


class MosaicHybridStaticLayer(MosaicStaticPairsMixin, LinearAttentionAndStaticFullAttentionLayer):
    _layer_type = "hybrid_associative_memory"

    def __init__(self, max_cache_len: int, number_of_states: int = 2, **kwargs):
        super().__init__(max_cache_len, number_of_states=number_of_states, **kwargs)


# The masks `generate` prepares ahead of a compiled step for these layers: a hybrid layer's (the attention's causal
# mask, and the new tokens' padding mask, which the associative memory reads).
for _layer_type in ("associative_memory", "hybrid_associative_memory"):
    LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.setdefault(_layer_type, LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING["hybrid"])


# --- the memory --------------------------------------------------------------------------------------------------


class MemoryLlamaAssociativeMemoryLevel(nn.Module):
    """The featurisers and bandwidth of one memory (short- or long-term); see the module docstring. Initialised by
    the model's `_init_weights`."""

    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the initialisation's scale depends on it
        self.num_heads = config.mosaic_effective_num_heads
        self.head_dim = config.mosaic_effective_head_dim
        hidden, width = config.hidden_size, self.num_heads * self.head_dim
        # mosaic_* names, so that PEFT targets like "k_proj" or "v_proj" never hit them by accident.
        self.mosaic_key = nn.Linear(hidden, width, bias=False)  # W_phi
        self.mosaic_key_gate = nn.Linear(hidden, self.num_heads, bias=False)  # W_g
        self.mosaic_key_decay = nn.Linear(hidden, self.num_heads, bias=False)  # W_lambda
        self.mosaic_value = nn.Linear(hidden, width, bias=False)  # W_psi
        self.value_mix = nn.Parameter(torch.empty(self.num_heads))  # gamma
        self.value_log_scale = nn.Parameter(torch.empty(self.num_heads))
        self.bandwidth_log_base = nn.Parameter(torch.empty(self.num_heads))  # beta0
        self.bandwidth_log_slope = nn.Parameter(torch.empty(self.num_heads))  # beta1
        self.bandwidth_exponent = nn.Parameter(torch.empty(self.num_heads))  # alpha

    def key_inputs(self, hidden_states: torch.Tensor, token_mask: torch.Tensor):
        """The recurrence's inputs, (B, H, S, D) and twice (B, H, S); padding leaves the key state unchanged."""
        batch, seq_len, _ = hidden_states.shape
        projected = self.mosaic_key(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        # `where`, not a product: a padded position's input gets no gradient, however large the scan's is there.
        keep = token_mask[:, None, :]
        log_gate = torch.where(keep, self.mosaic_key_gate(hidden_states).transpose(1, 2).float(), 0.0)
        log_decay = torch.where(keep, -self.mosaic_key_decay(hidden_states).transpose(1, 2).float().abs(), 0.0)
        return torch.where(keep[..., None], projected, 0.0), log_gate, log_decay

    def finish_values(self, projections: torch.Tensor) -> torch.Tensor:
        """Values of the pairs whose look-ahead token is in `projections` (B, H, L, D): (B, H, L - 1, D)."""
        mix = self.value_mix.float()[None, :, None, None]
        blend = mix * projections[:, :, :-1].float() + (1 - mix) * projections[:, :, 1:].float()
        scale = self.value_log_scale.float().abs().clamp(max=VALUE_SCALE_BOUND).exp()[None, :, None, None]
        return (scale * F.normalize(blend, dim=-1, eps=NORM_EPS)).to(projections.dtype)

    def bandwidth(self, pairs_read: torch.Tensor) -> torch.Tensor:
        """beta for each query row, (B, H, S) fp32, from the number of pairs it reads (B, S)."""
        base = self.bandwidth_log_base.float().clamp(max=BANDWIDTH_LOG_BOUND).exp()[None, :, None]
        slope = self.bandwidth_log_slope.float().clamp(max=BANDWIDTH_LOG_BOUND).exp()[None, :, None]
        exponent = self.bandwidth_exponent.float().abs().clamp(max=BANDWIDTH_EXPONENT_BOUND)[None, :, None]
        return slope * pairs_read.float()[:, None, :].pow(exponent) + base


class MemoryLlamaAssociativeMemoryOutput(nn.Linear):
    """W_o: the memories' heads, concatenated, back to the hidden size (zero at birth with "parallel")."""


class MemoryLlamaAssociativeMemory(nn.Module):
    """The associative memory of one decoder layer: short- and long-term memories ("replace") or a long-term one
    ("parallel"), read on the layer's normed input. Returns the update to add to the residual."""

    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.placement = config.mosaic_placement
        self.short_window = config.mosaic_short_window
        self.min_delay, self.max_delay = config.mosaic_min_delay, config.mosaic_max_delay
        self.head_dim = config.mosaic_effective_head_dim
        replace = self.self_attention_replaced = self.placement == "replace"
        self.short_term = MemoryLlamaAssociativeMemoryLevel(config, layer_idx) if replace else None
        self.long_term = MemoryLlamaAssociativeMemoryLevel(config, layer_idx)
        levels = 2 if self.short_term is not None else 1
        width = levels * config.mosaic_effective_num_heads * self.head_dim
        self.mosaic_output = MemoryLlamaAssociativeMemoryOutput(width, config.hidden_size, bias=False)
        self.mosaic_output.layer_idx = layer_idx
        # Read by the attention interface's eager path (no grouped keys here).
        self.num_key_value_groups = 1
        self.is_causal = False

    @property
    def levels(self) -> list[MemoryLlamaAssociativeMemoryLevel]:
        return [level for level in (self.short_term, self.long_term) if level is not None]

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor, cache=None, documents=None) -> torch.Tensor:
        """
        Args:
            hidden_states: (B, S, d) the layer's normed input (new tokens only when decoding with a cache).
            token_mask: (B, S) bool, False at padding.
            cache: transformers' cache built from the model's config (its layer `layer_idx` keeps the pairs), or None.
            documents: (B, S) the document of each token in packed rows (nothing cached before), or None: a token
                then reads only its own document's pairs, and each document's key recurrence starts from zero.
        Returns:
            (B, S, d) the update to add to the residual.
        """
        batch, seq_len, _ = hidden_states.shape
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        past = layer_cache.mosaic_past() if layer_cache is not None else None
        levels = self.levels
        heads = [level.num_heads for level in levels]
        real = token_mask[:, None, :, None]

        new_keys, new_log_norms, new_values, pending_values = [], [], [], []
        for index, level in enumerate(levels):
            projection = level.mosaic_value(hidden_states).view(batch, seq_len, level.num_heads, self.head_dim)
            projection = projection.transpose(1, 2)
            initial = (None, None)
            if past is not None:
                # The recurrence continues from the last cached position's key state, and the new tokens finish
                # that position's pending value.
                last = _last_index(past[3], past[0])
                past_key, past_log_norm, past_value = (
                    self._head_slice(state, heads, index).index_select(2, last)[:, :, 0] for state in past[:3]
                )
                initial = (past_key[..., : self.head_dim], past_log_norm[..., 0])
                last_projection = past_value[:, :, None, self.head_dim :]
                finished = level.finish_values(torch.cat([last_projection, projection], dim=2))
                pending_values.append(torch.cat([finished[:, :, :1], last_projection], dim=-1))
                values = finished[:, :, 1:]
            else:
                values = level.finish_values(projection)
            key_inputs = level.key_inputs(hidden_states, token_mask)
            if documents is None:
                keys, log_norms = mosaic_key_scan(*key_inputs, *initial)
            else:
                keys, log_norms = _key_scan_within_documents(*key_inputs, documents)
            new_keys.append(torch.cat([keys, real.expand(batch, level.num_heads, seq_len, 1).to(keys.dtype)], dim=-1))
            new_log_norms.append(log_norms[..., None])
            values = torch.cat([values, values.new_zeros(batch, level.num_heads, 1, self.head_dim)], dim=2)
            new_values.append(torch.cat([values, projection], dim=-1))

        states = [torch.cat(new_keys, dim=1), torch.cat(new_log_norms, dim=1), torch.cat(new_values, dim=1)]
        if layer_cache is not None:
            pending_value = torch.cat(pending_values, dim=1) if pending_values else None
            keys, _, values, start = layer_cache.update_mosaic(states, pending_value)
            if self.self_attention_replaced:
                # Without attention, the layer's length (what `get_seq_length` and the masks read) counts these.
                placeholder = hidden_states.new_zeros(batch, 1, seq_len, 1)
                cache.update(placeholder, placeholder, self.layer_idx)
        else:
            (keys, _, values), start = states, 0

        outputs = []
        for index, level in enumerate(levels):
            queries = self._head_slice(states[0], heads, index)[..., : self.head_dim]
            level_keys = self._head_slice(keys, heads, index)
            level_values = self._head_slice(values, heads, index)[..., : self.head_dim]
            outputs.append(self._read(level, queries, level_keys, level_values, start, level is self.short_term, documents))
        return self.mosaic_output(torch.cat(outputs, dim=-1))

    @staticmethod
    def _head_slice(tensor: torch.Tensor, heads: list[int], index: int) -> torch.Tensor:
        start = sum(heads[:index])
        return tensor[:, start : start + heads[index]]

    def _read(self, level, queries, keys, values, start, short_term: bool, documents=None) -> torch.Tensor:
        """Kernel regression of the new tokens' queries over the pairs they may read: (B, S, H * D)."""
        batch, num_heads, seq_len, head_dim = queries.shape
        query_positions = torch.arange(seq_len, device=queries.device) + start  # (S,)
        key_positions = torch.arange(keys.shape[2], device=queries.device)  # (K,)
        window = seq_len + self.short_window - 1
        if short_term and keys.shape[2] > window:
            # Decoding: only the last h - 1 cached pairs and the new ones are in reach, so read those, not the whole
            # cache (a fixed number of positions, which a compiled static-cache step needs too).
            key_positions = key_positions[:window] + (start - (self.short_window - 1))
            cached = key_positions.clamp(min=0)
            keys, values = keys.index_select(2, cached), values.index_select(2, cached)
        lag = query_positions[:, None] - key_positions[None, :]  # (S, K)
        real_keys = (keys[:, 0, :, head_dim] > 0) & (key_positions >= 0)  # (B, K)
        if short_term:
            readable = (lag >= 1) & (lag <= self.short_window - 1)
            readable = readable[None] & real_keys[:, None, :]
        else:
            delay = self._long_term_delay(batch, queries.device)  # (B,)
            readable = (lag[None] >= delay[:, None, None]) & real_keys[:, None, :]
        if documents is not None:  # packed rows, nothing cached before: queries and keys are the same positions
            readable = readable & (documents[:, :, None] == documents[:, None, :])
        pairs_read = readable.sum(-1)  # (B, S)
        beta = level.bandwidth(pairs_read)  # (B, H, S)
        scaled_queries = (queries.float() * beta[..., None]).to(queries.dtype)
        # A row that reads nothing gets one placeholder key (a finite softmax) and a zero output.
        reads_some = pairs_read > 0
        first_key = torch.arange(keys.shape[2], device=queries.device) == 0
        readable = readable | (~reads_some[:, :, None] & first_key[None, None, :])
        output = self._attention(scaled_queries, keys[..., :head_dim], values, readable[:, None])
        output = output * reads_some[:, :, None, None].to(output.dtype)
        return output.reshape(batch, seq_len, num_heads * head_dim)

    def _long_term_delay(self, batch: int, device) -> torch.Tensor:
        """m per sequence: drawn uniformly in [min, max] while training, the minimum at inference."""
        if self.training and self.max_delay > self.min_delay:
            return torch.randint(self.min_delay, self.max_delay + 1, (batch,), device=device)
        return torch.full((batch,), self.min_delay, device=device)

    def _attention(self, queries, keys, values, readable: torch.Tensor) -> torch.Tensor:
        """transformers' attention interface with scale 1 and an explicit mask: boolean for SDPA, a block mask for
        flex attention, additive for eager. (B, S, H, D)."""
        implementation = self.config._attn_implementation
        check_read_implementation(implementation)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if implementation == "sdpa":
            mask = readable
        elif implementation == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            batch, _, query_len, key_len = readable.shape
            mask = create_block_mask(
                lambda b, h, q, kv: readable[b, 0, q, kv], batch, None, query_len, key_len, device=readable.device
            )
        else:
            mask = torch.zeros(readable.shape, dtype=queries.dtype, device=queries.device)
            mask = mask.masked_fill(~readable, torch.finfo(queries.dtype).min)
        output, _ = interface(self, queries, keys, values, mask, scaling=1.0, dropout=0.0, is_causal=False)
        return output


def check_read_implementation(implementation: str) -> None:
    """The reads need an arbitrary mask, which the flash kernels cannot take."""
    if implementation.startswith("flash"):
        raise ValueError(
            f"The associative memory reads its pairs with a mask of its own (shifted windows, per-sequence delays), "
            f"which {implementation} cannot take: load the model with attn_implementation='sdpa', 'eager' or "
            "'flex_attention'."
        )


def _key_scan_within_documents(projected, log_gate, log_decay, documents: torch.Tensor):
    """`mosaic_key_scan` restarted at every document of packed rows: each document is gathered into a row of its own
    (positions past its end are padding, which leaves a state unchanged), scanned from a zero state, and scattered
    back. Inputs (B, H, S, D) and twice (B, H, S), `documents` (B, S); returns what `mosaic_key_scan` returns."""
    batch, heads, length, width = projected.shape
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    starts = starts.flatten()  # (B * S,) a new document (or row) begins here
    segment = starts.cumsum(0) - 1
    first = torch.nonzero(starts).flatten()
    offset = torch.arange(batch * length, device=documents.device) - first[segment]
    source = torch.full((first.numel(), int(offset.max()) + 1), -1, dtype=torch.long, device=documents.device)
    source[segment, offset] = torch.arange(batch * length, device=documents.device)  # (N, L) flat position or -1
    present = source >= 0

    def to_documents(tensor):  # (B, H, S, ...) -> (N, H, L, ...), zero past each document's end
        flat = tensor.transpose(1, 2).reshape(batch * length, heads, *tensor.shape[3:])
        gathered = flat[source.clamp_min(0)]  # (N, L, H, ...)
        gathered = torch.where(present.view(*present.shape, *[1] * (gathered.dim() - 2)), gathered, 0)
        return gathered.transpose(1, 2)

    keys, log_norms = mosaic_key_scan(to_documents(projected), to_documents(log_gate), to_documents(log_decay))
    keys = keys[segment, :, offset].view(batch, length, heads, width).transpose(1, 2)
    log_norms = log_norms[segment, :, offset].view(batch, length, heads).transpose(1, 2)
    return keys, log_norms


def _last_index(past_len, tensor: torch.Tensor) -> torch.Tensor:
    """Index (1,) of the last cached position (0 when none: its entries are then all zero)."""
    if isinstance(past_len, torch.Tensor):
        return (past_len - 1).clamp(min=0).reshape(1).to(tensor.device)
    return torch.tensor([max(past_len - 1, 0)], device=tensor.device)


__all__ = ["MemoryLlamaAssociativeMemory"]

"""Product-key memory (Memory Layers at Scale; Memory+): a table of N = num_keys**2 learnt value rows,
each token reading top_k of them per head. It runs in parallel with the MLP of a decoder layer, on the
same normed input, and its output is added to the residual.

Per head h (the heads share one values table):

    q = RMSNorm(W_q x)_h                          optional norm, per head
    s1 = K1_h q[:K/2], s2 = K2_h q[K/2:]           2 * num_keys sub-key scores
    top-k of s1, top-k of s2, top-k of the k x k sums s1_i + s2_j  ->  slots i * num_keys + j
    w = softmax(top-k scores)                     fp32
    bag = sum_h sum_k w * V[slot]                  weighted embedding bag
    out = W_o (bag * SiLU(W_g x))                  Memory+ gated output

Cost per token: 2 * num_keys sub-key scores and k * k candidate sums per head, then H * k value rows;
nothing per token grows with N. The values get sparse (coalesced COO) gradients.

Function-preserving at birth: the values table starts at zero (see `init_weights`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .ops_product_keys import product_key_bag, product_key_topk


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, maximum: int | None = None, extra: str = "") -> None:
    upper = f" and <= {maximum}" if maximum is not None else ""
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be an integer >= {minimum}{upper}{extra}, got {value!r}.")


class MemoryLlamaProductKeyValues(nn.Module):
    """The values table, (num_slots, value_dim): owned by one product-key memory, or by the model and
    read by all of them (`pkm_share_values`)."""

    def __init__(self, num_slots: int, value_dim: int):
        super().__init__()
        _check_int("num_slots", num_slots, 1)
        _check_int("value_dim", value_dim, 1)
        self.weight = nn.Parameter(torch.empty(num_slots, value_dim))

    def init_weights(self) -> None:
        # Zero, so that a fresh memory adds exactly zero while the values still get gradients on the first
        # step (see MemoryLlamaProductKeyMemory.init_weights). A table trained from scratch without that
        # constraint would be drawn from N(0, value_dim**-0.5), as in the Memory Layers code.
        init.zeros_(self.weight)


class MemoryLlamaProductKeyMemory(nn.Module):
    """
    Args:
        hidden_size: width d of the hidden states.
        num_keys: sub-keys per half, n; the memory has N = n**2 slots.
        top_k: slots each head reads, k, in [1, n].
        heads: query heads, H >= 1; they share the values table and their reads are summed.
        key_dim: query width per head, K, even (each half scores against one sub-key set).
        value_dim: width of a value row (default d).
        query_norm: RMSNorm on each head's query.
        rms_norm_eps: epsilon of that norm.
        shared_values: a `MemoryLlamaProductKeyValues` (N, value_dim) read instead of a table of this
            layer's own. It is not registered as a submodule here: its owner (the model) holds it once, so
            it appears once in the state dict and is initialised by its owner.
    """

    def __init__(
        self,
        hidden_size: int,
        num_keys: int,
        top_k: int,
        heads: int,
        key_dim: int,
        value_dim: int | None = None,
        query_norm: bool = True,
        rms_norm_eps: float = 1e-6,
        shared_values: MemoryLlamaProductKeyValues | None = None,
    ):
        super().__init__()
        value_dim = hidden_size if value_dim is None else value_dim
        _check_int("hidden_size", hidden_size, 1)
        _check_int("num_keys", num_keys, 1)
        _check_int("top_k", top_k, 1, num_keys, extra=" (`num_keys`)")
        _check_int("heads", heads, 1)
        _check_int("value_dim", value_dim, 1)
        if not _is_int(key_dim) or key_dim < 2 or key_dim % 2 != 0:
            raise ValueError(f"`key_dim` must be an even integer >= 2 (two halves), got {key_dim!r}.")
        if not isinstance(query_norm, bool):
            raise ValueError(f"`query_norm` must be a bool, got {query_norm!r}.")
        if not isinstance(rms_norm_eps, (int, float)) or isinstance(rms_norm_eps, bool) or not rms_norm_eps > 0:
            raise ValueError(f"`rms_norm_eps` must be a number > 0, got {rms_norm_eps!r}.")
        num_slots = num_keys**2
        if shared_values is not None:
            if not isinstance(shared_values, MemoryLlamaProductKeyValues):
                raise ValueError(
                    "`shared_values` must be a MemoryLlamaProductKeyValues or None, "
                    f"got {type(shared_values).__name__}."
                )
            if tuple(shared_values.weight.shape) != (num_slots, value_dim):
                raise ValueError(
                    f"`shared_values` has shape {tuple(shared_values.weight.shape)}; this memory needs "
                    f"(num_keys**2, value_dim) = ({num_slots}, {value_dim})."
                )

        self.hidden_size = hidden_size
        self.num_keys = num_keys
        self.num_slots = num_slots
        self.top_k = top_k
        self.heads = heads
        self.key_dim = key_dim
        self.value_dim = value_dim

        # pkm_* names, so that PEFT targets like "q_proj" or "o_proj" never hit them by accident.
        self.pkm_query = nn.Linear(hidden_size, heads * key_dim, bias=False)
        self.pkm_query_norm = LlamaRMSNorm(key_dim, eps=rms_norm_eps) if query_norm else None
        # (H, 2, n, K / 2): sub-keys of the first and second query half of every head.
        self.pkm_keys = nn.Parameter(torch.empty(heads, 2, num_keys, key_dim // 2))
        self.pkm_gate = nn.Linear(hidden_size, value_dim, bias=False)
        self.pkm_output = nn.Linear(value_dim, hidden_size, bias=False)
        self.pkm_values = MemoryLlamaProductKeyValues(num_slots, value_dim) if shared_values is None else None
        # Plain attribute, not a submodule: the owner registers, moves and initialises the shared table.
        object.__setattr__(self, "_shared_values", shared_values)

    @property
    def values_table(self) -> MemoryLlamaProductKeyValues:
        """The table this memory reads: its own, or the shared one."""
        return self.pkm_values if self.pkm_values is not None else self._shared_values

    def init_weights(self, std: float) -> None:
        """Initialise every parameter this memory owns (its own values table included, a shared one not).

        Function-preserving at birth, with the values learning from the first step: the output is
        W_o (bag * SiLU(W_g x)) with bag linear in the values, so a zero W_o or W_g (or a zero scale anywhere
        after the bag) makes the output zero but also every gradient that reaches the values through it.
        Zero values are the one choice that gives a zero output while d loss / d values =
        w * (SiLU(W_g x) * W_o^T d loss / d out) is not zero. The keys, query, gate and output learn from the
        second step on: their gradients all pass through the values read, zero until the first update.

        The gate and output projections are drawn at fan-in scale (std fan_in**-0.5), not at `std`: the read
        path multiplies the two, and at 0.02 each a value row reaches the residual about 16x attenuated
        (hidden 576), so values born at zero would need steps that large to matter (measured on SmolLM2:
        sparse memory fine-tuning at the same learning rate learnt little until this scale was used).

        Args:
            std: standard deviation of the query projection (the model's `initializer_range`).
        """
        init.normal_(self.pkm_query.weight, mean=0.0, std=std)
        init.normal_(self.pkm_gate.weight, mean=0.0, std=self.hidden_size**-0.5)
        init.normal_(self.pkm_output.weight, mean=0.0, std=self.value_dim**-0.5)
        # Uniform in +-1/sqrt(K / 2), as the product-key code draws its sub-keys (nn.Linear's bound).
        bound = (self.key_dim // 2) ** -0.5
        init.uniform_(self.pkm_keys, -bound, bound)
        if self.pkm_query_norm is not None:
            init.ones_(self.pkm_query_norm.weight)
        if self.pkm_values is not None:
            self.pkm_values.init_weights()

    def address(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots each head reads and their weights.

        Args:
            hidden_states: (T, d) normed hidden states.
        Returns:
            indices (T, H, k) int64 in [0, N); weights (T, H, k) fp32, a softmax over each head's k scores.
        """
        query = self.pkm_query(hidden_states).view(-1, self.heads, self.key_dim)
        if self.pkm_query_norm is not None:
            query = self.pkm_query_norm(query)
        scores, indices = product_key_topk(query, self.pkm_keys, self.top_k)
        return indices, scores.softmax(dim=-1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states: (B, S, d), the normed input of the layer's MLP.
        Returns:
            (B, S, d) the residual update, in the dtype of `hidden_states`.
        """
        values = self.values_table.weight
        if values.device != hidden_states.device:
            raise ValueError(
                f"The product-key values table is on {values.device} but the hidden states are on "
                f"{hidden_states.device}: move the whole model with `model.to(device)`."
            )
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        indices, weights = self.address(flat)
        # All heads of a token in one bag: their reads are summed anyway. The table may be kept in higher
        # precision than the layer; the gate runs in fp32 either way.
        bag = product_key_bag(values, indices.flatten(1), weights.flatten(1))
        gated = (bag.float() * F.silu(self.pkm_gate(flat).float())).to(hidden_states.dtype)
        return self.pkm_output(gated).view(batch, seq_len, hidden)

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

Function-preserving at birth: the values table starts at zero (see the model's `_init_weights`, which
initialises every parameter here). Besides the update, the layer returns the slots it read, which the model
records on request (`output_pkm_indices`): sparse memory fine-tuning counts them there.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_memory_llama import MemoryLlamaConfig
from .ops_product_keys import product_key_bag, product_key_topk
from .ops_table_rows import dense_gradient
from .table_placement import MemoryTable, new_table_device


class MemoryLlamaProductKeyValues(MemoryTable, nn.Module):
    """The values table, (pkm_num_keys**2, value_dim): owned by one product-key memory, or by the model and
    read by all of them (`pkm_share_values`); placed on the device, in host RAM or on disk (`table_placement.py`).
    Initialised (to zero) by the model's `_init_weights`."""

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(config.pkm_num_slots, config.pkm_effective_value_dim, device=new_table_device())
        )
        # Sparse row gradients, as `nn.Embedding(sparse=True)` gives; `set_sparse_table_gradients` turns them dense.
        self.sparse = True


class MemoryLlamaProductKeyMemory(nn.Module):
    """Product-key memory of one decoder layer (see the module docstring). It reads its own values table, or with
    `pkm_share_values` the model's, which the decoder layer passes to `forward`. The settings are the config's
    `pkm_*` fields (validated there)."""

    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_keys = config.pkm_num_keys
        self.num_slots = config.pkm_num_slots
        self.top_k = config.pkm_top_k
        self.heads = config.pkm_heads
        self.key_dim = config.pkm_key_dim
        self.value_dim = config.pkm_effective_value_dim

        # pkm_* names, so that PEFT targets like "q_proj" or "o_proj" never hit them by accident.
        self.pkm_query = nn.Linear(self.hidden_size, self.heads * self.key_dim, bias=False)
        self.pkm_query_norm = LlamaRMSNorm(self.key_dim, eps=config.rms_norm_eps) if config.pkm_query_norm else None
        # (H, 2, n, K / 2): sub-keys of the first and second query half of every head.
        self.pkm_keys = nn.Parameter(torch.empty(self.heads, 2, self.num_keys, self.key_dim // 2))
        self.pkm_gate = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.pkm_output = nn.Linear(self.value_dim, self.hidden_size, bias=False)
        self.pkm_values = None if config.pkm_share_values else MemoryLlamaProductKeyValues(config)

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

    def forward(
        self, hidden_states: torch.Tensor, shared_values: MemoryLlamaProductKeyValues | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: (B, S, d), the normed input of the layer's MLP.
            shared_values: the model's values table when `pkm_share_values`, else None (the layer reads its own).
        Returns:
            (B, S, d) the residual update, in the dtype of `hidden_states`; (B * S, H, k) int64 the slots each
            token read (recorded by the model as `pkm_indices`).
        """
        values_table = self.pkm_values if self.pkm_values is not None else shared_values
        values = values_table.weight
        if not values_table.is_offloaded and values.device != hidden_states.device:
            raise ValueError(
                f"The product-key values table is on {values.device} but the hidden states are on "
                f"{hidden_states.device}: move the whole model with `model.to(device)`."
            )
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        indices, weights = self.address(flat)
        # All heads of a token in one bag: their reads are summed anyway. The table may be kept in higher
        # precision than the layer; the gate runs in fp32 either way.
        slots = indices.flatten(1)
        if values_table.reads_by_fetch:
            # The distinct slots read, brought to the compute device; the bag reads them by position.
            fetch = values_table.fetch_rows(slots)
            values, slots = values_table.read_fetched(fetch), fetch.inverse
        elif not values_table.sparse:
            values = dense_gradient(values)
        bag = product_key_bag(values, slots, weights.flatten(1))
        gated = (bag.float() * F.silu(self.pkm_gate(flat).float())).to(hidden_states.dtype)
        return self.pkm_output(gated).view(batch, seq_len, hidden), indices

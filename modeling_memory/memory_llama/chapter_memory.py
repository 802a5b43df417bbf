"""Chapter memory: a bank of learnt latent tokens split into chapters, read by cross-attention after
self-attention at `config.chapter_layers`.

Routing is per token and causal: each token's router logits come from its own hidden state only.
A token reads the shared chapter(s) plus its top-k routed chapters; each chapter is attended
separately and the outputs combine MoE-style:

    o_t = mean(o_t,shared) + sum_{c in topk(t)} w_t,c * o_t,c,   w = softmax over the k selected logits

then `memory_output` (zero-initialised, so a fresh memory adds exactly zero).

Training reads only the rows of the chapters a batch reads, gathered so that the bank's gradient is sparse
(those rows only, see `ops_table_rows.py`), and attends to them in one of two exact ways: projecting the
rows to keys and values (for the Triton kernels, or when cheaper), or, in PyTorch, folding the projections
into the query and the output (`attend_folded`), whose cost does not depend on how many distinct chapters
are read. Inference projects the whole bank once and reuses it.
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_memory_llama import MemoryLlamaConfig
from .ops_chapter_attention import chapter_attention, chapter_attention_folded, chapter_attention_runs_kernels
from .ops_table_rows import gather_rows
from .table_placement import MemoryTable, new_table_device


class MemoryLlamaChapterBank(MemoryTable, nn.Embedding):
    """The learnt memory tokens: (num_chapters * chapter_size, hidden_size), shared chapters first.

    Owned by the model and read by every chapter layer (`chapter_share_bank`), or owned by one chapter memory.
    A table read by rows in training (the rows of the chapters a batch reads), hence an `nn.Embedding` whose
    `sparse` flag says whether its gradient is sparse (the default) or dense: DDP all-reduces sparse gradients
    only for embedding modules that say so. Placed on the device, in host RAM or on disk (`table_placement.py`).
    Its weight is initialised by the model's `_init_weights`.
    """

    def __init__(self, config: MemoryLlamaConfig):
        rows = config.chapter_num_chapters * config.chapter_size
        weight = torch.empty(rows, config.hidden_size, device=new_table_device())
        super().__init__(rows, config.hidden_size, sparse=True, _weight=weight)


class MemoryLlamaChapterOutput(nn.Linear):
    """The chapter memory's last projection, zero at birth (see `_init_weights`) so that a fresh memory adds
    exactly zero. A class of its own because transformers calls `_init_weights` on a module of custom code only
    if it holds parameters itself, which the chapter memory does not: its init is decided on this projection."""


class MemoryLlamaChapterMemory(nn.Module):
    """Chapter memory of one decoder layer (see the module docstring). It reads its own bank, or with
    `chapter_share_bank` the model's, which the decoder layer passes to `forward`."""

    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_chapters = config.chapter_num_chapters
        self.chapter_size = config.chapter_size
        self.num_shared = config.chapter_num_shared
        self.top_k = config.chapter_top_k
        self.num_heads = config.chapter_num_heads
        self.head_dim = config.hidden_size // config.chapter_num_heads

        # Projections carry memory_* names so that PEFT targets like "q_proj" never hit them by accident.
        self.router = nn.Linear(config.hidden_size, config.chapter_num_routed, bias=False)
        self.memory_query = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.memory_key = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.memory_value = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.memory_output = MemoryLlamaChapterOutput(config.hidden_size, config.hidden_size, bias=False)
        self.bank_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.bank = None if config.chapter_share_bank else MemoryLlamaChapterBank(config)
        self._projected_bank = None  # (version key, keys, values), reused while no weight changes

    def _bank_version(self, bank: torch.Tensor) -> tuple:
        modules = (self.bank_norm, self.memory_key, self.memory_value)
        params = [bank] + [p for m in modules for p in m.parameters()]
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)

    def _project(self, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(chapters * T, d) bank rows -> keys and values, each (chapters, T, H, D)."""
        # A bank may be kept in higher precision than the layer, or off the device.
        normed = self.bank_norm(rows.to(device=self.bank_norm.weight.device, dtype=dtype))
        shape = (-1, self.chapter_size, self.num_heads, self.head_dim)
        return self.memory_key(normed).view(shape), self.memory_value(normed).view(shape)

    def project_bank(self, bank: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the whole bank, each (C, T, H, D), for inference (no autograd).

        `dtype` is the dtype of the hidden states. They are computed once and reused until a weight they
        depend on changes: an optimizer step, `load_state_dict` or `.to()` all change a parameter's
        version or storage.
        """
        if torch.compiler.is_compiling():
            # Storage versions cannot be traced. A compiled decode step reads the projection that the eager
            # prefill before it checked (generate always prefills eagerly), or projects afresh.
            if self._projected_bank is not None and self._projected_bank[0][1] == dtype:
                return self._projected_bank[1], self._projected_bank[2]
            return self._project(bank, dtype)
        version = (self._bank_version(bank), dtype)
        if self._projected_bank is None or self._projected_bank[0] != version:
            self._projected_bank = (version, *self._project(bank, dtype))
        return self._projected_bank[1], self._projected_bank[2]

    def read_chapter_rows(
        self, bank: MemoryLlamaChapterBank, chapter_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank rows of only the chapters this batch reads (training: a step's cost is bounded by
        tokens x (shared + k) chapters instead of growing with the bank), gathered so that the bank's gradient
        is sparse (the U * T rows read) unless the bank says otherwise (`bank.sparse`).

        Returns rows (U * T, d) of the U distinct chapters read, and chapter_ids renumbered into them.
        """
        read, local_ids = torch.unique(chapter_ids, return_inverse=True)
        offsets = torch.arange(self.chapter_size, device=read.device)
        row_ids = (read.unsqueeze(1) * self.chapter_size + offsets).flatten()
        if bank.reads_by_fetch:
            return bank.read_fetched(bank.fetch_rows(row_ids)), local_ids
        return gather_rows(bank.weight, row_ids, sparse_grad=bank.sparse), local_ids

    def folding_is_cheaper(self, num_tokens: int, reads_per_token: int, num_read: int) -> bool:
        """Whether `attend_folded` costs fewer FLOPs than projecting the `num_read` chapters read. Both are exact;
        folding works on the modules' weights, so it is used only for plain `nn.Linear` projections (a projection
        carrying an adapter is called as a module)."""
        if type(self.memory_key) is not nn.Linear or type(self.memory_value) is not nn.Linear:
            return False
        hidden, keys_read = self.num_heads * self.head_dim, reads_per_token * self.chapter_size
        projected = num_read * self.chapter_size * hidden * hidden + num_tokens * keys_read * hidden
        folded = num_tokens * hidden * hidden + num_tokens * keys_read * self.num_heads * hidden
        return folded < projected

    def attend_folded(
        self, query: torch.Tensor, rows: torch.Tensor, chapter_ids: torch.Tensor, chapter_weights: torch.Tensor
    ) -> torch.Tensor:
        """Chapter attention with the key and value projections folded into the query and the output.

        Per head h, with n_j the normed bank rows and W_k[h], W_v[h] the head's (D, d) slices of the projections:
        q . (W_k[h] n_j) = (W_k[h]^T q) . n_j, and sum_j p_j W_v[h] n_j = W_v[h] sum_j p_j n_j. So the rows read
        are normed but never projected: O(N * R * T * H * d) work instead of O(U * T * d^2), whatever the number
        U of chapters read.

        Args:
            query: (N, H, D) projected queries.
            rows: (U * T, d) bank rows of the chapters read; chapter_ids (N, R) into them; chapter_weights (N, R).
        Returns:
            (N, H, D), as `chapter_attention` of the projected rows.
        """
        normed = self.bank_norm(rows.to(query.dtype)).view(-1, self.chapter_size, rows.shape[-1])  # (U, T, d)
        per_head = (self.num_heads, self.head_dim, -1)
        folded_query = torch.einsum("nhe,hed->nhd", query, self.memory_key.weight.view(per_head))
        mixed = chapter_attention_folded(folded_query, normed, chapter_ids, chapter_weights, self.head_dim**-0.5)
        return torch.einsum("nhd,hed->nhe", mixed, self.memory_value.weight.view(per_head))

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: (N, d) normed hidden states.
        Returns:
            router_logits (N, routed) fp32; routed_chapters (N, k) int64, the top-k routed chapters (0-based
            among the routed ones); chapter_ids (N, shared + k) int64 into the whole bank; chapter_weights
            (N, shared + k) fp32.
        """
        router_logits = self.router(hidden_states).float()
        top_logits, routed_chapters = router_logits.topk(self.top_k, dim=-1)
        routed_weights = top_logits.softmax(dim=-1)
        n_tokens = hidden_states.shape[0]
        shared_ids = torch.arange(self.num_shared, device=hidden_states.device).expand(n_tokens, -1)
        shared_weights = routed_weights.new_full((n_tokens, self.num_shared), 1.0 / max(self.num_shared, 1))
        chapter_ids = torch.cat([shared_ids, routed_chapters + self.num_shared], dim=-1)
        chapter_weights = torch.cat([shared_weights, routed_weights], dim=-1)
        return router_logits, routed_chapters, chapter_ids, chapter_weights

    def forward(self, hidden_states: torch.Tensor, shared_bank: MemoryLlamaChapterBank | None = None):
        """
        Args:
            hidden_states: (B, S, d), already normed by the layer's `memory_layernorm`.
            shared_bank: the model's bank when `chapter_share_bank`, else None (the layer reads its own).
        Returns:
            (B, S, d) the residual update, (B * S, routed) fp32 router logits and (B * S, k) the routed
            chapters each token read (recorded by the model as `router_logits` / `router_indices`).
        """
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        router_logits, routed_chapters, chapter_ids, chapter_weights = self.route(flat)
        bank_table = self.bank if self.bank is not None else shared_bank
        bank = bank_table.weight
        if not bank_table.is_offloaded and bank.device != hidden_states.device:
            raise ValueError(
                f"The chapter bank is on {bank.device} but the hidden states are on {hidden_states.device}: "
                "move the whole model with `model.to(device)`."
            )
        query = self.memory_query(flat).view(-1, self.num_heads, self.head_dim)
        scale = self.head_dim**-0.5
        # A bank sharded across processes is read by rows in inference too: no process holds all of it.
        if torch.is_grad_enabled() or bank_table.is_sharded:
            rows, chapter_ids = self.read_chapter_rows(bank_table, chapter_ids)
            num_read = rows.shape[0] // self.chapter_size
            # The Triton kernels attend to projected rows; folding replaces the PyTorch path when cheaper.
            fold = self.folding_is_cheaper(flat.shape[0], chapter_ids.shape[1], num_read)
            if fold and not chapter_attention_runs_kernels(query):
                attended = self.attend_folded(query, rows, chapter_ids, chapter_weights)
            else:
                keys, values = self._project(rows, hidden_states.dtype)
                attended = chapter_attention(query, keys, values, chapter_ids, chapter_weights, scale)
        else:
            keys, values = self.project_bank(bank, hidden_states.dtype)
            attended = chapter_attention(query, keys, values, chapter_ids, chapter_weights, scale)
        output = self.memory_output(attended.reshape(batch, seq_len, hidden))
        return output, router_logits, routed_chapters


def router_losses(
    router_logits: tuple[torch.Tensor, ...], router_indices: tuple[torch.Tensor, ...], token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-style load-balancing loss and router z-loss over non-padding tokens, averaged over layers.

    Args:
        router_logits: per chapter layer, (N, routed) fp32.
        router_indices: per chapter layer, (N, k) the routed chapters the layer chose (not recomputed here).
        token_mask: (N,) bool, False at padding; None when every token is real.
    Returns:
        (load_balancing, z_loss) scalars. Balanced routing gives load_balancing = 1; routing that
        collapses onto k chapters gives routed / k.
    """
    balance, z_loss = [], []
    for logits, chosen in zip(router_logits, router_indices):
        num_routed, top_k = logits.shape[-1], chosen.shape[-1]
        mask = torch.ones_like(logits[:, 0]) if token_mask is None else token_mask.to(logits.device, logits.dtype)
        n_valid = mask.sum().clamp_min(1.0)
        # scatter_add rather than bincount: no device-to-host sync
        picks = logits.new_zeros(num_routed).scatter_add_(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
        fraction_routed = picks / (n_valid * top_k)
        mean_prob = (logits.softmax(dim=-1) * mask[:, None]).sum(0) / n_valid
        balance.append(num_routed * (fraction_routed * mean_prob).sum())
        z_loss.append((logits.logsumexp(dim=-1).square() * mask).sum() / n_valid)
    return torch.stack(balance).mean(), torch.stack(z_loss).mean()

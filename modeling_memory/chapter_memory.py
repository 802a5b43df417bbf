"""Chapter memory: a bank of learnt latent tokens split into chapters, read by cross-attention after
self-attention at `config.chapter_layers`.

Routing is per token and causal: each token's router logits come from its own hidden state only.
A token reads the shared chapter(s) plus its top-k routed chapters; each chapter is attended
separately and the outputs combine MoE-style:

    o_t = mean(o_t,shared) + sum_{c in topk(t)} w_t,c * o_t,c,   w = softmax over the k selected logits

then `memory_output` (zero-initialised, so a fresh memory adds exactly zero).
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_memory_llama import MemoryLlamaConfig
from .ops_chapter_attention import chapter_attention


class MemoryLlamaChapterBank(nn.Module):
    """The learnt memory tokens: (num_chapters * chapter_size, hidden_size), shared chapters first."""

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.chapter_num_chapters * config.chapter_size, config.hidden_size))


class MemoryLlamaChapterMemory(nn.Module):
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
        self.memory_output = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.memory_output.zero_init = True  # function-preserving at birth (see _init_weights)
        self.bank_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.bank = None if config.chapter_share_bank else MemoryLlamaChapterBank(config)
        self._projected_bank = None  # (version key, keys, values), reused while no weight changes

    def _bank_version(self, bank: torch.Tensor) -> tuple:
        modules = (self.bank_norm, self.memory_key, self.memory_value)
        params = [bank] + [p for m in modules for p in m.parameters()]
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)

    def _project(self, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(chapters * T, d) bank rows -> keys and values, each (chapters, T, H, D)."""
        normed = self.bank_norm(rows.to(dtype))  # a bank may be kept in higher precision than the layer
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

    def project_read_chapters(
        self, bank: torch.Tensor, chapter_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values of only the chapters this batch reads (training: the projection must be part of
        the graph, so it is recomputed every step; limiting it to the read chapters keeps a step's cost
        bounded by tokens x (shared + k) chapters instead of growing with the bank).

        Returns keys, values (U, T, H, D) for the U distinct chapters read and chapter_ids renumbered into them.
        """
        read, local_ids = torch.unique(chapter_ids, return_inverse=True)
        if read.numel() == self.num_chapters:
            return *self._project(bank, dtype), chapter_ids
        rows = bank.view(self.num_chapters, self.chapter_size, -1)[read].flatten(0, 1)
        return *self._project(rows, dtype), local_ids

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

    def forward(self, hidden_states: torch.Tensor, shared_bank: torch.Tensor | None = None):
        """
        Args:
            hidden_states: (B, S, d), already normed by the layer's `memory_layernorm`.
            shared_bank: (C * T, d) the model's bank when `chapter_share_bank`, else None.
        Returns:
            (B, S, d) the residual update, (B * S, routed) fp32 router logits and (B * S, k) the routed
            chapters each token read (recorded by the model as `router_logits` / `router_indices`).
        """
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        router_logits, routed_chapters, chapter_ids, chapter_weights = self.route(flat)
        bank = self.bank.weight if self.bank is not None else shared_bank
        if bank.device != hidden_states.device:
            raise ValueError(
                f"The chapter bank is on {bank.device} but the hidden states are on {hidden_states.device}: "
                "move the whole model with `model.to(device)`."
            )
        if torch.is_grad_enabled():
            keys, values, chapter_ids = self.project_read_chapters(bank, chapter_ids, hidden_states.dtype)
        else:
            keys, values = self.project_bank(bank, hidden_states.dtype)
        query = self.memory_query(flat).view(-1, self.num_heads, self.head_dim)
        attended = chapter_attention(query, keys, values, chapter_ids, chapter_weights, self.head_dim**-0.5)
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

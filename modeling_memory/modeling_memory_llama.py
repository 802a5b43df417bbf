"""MemoryLlama: a Llama whose decoder layers carry Engram and chapter memory.

Order inside a decoder layer (every Llama parameter keeps its key name):

    h = h + Engram(h, n-gram ids)                 # at config.engram_layers, before attention
    h = h + SelfAttention(input_layernorm(h))     # Llama, unchanged
    h = h + ChapterMemory(memory_layernorm(h))    # at config.chapter_layers, before the MLP
    h = h + MLP(post_attention_layernorm(h))      # Llama, unchanged

The last projection of each memory module is zero-initialised, so a model grafted from a Llama
computes exactly what the Llama computed until training changes it.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_memory_llama import MemoryLlamaCache
from .chapter_memory import MemoryLlamaChapterBank, MemoryLlamaChapterMemory, router_losses
from .configuration_memory_llama import MemoryLlamaConfig
from .engram import EngramInputs, MemoryLlamaEngram, engram_hash_multipliers, engram_table_primes
from .ops_engram import engram_history_lengths


@dataclass
class MemoryLlamaModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor`, *optional*):
        Weighted router losses (load balancing + z-loss) of the chapter layers; None without chapter layers.
    router_logits (`tuple(torch.FloatTensor)`, *optional*):
        Per chapter layer, (batch * seq_len, routed chapters) fp32; returned with `output_router_logits=True`.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MemoryLlamaCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor`, *optional*):
        Weighted router losses; already included in `loss` when labels are given.
    router_logits (`tuple(torch.FloatTensor)`, *optional*):
        Per chapter layer, (batch * seq_len, routed chapters) fp32; returned with `output_router_logits=True`.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MemoryLlamaLayerInputs:
    """What the memory modules of every layer read in one forward (built once by the model)."""

    token_mask: torch.Tensor  # (B, S) bool, False at padding
    engram: EngramInputs | None
    shared_bank: torch.Tensor | None  # (C * T, d) when the bank is shared


class MemoryLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.engram = MemoryLlamaEngram(config, layer_idx) if layer_idx in config.engram_layers else None
        if layer_idx in config.chapter_layers:
            self.memory_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.chapter_memory = MemoryLlamaChapterMemory(config, layer_idx)
        else:
            self.memory_layernorm = self.chapter_memory = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_inputs: MemoryLlamaLayerInputs | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.engram is not None:
            conv_history = None
            if isinstance(past_key_values, MemoryLlamaCache):
                conv_history = past_key_values.engram_conv_history(self.layer_idx, self.engram.conv_history)
            update, conv_inputs = self.engram(hidden_states, memory_inputs.engram, memory_inputs.token_mask, conv_history)
            if isinstance(past_key_values, MemoryLlamaCache):
                past_key_values.append_engram_conv_inputs(self.layer_idx, conv_inputs.detach())
            hidden_states = hidden_states + update

        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        router_logits = None
        if self.chapter_memory is not None:
            update, router_logits = self.chapter_memory(self.memory_layernorm(hidden_states), memory_inputs.shared_bank)
            hidden_states = hidden_states + update

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states, router_logits


class MemoryLlamaPreTrainedModel(PreTrainedModel):
    config: MemoryLlamaConfig
    config_class = MemoryLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MemoryLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the routed memory and the cache's Engram state are dynamic
    _can_record_outputs = {
        "hidden_states": MemoryLlamaDecoderLayer,
        "attentions": LlamaAttention,
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, use_safetensors: bool | None = True, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but weights load from safetensors only: pickle files
        (`pytorch_model.bin`) can run code when loaded. Opt in to them with `use_safetensors=False`."""
        if use_safetensors and os.path.isdir(str(pretrained_model_name_or_path)):
            folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder", ""))
            names = os.listdir(folder) if os.path.isdir(folder) else []
            has_safetensors = any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in names)
            pickles = sorted(name for name in names if name.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickles and not has_safetensors:
                raise OSError(
                    f"{pretrained_model_name_or_path} holds only pickle weights ({', '.join(pickles)}), which can run "
                    "code when loaded. Convert them to safetensors, or opt in with `use_safetensors=False` if you "
                    "trust their source."
                )
        return super().from_pretrained(pretrained_model_name_or_path, *args, use_safetensors=use_safetensors, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialise every parameter and buffer the memory adds (runs after the children's defaults)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        # Decided on the projection itself: modules without direct parameters are skipped by transformers.
        if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            init.zeros_(module.weight)
        elif isinstance(module, MemoryLlamaChapterBank):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MemoryLlamaEngram):
            bound = module.conv_kernel**-0.5
            init.uniform_(module.conv.weight, -bound, bound)
            primes = engram_table_primes(self.config, module.layer_idx)
            init.copy_(module.table_primes, torch.tensor(primes, dtype=torch.int64))
            init.copy_(module.table_offsets, torch.tensor([0, *primes[:-1]], dtype=torch.int64).cumsum(0))
            init.copy_(module.hash_multipliers, engram_hash_multipliers(self.config, module.layer_idx))
        elif isinstance(module, MemoryLlamaModel) and module.engram_canonical_map is not None:
            init.copy_(module.engram_canonical_map, torch.arange(self.config.vocab_size, dtype=torch.int64))


class MemoryLlamaModel(MemoryLlamaPreTrainedModel):
    def __init__(self, config: MemoryLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MemoryLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        share_bank = config.chapter_layers and config.chapter_share_bank
        self.chapter_bank = MemoryLlamaChapterBank(config) if share_bank else None
        if config.engram_layers:
            # raw id -> canonical id; identity unless built from a tokenizer (see canonical_ids.py)
            self.register_buffer("engram_canonical_map", torch.arange(config.vocab_size, dtype=torch.int64))
        else:
            self.engram_canonical_map = None
        eos = config.eos_token_id
        self._eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.post_init()

    def _engram_inputs(self, input_ids, token_mask, past_key_values) -> EngramInputs:
        """Token ids with their cached history, and how much history each token may use: history never
        crosses an EOS or padding."""
        history = self.config.engram_max_order - 1
        boundaries = ~token_mask
        for eos in self._eos_token_ids:
            boundaries = boundaries | (input_ids == eos)
        if isinstance(past_key_values, MemoryLlamaCache):
            past_ids, past_boundaries = past_key_values.engram_history(input_ids.shape[0], history, input_ids.device)
            past_key_values.append_engram_tokens(input_ids, boundaries)
        else:
            past_ids = input_ids.new_zeros(input_ids.shape[0], history)
            past_boundaries = torch.ones_like(past_ids, dtype=torch.bool)
        token_ids = torch.cat([past_ids, input_ids], dim=1)
        history_lengths = engram_history_lengths(torch.cat([past_boundaries, boundaries], dim=1), history)
        return EngramInputs(token_ids, history_lengths, self.engram_canonical_map)

    def _check_inputs(self, input_ids, inputs_embeds, past_key_values) -> None:
        """Clear errors for inputs that would otherwise fail deep inside a gather or kernel, or silently
        produce garbage."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is None and self.config.engram_layers:
            raise ValueError(
                f"Engram (engram_layers={self.config.engram_layers}) hashes token ids, so this model needs "
                "`input_ids`; `inputs_embeds` alone cannot be used. Pass `input_ids` instead."
            )
        inputs = input_ids if input_ids is not None else inputs_embeds
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        if inputs.dim() < 2 or inputs.shape[0] == 0 or inputs.shape[1] == 0:
            raise ValueError(
                f"`{name}` has shape {tuple(inputs.shape)}: expected (batch, sequence) with at least one row "
                "and one token."
            )
        weight = self.embed_tokens.weight
        if inputs.device != weight.device:
            raise ValueError(
                f"`{name}` is on {inputs.device} but the model is on {weight.device}: move the inputs with "
                f"`.to(model.device)`."
            )
        if input_ids is not None:
            if input_ids.dtype.is_floating_point:
                raise ValueError(f"`input_ids` must be integer token ids, got dtype {input_ids.dtype}.")
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"`input_ids` holds ids in [{low}, {high}] but the vocabulary has {self.config.vocab_size} "
                    f"tokens (valid ids: 0..{self.config.vocab_size - 1}); check the tokenizer matches the model."
                )
        elif not torch.isfinite(inputs_embeds).all():
            raise ValueError("`inputs_embeds` contains NaN or Inf values.")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + inputs.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"The sequence would reach {past + inputs.shape[1]} tokens ({past} cached + {inputs.shape[1]} new) "
                f"but max_position_embeddings is {self.config.max_position_embeddings}: shorten the input or "
                "lower max_new_tokens."
            )

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MemoryLlamaModelOutputWithPast:
        self._check_inputs(input_ids, inputs_embeds, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            past_key_values = MemoryLlamaCache(config=self.config)
        if self.config.engram_layers and past_key_values is not None and not isinstance(past_key_values, MemoryLlamaCache):
            raise ValueError(
                f"Engram layers keep token history in the cache, so `past_key_values` must be a MemoryLlamaCache, "
                f"got {type(past_key_values).__name__}. Create one with `MemoryLlamaCache(config=model.config)`."
            )

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

        batch, seq_len = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq_len:].bool()
        else:
            token_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=inputs_embeds.device)
        memory_inputs = MemoryLlamaLayerInputs(
            token_mask=token_mask,
            engram=self._engram_inputs(input_ids, token_mask, past_key_values) if self.config.engram_layers else None,
            shared_bank=self.chapter_bank.weight if self.chapter_bank is not None else None,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_router_logits = []
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, router_logits = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                memory_inputs=memory_inputs,
                **kwargs,
            )
            if router_logits is not None:
                all_router_logits.append(router_logits)
        hidden_states = self.norm(hidden_states)

        aux_loss = None
        if all_router_logits:
            balance, z_loss = router_losses(all_router_logits, token_mask.reshape(-1), self.config.chapter_top_k)
            aux_loss = self.config.router_aux_loss_coef * balance + self.config.router_z_loss_coef * z_loss
        return MemoryLlamaModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            aux_loss=aux_loss,
            router_logits=tuple(all_router_logits) if output_router_logits else None,
        )


class MemoryLlamaForCausalLM(MemoryLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__(config)
        self.model = MemoryLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate` builds a plain DynamicCache by default; Engram's history needs ours."""
        wants_dynamic = generation_config.cache_implementation in (None, "dynamic")
        if (
            model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and wants_dynamic
        ):
            model_kwargs["past_key_values"] = MemoryLlamaCache(config=self.config.get_text_config(decoder=True))
            if generation_config.is_assistant:
                model_kwargs["past_key_values"].activate_past_recording()
            return
        if self.config.engram_layers and not wants_dynamic and generation_config.use_cache is not False:
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} cannot hold Engram's token "
                "history; use the default dynamic cache (leave cache_implementation unset)."
            )
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    @classmethod
    def from_llama(cls, llama_model_or_path, tokenizer=None, **memory_fields) -> "MemoryLlamaForCausalLM":
        """Graft memory onto a Llama-family causal LM (a loaded model or a checkpoint path).

        The result computes exactly what the Llama computes (the memory's last projections start at zero).
        With a `tokenizer`, Engram's canonical-id map is built from it (otherwise the identity).
        `memory_fields` are MemoryLlamaConfig memory fields, e.g. `engram_layers=[1], chapter_layers=[3]`.
        """
        from .grafting import graft_from_llama

        return graft_from_llama(cls, llama_model_or_path, tokenizer=tokenizer, **memory_fields)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MemoryLlamaCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside); -100 is ignored. The router `aux_loss` is added to the loss.
        output_router_logits (`bool`, *optional*):
            Also return each chapter layer's router logits.
        """
        outputs: MemoryLlamaModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss.to(loss.device)

        return MemoryLlamaCausalLMOutputWithPast(
            loss=loss,
            aux_loss=outputs.aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def push_to_hub(self, repo_id: str, *, tokenizer=None, **kwargs):
        """Upload a copy that loads with `trust_remote_code=True` where this package is not installed: weights,
        config with `auto_map`, the flat modeling files, generation config, `tokenizer` when given, and a model
        card. It is checked to load without the package before anything is uploaded. Other keyword arguments
        are those of `PreTrainedModel.push_to_hub` (commit_message, private, token, revision, create_pr, ...).
        Returns huggingface_hub's CommitInfo."""
        import importlib

        try:
            # importlib rather than `from .hub_export import`: export tooling must stay out of the files that
            # save_pretrained copies into Hub checkpoints (it follows `from .x import` lines).
            hub_export = importlib.import_module(".hub_export", __package__)
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}.hub_export":
                raise
            # Loaded as remote code without the package: transformers' own upload still carries the code.
            if tokenizer is not None:
                raise ValueError(
                    "push_to_hub(tokenizer=...) needs the modeling_memory package; without it, push the tokenizer "
                    "separately with tokenizer.push_to_hub(repo_id)."
                ) from error
            return super().push_to_hub(repo_id, **kwargs)
        return hub_export.push_model_to_hub(self, repo_id, tokenizer=tokenizer, **kwargs)


__all__ = [
    "MemoryLlamaCausalLMOutputWithPast",
    "MemoryLlamaDecoderLayer",
    "MemoryLlamaForCausalLM",
    "MemoryLlamaModel",
    "MemoryLlamaModelOutputWithPast",
    "MemoryLlamaPreTrainedModel",
]

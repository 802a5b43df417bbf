"""MemoryLlama: a Llama whose decoder layers carry Engram, chapter memory, product-key memory and associative
memory.

Order inside a decoder layer (every Llama parameter keeps its key name):

    h = h + Engram(h, n-gram ids)                 # at config.engram_layers, before attention
    x = input_layernorm(h)
    h = h + SelfAttention(x) [+ Mosaic(x)]        # Llama, unchanged; at config.mosaic_layers an associative
                                                  # memory beside it ("parallel") or instead of it ("replace")
    h = h + ChapterMemory(memory_layernorm(h))    # at config.chapter_layers, before the MLP
    x = post_attention_layernorm(h)
    h = h + MLP(x) + ProductKeyMemory(x)          # MLP: Llama, unchanged; PKM at config.pkm_layers

Each memory starts at exactly zero (a zero-initialised last projection, or for the product-key memory
zero values), so a model grafted from a Llama computes exactly what the Llama computed until training
changes it.
"""

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices, packed_sequence_mask_function
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .associative_memory import (
    MemoryLlamaAssociativeMemory,
    MemoryLlamaAssociativeMemoryLevel,
    MemoryLlamaAssociativeMemoryOutput,
    MosaicPairsCacheMixin,
    check_read_implementation,
)
from .chapter_memory import MemoryLlamaChapterBank, MemoryLlamaChapterMemory, MemoryLlamaChapterOutput, router_losses
from .configuration_memory_llama import MemoryLlamaConfig
from .engram import EngramRead, MemoryLlamaEngram, engram_hash_multipliers, engram_table_primes
from .product_key_memory import MemoryLlamaProductKeyMemory, MemoryLlamaProductKeyValues
from .table_placement import (
    MemoryTable,
    check_placement,
    place_table,
    write_safetensors_streaming,
)
from .table_sharding import launched_world_size, meta_blocks, require_process_group, shard_rows, write_sharded_table


_RECORDED_MEMORY_DOC = r"""
    router_logits (`tuple(torch.FloatTensor)`, *optional*):
        Per chapter layer, (batch * seq_len, routed chapters) fp32; returned with `output_router_logits=True`.
    router_indices (`tuple(torch.LongTensor)`, *optional*):
        Per chapter layer, (batch * seq_len, chapter_top_k) the routed chapters each token read; returned with
        `output_router_indices=True` (the causal-LM head asks for them with `output_router_logits=True`).
    engram_gates (`tuple(torch.FloatTensor)`, *optional*):
        Per Engram layer, (batch * seq_len,) fp32 the gate of each token; returned with `output_engram_gates=True`.
    engram_row_ids (`tuple(torch.LongTensor)`, *optional*):
        Per Engram layer, (batch * seq_len, heads) the table rows each token read; returned with
        `output_engram_row_ids=True`.
    pkm_indices (`tuple(torch.LongTensor)`, *optional*):
        Per product-key layer, (batch * seq_len, pkm_heads, pkm_top_k) the value slots each token read; returned
        with `output_pkm_indices=True`.
"""


@dataclass
class MemoryLlamaModelOutputWithPast(MoeModelOutputWithPast):
    __doc__ = _RECORDED_MEMORY_DOC

    router_indices: tuple[torch.LongTensor, ...] | None = None
    engram_gates: tuple[torch.FloatTensor, ...] | None = None
    engram_row_ids: tuple[torch.LongTensor, ...] | None = None
    pkm_indices: tuple[torch.LongTensor, ...] | None = None


@dataclass
class MemoryLlamaCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    __doc__ = (
        r"""
    aux_loss (`torch.FloatTensor`, *optional*):
        Weighted router losses (load balancing + z-loss) of the chapter layers, with `output_router_logits=True`;
        already included in `loss` when labels are given."""
        + _RECORDED_MEMORY_DOC
    )

    router_indices: tuple[torch.LongTensor, ...] | None = None
    engram_gates: tuple[torch.FloatTensor, ...] | None = None
    engram_row_ids: tuple[torch.LongTensor, ...] | None = None
    pkm_indices: tuple[torch.LongTensor, ...] | None = None


@dataclass
class MemoryLlamaLayerInputs:
    """What the memory modules of every layer read in one forward (built once by the model)."""

    input_ids: torch.Tensor | None  # (B, S)
    token_mask: torch.Tensor  # (B, S) bool, False at padding
    boundaries: torch.Tensor | None  # (B, S) bool, True at EOS, padding and document ends (Engram's n-grams stop there)
    # (B, S) int, the document each token belongs to in rows packed with several (None: one per row); see
    # `MemoryLlamaModel.packed_documents`.
    documents: torch.Tensor | None
    canonical_map: torch.Tensor | None  # (V,) raw id -> canonical id, for Engram
    # Tables shared between layers, owned by the model (None when each layer owns its own).
    chapter_bank: MemoryLlamaChapterBank | None
    pkm_values: MemoryLlamaProductKeyValues | None
    # Whether the Engram layers must hand out the rows they read (the fused kernel writes them only then).
    output_engram_row_ids: bool = False
    # Per Engram layer whose table is off the device: its read, prepared (and its rows fetched) at forward entry.
    engram_reads: dict[int, EngramRead] | None = None


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
        in_pkm_layers = layer_idx in config.pkm_layers
        self.product_key_memory = MemoryLlamaProductKeyMemory(config, layer_idx) if in_pkm_layers else None
        in_mosaic_layers = layer_idx in config.mosaic_layers
        self.associative_memory = MemoryLlamaAssociativeMemory(config, layer_idx) if in_mosaic_layers else None
        if in_mosaic_layers and config.mosaic_placement == "replace":
            self.self_attn = None  # the associative memory stands in for it

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_inputs: MemoryLlamaLayerInputs | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        # Each memory returns its update and what the model records on request (see `_can_record_outputs`).
        if self.engram is not None:
            update, _, _ = self.engram(
                hidden_states,
                memory_inputs.input_ids,
                memory_inputs.boundaries,
                memory_inputs.token_mask,
                memory_inputs.canonical_map,
                cache,
                documents=memory_inputs.documents,
                return_row_ids=memory_inputs.output_engram_row_ids,
                read=(memory_inputs.engram_reads or {}).get(self.layer_idx),
            )
            hidden_states = hidden_states + update

        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        hidden_states = residual
        if self.self_attn is not None:
            attended, _ = self.self_attn(
                hidden_states=normed,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attended
        if self.associative_memory is not None:
            hidden_states = hidden_states + self.associative_memory(normed, memory_inputs.token_mask, cache, memory_inputs.documents)

        if self.chapter_memory is not None:
            update, _, _ = self.chapter_memory(self.memory_layernorm(hidden_states), memory_inputs.chapter_bank)
            hidden_states = hidden_states + update

        residual = hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(normed)
        if self.product_key_memory is not None:
            update, _ = self.product_key_memory(normed, memory_inputs.pkm_values)
            hidden_states = hidden_states + update
        hidden_states = residual + hidden_states
        return hidden_states


class MemoryLlamaPreTrainedModel(PreTrainedModel):
    config: MemoryLlamaConfig
    config_class = MemoryLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MemoryLlamaDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # What the memory modules return besides their update, recorded when the matching `output_<name>` flag is set.
    _can_record_outputs = {
        "hidden_states": MemoryLlamaDecoderLayer,
        "attentions": LlamaAttention,
        "router_logits": OutputRecorder(MemoryLlamaChapterMemory, index=1),
        "router_indices": OutputRecorder(MemoryLlamaChapterMemory, index=2),
        "engram_gates": OutputRecorder(MemoryLlamaEngram, index=1),
        "engram_row_ids": OutputRecorder(MemoryLlamaEngram, index=2),
        "pkm_indices": OutputRecorder(MemoryLlamaProductKeyMemory, index=1),
    }

    # Where the memory tables live is a run-time choice (`table_placement.py`), never part of the config.
    def memory_tables(self) -> dict[str, MemoryTable]:
        """Every memory table (Engram tables, chapter banks, product-key values), by its weight's state-dict key,
        each shared table once."""
        tables, seen = {}, set()
        for name, module in self.named_modules():
            if isinstance(module, MemoryTable) and id(module) not in seen:
                seen.add(id(module))
                tables[f"{name}.weight" if name else "weight"] = module
        return tables

    @property
    def memory_placement(self) -> str:
        """Where the memory tables live: "device", "host" or "disk" (see `set_memory_placement`)."""
        placements = {module.memory_placement for module in self.memory_tables().values()}
        return placements.pop() if len(placements) == 1 else "device"

    def set_memory_placement(self, placement: str, offload_dir: str | None = None):
        """Move every memory table to `placement`, one of `MEMORY_PLACEMENTS`:

        - "device": beside the rest of the model;
        - "host": in RAM (pinned at its exact size on a CUDA machine), rows fetched to the device as they are read;
        - "disk": a working copy in `offload_dir`, mapped shared, so the page cache holds the hot rows and training
          writes rows back to the file; the table may be larger than the machine's RAM.

        Checked before any work (a writable folder with room for every table; RAM for "host"). Moving the model
        afterwards (`.to()`, `.cuda()`, `.half()`) leaves host and disk tables where they are. Returns the model.
        """
        # A process's block of a sharded table gets a working copy named for its rows: processes may share a folder.
        tables = {_block_name(name, module): module for name, module in self.memory_tables().items()}
        check_placement(placement, offload_dir, tables)
        compute_device = self.get_input_embeddings().weight.device
        for name, module in tables.items():
            place_table(module, name, placement, compute_device, offload_dir, self._table_initialiser(module))
        return self

    @property
    def memory_tables_sharded(self) -> bool:
        """Whether the memory tables are sharded by row owner across processes (`shard_memory_tables`)."""
        return any(module.is_sharded for module in self.memory_tables().values())

    def shard_memory_tables(self):
        """Shard every memory table by row owner across the processes of the default `torch.distributed` process
        group: each process keeps one contiguous block of each table's rows (1/W of them, in the table's current
        placement) and reads the other rows from their owners; training sends each row's gradient to its owner
        (see `table_sharding.py`). Collective: every process calls it, after `init_process_group` (torchrun,
        accelerate launch; `MemoryTrainer` does it for a run of several processes) and before building an
        optimizer. Every later forward is collective too. Returns the model."""
        tables = self.memory_tables()
        offloaded = {module.memory_placement for module in tables.values() if module.is_offloaded}
        if offloaded:
            raise ValueError(
                f"Shard the memory tables before placing them ({', '.join(sorted(offloaded))}): call "
                "shard_memory_tables() first, then set_memory_placement() (or pass shard_memory_tables=True with "
                "memory_placement to from_pretrained), so that each process places only its block."
            )
        require_process_group()
        for name, module in tables.items():
            if not module.is_sharded:
                shard_rows(module, name)
        return self

    def _table_initialiser(self, module: MemoryTable):
        """How `_init_weights` fills this table, for a table created off the device a block of rows at a time."""
        std = self.config.initializer_range
        if isinstance(module, MemoryLlamaProductKeyValues):
            return torch.nn.init.zeros_
        return lambda rows: torch.nn.init.normal_(rows, mean=0.0, std=std)

    @classmethod
    def from_pretrained(
        cls,
        *args,
        memory_placement: str | None = None,
        memory_offload_dir: str | None = None,
        shard_memory_tables: bool = False,
        **kwargs,
    ):
        """`PreTrainedModel.from_pretrained`; with `shard_memory_tables=True` (under torch.distributed) each process
        then keeps its block of every memory table's rows (`shard_memory_tables`); with `memory_placement`
        ("device", "host" or "disk", with `memory_offload_dir` for "disk") the tables (or blocks) are then placed as
        `set_memory_placement` says. The loader maps the checkpoint's files, so a table goes to its block and its
        working copy through the page cache, never whole in RAM."""
        world_size = launched_world_size() if shard_memory_tables else 1  # checked before loading
        if memory_placement is not None:  # before loading: the tables the config describes, built without storage
            tables = cls._tables_described(*args, **kwargs)
            if shard_memory_tables:
                tables = meta_blocks(tables, world_size)
            check_placement(memory_placement, memory_offload_dir, tables)
        model = super().from_pretrained(*args, **kwargs)
        if shard_memory_tables:
            model.shard_memory_tables()
        if memory_placement not in (None, "device"):
            model.set_memory_placement(memory_placement, memory_offload_dir)
        return model

    @classmethod
    def _tables_described(cls, *args, **kwargs) -> dict[str, MemoryTable]:
        """The memory tables of the checkpoint `from_pretrained(*args, **kwargs)` names, on the `meta` device (shape
        and dtype only); none when its config cannot be read here (loading then says why)."""
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            location = config if isinstance(config, (str, os.PathLike)) else (args[0] if args else None)
            hub_options = ("cache_dir", "revision", "subfolder", "token", "local_files_only")
            try:
                config = cls.config_class.from_pretrained(location, **{k: kwargs[k] for k in hub_options if k in kwargs})
            except (OSError, ValueError, TypeError):
                return {}
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        with torch.device("meta"):
            model = cls(config)
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model.memory_tables()

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """`PreTrainedModel.save_pretrained`, with each table that lives off the device streamed into a file of its
        own (`memory-<key>.safetensors`, listed in the checkpoint's index) a block of rows at a time, never copied
        whole into RAM. A table sharded across processes is written the same way, each process streaming its own
        block into the one file: then every process calls `save_pretrained` (with `is_main_process` true on one),
        into a folder they all see. The checkpoint is an ordinary one: it loads with plain `from_pretrained` in one
        process or in any number."""
        tables = self.memory_tables()
        streamed = [key for key, module in tables.items() if module.is_offloaded or module.is_sharded]
        if not streamed:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        state_dict = dict(state_dict if state_dict is not None else self.state_dict())
        values = {key: state_dict.pop(key, None) for key in streamed}
        is_main_process = kwargs.get("is_main_process", True)
        super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        written = {}
        for key in streamed:
            file_name = f"memory-{key.removesuffix('.weight')}.safetensors"
            path = os.path.join(save_directory, file_name)
            if tables[key].is_sharded:
                write_sharded_table(path, key, tables[key], metadata={"format": "pt"})
            elif is_main_process and values[key] is not None:
                write_safetensors_streaming(path, {key: values[key]}, metadata={"format": "pt"})
            else:
                continue
            weight = tables[key].weight
            rows = tables[key].row_sharding.num_rows if tables[key].is_sharded else weight.shape[0]
            written[key] = (file_name, rows * weight[0].numel() * weight.element_size())
        if is_main_process:
            _list_tables_in_index(save_directory, written)

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialise every parameter and buffer the memory adds (runs after the children's defaults, and only
        where `from_pretrained` loaded nothing: the `init` helpers skip loaded tensors).

        Each memory is function-preserving at birth: its last projection is zero (the chapter memory's
        `memory_output`, Engram's `engram_value`), or for the product-key memory its values (see below)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MemoryLlamaChapterOutput):
            init.zeros_(module.weight)
        elif isinstance(module, MemoryLlamaChapterBank):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MemoryLlamaEngram):
            init.zeros_(module.engram_value.weight)
            bound = module.conv_kernel**-0.5
            init.uniform_(module.conv.weight, -bound, bound)
            primes = engram_table_primes(self.config, module.layer_idx)
            init.copy_(module.table_primes, torch.tensor(primes, dtype=torch.int64))
            init.copy_(module.table_offsets, torch.tensor([0, *primes[:-1]], dtype=torch.int64).cumsum(0))
            init.copy_(module.hash_multipliers, engram_hash_multipliers(self.config, module.layer_idx))
        elif isinstance(module, MemoryLlamaProductKeyValues):
            # Zero, so that a fresh memory adds exactly zero while the values still get gradients on the first
            # step: the output is W_o (bag * SiLU(W_g x)) with bag linear in the values, so a zero W_o or W_g (or a
            # zero scale anywhere after the bag) would make the output zero but also every gradient that reaches
            # the values through it. With zero values, d loss / d values = w * (SiLU(W_g x) * W_o^T d loss / d out)
            # is not zero; the keys, query, gate and output learn from the second step on. (A table trained from
            # scratch without that constraint would be drawn from N(0, value_dim**-0.5), as in the Memory Layers
            # code.)
            init.zeros_(module.weight)
        elif isinstance(module, MemoryLlamaProductKeyMemory):
            init.normal_(module.pkm_query.weight, mean=0.0, std=std)
            if module.pkm_query_norm is not None:
                init.ones_(module.pkm_query_norm.weight)
            # The gate and output projections at fan-in scale (std fan_in**-0.5), not at `std`: the read path
            # multiplies the two, and at 0.02 each a value row reaches the residual about 16x attenuated (hidden
            # 576), so values born at zero would need steps that large to matter (measured on SmolLM2: sparse
            # memory fine-tuning at the same learning rate learnt little until this scale was used).
            init.normal_(module.pkm_gate.weight, mean=0.0, std=module.hidden_size**-0.5)
            init.normal_(module.pkm_output.weight, mean=0.0, std=module.value_dim**-0.5)
            # Uniform in +-1/sqrt(K / 2), as the product-key code draws its sub-keys (nn.Linear's bound).
            bound = (module.key_dim // 2) ** -0.5
            init.uniform_(module.pkm_keys, -bound, bound)
        elif isinstance(module, MemoryLlamaAssociativeMemoryLevel):
            # The v2 paper's initialisation: truncated normal (+-3 sigma), sigma = 1 / sqrt(2 d (l + 1)) for the
            # block at index l; gamma ~ U(0, 1); beta0 = beta1 = exp(1.5); alpha = 1/3; the value scale
            # a = exp(min(|theta|, 15)) at theta = 0, which |.| would pin there (no gradient at 0): it starts just
            # off it.
            sigma = (2 * self.config.hidden_size * (module.layer_idx + 1)) ** -0.5
            for linear in (module.mosaic_key, module.mosaic_key_gate, module.mosaic_key_decay, module.mosaic_value):
                init.trunc_normal_(linear.weight, mean=0.0, std=sigma, a=-3 * sigma, b=3 * sigma)
            init.uniform_(module.value_mix, 0.0, 1.0)
            init.constant_(module.value_log_scale, 1e-3)
            init.constant_(module.bandwidth_log_base, 1.5)
            init.constant_(module.bandwidth_log_slope, 1.5)
            init.constant_(module.bandwidth_exponent, 1 / 3)
        elif isinstance(module, MemoryLlamaAssociativeMemoryOutput):
            if self.config.mosaic_placement == "parallel":
                init.zeros_(module.weight)  # function-preserving at birth: the branch adds exactly zero
            else:
                sigma = (2 * self.config.hidden_size * (module.layer_idx + 1)) ** -0.5
                init.trunc_normal_(module.weight, mean=0.0, std=sigma, a=-3 * sigma, b=3 * sigma)
        elif isinstance(module, MemoryLlamaModel) and module.engram_canonical_map is not None:
            init.copy_(module.engram_canonical_map, torch.arange(self.config.vocab_size, dtype=torch.int64))


def _block_name(name: str, module: MemoryTable) -> str:
    """The name of a table's working copy: a sharded table's block is named for the rows it holds."""
    if not module.is_sharded:
        return name
    sharding = module.row_sharding
    return f"{name}.rows-{sharding.start}-{sharding.stop}-of-{sharding.num_rows}"


def _list_tables_in_index(save_directory: str, tables: dict[str, tuple[str, int]]) -> None:
    """List tables written into files of their own (key: (file name, bytes)) in the safetensors index of the
    checkpoint `save_pretrained` just wrote (written now if the checkpoint was one file: that file is renamed into a
    shard)."""
    index_path = os.path.join(save_directory, "model.safetensors.index.json")
    single = os.path.join(save_directory, "model.safetensors")
    if os.path.exists(single):
        shard = "model-00001-of-00001.safetensors"
        with safe_open(single, "pt") as file:
            weight_map = dict.fromkeys(file.keys(), shard)
        index = {"metadata": {"total_size": os.path.getsize(single)}, "weight_map": weight_map}
    else:
        with open(index_path) as file:
            index = json.load(file)
    for key, (file_name, nbytes) in tables.items():
        index["weight_map"][key] = file_name
        index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + nbytes
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    partial = f"{index_path}.partial"
    with open(partial, "w") as file:
        json.dump(index, file, indent=2)
    if os.path.exists(single):
        os.replace(single, os.path.join(save_directory, "model-00001-of-00001.safetensors"))
    os.replace(partial, index_path)


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

        # Tables shared between layers live here, once, and reach the layers through their inputs in forward.
        share_bank = config.chapter_layers and config.chapter_share_bank
        self.chapter_bank = MemoryLlamaChapterBank(config) if share_bank else None
        share_values = config.pkm_layers and config.pkm_share_values
        self.pkm_values = MemoryLlamaProductKeyValues(config) if share_values else None
        if config.engram_layers:
            # raw id -> canonical id; identity unless built from a tokenizer (see canonical_ids.py)
            self.register_buffer("engram_canonical_map", torch.arange(config.vocab_size, dtype=torch.int64))
        else:
            self.engram_canonical_map = None
        eos = config.eos_token_id
        self._eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.post_init()

    def engram_boundaries(
        self, input_ids: torch.Tensor, token_mask: torch.Tensor, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, S) bool, True at EOS, padding and the last token of each packed document: Engram's n-gram history
        never reaches across them."""
        boundaries = ~token_mask
        for eos in self._eos_token_ids:
            boundaries = boundaries | (input_ids == eos)
        if documents is not None:
            boundaries[:, :-1] |= documents[:, 1:] != documents[:, :-1]
        return boundaries

    @staticmethod
    def packed_documents(position_ids: torch.Tensor, batch: int, cache: Cache | None) -> torch.Tensor | None:
        """(B, S) document index of each token when the rows pack several documents, else None.

        A packed row says where its documents start the way transformers' `DataCollatorWithFlattening` and
        `data.packing.tokenize_and_pack(..., separate_documents=True)` do: its position ids restart at 0. In a
        forward that starts from nothing cached (training, scoring, a prompt's prefill), attention, Engram's n-grams
        and convolution and the associative memory then stay inside each document, so that what a document teaches
        does not depend on the unrelated text packed before it. (transformers' own masks do this only without a
        cache and without an attention mask; a plain forward builds an empty cache, and packed rows may be padded.)
        A forward that continues cached tokens never splits them, nor one that fills a fixed-size (static) cache."""
        if position_ids is None or position_ids.shape[-1] < 2:
            return None
        if cache is not None and (cache.is_compileable or cache.get_seq_length() != 0):
            return None
        return find_packed_sequence_indices(position_ids.expand(batch, -1))

    def prefetch_engram_rows(self, input_ids, boundaries, cache) -> dict[int, EngramRead] | None:
        """For every Engram layer whose table is off the device: its n-gram context (the cache's window updated
        now rather than in the layer) and its rows, fetched on a background thread while the layers before it run.
        Engram's rows depend on the token ids only, so they are known here; None when every table is on the
        device."""
        layers = [layer for layer in self.layers if layer.engram is not None and layer.engram.table_reads_by_fetch]
        if not layers:
            return None
        # A sharded table's rows come from their owners through collectives, which run here, layer by layer, in the
        # same order on every process.
        return {
            layer.layer_idx: layer.engram.prepare_read(
                input_ids, boundaries, self.engram_canonical_map, cache, background=not layer.engram.table.is_sharded
            )
            for layer in layers
        }

    def _check_inputs(self, input_ids, inputs_embeds, cache) -> None:
        """Clear errors for inputs that would otherwise fail deep inside a gather or kernel, or silently
        produce garbage. Values are read on the host (one sync) only for a prefill or an uncached forward; a
        decode step (one new token on a cache) checks its ids on the device, without waiting for it."""
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
        if input_ids is not None and input_ids.dtype.is_floating_point:
            raise ValueError(f"`input_ids` must be integer token ids, got dtype {input_ids.dtype}.")
        if self.config.mosaic_layers:
            check_read_implementation(self.config._attn_implementation)
        if (self.config.engram_layers or self.config.mosaic_layers) and cache is not None:
            self._check_cache_layout(cache)

        vocab = self.config.vocab_size
        decode_step = cache is not None and inputs.shape[1] == 1
        if decode_step or torch.compiler.is_compiling():
            if input_ids is not None:
                torch._assert_async(
                    ((input_ids >= 0) & (input_ids < vocab)).all(),
                    f"`input_ids` holds ids outside 0..{vocab - 1}; check the tokenizer matches the model.",
                )
        elif input_ids is not None:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"`input_ids` holds ids in [{low}, {high}] but the vocabulary has {vocab} tokens (valid ids: "
                    f"0..{vocab - 1}); check the tokenizer matches the model."
                )
        elif not torch.isfinite(inputs_embeds).all():
            raise ValueError("`inputs_embeds` contains NaN or Inf values.")

        past = cache.get_seq_length() if cache is not None else 0
        # A static cache counts on the device; its length is bounded by the cache anyway.
        if isinstance(past, int) and past + inputs.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"The sequence would reach {past + inputs.shape[1]} tokens ({past} cached + {inputs.shape[1]} new) "
                f"but max_position_embeddings is {self.config.max_position_embeddings}: shorten the input or "
                "lower max_new_tokens."
            )

    def _check_cache_layout(self, cache: Cache) -> None:
        """Engram keeps bounded windows in the cache's "hybrid" layers, and the associative memory its pairs in
        layers of its own kind, which a cache built without the model's config does not have."""
        layers = getattr(cache, "layers", [])
        if self.config.mosaic_layers and not all(
            layer_idx < len(layers) and isinstance(layers[layer_idx], MosaicPairsCacheMixin)
            for layer_idx in self.config.mosaic_layers
        ):
            raise ValueError(
                f"Associative-memory layers {self.config.mosaic_layers} keep their (key, value) pairs in the cache, so "
                f"the cache must be built from the model's config: `DynamicCache(config=model.config)` or "
                f"`StaticCache(config=model.config, max_cache_len=...)`; got a {type(cache).__name__} without them."
            )
        if not all(
            layer_idx < len(layers) and isinstance(layers[layer_idx], LinearAttentionCacheLayerMixin)
            for layer_idx in self.config.engram_layers
        ):
            raise ValueError(
                f"Engram layers {self.config.engram_layers} keep their n-gram and convolution windows in the cache, "
                f"so the cache must be built from the model's config: `DynamicCache(config=model.config)` or "
                f"`StaticCache(config=model.config, max_cache_len=...)`; got a {type(cache).__name__} without them."
            )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MemoryLlamaModelOutputWithPast:
        r"""
        Besides Llama's options, each memory's internals on request (see `MemoryLlamaModelOutputWithPast`):
        `output_router_logits` / `output_router_indices` (chapter layers' router logits / chosen chapters),
        `output_engram_gates`, `output_engram_row_ids` and `output_pkm_indices`. Nothing is recorded, and
        nothing extra computed, unless asked.
        """
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        self._check_inputs(input_ids, inputs_embeds, cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        batch, seq_len = inputs_embeds.shape[:2]
        documents = self.packed_documents(position_ids, batch, cache)
        if isinstance(attention_mask, dict):
            # Prepared by `generate` for a compilable cache, one mask per layer kind: the attention mask, and
            # the (B, S) padding mask of the layers' windows (None without padding).
            causal_mask, padding_mask = attention_mask["full_attention"], attention_mask.get("linear_attention")
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                and_mask_function=None if documents is None else packed_sequence_mask_function(documents),
            )
            padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if padding_mask is not None:
            token_mask = padding_mask[:, -seq_len:].bool()
        else:
            token_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=inputs_embeds.device)
        boundaries = self.engram_boundaries(input_ids, token_mask, documents) if self.config.engram_layers else None
        memory_inputs = MemoryLlamaLayerInputs(
            input_ids=input_ids,
            token_mask=token_mask,
            boundaries=boundaries,
            documents=documents,
            canonical_map=self.engram_canonical_map,
            chapter_bank=self.chapter_bank,
            pkm_values=self.pkm_values,
            # Read as the output recorder reads it: the keyword, else the config.
            output_engram_row_ids=bool(kwargs.get("output_engram_row_ids", getattr(self.config, "output_engram_row_ids", False))),
            engram_reads=self.prefetch_engram_rows(input_ids, boundaries, cache),
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                memory_inputs=memory_inputs,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MemoryLlamaModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class MemoryLlamaForCausalLM(MemoryLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # The backbone's parallel plans, as Llama declares them (the config carries the base model's). The memory
    # tables are not in them: they are sharded by row owner (`shard_memory_tables`).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__(config)
        self.model = MemoryLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MemoryLlamaCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside); -100 is ignored.
        output_router_logits (`bool`, *optional*, defaults to `config.output_router_logits`):
            Return each chapter layer's router logits and chosen chapters, and the router `aux_loss` (added to
            the loss when labels are given).

        `output_router_indices` (on with `output_router_logits`), `output_engram_gates`, `output_engram_row_ids` and
        `output_pkm_indices` go to the model (see `MemoryLlamaModel.forward`) and come back in the output.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        # The router losses need the chapters each layer chose.
        output_router_indices = bool(kwargs.pop("output_router_indices", False)) or output_router_logits
        outputs: MemoryLlamaModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_router_indices=output_router_indices,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        aux_loss = None
        if output_router_logits and outputs.router_logits:
            seq_len = hidden_states.shape[1]
            token_mask = None
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
                token_mask = attention_mask[:, -seq_len:].bool().reshape(-1)
            balance, z_loss = router_losses(outputs.router_logits, outputs.router_indices, token_mask)
            aux_loss = self.config.router_aux_loss_coef * balance + self.config.router_z_loss_coef * z_loss
            if loss is not None:
                loss = loss + aux_loss.to(loss.device)

        return MemoryLlamaCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            router_indices=outputs.router_indices,
            engram_gates=outputs.engram_gates,
            engram_row_ids=outputs.engram_row_ids,
            pkm_indices=outputs.pkm_indices,
        )


__all__ = [
    "MemoryLlamaCausalLMOutputWithPast",
    "MemoryLlamaDecoderLayer",
    "MemoryLlamaForCausalLM",
    "MemoryLlamaModel",
    "MemoryLlamaModelOutputWithPast",
    "MemoryLlamaPreTrainedModel",
]

"""Configuration of MemoryLlama: a Llama whose decoder layers carry chapter memory, Engram, product-key
memory and associative memory.

Memory settings are flat, prefixed fields (the Mixtral / Qwen-MoE convention). With `chapter_layers`,
`engram_layers`, `pkm_layers` and `mosaic_layers` empty the model is exactly a Llama.
"""

import dataclasses
import difflib

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    _check(_is_int(value) and value >= 1, f"`{name}` must be an integer >= 1, got {value!r}.")


def _check_int_list(name: str, values, minimum: int, maximum: int | None = None) -> None:
    upper = f" and <= {maximum}" if maximum is not None else ""
    _check(
        isinstance(values, (list, tuple)) and all(_is_int(v) for v in values),
        f"`{name}` must be a list of integers, got {values!r}.",
    )
    for value in values:
        _check(
            value >= minimum and (maximum is None or value <= maximum),
            f"`{name}` entry {value} is out of range: entries must be >= {minimum}{upper}.",
        )
    duplicates = sorted({v for v in values if list(values).count(v) > 1})
    _check(not duplicates, f"`{name}` lists {duplicates} more than once; each entry must be unique.")


# The prefixes of the memory kinds' fields. A keyword argument
# with one of them that is no field is a misspelling: refused (`validate_memory_field_names`), since
# PretrainedConfig would keep it as an attribute and build the model without that setting.
MEMORY_FIELD_PREFIXES = ("chapter_", "engram_", "pkm_", "router_", "mosaic_")
# The fields listing each memory kind's layers.
MEMORY_LAYER_FIELDS = ("engram_layers", "chapter_layers", "pkm_layers", "mosaic_layers")
# Where an associative memory sits in its layer (see `mosaic_placement`).
MOSAIC_PLACEMENTS = ("replace", "parallel")


@strict
class MemoryLlamaConfig(LlamaConfig):
    r"""
    A [`LlamaConfig`] plus the settings of the four memory kinds.

    Chapter memory (read by cross-attention after self-attention, at `chapter_layers`):
        chapter_layers (`list[int]`): decoder layers that read the chapter bank; empty for none.
        chapter_num_chapters (`int`): chapters in the bank, shared ones included.
        chapter_size (`int`): memory tokens per chapter.
        chapter_top_k (`int`): routed chapters each token reads.
        chapter_num_shared (`int`): chapters every token reads (the first ones of the bank).
        chapter_num_heads (`int`): heads of the memory cross-attention; must divide `hidden_size`.
        chapter_share_bank (`bool`): one bank for all chapter layers (each layer keeps its own projections).
        router_aux_loss_coef (`float`): weight of the load-balancing loss in `aux_loss`.
        router_z_loss_coef (`float`): weight of the router z-loss in `aux_loss`.
        output_router_logits (`bool`): return the router logits and chosen chapters, and compute `aux_loss`
            (added to `loss` when labels are given), as Mixtral does. Off by default so that inference and
            `generate` skip the losses; `MemoryTrainer` asks for them while training.

    Engram (hashed n-gram lookup added before attention, at `engram_layers`):
        engram_layers (`list[int]`): decoder layers with an Engram; empty for none.
        engram_ngram_orders (`list[int]`): n-gram orders, each >= 2.
        engram_heads_per_order (`int`): hash heads (tables) per order.
        engram_table_size (`int`): rows per table before rounding up to a distinct prime.
        engram_dim (`int`): width of the concatenated head embeddings.
        engram_conv_kernel (`int`): kernel of the short causal depthwise convolution.
        engram_conv_dilation (`int`, *optional*): its dilation; defaults to the largest order.
        engram_seed (`int`): seed of the hash multipliers.

    Product-key memory (read in parallel with the MLP, on its normed input, at `pkm_layers`):
        pkm_layers (`list[int]`): decoder layers with a product-key memory; empty for none.
        pkm_num_keys (`int`): sub-keys per half; the memory has pkm_num_keys**2 value slots.
        pkm_top_k (`int`): slots each head reads, in [1, pkm_num_keys].
        pkm_heads (`int`): query heads; their reads are summed.
        pkm_key_dim (`int`): query width per head, even (each half scores against one sub-key set).
        pkm_value_dim (`int`, *optional*): width of a value row; defaults to `hidden_size`.
        pkm_query_norm (`bool`): RMSNorm on each head's query.
        pkm_share_values (`bool`): one values table for all product-key layers (each keeps its keys and
            query), as in Memory+.

    Associative memory (Memory Mosaics v2, at `mosaic_layers`):
        mosaic_layers (`list[int]`): decoder layers with an associative memory; empty for none.
        mosaic_placement (`str`): "replace": the layer's self-attention becomes short- and long-term associative
            memory (a model whose every layer does so is a Memory Mosaics v2 model, trained from scratch);
            "parallel": a long-term associative memory beside the self-attention, on the same normed input, its
            output projection zero at birth (a graft computes what the base computed).
        mosaic_num_heads (`int`, *optional*): heads of each memory (short- and long-term alike); defaults to half
            of `num_attention_heads` (at least 1).
        mosaic_head_dim (`int`, *optional*): width of a head's keys and values; defaults to the attention's
            `head_dim`.
        mosaic_short_window (`int`): h: the short-term memory of token t reads the pairs t-h+1 .. t-1.
        mosaic_min_delay (`int`), mosaic_max_delay (`int`): m: the long-term memory of token t reads the pairs
            1 .. t-m; m is drawn uniformly in [min, max] per training sequence and is `mosaic_min_delay` at
            inference.
    """

    model_type = "memory_llama"
    # Outputs that Trainer's evaluation must not gather as logits: the cache and the recorded memory internals.
    keys_to_ignore_at_inference = [
        "cache", "router_logits", "router_indices", "aux_loss", "hidden_states", "engram_gates", "engram_row_ids",
        "pkm_indices",
    ]

    chapter_layers: list[int] | None = None
    chapter_num_chapters: int = 64
    chapter_size: int = 32
    chapter_top_k: int = 2
    chapter_num_shared: int = 1
    chapter_num_heads: int = 4
    chapter_share_bank: bool = True
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    output_router_logits: bool = False

    engram_layers: list[int] | None = None
    engram_ngram_orders: list[int] | None = None
    engram_heads_per_order: int = 8
    engram_table_size: int = 65536
    engram_dim: int = 512
    engram_conv_kernel: int = 4
    engram_conv_dilation: int | None = None
    engram_seed: int = 0

    pkm_layers: list[int] | None = None
    pkm_num_keys: int = 256
    pkm_top_k: int = 32
    pkm_heads: int = 4
    pkm_key_dim: int = 256
    pkm_value_dim: int | None = None
    pkm_query_norm: bool = True
    pkm_share_values: bool = True

    mosaic_layers: list[int] | None = None
    mosaic_placement: str = "replace"
    mosaic_num_heads: int | None = None
    mosaic_head_dim: int | None = None
    mosaic_short_window: int = 256
    mosaic_min_delay: int = 64
    mosaic_max_delay: int = 256

    def __post_init__(self, **kwargs):
        # Training settings that older checkpoints stored here; they are MemoryTrainingArguments fields now.
        for legacy in ("engram_lr_multiplier", "chapter_bank_lr_multiplier"):
            kwargs.pop(legacy, None)
        self.chapter_layers = list(self.chapter_layers) if self.chapter_layers is not None else []
        self.engram_layers = list(self.engram_layers) if self.engram_layers is not None else []
        self.pkm_layers = list(self.pkm_layers) if self.pkm_layers is not None else []
        self.mosaic_layers = list(self.mosaic_layers) if self.mosaic_layers is not None else []
        orders = self.engram_ngram_orders
        self.engram_ngram_orders = list(orders) if orders is not None else [2, 3]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Cross-field checks; the settings of a memory kind are checked only when that kind is on (as
        transformers does for Qwen4-Exp's n-gram fields), so that a model without it loads whatever they say."""
        super().validate_architecture()
        n_layers = self.num_hidden_layers
        _check_int_list("chapter_layers", self.chapter_layers, 0, n_layers - 1)
        _check_int_list("engram_layers", self.engram_layers, 0, n_layers - 1)
        _check_int_list("pkm_layers", self.pkm_layers, 0, n_layers - 1)
        _check_int_list("mosaic_layers", self.mosaic_layers, 0, n_layers - 1)
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            _check(value >= 0, f"`{name}` must be >= 0, got {value!r}.")
        if self.chapter_layers:
            self._validate_chapter_memory()
        if self.engram_layers:
            self._validate_engram()
        if self.pkm_layers:
            self._validate_product_keys()
        if self.mosaic_layers:
            self._validate_associative_memory()

    def _validate_chapter_memory(self):
        for name in ("chapter_num_chapters", "chapter_size", "chapter_top_k", "chapter_num_heads"):
            _check_positive_int(name, getattr(self, name))
        _check(
            _is_int(self.chapter_num_shared) and self.chapter_num_shared >= 0,
            f"`chapter_num_shared` must be an integer >= 0, got {self.chapter_num_shared!r}.",
        )
        routed = self.chapter_num_chapters - self.chapter_num_shared
        _check(
            routed >= 1,
            f"`chapter_num_chapters` ({self.chapter_num_chapters}) must exceed `chapter_num_shared` "
            f"({self.chapter_num_shared}) so that at least one chapter is routed.",
        )
        _check(
            self.chapter_top_k <= routed,
            f"`chapter_top_k` ({self.chapter_top_k}) must be between 1 and the number of routed chapters "
            f"(chapter_num_chapters - chapter_num_shared = {routed}).",
        )
        _check(
            self.hidden_size % self.chapter_num_heads == 0,
            f"`chapter_num_heads` ({self.chapter_num_heads}) must divide `hidden_size` ({self.hidden_size}).",
        )

    def _validate_engram(self):
        _check_int_list("engram_ngram_orders", self.engram_ngram_orders, 2)
        _check(len(self.engram_ngram_orders) > 0, "`engram_ngram_orders` must name at least one order (>= 2).")
        for name in ("engram_heads_per_order", "engram_table_size", "engram_dim", "engram_conv_kernel"):
            _check_positive_int(name, getattr(self, name))
        heads = len(self.engram_ngram_orders) * self.engram_heads_per_order
        _check(
            self.engram_dim % heads == 0,
            f"`engram_dim` ({self.engram_dim}) must be divisible by the number of Engram heads "
            f"(len(engram_ngram_orders) * engram_heads_per_order = {heads}).",
        )
        if self.engram_conv_dilation is not None:
            _check(
                _is_int(self.engram_conv_dilation) and self.engram_conv_dilation >= 1,
                f"`engram_conv_dilation` must be an integer >= 1 or None, got {self.engram_conv_dilation!r}.",
            )

    def _validate_product_keys(self):
        for name in ("pkm_num_keys", "pkm_top_k", "pkm_heads", "pkm_key_dim"):
            _check_positive_int(name, getattr(self, name))
        _check(
            self.pkm_top_k <= self.pkm_num_keys,
            f"`pkm_top_k` ({self.pkm_top_k}) must be between 1 and `pkm_num_keys` ({self.pkm_num_keys}): each "
            "half of a query picks its top-k among pkm_num_keys sub-keys.",
        )
        _check(
            self.pkm_key_dim % 2 == 0,
            f"`pkm_key_dim` ({self.pkm_key_dim}) must be even: each half of a query scores against one sub-key set.",
        )
        if self.pkm_value_dim is not None:
            _check_positive_int("pkm_value_dim", self.pkm_value_dim)
        for name in ("pkm_query_norm", "pkm_share_values"):
            _check(isinstance(getattr(self, name), bool), f"`{name}` must be a bool, got {getattr(self, name)!r}.")

    def _validate_associative_memory(self):
        _check(
            self.mosaic_placement in MOSAIC_PLACEMENTS,
            f"`mosaic_placement` must be one of {', '.join(map(repr, MOSAIC_PLACEMENTS))}, got {self.mosaic_placement!r}.",
        )
        for name in ("mosaic_num_heads", "mosaic_head_dim"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        for name in ("mosaic_short_window", "mosaic_min_delay", "mosaic_max_delay"):
            _check_positive_int(name, getattr(self, name))
        _check(
            self.mosaic_short_window >= 2,
            f"`mosaic_short_window` ({self.mosaic_short_window}) must be >= 2: token t reads the pairs t-h+1 .. t-1.",
        )
        _check(
            self.mosaic_min_delay <= self.mosaic_max_delay,
            f"`mosaic_min_delay` ({self.mosaic_min_delay}) must not exceed `mosaic_max_delay` ({self.mosaic_max_delay}).",
        )
        context = self.max_position_embeddings
        # The short-term memory exists only with "replace".
        limited = ("mosaic_short_window", "mosaic_max_delay") if self.mosaic_placement == "replace" else ("mosaic_max_delay",)
        for name in limited:
            _check(
                getattr(self, name) < context,
                f"`{name}` ({getattr(self, name)}) must be shorter than the context (max_position_embeddings = "
                f"{context}): the memory would never read a pair. Lower it or raise max_position_embeddings.",
            )

    def validate_layer_type(self):
        """transformers checks `layer_types` against the attention kinds it knows. Here it is derived from the memory
        fields (see the property) and also names the associative memory's cache layer kinds, registered with
        transformers' caches by `associative_memory.py`: there is nothing a user could set wrong."""

    def validate_memory_field_names(self):
        """Refuse an attribute with a memory prefix that is no field (`engram_layer=[1]` for `engram_layers`),
        naming the closest field. Fields that older checkpoints carried are dropped in `__post_init__` first."""
        fields = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(name for name in vars(self) if name.startswith(MEMORY_FIELD_PREFIXES) and name not in fields)
        if unknown:
            memory_fields = sorted(name for name in fields if name.startswith(MEMORY_FIELD_PREFIXES))
            closest = difflib.get_close_matches(unknown[0], memory_fields, n=1)
            hint = f"did you mean `{closest[0]}`?" if closest else f"the memory fields are {', '.join(memory_fields)}."
            raise ValueError(f"MemoryLlamaConfig has no field `{unknown[0]}`; {hint}")

    # Derived quantities, kept as properties so they never disagree with the fields.
    @property
    def layer_types(self) -> list[str]:
        """Cache layout read by transformers' caches: an Engram layer keeps, besides its key/value states, two
        bounded windows ("hybrid" layers, as hybrid attention/convolution models do): its last max_order - 1
        token ids and its convolution's last (kernel - 1) * dilation inputs. An associative-memory layer keeps its
        pairs in a cache layer kind of its own ("associative_memory", "hybrid_associative_memory" with Engram;
        see `associative_memory.py`)."""
        types = []
        for i in range(self.num_hidden_layers):
            kind = "hybrid" if i in self.engram_layers else "full_attention"
            if i in self.mosaic_layers:
                kind = "hybrid_associative_memory" if kind == "hybrid" else "associative_memory"
            types.append(kind)
        return types

    @property
    def number_of_conv_states(self) -> int:
        """Windows an Engram layer keeps in the cache: token context (0) and convolution inputs (1)."""
        return 2

    @property
    def has_memory(self) -> bool:
        """Whether any layer carries memory (otherwise the model is exactly a Llama)."""
        return any(getattr(self, name) for name in MEMORY_LAYER_FIELDS)

    @property
    def chapter_num_routed(self) -> int:
        return self.chapter_num_chapters - self.chapter_num_shared

    @property
    def engram_max_order(self) -> int:
        return max(self.engram_ngram_orders)

    @property
    def engram_num_heads(self) -> int:
        return len(self.engram_ngram_orders) * self.engram_heads_per_order

    @property
    def engram_head_dim(self) -> int:
        return self.engram_dim // self.engram_num_heads

    @property
    def pkm_num_slots(self) -> int:
        return self.pkm_num_keys**2

    @property
    def pkm_effective_value_dim(self) -> int:
        return self.pkm_value_dim if self.pkm_value_dim is not None else self.hidden_size

    @property
    def mosaic_effective_num_heads(self) -> int:
        return self.mosaic_num_heads if self.mosaic_num_heads is not None else max(1, self.num_attention_heads // 2)

    @property
    def mosaic_effective_head_dim(self) -> int:
        if self.mosaic_head_dim is not None:
            return self.mosaic_head_dim
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def engram_effective_dilation(self) -> int:
        return self.engram_conv_dilation if self.engram_conv_dilation is not None else self.engram_max_order


__all__ = ["MemoryLlamaConfig"]

"""Which parameters and buffers of a model are memory, decided by the type of the module that owns them.

The one classifier used by every tool that needs to know: the trainer's optimizer groups, the PEFT
training modes, parameter counts, graft checks and the benchmarks. Names come out as the model (or the
wrapper around it: PEFT, DDP) names them, so they match `named_parameters()` and `state_dict()` keys.
"""

from torch import nn

from modeling_memory.memory_llama.associative_memory import MemoryLlamaAssociativeMemory
from modeling_memory.memory_llama.chapter_memory import MemoryLlamaChapterBank, MemoryLlamaChapterMemory
from modeling_memory.memory_llama.engram import MemoryLlamaEngram
from modeling_memory.memory_llama.modeling_memory_llama import MemoryLlamaDecoderLayer, MemoryLlamaModel
from modeling_memory.memory_llama.product_key_memory import MemoryLlamaProductKeyMemory, MemoryLlamaProductKeyValues

# Kinds of memory tensors. Tables are read a few rows at a time (their own learning rate, no weight decay).
ENGRAM_TABLE = "engram_table"
CHAPTER_BANK = "chapter_bank"
ENGRAM = "engram"  # the rest of an Engram: key/value projections, norms, convolution, hash buffers
CHAPTER_MEMORY = "chapter_memory"  # the rest of a chapter memory: router, projections, norms
PKM_VALUES = "pkm_values"
PRODUCT_KEY_MEMORY = "product_key_memory"  # the rest of a product-key memory: query, sub-keys, gate, output
ASSOCIATIVE_MEMORY = "associative_memory"  # featurisers, bandwidths and output of an associative memory
MEMORY_KINDS = (ENGRAM_TABLE, CHAPTER_BANK, PKM_VALUES, ENGRAM, CHAPTER_MEMORY, PRODUCT_KEY_MEMORY, ASSOCIATIVE_MEMORY)
TABLE_KINDS = (ENGRAM_TABLE, CHAPTER_BANK, PKM_VALUES)


def _owned_tensors(module: nn.Module, prefix: str):
    for name, tensor in list(module.named_parameters(prefix=prefix)) + list(module.named_buffers(prefix=prefix)):
        yield name, tensor


def memory_kinds(model: nn.Module) -> dict[str, str]:
    """Every memory parameter and buffer of `model`, name -> kind (one of MEMORY_KINDS).

    Adapter weights that PEFT puts inside a memory module count as that module's; callers that must tell
    them apart check for PEFT's own markers.
    """
    kinds: dict[str, str] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, MemoryLlamaEngram):
            for name, _ in _owned_tensors(module, prefix):
                kinds[name] = ENGRAM
            for name, _ in _owned_tensors(module.table, f"{dot}table"):
                kinds[name] = ENGRAM_TABLE
        elif isinstance(module, MemoryLlamaChapterBank):
            for name, _ in _owned_tensors(module, prefix):
                kinds[name] = CHAPTER_BANK
        elif isinstance(module, MemoryLlamaChapterMemory):
            for name, _ in _owned_tensors(module, prefix):
                kinds.setdefault(name, CHAPTER_MEMORY)  # a per-layer bank inside is set to CHAPTER_BANK when visited
        elif isinstance(module, MemoryLlamaProductKeyValues):
            for name, _ in _owned_tensors(module, prefix):
                kinds[name] = PKM_VALUES
        elif isinstance(module, MemoryLlamaProductKeyMemory):
            for name, _ in _owned_tensors(module, prefix):
                kinds.setdefault(name, PRODUCT_KEY_MEMORY)  # its own values table is set to PKM_VALUES when visited
        elif isinstance(module, MemoryLlamaAssociativeMemory):
            for name, _ in _owned_tensors(module, prefix):
                kinds[name] = ASSOCIATIVE_MEMORY
        elif isinstance(module, MemoryLlamaDecoderLayer) and module.memory_layernorm is not None:
            for name, _ in _owned_tensors(module.memory_layernorm, f"{dot}memory_layernorm"):
                kinds[name] = CHAPTER_MEMORY
        elif isinstance(module, MemoryLlamaModel) and module.engram_canonical_map is not None:
            kinds[f"{dot}engram_canonical_map"] = ENGRAM
    return kinds


def memory_parameters(model: nn.Module, kinds=MEMORY_KINDS) -> list[nn.Parameter]:
    """The distinct memory parameters of `model` whose kind is in `kinds` (shared tensors listed once)."""
    wanted = {name for name, kind in memory_kinds(model).items() if kind in kinds}
    seen, params = set(), []
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in wanted and id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


__all__ = [
    "ASSOCIATIVE_MEMORY",
    "CHAPTER_BANK",
    "CHAPTER_MEMORY",
    "ENGRAM",
    "ENGRAM_TABLE",
    "MEMORY_KINDS",
    "PKM_VALUES",
    "PRODUCT_KEY_MEMORY",
    "TABLE_KINDS",
    "memory_kinds",
    "memory_parameters",
]

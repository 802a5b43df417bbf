"""MemoryLlama: Llama with learnt memory (chapter memory, Engram, product-key memory) for Hugging Face Transformers.

Importing the package registers `memory_llama` with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .memory_llama import (
    MEMORY_PLACEMENTS,
    MemoryLlamaConfig,
    MemoryLlamaForCausalLM,
    MemoryLlamaModel,
    MemoryLlamaPreTrainedModel,
    deferred_memory_tables,
)

AutoConfig.register("memory_llama", MemoryLlamaConfig)
AutoModel.register(MemoryLlamaConfig, MemoryLlamaModel)
AutoModelForCausalLM.register(MemoryLlamaConfig, MemoryLlamaForCausalLM)

__version__ = "0.1.0"

# Tooling loads on first use, so that importing the model does not import Trainer, PEFT or the Hub tools.
_LAZY_EXPORTS = {
    "from_llama": "tools.graft",
    "push_to_hub": "tools.export",
    "MemoryTrainer": "training.trainer",
    "MemoryTrainingArguments": "training.trainer",
    "RowWiseAdagrad": "training.table_optimizers",
    "LazyAdam": "training.table_optimizers",
    "set_sparse_table_gradients": "training.trainer",
    "KnowledgeSet": "data.knowledge",
    "prepare_model_for_mode": "training.peft_modes",
    "recommended_lora_config": "training.peft_modes",
    "save_adapter_with_memory": "training.peft_modes",
    "load_adapter_with_memory": "training.peft_modes",
}


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY_EXPORTS,
    "MEMORY_PLACEMENTS",
    "MemoryLlamaConfig",
    "MemoryLlamaForCausalLM",
    "MemoryLlamaModel",
    "MemoryLlamaPreTrainedModel",
    "deferred_memory_tables",
]

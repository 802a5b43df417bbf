"""The run-time model: configuration, modeling, one file per memory kind, its ops (naive reference, PyTorch
path, Triton kernels) and the kernel utilities. Flat and importing only torch, transformers and (guarded)
triton, because this folder is exactly what a Hub export ships as remote code."""

from .configuration_memory_llama import MemoryLlamaConfig
from .modeling_memory_llama import MemoryLlamaForCausalLM, MemoryLlamaModel, MemoryLlamaPreTrainedModel
from .table_placement import MEMORY_PLACEMENTS, deferred_memory_tables

__all__ = [
    "MEMORY_PLACEMENTS",
    "MemoryLlamaConfig",
    "MemoryLlamaForCausalLM",
    "MemoryLlamaModel",
    "MemoryLlamaPreTrainedModel",
    "deferred_memory_tables",
]

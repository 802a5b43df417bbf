"""MemoryLlama: Llama with learnt memory (chapter memory and Engram) for Hugging Face Transformers.

Importing the package registers `memory_llama` with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_memory_llama import MemoryLlamaCache
from .configuration_memory_llama import MemoryLlamaConfig
from .modeling_memory_llama import MemoryLlamaForCausalLM, MemoryLlamaModel, MemoryLlamaPreTrainedModel

AutoConfig.register("memory_llama", MemoryLlamaConfig)
AutoModel.register(MemoryLlamaConfig, MemoryLlamaModel)
AutoModelForCausalLM.register(MemoryLlamaConfig, MemoryLlamaForCausalLM)

__version__ = "0.1.0"

__all__ = [
    "MemoryLlamaCache",
    "MemoryLlamaConfig",
    "MemoryLlamaForCausalLM",
    "MemoryLlamaModel",
    "MemoryLlamaPreTrainedModel",
]

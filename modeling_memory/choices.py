"""The named choices of the library's entry points: training modes, graft presets, table placements, the default
shard size.

The library reads them from here (`training.peft_modes`, `tools.graft`, `tools.safe_write`), and so does the
command line's parser, which lists them in `--help` and refuses anything else at once. Importing this module
the ordinary way runs `modeling_memory/__init__.py` first, which imports torch and transformers (about 5 s);
the parser instead executes this file on its own (`memory_llama_cli.parser.library_choices`). So this file
imports nothing and holds nothing but constants.
"""

# `prepare_model_for_mode(model, mode)` / `memory-llama train --mode`.
TRAINING_MODES = ("full", "memory_only", "lora", "lora_all", "sparse_memory")

# `memory_preset(config, preset)` / `memory-llama graft --preset`, `memory-llama train --graft`.
GRAFT_PRESETS = ("engram", "chapters", "both", "pkm", "all", "mosaic")

# Where memory tables live: `model.set_memory_placement(placement)` / `--memory-placement`. The run-time module
# `memory_llama/table_placement.py` holds the same tuple (a Hub export ships it without this file).
MEMORY_PLACEMENTS = ("device", "host", "disk")

# Largest safetensors shard the tools write (save_pretrained's max_shard_size).
DEFAULT_MAX_SHARD_SIZE = "5GB"

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "GRAFT_PRESETS", "MEMORY_PLACEMENTS", "TRAINING_MODES"]

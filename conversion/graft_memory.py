"""Graft memory onto a Llama-family checkpoint: the same as `memory-llama graft BASE OUT` (see `--help`).

    python conversion/graft_memory.py HuggingFaceTB/SmolLM2-135M smollm2-memory --preset both
"""

import sys

from memory_llama_cli import main

if __name__ == "__main__":
    sys.exit(main(["graft", *sys.argv[1:]]))

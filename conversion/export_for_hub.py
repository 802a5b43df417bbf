"""Write a Hub-ready copy of a MemoryLlama checkpoint, or upload one: the same as `memory-llama export` and
`memory-llama push` (see their `--help`).

    python conversion/export_for_hub.py CHECKPOINT OUT          # memory-llama export CHECKPOINT OUT
    python conversion/export_for_hub.py push CHECKPOINT REPO_ID  # memory-llama push CHECKPOINT REPO_ID
"""

import sys

from memory_llama_cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    command = ["push", *arguments[1:]] if arguments[:1] == ["push"] else ["export", *arguments]
    sys.exit(main(command))

"""`python -m memory_llama_cli ...`: the same entry point as the `memory-llama` script (what
`accelerate launch -m memory_llama_cli train ...` runs on every process)."""

import sys

from memory_llama_cli import main

sys.exit(main())

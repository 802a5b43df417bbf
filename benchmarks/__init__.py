"""Benchmarks: scripts that time ours against a baseline side by side in one run, print the ratios and write
their section of benchmarks/RESULTS.md (with the command and the machine). They never assert on time.

Run from the repository root as modules, e.g. `python -m benchmarks.throughput --help`.

- `harness`: what every benchmark uses: interleaved timings and their medians, the machine, the command line,
  the RESULTS.md writer;
- `from_scratch`: what the two benchmarks that train small models from scratch (`iso_flop`, `forgetting`) share;
- one module per benchmark: `bench_kernels`, `engram_lookup`, `forgetting`, `iso_flop`, `limits`,
  `table_optimizer_memory`, `table_optimizer_quality`, `throughput`.
"""

import os

# Offline by default (SmolLM2 and the natural text are local); set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

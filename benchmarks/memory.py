"""Peak training memory of every VRAM preset, and of the ys-71m configuration with and without the memory savers.

For each preset: build its model (random weights, its vocabulary), run a few optimizer steps on random tokens with the
preset's micro-batch, training length, precision, activation checkpointing and chunked cross-entropy, and record
torch.cuda.max_memory_reserved / max_memory_allocated and tokens per second. A preset passes when its peak reserved
memory is at most 90% of its budget. (Gradient accumulation does not change the peak: one micro-batch is in flight at
a time; so each step here is one micro-batch.)

    python benchmarks/memory.py                   # CUDA: every GPU preset + ys-71m, ~5 min on an H100
    python benchmarks/memory.py --device cpu --quick   # a smoke test of the script itself

Prints a markdown table and writes benchmarks/results/memory_<device>.json. The code is `snakes_lib.bench`
(notebook 11_bench), so `snakes bench memory` runs the same from an installed package.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # as `snakes train` does

from snakes_lib.bench import memory_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(memory_main(results_dir=Path(__file__).resolve().parent / "results"))

"""Why did it have to be snakes? A notebook-first course that builds a Mamba-2 language model from scratch, and the library it produces.

Modules:

- `snakes_lib.cli`: The `snakes` command line (also `python -m snakes_lib`): train, generate, data generate, bench, demo.
- `snakes_lib.ssd_triton`: Mamba-2's SSD as our own Triton GPU kernels, forward and backward, behind one PyTorch op: why the PyTorch version is slow on a GPU (memory traffic, launches), and kernels that compute the same numbers without it."""

__version__ = "0.1.0"

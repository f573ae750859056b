"""Why did it have to be snakes? A notebook-first course that builds a Mamba-2 language model from scratch, and the library it produces.

Modules:

- `snakes_lib.cli`: The `snakes` command line (also `python -m snakes_lib`): train, generate, data generate, bench, demo.
- `snakes_lib.distributed`: What changes when one model trains on several GPUs: every rank computes gradients on its own slice of the batch and they are averaged (DDP), or the weights, gradients and optimizer state are split across ranks (FSDP). The pieces, built on `torch.distributed`, proven equal to one process on the CPU with two processes.
- `snakes_lib.fused_block`: Chapter 09 made the SSD fast; the rest of the Mamba-2 block then costs more than the SSD. Two small Triton kernels (the causal depthwise convolution with its SiLU, and the gated RMSNorm), forward and backward, behind PyTorch ops that `torch.compile` keeps whole, and the model picks them on a GPU by itself.
- `snakes_lib.fused_step`: Inside a CUDA graph, a Mamba-2 decoding step still runs dozens of tiny kernels per layer, and each costs a few microseconds however little it does. Two Triton kernels take over the layer's convolution and its state update, the gated norm becomes chapter 10's kernel, and a layer's step shrinks to a handful of launches.
- `snakes_lib.graph_decode`: Generating one token runs hundreds of tiny GPU kernels, and the GPU spends most of the step waiting for Python to launch them. A CUDA graph records the whole step once and replays it with one launch. Mamba-2's fixed-size state makes the step a perfect candidate.
- `snakes_lib.ssd_triton`: Mamba-2's SSD as our own Triton GPU kernels, forward and backward, behind one PyTorch op: why the PyTorch version is slow on a GPU (memory traffic, launches), and kernels that compute the same numbers without it."""

__version__ = "0.1.0"

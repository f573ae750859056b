"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def device_name(device: str) -> str:
    "A readable name for the JSON and the table: the GPU's name, or the CPU model with its logical core count."
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setup_device(parser, args) -> bool:
    """Apply the --device and --threads flags every benchmark has; returns True for CUDA.
    Stops with a parser error when CUDA is asked for but not available."""
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False (a CPU-only PyTorch build, or no GPU visible)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return cuda


def write_json_atomic(path, doc: dict) -> None:
    "Write `doc` as JSON to `path` atomically, with snakes' one atomic writer (no half-written file)."
    import json
    from snakes_lib.utils import atomic_write_text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def read_json(path) -> dict | None:
    "The JSON object stored at `path`, or None when there is none (or it does not parse)."
    import json
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None

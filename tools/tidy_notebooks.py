"""Drop per-run noise from executed notebooks so re-running a chapter gives a reviewable diff.

Keeps outputs and execution counts (nbval needs both) and the cell tags (papermill's `parameters`); removes cell
execution timestamps and other per-run cell metadata, and the profiler's start/stop trace lines ("USDT: ...") that
some PyTorch builds print to stderr. Usage: python tools/tidy_notebooks.py notebooks/*.ipynb"""
import sys

import nbformat

KEEP_CELL_KEYS = {"tags"}

for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        extra = set(cell.metadata) - KEEP_CELL_KEYS
        for key in extra:
            del cell.metadata[key]
        changed |= bool(extra)
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and "USDT:" in out.get("text", ""):
                text = "".join(line for line in out["text"].splitlines(keepends=True) if not line.startswith("USDT:"))
                changed = True
                if not text:
                    continue
                out["text"] = text
            outputs.append(out)
        if "outputs" in cell:
            cell.outputs = outputs
    if changed:
        nbformat.write(nb, path)
        print(f"tidied {path}")

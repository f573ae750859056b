"""The trainer eager and with each step recorded as a CUDA graph (chapter 10d), side by side from the same seed.

    python benchmarks/graph_train.py --device cuda                          # presets 24gb and 80gb, 30 steps each
    python benchmarks/graph_train.py --device cuda --presets auto --steps 50 --label "preset auto"

For each preset: snakes_lib.train.train on the bundled corpus, once eagerly and once with cuda_graph=True, same seed,
no evaluation. Tokens/s: the median of the trainer's own per-step figure (metrics.jsonl) over the second half of the
steps. Losses: the largest relative difference between the two runs' per-step training losses. A configuration
that fails (out of memory, a capture error) is a row with its error. Writes benchmarks/results/graph_train_cuda.json.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from snakes_lib.train import train  # noqa: E402
from _common import device_name, setup_device, write_json_atomic  # noqa: E402


def one_run(preset: str, cuda_graph: bool, steps: int, out: Path, extra: dict) -> dict:
    "Train `steps` steps; the per-step losses and the median tokens/s of the second half."
    res = train(preset=preset, out=str(out), max_steps=steps, eval_every=0, checkpoint_every=10**6, progress=False,
                cuda_graph=cuda_graph, **extra)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "train_loss" in r]
    tail = [r["tokens_per_s"] for r in recs[len(recs) // 2:]]
    return dict(losses=[r["train_loss"] for r in recs], tokens_per_s=statistics.median(tail), seconds=res.seconds,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def compare(preset: str, steps: int, tmp: Path, label: str, extra: dict) -> dict:
    row = dict(preset=preset, label=label, overrides=extra, steps=steps)
    try:
        for graphed in (False, True):
            torch.cuda.reset_peak_memory_stats()
            r = one_run(preset, graphed, steps, tmp / f"{preset}-{label}-{graphed}".replace(" ", "_"), extra)
            key = "graphed" if graphed else "eager"
            row.update({f"{key}_tokens_per_s": r["tokens_per_s"], f"{key}_losses": r["losses"],
                        f"{key}_peak_gib": r["peak_gib"]})
            gc.collect(); torch.cuda.empty_cache()
        row["speedup"] = row["graphed_tokens_per_s"] / row["eager_tokens_per_s"]
        row["max_rel_diff"] = max(abs(a - b) / abs(a) for a, b in zip(row["eager_losses"], row["graphed_losses"]))
    except Exception as e:                    # a configuration that cannot run is a result, with its reason
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--presets", nargs="+", default=["24gb", "80gb"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--label", default="the preset as it is")
    p.add_argument("--no-activation-checkpointing", action="store_true", help="also turn block checkpointing off")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/graph_train_cuda.json)")
    p.add_argument("--append", action="store_true", help="add the rows to an existing JSON")
    args = p.parse_args(argv)
    if not setup_device(p, args):
        p.error("this benchmark compares CUDA graphs with eager steps: it needs --device cuda")
    out = Path(args.out or ROOT / "benchmarks" / "results" / "graph_train_cuda.json")
    doc = json.loads(out.read_text()) if args.append and out.exists() else dict(
        benchmark="graph_train", device=device_name(args.device), torch=torch.__version__,
        date=datetime.date.today().isoformat(), steps=args.steps, rows=[])
    extra = {"activation_checkpointing": False} if args.no_activation_checkpointing else {}
    with tempfile.TemporaryDirectory(prefix="snakes-graph-train-") as tmp:
        for preset in args.presets:
            row = compare(preset, args.steps, Path(tmp), args.label, extra)
            doc["rows"].append(row)
            print(f"{preset:>5} {args.label:<30} " + (f"failed: {row['error']}" if "error" in row else
                  f"eager {row['eager_tokens_per_s']:>9,.0f} tok/s, graphed {row['graphed_tokens_per_s']:>9,.0f} "
                  f"(x{row['speedup']:.2f}); peak {row['eager_peak_gib']:.1f} / {row['graphed_peak_gib']:.1f} GiB; "
                  f"losses max rel diff {row['max_rel_diff']:.1e}"), flush=True)
    write_json_atomic(out, doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Mamba-2 vs a parameter-matched Transformer++ (chapters 08b and 08c): the five experiments of snakes_lib.compare
and snakes_lib.mqar in one command. Prints tables, writes benchmarks/results/compare_<device>[_quick].json (the
chapters plot it).

    python benchmarks/compare.py --quick          # CPU, tiny settings (a few minutes on 2 idle cores)
    python benchmarks/compare.py                  # CPU, larger settings (~6 min on 2 idle cores)
    python benchmarks/compare.py --device cuda    # one GPU, ~12 min on an H100; writes compare_cuda.json
    python benchmarks/compare.py --device cuda --only mqar   # chapter 08c's grid again; the file keeps the rest
    python benchmarks/compare.py --only lm --lm-seeds 0 1 2 --lm-lrs 1e-3 3e-3 1e-2 3e-2 1e-1 --lm-steps 200 \
        --threads 1 --out benchmarks/results/compare_lm_sweep_cpu.json   # chapter 08b's LM sweep: 30 runs, ~27 CPU-minutes

Experiments (--only picks some): lm (val loss vs tokens, a learning-rate sweep per model, each rate with one or more
seeds (--lm-seeds; on CUDA 3 seeds x 5 rates by default), snakes_lib.train),
train (step time and memory vs sequence length at fixed tokens per step), decode (time per token and cache bytes vs
context length, crossovers), mqar (associative recall accuracy vs width and state size), story (the Maia prompt,
continued by the best LM run of each model). With --only, an existing output file keeps its other experiments;
`provenance` records the device, torch and date of each experiment's run.

Timing: median of the timed steps after warm-up; torch.cuda.synchronize() around each on CUDA. Memory: CUDA
max_memory_allocated (GPU only) and the bytes of tensors autograd saves for backward (any device).
Not handled: multi-GPU, the official Triton/CUDA Mamba kernels (this compares pure-PyTorch SSD with PyTorch's
fused attention), torch.compile.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from snakes_lib import compare as C  # noqa: E402
from snakes_lib import mqar as M  # noqa: E402
from snakes_lib.utils import atomic_write_text  # noqa: E402
from snakes_lib.model import Mamba2Config  # noqa: E402
from _common import device_name, setup_device  # noqa: E402  (benchmarks/ is on sys.path)

EXPERIMENTS = ("lm", "train", "decode", "story", "mqar")
LM_SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)   # wide enough that neither model's best rate sits at an edge


def settings(device_type: str, quick: bool) -> dict:
    "Every size and length, per device and mode, in one place."
    if device_type == "cuda":
        return dict(
            lm=dict(model_size="tiny", lrs=LM_SWEEP_LRS, seeds=(0, 1, 2), max_steps=300, batch_size=32, seq_len=256,
                    eval_every=25, eval_batches=8),
            bench_model=dict(d_model=768, n_layer=24, d_state=128, headdim=64, vocab_size=32768, chunk_size=256),
            train=dict(seq_lens=(256, 512, 1024, 2048, 4096, 8192, 16384), tokens_per_step=16384, steps=3, warmup=2,
                       amp_dtype=torch.bfloat16),
            decode=dict(context_lens=(256, 1024, 4096, 8192, 16384, 32768), new_tokens=32, batch_size=8,
                        dtype=torch.bfloat16),
            mqar=dict(d_models=(64, 128), d_states=(8, 16, 32, 64, 128), lrs=(1e-3, 3e-3), seeds=(0, 1, 2), steps=1500, batch_size=64,
                      num_kv_pairs=8, seq_len=64, vocab_size=64),
        )
    if quick:
        return dict(
            lm=dict(model_size="tiny", lrs=(1e-3, 3e-3, 1e-2), max_steps=30, batch_size=8, seq_len=128, eval_every=10,
                    eval_batches=2),
            bench_model=dict(d_model=64, n_layer=2, d_state=32, headdim=32, vocab_size=2048, chunk_size=64),
            train=dict(seq_lens=(128, 512, 2048), tokens_per_step=4096, steps=2, warmup=1),
            decode=dict(context_lens=(128, 512, 2048), new_tokens=8),
            mqar=dict(d_models=(32,), d_states=(4, 32), lrs=(1e-3,), steps=60, batch_size=32, num_kv_pairs=4,
                      seq_len=32, vocab_size=32),
        )
    return dict(
        lm=dict(model_size="tiny", lrs=(1e-3, 3e-3, 1e-2), max_steps=100, batch_size=8, seq_len=128, eval_every=10,
                eval_batches=4),
        bench_model=dict(d_model=128, n_layer=4, d_state=64, headdim=32, vocab_size=2048, chunk_size=64),
        train=dict(seq_lens=(128, 256, 512, 1024, 2048, 4096), tokens_per_step=8192, steps=2, warmup=1),
        decode=dict(context_lens=(128, 512, 2048, 8192, 16384), new_tokens=16),
        mqar=dict(d_models=(32, 64), d_states=(4, 16, 64), lrs=(1e-3, 3e-3), steps=400, batch_size=32, num_kv_pairs=4,
                  seq_len=32, vocab_size=32),
    )


def combine_mqar_seeds(results: list) -> dict:
    """mqar_experiment results, one per seed, as one: a row per config whose 'accuracy' is the median over seeds,
    with 'accuracy_per_seed' {seed: accuracy} beside it (the other fields are the first seed's)."""
    rows = {}
    for res in results:
        for r in res["runs"]:
            rows.setdefault((r["model"], r["d_model"], r["d_state"]), []).append((res["settings"]["seed"], r))
    runs = []
    for per_seed in rows.values():
        row = dict(per_seed[0][1])
        row["accuracy_per_seed"] = {str(seed): r["accuracy"] for seed, r in per_seed}
        row["accuracy"] = statistics.median(row["accuracy_per_seed"].values())
        runs.append(row)
    settings = {k: v for k, v in results[0]["settings"].items() if k != "seed"}
    settings["seeds"] = sorted({res["settings"]["seed"] for res in results})
    return {"settings": settings, "runs": runs}


def keep_others(doc: dict, old: dict, todo, out: Path) -> None:
    """--only: carry the experiments this run does not redo over from the existing file `old` (with their settings,
    seconds and provenance; files from before provenance get the old file's device, torch and date)."""
    if old.get("device_type") != doc["device_type"]:
        raise SystemExit(f"{out} holds {old.get('device_type')} results; this run is {doc['device_type']}: "
                         "pass --out to write elsewhere")
    kept = [k for k in old.get("experiments", {}) if k not in todo]
    for k in kept:
        doc["experiments"][k] = old["experiments"][k]
        for key in ("settings", "seconds"):
            if k in old.get(key, {}):
                doc[key][k] = old[key][k]
        doc["provenance"][k] = old.get("provenance", {}).get(k) or {f: old.get(f) for f in ("device", "torch", "date")}
    if kept:
        print(f"keeping {', '.join(kept)} from {out} (--only {' '.join(todo)})")


def _mib(b):
    return "-" if b is None else f"{b / 2**20:9.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="tiny settings (CPU smoke run)")
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=None, help="run only these experiments")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--lm-seeds", type=int, nargs="+", default=None, metavar="S", help="lm: seeds per learning rate")
    p.add_argument("--lm-lrs", type=float, nargs="+", default=None, metavar="LR", help="lm: the learning rates swept")
    p.add_argument("--lm-steps", type=int, default=None, metavar="N", help="lm: training steps per run")
    p.add_argument("--mqar-d-models", type=int, nargs="+", default=None, metavar="D",
                   help="mqar: the widths swept (to split the grid over processes)")
    p.add_argument("--mqar-seeds", type=int, nargs="+", default=None, metavar="S",
                   help="mqar: seeds per config (on CUDA 0 1 2 by default); each row keeps the median and every seed's")
    p.add_argument("--runs-dir", type=Path, default=None, help="where the LM runs go (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/compare_<cpu|cuda>[_quick].json)")
    args = p.parse_args(argv)

    cuda = setup_device(p, args)
    S = settings("cuda" if cuda else "cpu", args.quick)
    for key, value in (("seeds", args.lm_seeds), ("lrs", args.lm_lrs), ("max_steps", args.lm_steps)):
        if value is not None:
            if (key == "max_steps" and value < 1) or (key != "max_steps" and len(set(value)) != len(value)):
                p.error(f"--lm-{key.replace('max_', '')}: {value!r} (need >= 1 step, and no value twice)")
            S["lm"][key] = tuple(value) if key != "max_steps" else value
    if args.mqar_d_models:
        S["mqar"]["d_models"] = tuple(args.mqar_d_models)
    if args.mqar_seeds:
        S["mqar"]["seeds"] = tuple(args.mqar_seeds)
    todo = args.only or EXPERIMENTS
    out = args.out or ROOT / "benchmarks" / "results" / f"compare_{'cuda' if cuda else 'cpu'}{'_quick' if args.quick else ''}.json"
    doc = dict(benchmark="compare", device=device_name(args.device), device_type="cuda" if cuda else "cpu",
               torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
               quick=args.quick, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               loadavg_before=os.getloadavg() if hasattr(os, "getloadavg") else None,
               settings=json.loads(json.dumps(S, default=str)), experiments={}, seconds={})
    print(f"Mamba-2 vs Transformer++ on {doc['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    doc["provenance"] = {k: {f: doc[f] for f in ("device", "torch", "date")} for k in todo}
    if args.only and out.exists():
        keep_others(doc, json.loads(out.read_text()), todo, out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        doc["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        atomic_write_text(out, json.dumps(doc, indent=1, default=str) + "\n")

    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="snakes-compare-"))
    bench_cfg = Mamba2Config(**S["bench_model"])
    pair = C.matched_pair(bench_cfg)
    configs = {"mamba2": bench_cfg, "transformer": C.matched_transformer_config(bench_cfg)}
    doc["bench_models"] = pair
    pm, pt = pair["parameters"]["mamba2"], pair["parameters"]["transformer"]
    print(f"benchmark models: Mamba-2 {pm['non_embedding']:,} / Transformer++ {pt['non_embedding']:,} non-embedding "
          f"parameters ({pair['non_embedding_mismatch']:+.1%}), embedding {pm['embedding']:,} each")

    if "lm" in todo:
        t0 = time.perf_counter()
        lm = C.lm_experiment(runs_dir / "lm", device=args.device, verbose=True, **S["lm"])
        doc["experiments"]["lm"] = lm
        doc["seconds"]["lm"] = time.perf_counter() - t0
        print("\nlanguage modelling: best validation loss per learning rate (mean ± std over seeds, min-max)")
        for r in lm["summary"]:
            print(f"  {r['model']:<12} lr {r['lr']:<7g} {r['mean']:.4f} ± {r['std']:.4f} ({r['min']:.4f}-{r['max']:.4f}, "
                  f"seeds {r['seeds']})")
        print("  best: " + ", ".join(f"{k} {v['best_val_loss']:.4f} (lr {v['lr']:g}{', at the edge of the sweep' * v['at_edge']})"
                                     for k, v in lm["best"].items()))
        save()
    if "train" in todo:
        t0 = time.perf_counter()
        rows = C.train_step_benchmark(configs, device=args.device, progress=False, **S["train"])
        doc["experiments"]["train"] = {"rows": rows}
        doc["seconds"]["train"] = time.perf_counter() - t0
        print(f"\ntraining step at {S['train']['tokens_per_step']} tokens per step: ms / activation MiB / peak MiB")
        for r in rows:
            print(f"  {r['model']:<12} L {r['seq_len']:>6} batch {r['batch_size']:>4}: " +
                  ("OOM" if r["oom"] else f"{r['ms_per_step']:9.1f} ms {_mib(r['activation_bytes'])} {_mib(r['peak_memory_bytes'])}"))
        save()
    if "decode" in todo:
        t0 = time.perf_counter()
        rows = C.decode_benchmark(configs, device=args.device, progress=False, **S["decode"])
        cross = C.crossovers(rows)
        r0 = C.state_size_report(d_model=bench_cfg.d_model, n_layer=bench_cfg.n_layer, d_state=bench_cfg.d_state,
                                 expand=bench_cfg.expand, transformer_n_layer=configs["transformer"].n_layer,
                                 state_bytes=4, kv_bytes=torch.tensor([], dtype=S["decode"].get("dtype", torch.float32)).element_size())
        doc["experiments"]["decode"] = {"rows": rows, "crossovers": cross,
                                        "analytic_crossover_context_len": r0["crossover_context_len"]}
        doc["seconds"]["decode"] = time.perf_counter() - t0
        print("\ndecoding: ms per token / cache MiB (measured, analytic)")
        for r in rows:
            print(f"  {r['model']:<12} context {r['context_len']:>6}: " +
                  ("OOM" if r["oom"] else f"{r['ms_per_token']:8.2f} ms {_mib(r['cache_bytes'])} {_mib(r['analytic_cache_bytes'])}"))
        print(f"  the Mamba-2 state is smaller than the KV cache from {r0['crossover_context_len']} tokens (analytic), "
              f"measured from {cross['smaller_cache_from']}; decoding faster from {cross['faster_decoding_from']}")
        save()
    if "story" in todo and "lm" in todo:                 # the LM runs of this invocation (their folders exist)
        t0 = time.perf_counter()
        best = {k: v["run_dir"] for k, v in doc["experiments"]["lm"]["best"].items()}
        doc["experiments"]["story"] = C.continue_story(best, device=args.device)
        doc["seconds"]["story"] = time.perf_counter() - t0
        for k, v in doc["experiments"]["story"].items():
            print(f"\n{k}: ...{C.MAIA_PROMPT}{v['text']}")
        save()
    if "mqar" in todo:
        t0 = time.perf_counter()
        kw = {k: v for k, v in S["mqar"].items() if k != "seeds"}
        mq = combine_mqar_seeds([M.mqar_experiment(device=args.device, progress=False, seed=seed, **kw)
                                 for seed in S["mqar"].get("seeds", (0,))])
        doc["experiments"]["mqar"] = mq
        doc["seconds"]["mqar"] = time.perf_counter() - t0
        print("\nMQAR accuracy (best lr)")
        for r in mq["runs"]:
            print(f"  {r['model']:<12} d_model {r['d_model']:>4} d_state {str(r['d_state']):>4} state {r['state_numbers']:>8,}: "
                  f"acc {r['accuracy']:.3f} (median; per seed " + ", ".join(f"{a:.3f}" for a in r['accuracy_per_seed'].values()) + ")")
        save()
    save()
    print(f"\nwrote {out}")
    return doc


if __name__ == "__main__":
    main()

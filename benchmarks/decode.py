"""Benchmark Mamba-2 inference against context length: prefill (the prompt in parallel) and step decoding (one
token at a time from the cache). Prints a table and the ratio that matters, writes
benchmarks/results/decode_<device>.json.

    python benchmarks/decode.py                  # CPU, contexts 128 ... 8192 (about a minute on 2 cores)
    python benchmarks/decode.py --quick          # contexts 128, 1024, 4096 and fewer decode steps
    python benchmarks/decode.py --device cuda --dtype bfloat16 --batch 8

For each context length L: prefill L random tokens into a fresh cache (time, tokens/s, peak memory), then time
--decode-tokens calls of model.step (after --warmup untimed ones): ms per token, tokens/s, the cache's size and the
peak memory of one step. Steps are timed round-robin over the contexts (best and median of --decode-tokens).
Re-running the whole prompt for every new token (what a model without a cache must do) costs
about one prefill per token; the "step speedup" column is prefill time / best step time.

The check: a step's time and memory must not grow with the context (the cache has a fixed size). The script prints
the ratio of the step time at the longest context to the one at the shortest (best and median; the median one is
checked), and with --strict exits 1 when it is above --max-ratio or the cache size changed.

Peak memory: on CUDA torch.cuda.max_memory_allocated() minus what was allocated before the call; on CPU
snakes_lib.ssd_cost.PeakTensorMemory (the total size of tensor storage allocated during the call).
Not handled: the official Triton kernels, CUDA graphs, multi-GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from snakes_lib.model import Mamba2Config, Mamba2LM  # noqa: E402
from _common import device_name, setup_device  # noqa: E402  (benchmarks/ is on sys.path)

try:
    from snakes_lib.ssd_cost import PeakTensorMemory  # noqa: E402
except ImportError:  # older chapter 03: no CPU memory counter
    PeakTensorMemory = None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device):
    "Run fn once; return (seconds, peak bytes allocated during the call or None)."
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - before
    if PeakTensorMemory is not None:
        with PeakTensorMemory() as pm:                      # memory in a separate, untimed run
            fn()
        peak = pm.peak
    else:
        peak = None
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="contexts 128 1024 4096, 16 decode tokens")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="default 128 512 2048 8192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=None, help="timed steps per context (default 64, 16 quick)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--max-ratio", type=float, default=1.5, help="largest acceptable step-time ratio (longest/shortest)")
    p.add_argument("--strict", action="store_true", help="exit 1 if the step-time ratio exceeds --max-ratio")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    setup_device(p, args)
    device = torch.device(args.device)
    contexts = args.contexts or ([128, 1024, 4096] if args.quick else [128, 512, 2048, 8192])
    n_decode = args.decode_tokens or (16 if args.quick else 64)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(args.seed)
    cfg = Mamba2Config(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab_size, d_state=args.d_state,
                       headdim=args.headdim, ngroups=args.ngroups, chunk_size=args.chunk_size)
    model = Mamba2LM(cfg).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(args.seed)
    print(f"Mamba2LM {model.num_parameters():,} parameters ({args.dtype}) on {device_name(args.device)}, "
          f"batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    with torch.inference_mode():
        rows = []
        # warm up both paths once (allocator, kernels) at a small size
        cache = model.allocate_inference_cache(args.batch)
        model(torch.randint(0, cfg.vocab_size, (args.batch, 64), generator=g).to(device), cache=cache)
        for _ in range(args.warmup):
            model.step(torch.zeros(args.batch, dtype=torch.long, device=device), cache)
        # 1. prefill each context into its own cache
        states = []
        for L in contexts:
            prompt = torch.randint(0, cfg.vocab_size, (args.batch, L), generator=g).to(device)
            cache = model.allocate_inference_cache(args.batch)
            if device.type == "cpu" and PeakTensorMemory is not None:
                with PeakTensorMemory() as pm:                     # memory in a separate, untimed run
                    model(prompt, cache=model.allocate_inference_cache(args.batch))
                prefill_peak = pm.peak
                t0 = time.perf_counter()
                logits = model(prompt, cache=cache)
                prefill_s = time.perf_counter() - t0
            else:
                out = {}
                prefill_s, prefill_peak = measure(lambda: out.setdefault("l", model(prompt, cache=cache)), device)
                logits = out["l"]
            tok = logits[:, -1].argmax(-1)
            for _ in range(args.warmup):
                tok = model.step(tok, cache).argmax(-1)
            holder = {}
            _, step_peak = measure(lambda: holder.setdefault("l", model.step(tok, cache)), device)
            states.append(dict(L=L, cache=cache, tok=holder["l"].argmax(-1), prefill_s=prefill_s,
                               prefill_peak=prefill_peak, step_peak=step_peak, bytes=cache.nbytes(), times=[]))
            print(f"context {L:6d}: prefill {prefill_s * 1e3:9.1f} ms", flush=True)
        # 2. time the steps round-robin over the contexts, so that a noisy machine disturbs them all alike
        for _ in range(n_decode):
            for st in states:
                sync(device)
                t0 = time.perf_counter()
                logits = model.step(st["tok"], st["cache"])
                sync(device)
                st["times"].append(time.perf_counter() - t0)
                st["tok"] = logits.argmax(-1)
        for st in states:
            assert st["cache"].nbytes() == st["bytes"]
            best, med = min(st["times"]), statistics.median(st["times"])
            rows.append(dict(context=st["L"], prefill_s=st["prefill_s"],
                             prefill_tokens_per_s=args.batch * st["L"] / st["prefill_s"],
                             prefill_peak_bytes=st["prefill_peak"], step_ms=best * 1e3, step_ms_median=med * 1e3,
                             decode_tokens_per_s=args.batch / best, step_peak_bytes=st["step_peak"],
                             cache_bytes=st["bytes"], step_speedup_vs_rerun=st["prefill_s"] / best))

    print()
    hdr = f"{'context':>8s} {'prefill tok/s':>14s} {'prefill MiB':>12s} {'step ms':>8s} {'decode tok/s':>13s} " \
          f"{'step MiB':>9s} {'cache KiB':>10s} {'step speedup':>13s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        f = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"
        print(f"{r['context']:8d} {r['prefill_tokens_per_s']:14.0f} {f(r['prefill_peak_bytes']):>12s} "
              f"{r['step_ms']:8.2f} {r['decode_tokens_per_s']:13.0f} {f(r['step_peak_bytes']):>9s} "
              f"{r['cache_bytes'] / 2**10:10.0f} {r['step_speedup_vs_rerun']:12.1f}x")
    ratio = rows[-1]["step_ms"] / rows[0]["step_ms"]
    ratio_median = rows[-1]["step_ms_median"] / rows[0]["step_ms_median"]
    mem_flat = len({r["cache_bytes"] for r in rows}) == 1
    flat = ratio_median <= args.max_ratio     # medians of round-robin samples: robust on a busy machine
    print(f"\nstep time at context {rows[-1]['context']} / at context {rows[0]['context']}: {ratio:.2f} best, "
          f"{ratio_median:.2f} median "
          f"({'flat' if flat else 'NOT flat'}: limit {args.max_ratio}); cache size "
          f"{'constant' if mem_flat else 'NOT constant'} ({rows[0]['cache_bytes'] / 2**10:.0f} KiB)")

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"decode_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        benchmark="decode", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(args.device), torch=torch.__version__, threads=torch.get_num_threads(),
        dtype=args.dtype, batch=args.batch, decode_tokens=n_decode, config=cfg.to_dict(),
        parameters=model.num_parameters(), rows=rows, step_time_ratio=ratio, step_time_ratio_median=ratio_median, step_time_flat=flat,
        cache_constant=mem_flat, command=" ".join(["python", "benchmarks/decode.py", *(argv or sys.argv[1:])])),
        indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if args.strict and not (flat and mem_flat):
        sys.exit(1)


if __name__ == "__main__":
    main()

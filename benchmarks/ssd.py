"""Benchmark the three SSD forms (chapter 03) against sequence length: time and peak memory, forward and
forward+backward. Prints tables and the ratios that matter, writes benchmarks/results/ssd_<device>.json.

    python benchmarks/ssd.py                 # CPU, seqlen 256 ... 16K (a few minutes on 2 cores)
    python benchmarks/ssd.py --quick         # seqlen 256, 1024, 4096, one repeat (under a minute)
    python benchmarks/ssd.py --device cuda   # on a GPU (synchronized timing, torch.cuda.max_memory_allocated)

Time: best of --repeats runs after one warm-up run. Peak memory: the peak total size of tensors allocated during one
call, inputs excluded. On CUDA that is torch.cuda.max_memory_allocated() minus what was allocated before; on CPU,
where PyTorch has no allocator counter and tracemalloc does not see tensor buffers, snakes_lib.ssd.PeakTensorMemory
counts it exactly (a TorchDispatchMode that adds each new tensor storage to a running total and subtracts it when the
storage is freed). The recurrent form takes too long and the quadratic form too much memory at long sequences: those
cells are skipped (and recorded as skipped, with the reason) past --max-recurrent and --max-quadratic-gib.

Not handled: multi-GPU, other dtypes than float32/bfloat16, the official Triton kernels (compare with them yourself).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from snakes_lib.ssd import measure_ssd, ssd_cost  # noqa: E402
from _common import device_name, setup_device  # noqa: E402  (benchmarks/ is on sys.path)

FORMS = ("recurrent", "quadratic", "chunked")


def skip_reason(form, seqlen, backward, args, cfg) -> str | None:
    if form == "recurrent":
        limit = args.max_recurrent if not backward else args.max_recurrent_backward
        if seqlen > limit:
            return f"skipped: recurrent loop past seqlen {limit} takes too long"
    if form == "quadratic":
        est = ssd_cost(seqlen, cfg["chunk_size"], cfg["dstate"], cfg["nheads"], cfg["headdim"], cfg["ngroups"],
                       cfg["batch"])["quadratic"]["peak_bytes"] * (3 if backward else 1)
        if est > args.max_quadratic_gib * 2**30:
            return f"skipped: estimated peak {est / 2**30:.1f} GiB > --max-quadratic-gib {args.max_quadratic_gib}"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="seqlen 256, 1024, 4096 and one repeat")
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="default 256 512 1024 2048 4096 8192 16384")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dstate", type=int, default=64)
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cell (best is kept); default 3, 1 with --quick")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: PyTorch's choice")
    p.add_argument("--max-recurrent", type=int, default=None, help="longest seqlen for the recurrent forward (default 4096 on CPU, 16384 on CUDA)")
    p.add_argument("--max-recurrent-backward", type=int, default=None, help="same for forward+backward (default 4096 on CPU, 8192 on CUDA)")
    p.add_argument("--max-quadratic-gib", type=float, default=None, help="skip the quadratic form when its estimated peak exceeds this (default 2 on CPU, 20 on CUDA)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ssd_<device>[_quick].json)")
    args = p.parse_args(argv)

    cuda = setup_device(p, args)
    seqlens = args.seqlens or ([256, 1024, 4096] if args.quick else [256, 512, 1024, 2048, 4096, 8192, 16384])
    repeats = args.repeats or (1 if args.quick else 3)
    args.max_recurrent = args.max_recurrent or (16384 if cuda else 4096)
    args.max_recurrent_backward = args.max_recurrent_backward or (8192 if cuda else 4096)
    args.max_quadratic_gib = args.max_quadratic_gib or (20.0 if cuda else 2.0)
    cfg = dict(batch=args.batch, nheads=args.nheads, headdim=args.headdim, dstate=args.dstate, ngroups=args.ngroups,
               chunk_size=args.chunk_size, dtype=args.dtype)
    dtype = getattr(torch, args.dtype)
    passes = ["forward"] + ([] if args.no_backward else ["forward+backward"])
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    print(f"SSD benchmark on {device_name(args.device)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("config: " + ", ".join(f"{k} {v}" for k, v in cfg.items()) + f"; best of {repeats} after a warm-up (fewer past 2 s)")
    results, method = [], None
    for pass_ in passes:
        for L in seqlens:
            for form in FORMS:
                row = dict(form=form, seqlen=L, mode=pass_)
                reason = skip_reason(form, L, pass_ != "forward", args, cfg)
                if reason:
                    row["skipped"] = reason
                else:
                    m = measure_ssd(form, seqlen=L, chunk_size=args.chunk_size, dstate=args.dstate, nheads=args.nheads,
                                    headdim=args.headdim, ngroups=args.ngroups, batch=args.batch,
                                    backward=pass_ != "forward", dtype=dtype, device=args.device, repeats=repeats,
                                    time_budget_s=2.0)
                    row.update(time_ms=round(m["time_s"] * 1e3, 3), peak_mib=round(m["peak_bytes"] / 2**20, 3))
                    method = m["memory_method"]
                    if cuda:
                        torch.cuda.empty_cache()
                results.append(row)
                print(f"  {pass_:<16} {form:<9} seqlen {L:>6}: " +
                      (row["skipped"] if "skipped" in row else f"{row['time_ms']:10.1f} ms {row['peak_mib']:10.1f} MiB"),
                      flush=True)

    get = lambda form, L, mode: next((r for r in results if r["form"] == form and r["seqlen"] == L and r["mode"] == mode
                                      and "skipped" not in r), None)
    for pass_ in passes:
        print(f"\n{pass_}: time (ms) / peak tensor memory (MiB)")
        print(f"{'seqlen':>7} | " + " | ".join(f"{f:^21}" for f in FORMS))
        for L in seqlens:
            cells = []
            for f in FORMS:
                r = get(f, L, pass_)
                cells.append(f"{r['time_ms']:>9.1f} {r['peak_mib']:>9.1f} " if r else f"{'skipped':^21}")
            print(f"{L:>7} | " + " | ".join(cells))

    checks = {}
    print("\nchecks (measured side by side in this run):")
    for pass_ in passes:
        if 4096 in seqlens and get("recurrent", 4096, pass_) and get("chunked", 4096, pass_):
            speedup = get("recurrent", 4096, pass_)["time_ms"] / get("chunked", 4096, pass_)["time_ms"]
            ok = speedup >= 10
            checks[f"speedup_chunked_vs_recurrent_4096_{pass_}"] = dict(value=round(speedup, 2), target=">= 10", ok=ok)
            print(f"  {pass_:<16} chunked vs recurrent at seqlen 4096: {speedup:6.1f}x faster  (target >= 10x: {'ok' if ok else 'MISSED'})")
        for form, target, ok_if in (("chunked", 1, lambda e: e < 1.2), ("quadratic", 2, lambda e: e > 1.7)):
            have = [L for L in seqlens if get(form, L, pass_) and L >= 512] or [L for L in seqlens if get(form, L, pass_)]
            if len(have) < 2:
                continue
            lo, hi = have[0], have[-1]
            ratio = get(form, hi, pass_)["peak_mib"] / get(form, lo, pass_)["peak_mib"]
            exponent = math.log(ratio) / math.log(hi / lo)
            ok = ok_if(exponent)
            checks[f"memory_growth_{form}_{pass_}"] = dict(seqlen_from=lo, seqlen_to=hi, memory_ratio=round(ratio, 2),
                                                           exponent=round(exponent, 3), expected_exponent=target, ok=ok)
            print(f"  {pass_:<16} {form:<9} memory seqlen {lo} -> {hi} (x{hi / lo:.0f}): x{ratio:.1f}, "
                  f"i.e. ~ seqlen^{exponent:.2f} (expected ^{target}: {'ok' if ok else 'MISSED'})")

    out = args.out or ROOT / "benchmarks" / "results" / f"ssd_{'cuda' if cuda else 'cpu'}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(benchmark="ssd", device=device_name(args.device), device_type="cuda" if cuda else "cpu",
               torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               config=cfg, repeats=repeats, seqlens=seqlens, memory_method=method,
               time_method="best of repeats after one warm-up (fewer repeats once they took 2 s)" + (", torch.cuda.synchronize() around each" if cuda else ""),
               loadavg_before=load_before, loadavg_after=os.getloadavg() if hasattr(os, "getloadavg") else None,
               results=results, checks=checks)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}")
    return doc


if __name__ == "__main__":
    main()

"""Data-parallel training speed and memory: tokens/s and peak memory per GPU on 1 and 2 GPUs, DDP and FSDP, for the
`medium` and `large` models at the same global batch (the 24gb and 80gb presets' batch, length and memory savers).

    python benchmarks/distributed.py --device cuda                  # 1 GPU, then 2 GPUs with DDP and with FSDP
    python benchmarks/distributed.py --device cuda --sizes large --gpus 1 2 4
    python benchmarks/distributed.py --quick --out /tmp/dist.json   # CPU smoke run: tiny model, 2 gloo processes

The script launches itself under torchrun (`--standalone --nproc_per_node N`) once per configuration; each rank runs
the trainer's pieces (snakes_lib.distributed.wrap_model around the chunked loss, AdamW from snakes_lib.train,
the `step` sampler on random tokens), bf16 autocast on GPUs, and reports the median step time after warm-up and its
own peak memory (CUDA max_memory_allocated; peak RSS on CPUs). One optimizer step = the global batch (per-rank batch
x accumulation x GPUs), kept equal across GPU counts by lowering the accumulation. Writes
benchmarks/results/distributed_<device>.json (the devices named) unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from _common import device_name, write_json_atomic  # noqa: E402

# size: (the preset whose batch, length and accumulation it takes)
PRESET_OF = {"medium": "24gb", "large": "80gb"}
VOCAB = 32768


def worker(args) -> None:
    """One rank: time `args.steps` optimizer steps and write this rank's numbers to args.result (rank 0 gathers)."""
    import dataclasses
    import resource
    import torch.distributed as dist
    from snakes_lib.distributed import DistEnv, init_distributed, micro_batch, wrap_model
    from snakes_lib.model import Mamba2Config, Mamba2LM
    from snakes_lib.presets import MODEL_SIZES
    from snakes_lib.optim import lm_loss, make_optimizer
    env = DistEnv.from_env()
    cuda = args.device.startswith("cuda")
    device = torch.device(f"cuda:{env.local_rank}" if cuda else "cpu")
    init_distributed(env, device, timeout_s=600)
    torch.manual_seed(0)
    size = dict(d_model=32, n_layer=2, d_state=8, headdim=16, chunk_size=16) if args.quick else \
        dataclasses.asdict(MODEL_SIZES[args.size])
    model = Mamba2LM(Mamba2Config(**{**size, "vocab_size": 512 if args.quick else VOCAB})).to(device)
    model.gradient_checkpointing = not args.quick
    unit = wrap_model(model, args.parallel, env, device,
                      loss_fn=lambda m, x, y: lm_loss(m, x, y, chunked=True, chunk_rows=1024))
    opt = make_optimizer(model, 3e-4, 0.1, device_type=device.type)
    accum = args.global_batch // (args.batch_size * env.world_size)
    tokens = torch.randint(0, model.config.vocab_size, (1_000_000,), generator=torch.Generator().manual_seed(1))
    times = []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for micro in range(accum):
            x, y = (t.to(device) for t in micro_batch(tokens, 0, step, micro, accum, args.batch_size, args.seq_len, env))
            sync = micro == accum - 1
            ctx = unit.no_sync() if hasattr(unit, "no_sync") and not sync else torch.enable_grad()
            if hasattr(unit, "set_requires_gradient_sync"):
                unit.set_requires_gradient_sync(sync)
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                (unit(x, y) / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        if step == args.warmup - 1 and cuda:
            torch.cuda.reset_peak_memory_stats(device)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    mine = {"rank": env.rank, "device": device_name(str(device)), "peak_gib": round(peak, 3),
            "median_step_s": statistics.median(times)}
    ranks = [mine]
    if env.distributed:
        ranks = [None] * env.world_size
        dist.all_gather_object(ranks, mine)
        dist.destroy_process_group()
    if env.is_main:
        step_s = max(r["median_step_s"] for r in ranks)
        Path(args.result).write_text(json.dumps({
            "size": args.size, "parallel": args.parallel if env.distributed else "none", "gpus": env.world_size,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "global_batch": args.global_batch, "per_rank_batch": args.batch_size, "accumulation": accum,
            "seq_len": args.seq_len, "step_s": round(step_s, 4),
            "tokens_per_s": round(args.global_batch * args.seq_len / step_s, 1),
            "peak_gib_per_gpu": [r["peak_gib"] for r in ranks], "devices": [r["device"] for r in ranks]}))


def launch(args, size: str, gpus: int, parallel: str) -> dict:
    """Run one configuration under torchrun and return rank 0's record."""
    from snakes_lib.presets import VRAM_PRESETS
    if args.quick:
        batch, seq_len, global_batch = 2, 32, 4
    else:
        p = VRAM_PRESETS[PRESET_OF[size]]
        batch, seq_len, global_batch = p.batch_size, p.seq_len, p.batch_size * p.grad_accum
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               __file__, "--worker", "--size", size, "--parallel", parallel, "--device", args.device,
               "--global-batch", str(global_batch), "--batch-size", str(batch), "--seq-len", str(seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", str(result)]
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            return {"size": size, "gpus": gpus, "parallel": parallel, "error": tail.strip().splitlines()[-1:]}
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (NCCL, one GPU per rank) or cpu (gloo)")
    ap.add_argument("--sizes", nargs="+", default=["medium", "large"], choices=sorted(PRESET_OF))
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2], help="process counts to compare (default 1 2)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny model, global batch 4, length 32")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/distributed_<device>.json)")
    # the worker's own flags (set by launch)
    for flag in ("--size", "--parallel", "--result"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--global-batch", "--batch-size", "--seq-len"):
        ap.add_argument(flag, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.device, args.sizes, args.steps, args.warmup = "cpu", ["tiny"], min(args.steps, 3), 1
    if args.device.startswith("cuda") and torch.cuda.device_count() < max(args.gpus):
        ap.error(f"--gpus {max(args.gpus)} needs that many GPUs; {torch.cuda.device_count()} visible")
    rows = []
    for size in args.sizes:
        for gpus in args.gpus:
            for parallel in (["ddp"] if gpus == 1 else ["ddp", "fsdp"]):
                rows.append(launch(args, size, gpus, parallel))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'size':7s} {'GPUs':>4s} {'mode':5s} {'batch':>14s} {'tokens/s':>10s} {'speed-up':>8s} {'peak GiB/GPU':>14s}")
    for r in rows:
        if "error" in r:
            print(f"{r['size']:7s} {r['gpus']:4d} {r['parallel']:5s} failed: {r['error']}")
            continue
        base = next((b for b in rows if b["size"] == r["size"] and b["gpus"] == 1 and "error" not in b), None)
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        batch = f"{r['per_rank_batch']}x{r['accumulation']}x{r['gpus']}={r['global_batch']}"
        print(f"{r['size']:7s} {r['gpus']:4d} {r['parallel'] if r['gpus'] > 1 else '-':5s} {batch:>14s} "
              f"{r['tokens_per_s']:10,.0f} {speed:7.2f}x {max(r['peak_gib_per_gpu']):14.2f}")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"distributed_{device}.json"
    write_json_atomic(out, {"benchmark": "distributed", "date": datetime.date.today().isoformat(),
                            "torch": torch.__version__, "device": device,
                            "devices": sorted({d for r in rows for d in r.get("devices", [])}), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Benchmark the three SSD forms (chapter 03) against sequence length: time and peak memory, forward and
forward+backward. Prints tables and the ratios that matter, writes benchmarks/results/ssd_<device>.json.

    python benchmarks/ssd.py                 # CPU, seqlen 256 ... 16K (a few minutes on 2 cores)
    python benchmarks/ssd.py --quick         # seqlen 256, 1024, 4096, one repeat (under a minute)
    python benchmarks/ssd.py --device cuda   # on a GPU (synchronized timing, torch.cuda.max_memory_allocated)

Time: best of --repeats runs after one warm-up run. Peak memory: the peak total size of tensors allocated during one
call, inputs excluded. On CUDA that is torch.cuda.max_memory_allocated() minus what was allocated before; on CPU,
where PyTorch has no allocator counter and tracemalloc does not see tensor buffers, snakes_lib.ssd_cost.PeakTensorMemory
counts it exactly (a TorchDispatchMode that adds each new tensor storage to a running total and subtracts it when the
storage is freed). The recurrent form takes too long and the quadratic form too much memory at long sequences: those
cells are skipped (and recorded as skipped, with the reason) past --max-recurrent and --max-quadratic-gib.

With --device cuda it then measures the chapter 09 Triton kernels (the "kernels" key of ssd_cuda.json; --kernels-only runs
just that part, ~4 min on an H200, and keeps the file's other keys): snakes_lib.ssd_triton (fused and unfused state
kernels) against snakes_lib.ssd.ssd_chunked, the official mamba_ssm kernels (--official PATH: the folder holding the
mamba_ssm package), causal FlashAttention (F.scaled_dot_product_attention) and an I/O floor, at bf16, 24 heads x
headdim 64, dstate 128, chunk 256, shapes (8, 4096), (4, 16384), (16, 1024) and a seqlen sweep at 32,768 tokens per
call; plus the error of y and every gradient against snakes_torch in float64. Timing: triton.testing.do_bench (median).

    python benchmarks/ssd.py --device cuda --kernels-only --official .official
    python benchmarks/report.py              # renders it, with the other tables

--seq-idx (with --device cuda) measures only packed documents: snakes_triton with seq_idx against the same call
without it, at the goal shapes in bf16, with documents of mean length 2048, 512 and 64 tokens, forward and
forward+backward; plus y and every gradient against snakes_torch in float64 with the same seq_idx (bf16 and float32).
It writes the "seq_idx" key of ssd_cuda.json and keeps the others (--tiny --seq-idx: the CPU dry run).

    python benchmarks/ssd.py --device cuda --seq-idx

Not handled: multi-GPU, other dtypes than float32/bfloat16.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from snakes_lib.ssd import ssd_chunked  # noqa: E402
from snakes_lib.ssd_cost import PeakTensorMemory, measure_ssd, ssd_cost  # noqa: E402
from _common import device_name, read_json, setup_device, write_json_atomic  # noqa: E402  (benchmarks/ is on sys.path)
from report import GRAD_NAMES, KERNEL_IMPLS, _ratio, kernel_row, kernel_shapes, kernels_summary  # noqa: E402

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


# ------------------------------------------------------------------------------------------------------------------
# the kernels section (--device cuda; --kernels-only runs just this): the chapter 09 Triton kernels against the PyTorch
# path, the official mamba_ssm kernels (--official PATH) and causal FlashAttention, at the model's SSD shape.
GOALS = dict(shape=[8, 4096], fwd_ms=0.6, fb_ms=3.5, peak_gib=0.6, speedup_vs_torch=10.0)
COPY_BW, PEAK_FLOPS = 4.3e12, 790e12  # H200: measured device copy bandwidth (B/s), dense bf16 tensor-core FLOP/s


def kernels_config(tiny: bool) -> dict:
    if tiny:  # the CPU dry run (TRITON_INTERPRET=1): every code path, tiny shapes, float32
        return dict(dtype="float32", nheads=4, headdim=16, dstate=16, ngroups=1, chunk_size=16,
                    goal_shapes=[[2, 64], [1, 32]], sweep_tokens=128, sweep_seqlens=[32, 64],
                    correctness=[dict(batch=2, seqlen=64, ngroups=1, chunk_size=16, dtype="float32"),
                                 dict(batch=2, seqlen=50, ngroups=2, chunk_size=16, dtype="float32")],
                    goals=dict(GOALS, shape=[2, 64]))
    return dict(dtype="bfloat16", nheads=24, headdim=64, dstate=128, ngroups=1, chunk_size=256,
                goal_shapes=[[8, 4096], [4, 16384], [16, 1024]], sweep_tokens=32768,
                sweep_seqlens=[1024, 2048, 4096, 8192, 16384, 32768],
                correctness=[dict(batch=8, seqlen=4096, ngroups=1, chunk_size=256, dtype="bfloat16"),
                             dict(batch=2, seqlen=1000, ngroups=2, chunk_size=64, dtype="bfloat16"),
                             dict(batch=2, seqlen=1000, ngroups=2, chunk_size=64, dtype="float32")],
                goals=GOALS)


def ssd_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, dtype, device, seed=0):
    """x, dt, A, B, C, D (leaves that require grad) and a fixed dy: x, B, C, dy in `dtype`; dt = softplus(randn - 3),
    A = -exp(0.5 randn) and D = randn in float32, as the model feeds them."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *shape, dt=torch.float32: torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)
    x = r(batch, seqlen, nheads, headdim, dt=dtype)
    dt = torch.nn.functional.softplus(r(batch, seqlen, nheads) - 3)
    A = -torch.exp(0.5 * r(nheads))
    B, C = r(batch, seqlen, ngroups, dstate, dt=dtype), r(batch, seqlen, ngroups, dstate, dt=dtype)
    D = r(nheads)
    dy = r(batch, seqlen, nheads, headdim, dt=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)], dy


@contextlib.contextmanager
def kernel_settings(mod, **settings):
    "Set KERNEL_CONFIG entries of the Triton module for the block; restored after, also on error."
    old = {key: mod.KERNEL_CONFIG[key] for key in settings}
    mod.KERNEL_CONFIG.update(settings)
    try:
        yield
    finally:
        mod.KERNEL_CONFIG.update(old)


def load_triton_module(spec: str):
    "snakes_lib.ssd_triton, or (hidden --triton-module, for dry runs) another module name or a .py file."
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = mod
        module_spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(spec)


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


def _free(cuda):
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def make_timers(cuda: bool):
    "bench(fn) -> median ms; graph(fn) -> median ms under CUDA-graph replay (None on CPU); peak(fn) -> GiB of one call."
    if cuda:
        import triton.testing

        def bench(fn):
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

        def graph(fn):
            return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))

        def peak(fn):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            used = torch.cuda.max_memory_allocated() - base
            del out
            return used / 2**30
    else:  # the --tiny dry run: wall time, PeakTensorMemory
        def bench(fn, repeats=1):  # the interpreter is slow; this checks the logic, not the speed
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3

        graph = None

        def peak(fn):
            with PeakTensorMemory() as mem:
                out = fn()
            del out
            return mem.peak / 2**30
    return bench, graph, peak


def measure_impl(fwd, inputs, dy, timers, cuda) -> dict:
    """Forward ms (under no_grad), forward+backward ms (torch.autograd.grad of y w.r.t. `inputs` with grad_outputs=dy),
    peak GiB of one forward+backward, forward ms under CUDA-graph replay (None where capture fails)."""
    bench, graph, peak = timers

    def f():
        with torch.no_grad():
            return fwd()

    def fb():
        return torch.autograd.grad(fwd(), inputs, grad_outputs=dy)

    row = dict(fwd_ms=bench(f))
    row["fb_ms"] = bench(fb)
    _free(cuda)
    row["peak_gib"] = peak(fb)
    row["fwd_graph_ms"] = None
    if graph is not None:
        try:
            row["fwd_graph_ms"] = graph(f)
        except Exception as e:  # noqa: BLE001 (e.g. a host sync inside the function)
            row["graph_error"] = _err(e)
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
    _free(cuda)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def io_floor_row(batch, seqlen, cfg, ngroups, itemsize, copy_bw, peak_flops) -> dict:
    """Lower bounds: read x, dt, B, C and write y once (forward); forward+backward adds reading x, dt, B, C, dy and
    writing dx, ddt, dB, dC once. FLOPs: ssd_cost's chunked forward count; forward+backward counted as 3x forward."""
    tokens = batch * seqlen
    xb = tokens * cfg["nheads"] * cfg["headdim"] * itemsize
    dtb = tokens * cfg["nheads"] * 4
    bcb = 2 * tokens * ngroups * cfg["dstate"] * itemsize
    fwd_bytes = xb + dtb + bcb + xb
    fb_bytes = fwd_bytes + 2 * (xb + dtb + bcb) + xb
    flops = ssd_cost(seqlen, cfg["chunk_size"], cfg["dstate"], cfg["nheads"], cfg["headdim"], ngroups, batch)["chunked"]["flops"]
    return dict(fwd_ms=round(fwd_bytes / copy_bw * 1e3, 4), fb_ms=round(fb_bytes / copy_bw * 1e3, 4),
                flop_fwd_ms=round(flops / peak_flops * 1e3, 4), flop_fb_ms=round(3 * flops / peak_flops * 1e3, 4),
                fwd_bytes=fwd_bytes, fb_bytes=fb_bytes, fwd_flops=flops, copy_bw=copy_bw, peak_flops=peak_flops)


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def run_correctness(cfg, impls, device, cuda, errors) -> list[dict]:
    """Relative error of y and every gradient of each implementation against snakes_torch in float64 on upcast inputs."""
    cases = []
    for case in cfg["correctness"]:
        t0 = time.perf_counter()
        b, L, g, Q, dtype = case["batch"], case["seqlen"], case["ngroups"], case["chunk_size"], getattr(torch, case["dtype"])
        inputs, dy = ssd_inputs(b, L, cfg["nheads"], cfg["headdim"], cfg["dstate"], g, dtype, device, seed=1)
        ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
        y_ref, _ = ssd_chunked(*ref_inputs[:5], chunk_size=Q, D=ref_inputs[5], check_values=False, backend="torch")
        refs = [y_ref.detach(), *torch.autograd.grad(y_ref, ref_inputs, grad_outputs=dy.double())]
        del y_ref, ref_inputs
        result = dict(case, errors={})
        for name, make_fwd, when in impls:
            if not when(b, L, dtype, correctness=True):
                continue
            try:
                with make_fwd.settings():
                    fwd = make_fwd(inputs, Q)
                    y = fwd()
                    grads = torch.autograd.grad(y, inputs, grad_outputs=dy)
                errs = {k: rel_err(a, r) for k, a, r in zip(("y",) + GRAD_NAMES, (y, *grads), refs)}
                result["errors"][name] = {k: float(f"{v:.3e}") for k, v in errs.items()}
                del y, grads
            except Exception as e:  # noqa: BLE001
                result["errors"][name] = _err(e)
                errors.append(dict(impl=name, shape=f"correctness {b}x{L} g{g} chunk {Q} {case['dtype']}", error=_err(e)))
            _free(cuda)
        del refs, inputs, dy
        _free(cuda)
        cases.append(result)
        shown = ", ".join(f"{n} " + (f"max {max(e.values()):.1e}" if isinstance(e, dict) else "error")
                          for n, e in result["errors"].items())
        print(f"  correctness {b} x {L}, ngroups {g}, chunk {Q}, {case['dtype']}: {shown}  ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    return cases


class _Impl:
    "A forward factory (inputs, chunk_size) -> (() -> y) with the kernel settings it runs under."

    def __init__(self, make, settings=None):
        self.make, self.settings = make, settings or contextlib.nullcontext

    def __call__(self, inputs, chunk_size):
        return self.make(inputs, chunk_size)


def run_kernels(args, device) -> dict:
    t_start = time.perf_counter()
    cuda = device.type == "cuda"
    cfg = kernels_config(args.tiny)
    dtype = getattr(torch, cfg["dtype"])
    errors = []
    import triton
    cfg.update(impl_notes=dict(
        snakes_torch="snakes_lib.ssd.ssd_chunked(check_values=False, backend='torch')",
        snakes_triton="snakes_lib.ssd_triton.ssd_chunked_triton(check_values=False), KERNEL_CONFIG fuse_states=True",
        snakes_triton_unfused="the same with KERNEL_CONFIG fuse_states=False (goal shapes only)",
        official_triton="mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D)",
        sdpa_flash="F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v (batch, nheads, seqlen, headdim), "
                   "flash backend forced",
        io_floor=f"bytes of x, dt, B, C read and y written once / {args.copy_bw:.3g} B/s; FLOPs "
                 f"(ssd_cost chunked) / {args.peak_flops:.3g} FLOP/s; forward+backward: see io_floor_row"),
        timing="triton.testing.do_bench(warmup=25, rep=100, return_mode='median') (L2 flushed before each call); forward "
               "under torch.no_grad(); forward+backward = torch.autograd.grad(y, (x, dt, A, B, C, D), grad_outputs=dy); "
               "fwd_graph_ms: triton.testing.do_bench_cudagraph(rep=50, median)",
        peak="torch.cuda.max_memory_allocated() during one forward+backward minus memory_allocated() before it (GiB)",
        torch_max_tokens=args.torch_max_tokens)

    mod = official = None
    try:
        mod = load_triton_module(args.triton_module)
        cfg["kernel_config"] = json.loads(json.dumps(mod.KERNEL_CONFIG, default=str))
    except Exception as e:  # noqa: BLE001
        errors.append(dict(impl="snakes_triton", shape="import", error=_err(e)))
        print(f"  cannot import {args.triton_module}: {_err(e)}", flush=True)
    if args.official:
        try:
            sys.path.insert(0, str(Path(args.official).resolve()))
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as official
        except Exception as e:  # noqa: BLE001
            errors.append(dict(impl="official_triton", shape="import", error=_err(e)))
            print(f"  cannot import the official kernels from {args.official}: {_err(e)}", flush=True)
    goal_shapes = [tuple(s) for s in cfg["goal_shapes"]]

    def torch_fwd(inputs, Q):
        x, dt, A, B, C, D = inputs
        # backend="torch": the default ("auto") would hand CUDA tensors to the Triton kernels
        return lambda: ssd_chunked(x, dt, A, B, C, chunk_size=Q, D=D, check_values=False, backend="torch")[0]

    def triton_fwd(inputs, Q):
        x, dt, A, B, C, D = inputs
        reason = mod.triton_unsupported_reason(x, B, Q)
        if reason:
            raise ValueError(f"triton_unsupported_reason: {reason}")
        return lambda: mod.ssd_chunked_triton(x, dt, A, B, C, chunk_size=Q, D=D, check_values=False)[0]

    def official_fwd(inputs, Q):
        x, dt, A, B, C, D = inputs
        return lambda: official(x, dt, A, B, C, Q, D=D)

    impls = [  # (name, forward factory, where it runs)
        ("snakes_torch", _Impl(torch_fwd), lambda b, L, dt, correctness=False: b * L <= args.torch_max_tokens or correctness),
        ("snakes_triton", _Impl(triton_fwd, lambda: kernel_settings(mod, fuse_states=True)),
         lambda b, L, dt, correctness=False: mod is not None),
        ("snakes_triton_unfused", _Impl(triton_fwd, lambda: kernel_settings(mod, fuse_states=False)),
         lambda b, L, dt, correctness=False: mod is not None and (correctness or (b, L) in goal_shapes)),
        ("official_triton", _Impl(official_fwd),  # float32 correctness skipped: another autotuning round for little news
         lambda b, L, dt, correctness=False: official is not None and dt != torch.float32 or (args.tiny and official is not None)),
    ]

    print(f"\nSSD kernels on {device_name(args.device)}, torch {torch.__version__}, triton {triton.__version__}: "
          f"{cfg['dtype']}, {cfg['nheads']} heads x headdim {cfg['headdim']}, dstate {cfg['dstate']}, "
          f"chunk {cfg['chunk_size']}", flush=True)
    copy_bw_measured = None
    if cuda:
        try:
            src = torch.empty(2**30, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            bench, _, _ = make_timers(True)
            copy_bw_measured = round(2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-3), -9)
            del src, dst
            print(f"  device copy bandwidth measured now: {copy_bw_measured / 1e12:.2f} TB/s "
                  f"(floors use --copy-bw {args.copy_bw / 1e12:.2f} TB/s)", flush=True)
        except Exception as e:  # noqa: BLE001
            errors.append(dict(impl="copy_bandwidth", shape="1 GiB", error=_err(e)))
        _free(cuda)

    correctness = []
    if not args.no_correctness:
        correctness = run_correctness(cfg, impls, device, cuda, errors)

    timers = make_timers(cuda)
    shapes = [(b, L, True, L * b == cfg["sweep_tokens"] and L in cfg["sweep_seqlens"]) for b, L in goal_shapes]
    shapes += [(cfg["sweep_tokens"] // L, L, False, True) for L in cfg["sweep_seqlens"]
               if (cfg["sweep_tokens"] // L, L) not in goal_shapes]
    rows = []
    for b, L, goal, sweep in shapes:
        t0 = time.perf_counter()
        base = dict(batch=b, seqlen=L, tokens=b * L, goal=goal, sweep=sweep)
        inputs, dy = ssd_inputs(b, L, cfg["nheads"], cfg["headdim"], cfg["dstate"], cfg["ngroups"], dtype, device)
        for name, make_fwd, when in impls:
            if name == "official_triton" and official is None:
                continue
            row = dict(impl=name, **base)
            if name == "snakes_triton_unfused" and not (mod is not None and (b, L) in goal_shapes):
                continue
            if not when(b, L, dtype):
                row["skipped"] = (f"skipped: {b * L} tokens > --torch-max-tokens {args.torch_max_tokens}"
                                  if name == "snakes_torch" else "skipped: module not available")
                rows.append(row)
                continue
            try:
                with make_fwd.settings():
                    row.update(measure_impl(make_fwd(inputs, cfg["chunk_size"]), inputs, dy, timers, cuda))
            except Exception as e:  # noqa: BLE001  (an error is recorded, the benchmark goes on)
                row["error"] = _err(e)
                errors.append(dict(impl=name, shape=f"{b}x{L}", error=row["error"]))
            _free(cuda)
            rows.append(row)
        del inputs, dy
        _free(cuda)
        row = dict(impl="sdpa_flash", **base)
        if not cuda:
            row["skipped"] = "skipped: needs CUDA"
        else:
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                g = torch.Generator(device=device).manual_seed(2)
                q, k, v, dyo = (torch.randn(b, cfg["nheads"], L, cfg["headdim"], generator=g, device=device,
                                            dtype=dtype) for _ in range(4))
                qkv = [t.requires_grad_() for t in (q, k, v)]

                def attn():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)
                row.update(measure_impl(attn, qkv, dyo, timers, cuda))
                del q, k, v, dyo, qkv
            except Exception as e:  # noqa: BLE001
                row["error"] = _err(e)
                errors.append(dict(impl="sdpa_flash", shape=f"{b}x{L}", error=row["error"]))
            _free(cuda)
        rows.append(row)
        rows.append(dict(impl="io_floor", **base, **io_floor_row(b, L, cfg, cfg["ngroups"], dtype.itemsize, args.copy_bw,
                                                                  args.peak_flops)))
        print(f"  {b:>3} x {L:>6}: " + ", ".join(
            f"{r['impl']} " + (f"{r['fwd_ms']:.3f}/{r['fb_ms']:.3f} ms" if r.get("fb_ms") is not None else
                               "skipped" if r.get("skipped") else "ERROR")
            for r in rows if (r["batch"], r["seqlen"]) == (b, L)) + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)

    section = dict(device=device_name(args.device), device_type=device.type, torch=torch.__version__,
                   triton=triton.__version__, python=platform.python_version(),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   triton_module=args.triton_module, official=args.official, config=cfg,
                   copy_bw_measured=copy_bw_measured, rows=rows, correctness=correctness, errors=errors,
                   wall_s=None)
    section["summary"] = kernels_summary(section)
    section["wall_s"] = round(time.perf_counter() - t_start, 1)
    print_kernels(section)
    return section


def packed_seq_idx(batch, seqlen, mean_len, device, seed=0):
    """(batch, seqlen) int32 document labels, a different random split per row with about seqlen / mean_len
    documents (starts uniform over the row; some land on chunk edges, some documents are one token long)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(batch, seqlen, dtype=torch.int32)
    ncuts = max(1, seqlen // mean_len - 1)
    for row in range(batch):
        starts[row, torch.randint(1, seqlen, (ncuts,), generator=g)] = 1
    return starts.cumsum(1, dtype=torch.int32).to(device)


def run_seq_idx(args, device) -> dict:
    """snakes_triton with seq_idx vs without, timing at the goal shapes, and the error of y and every gradient
    against snakes_torch in float64 with the same seq_idx."""
    t_start = time.perf_counter()
    cuda = device.type == "cuda"
    cfg = kernels_config(args.tiny)
    dtype = getattr(torch, cfg["dtype"])
    mod = load_triton_module(args.triton_module)
    mean_lens = [24, 5] if args.tiny else [2048, 512, 64]
    Q = cfg["chunk_size"]
    print(f"\nseq_idx (packed documents) on {device_name(args.device)}: {cfg['dtype']}, {cfg['nheads']} heads x headdim "
          f"{cfg['headdim']}, dstate {cfg['dstate']}, chunk {Q}; documents of mean length {mean_lens}", flush=True)
    correctness = []
    for case in cfg["correctness"][1:]:
        b, L, g, Qc, cdtype = case["batch"], case["seqlen"], case["ngroups"], case["chunk_size"], getattr(torch, case["dtype"])
        inputs, dy = ssd_inputs(b, L, cfg["nheads"], cfg["headdim"], cfg["dstate"], g, cdtype, device, seed=1)
        seq_idx = packed_seq_idx(b, L, mean_lens[-1], device, seed=1)
        ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
        y_ref, _ = ssd_chunked(*ref_inputs[:5], chunk_size=Qc, D=ref_inputs[5], check_values=False, backend="torch",
                               seq_idx=seq_idx)
        refs = [y_ref.detach(), *torch.autograd.grad(y_ref, ref_inputs, grad_outputs=dy.double())]
        x, dt, A, B, C, D = inputs
        y = mod.ssd_chunked_triton(x, dt, A, B, C, chunk_size=Qc, D=D, check_values=False, seq_idx=seq_idx)[0]
        grads = torch.autograd.grad(y, inputs, grad_outputs=dy)
        errs = {k: float(f"{rel_err(a, r):.3e}") for k, a, r in zip(("y",) + GRAD_NAMES, (y, *grads), refs)}
        correctness.append(dict(case, documents=int(seq_idx[:, -1].sum()) + b, errors=errs))
        print(f"  correctness {b} x {L} g{g} chunk {Qc} {case['dtype']}: " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()),
              flush=True)
        del inputs, dy, ref_inputs, refs, y, grads
        _free(cuda)
    timers = make_timers(cuda)
    rows = []
    for b, L in [tuple(s) for s in cfg["goal_shapes"]]:
        inputs, dy = ssd_inputs(b, L, cfg["nheads"], cfg["headdim"], cfg["dstate"], cfg["ngroups"], dtype, device)
        x, dt, A, B, C, D = inputs
        for mean_len in [None] + mean_lens:
            seq_idx = None if mean_len is None else packed_seq_idx(b, L, mean_len, device)
            fwd = lambda: mod.ssd_chunked_triton(x, dt, A, B, C, chunk_size=Q, D=D, check_values=False, seq_idx=seq_idx)[0]
            row = dict(batch=b, seqlen=L, mean_doc_len=mean_len,
                       documents=None if seq_idx is None else int(seq_idx[:, -1].sum()) + b)
            row.update(measure_impl(fwd, inputs, dy, timers, cuda))
            base = rows[-1 - mean_lens.index(mean_len)] if mean_len is not None else row
            row["fwd_vs_none"] = round(row["fwd_ms"] / base["fwd_ms"], 3)
            row["fb_vs_none"] = round(row["fb_ms"] / base["fb_ms"], 3)
            rows.append(row)
            print(f"  {b:>3} x {L:>6}, {'no seq_idx' if mean_len is None else f'documents ~{mean_len} tokens':<22}: "
                  f"fwd {row['fwd_ms']:.3f} ms (x{row['fwd_vs_none']:.2f}), f+b {row['fb_ms']:.3f} ms "
                  f"(x{row['fb_vs_none']:.2f}), peak {row['peak_gib']:.3f} GiB", flush=True)
            _free(cuda)
        del inputs, dy, x, dt, A, B, C, D
        _free(cuda)
    return dict(device=device_name(args.device), device_type=device.type, torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                config=dict(cfg, mean_doc_lens=mean_lens), rows=rows, correctness=correctness,
                wall_s=round(time.perf_counter() - t_start, 1))


def print_kernels(k: dict) -> None:
    "The impl x shape table with the ratios, the sweep crossover, the goal checks, the errors."
    s = k["summary"]
    print(f"\nkernels: fwd / fwd under CUDA graph / fwd+bwd (ms, median), peak of one fwd+bwd (GiB); "
          f"x torch = snakes_torch time / this, x official = official_triton time / this (fwd, f+b)")
    print(f"{'batch x seqlen':>15} {'impl':<22} {'fwd':>9} {'fwd graph':>9} {'f+b':>9} {'peak GiB':>9} "
          f"{'x torch':>8} {'x official (fwd, f+b)':>22}")
    num = lambda v, w=9, d=3: f"{v:>{w}.{d}f}" if v is not None else f"{'-':>{w}}"
    for b, L in kernel_shapes(k):
        for impl in KERNEL_IMPLS:
            r = kernel_row(k, impl, b, L)
            if r is None:
                continue
            label = f"{b} x {L}" + (" *" if [b, L] == s["goal_shape"] else "")
            if r.get("fwd_ms") is None:
                print(f"{label:>15} {impl:<22} {r.get('skipped') or 'error: ' + str(r.get('error'))[:90]}")
                continue
            ratio = lambda other, key: None if impl == "io_floor" else _ratio(kernel_row(k, other, b, L, key), r.get(key))
            print(f"{label:>15} {impl:<22} {num(r['fwd_ms'])} {num(r.get('fwd_graph_ms'))} {num(r.get('fb_ms'))} "
                  f"{num(r.get('peak_gib'))} {num(ratio('snakes_torch', 'fb_ms'), 8, 2)} "
                  f"{num(ratio('official_triton', 'fwd_ms'), 10, 2)} {num(ratio('official_triton', 'fb_ms'), 10, 2)}"
                  + ("   (io floor; flop floor " + f"{r['flop_fwd_ms']:.3f} / {r['flop_fb_ms']:.3f})" if impl == "io_floor" else ""))
    print(f"  (* the goal shape)\n\ncorrectness (relative error vs snakes_torch in float64):")
    for case in k["correctness"]:
        for impl, errs in case["errors"].items():
            text = errs if isinstance(errs, str) else "  ".join(f"{n} {v:.1e}" for n, v in errs.items())
            print(f"  {case['batch']} x {case['seqlen']} g{case['ngroups']} chunk {case['chunk_size']} {case['dtype']:<8} "
                  f"{impl:<22} {text}")
    print("\ngoals at " + " x ".join(map(str, s["goal_shape"])) + ":")
    for name, c in s["checks"].items():
        print(f"  {name:<20} {c['value'] if c['value'] is not None else '-'!s:>8}  target {c['target']:<7}  "
              f"{'-' if c['ok'] is None else 'ok' if c['ok'] else 'MISSED'}")
    cx = s["crossover_seqlen"]
    print(f"  snakes_triton f+b faster than sdpa_flash at seqlens {s['sweep_faster_than_sdpa']} of {s['sweep_measured']}"
          f" -> crossover {cx if cx is not None else 'none'}")
    if k["errors"]:
        print("errors:")
        for e in k["errors"]:
            print(f"  {e['impl']} at {e['shape']}: {e['error'][:200]}")
    print(f"kernels part took {k['wall_s']:.0f} s", flush=True)


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
    k = p.add_argument_group("Triton kernels (CUDA; see the top of this file)")
    k.add_argument("--kernels-only", action="store_true", help="run only the kernels part; merge it into the JSON's \"kernels\" key")
    k.add_argument("--no-kernels", action="store_true", help="skip the kernels part of a --device cuda run")
    k.add_argument("--official", default=None, metavar="PATH", help="folder holding the mamba_ssm package (e.g. .official): adds official_triton")
    k.add_argument("--torch-max-tokens", type=int, default=65536, help="skip snakes_torch past batch*seqlen tokens (default 65536: every shape)")
    k.add_argument("--copy-bw", type=float, default=COPY_BW, help="bytes/s for the I/O floor (default 4.3e12, H200 copy)")
    k.add_argument("--peak-flops", type=float, default=PEAK_FLOPS, help="FLOP/s for the FLOP floor (default 790e12)")
    k.add_argument("--no-correctness", action="store_true", help="skip the float64 error check")
    k.add_argument("--seq-idx", action="store_true", help="run only the packed-documents check (seq_idx vs none); "
                                                          "merge it into the JSON's \"seq_idx\" key")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CPU dry run of the kernels part (TRITON_INTERPRET=1)
    p.add_argument("--triton-module", default="snakes_lib.ssd_triton", help=argparse.SUPPRESS)  # a module name or a .py file
    args = p.parse_args(argv)

    if args.tiny:  # every code path of the kernels part on the CPU, through Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.device, args.kernels_only = "cpu", True
    cuda = setup_device(p, args)
    if args.seq_idx:
        if not (cuda or args.tiny):
            p.error("--seq-idx needs --device cuda")
        out = args.out or ROOT / "benchmarks" / "results" / ("local/ssd_tiny.json" if args.tiny else "ssd_cuda.json")
        doc = read_json(out) or dict(benchmark="ssd", device_type="cuda" if cuda else "cpu")
        doc["seq_idx"] = run_seq_idx(args, torch.device(args.device))
        write_json_atomic(out, doc)
        print(f"\nwrote the \"seq_idx\" key of {out}")
        return doc
    if args.kernels_only:
        if not (cuda or args.tiny):
            p.error("--kernels-only needs --device cuda")
        out = args.out or ROOT / "benchmarks" / "results" / ("local/ssd_tiny.json" if args.tiny else "ssd_cuda.json")
        section = run_kernels(args, torch.device(args.device))
        doc = read_json(out) or dict(benchmark="ssd", device_type=section["device_type"])
        doc["kernels"] = section
        write_json_atomic(out, doc)
        print(f"\nwrote the \"kernels\" key of {out}" + (f" (kept {', '.join(k for k in doc if k != 'kernels')})"
                                                         if len(doc) > 2 else ""))
        return doc
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
    if cuda and not args.no_kernels:
        doc["kernels"] = run_kernels(args, torch.device(args.device))
    elif (read_json(out) or {}).get("kernels"):  # keep a kernels section measured earlier
        doc["kernels"] = read_json(out)["kernels"]
    write_json_atomic(out, doc)
    print(f"\nwrote {out}")
    return doc


if __name__ == "__main__":
    main()

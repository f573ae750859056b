"""Host time of one call through a `torch.library.custom_op` with registered autograd, against the same Python run by
a plain `torch.autograd.Function` (chapter 09's `eager_autograd`) and by plain aten ops, in eager mode.

    python benchmarks/op_overhead.py                  # CPU: ~40 s on 2 cores
    python benchmarks/op_overhead.py --quick          # fewer calls (a smoke test of the script)
    python benchmarks/op_overhead.py --device cuda    # also chapter 10's real gated-RMSNorm op and Function

The computation is a gated RMSNorm, o = rmsnorm(y * silu(z)) * w, on tiny tensors (default 4 x 64), so that the
host's work per call dominates. It is built the way snakes_lib.fused_block builds its ops: a forward and a backward
function; `custom_op` makes each an operator, `register_autograd` ties them (the op path, what `torch.compile` sees);
`eager_autograd` runs the same two functions in a `torch.autograd.Function` of the `forward(ctx, ...)` form (what
snakes calls in eager mode); a third path runs them in a Function with a separate `setup_context` (whose `apply`
binds the arguments to forward's signature on every call; eager_autograd's first form); and a fourth writes the
norm with aten ops, for autograd to differentiate. The four are checked to agree first.
On CUDA the real ops of chapter 10 (`snakes::gated_rmsnorm_fwd` with its Triton kernels, against `_norm_call`) are
timed too. Without a GPU the Triton kernels would run in the interpreter, whose time is not host overhead: skipped.

Each path is timed per call, forward only (inputs that require grad: autograd records the graph) and forward plus
backward: blocks of --calls calls, the block's time / --calls, the median over --blocks blocks, the paths taken in
turn within each block round so that the machine's noise falls on all of them. On CUDA the time is the host's (the
blocks are not synchronized inside; the GPU is synchronized between blocks, untimed).
Prints a table and writes benchmarks/results/op_overhead_<device>[_quick].json (or --out).
Not handled: torch.compile (where the op is one graph node and no call pays this), CUDA-graph replay.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import device_name, setup_device, write_json_atomic  # noqa: E402  (benchmarks/ is on sys.path)

EPS = 1e-5


def norm_fwd(y: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    "o = g * rstd * w with g = y * silu(z), rstd = 1 / sqrt(mean(g^2) + eps) over the last dim. y, z (M, D), w (D,)."
    g = y * F.silu(z)
    rstd = torch.rsqrt(g.square().mean(-1, keepdim=True) + EPS)
    return g * rstd * w, rstd


def norm_bwd(do: torch.Tensor, y: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    "Gradients (dy, dz, dw) of norm_fwd's o, by hand (as a kernel's backward would compute them)."
    sig = torch.sigmoid(z)
    g = y * z * sig
    xhat = g * rstd
    u = do * w
    dg = (u - xhat * (xhat * u).mean(-1, keepdim=True)) * rstd
    return dg * z * sig, dg * y * sig * (1 + z * (1 - sig)), (do * xhat).sum(0)


def norm_aten(y, z, w):
    "The same norm left to autograd: every aten op records its own node."
    return norm_fwd(y, z, w)[0]


def setup_context_function(forward, setup_context, backward):
    """The same three functions in a torch.autograd.Function with a separate setup_context (the form eager_autograd
    used first): its `apply` binds the arguments to forward's signature with `inspect` on every call."""
    class SetupContextFunction(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return forward(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)
    return SetupContextFunction.apply


def make_paths():
    """{name: fn(y, z, w) -> o}: the custom op, eager_autograd's Function, the same Function with a separate
    setup_context, and plain aten; built as fused_block builds its ops."""
    from snakes_lib.ssd_triton import eager_autograd

    ns = f"op_overhead_{uuid.uuid4().hex[:8]}"             # a fresh namespace: make_paths may run twice in a process
    fwd_op = torch.library.custom_op(f"{ns}::norm_fwd", norm_fwd, mutates_args=())
    fwd_op.register_fake(lambda y, z, w: (torch.empty_like(y), y.new_empty(y.shape[0], 1)))
    bwd_op = torch.library.custom_op(f"{ns}::norm_bwd", norm_bwd, mutates_args=())
    bwd_op.register_fake(lambda do, y, z, w, rstd: (torch.empty_like(y), torch.empty_like(z), torch.empty_like(w)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])

    def backward(ctx, do, _drstd, bwd=bwd_op):
        return bwd(do, *ctx.saved_tensors)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    eager_backward = lambda ctx, do, drstd: backward(ctx, do, drstd, norm_bwd)
    eager = eager_autograd(fwd_op, norm_fwd, setup_context, eager_backward)
    separate = setup_context_function(norm_fwd, setup_context, eager_backward)
    return {"custom_op": lambda y, z, w: fwd_op(y, z, w)[0],
            "eager_autograd": lambda y, z, w: eager(y, z, w)[0],
            "Function with setup_context": lambda y, z, w: separate(y, z, w)[0],
            "aten": norm_aten}


def real_paths():
    "Chapter 10's gated RMSNorm (its Triton kernels): the registered op, the eager Function, chapter 05's module."
    from snakes_lib import fused_block as FB
    from snakes_lib.model import GatedRMSNorm

    made = {}

    def module(y, z, w):
        if "m" not in made:                                   # one module, its weight the inputs' w
            made["m"] = GatedRMSNorm(y.shape[-1], y.shape[-1]).to(y.device)
            with torch.no_grad():
                made["m"].weight.copy_(w)
        return made["m"](y, z)
    return {"real custom_op": lambda y, z, w: FB._norm_fwd_op(y, z, w, y.shape[-1], EPS)[0],
            "real eager_autograd": lambda y, z, w: FB._norm_call(y, z, w, y.shape[-1], EPS)[0],
            "real aten (chapter 05)": module}


def check_agree(paths: dict, inputs, tol: float) -> None:
    "Every path gives the same output and gradients as the first, or the comparison would be meaningless."
    ref = None
    for name, fn in paths.items():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        o = fn(*leaves)
        o.backward(torch.ones_like(o))
        got = [o] + [t.grad for t in leaves[:2]]             # the module path has its own weight: compare o, dy, dz
        if ref is None:
            ref = got
            continue
        for a, b in zip(got, ref):
            if not torch.allclose(a, b, rtol=tol, atol=tol):
                raise SystemExit(f"{name} disagrees with {next(iter(paths))}: max diff {(a - b).abs().max().item():.2e}")


def time_paths(paths: dict, inputs, calls: int, blocks: int, backward: bool, device) -> dict:
    "{name: [per-call seconds of each block]}: paths in turn within each block round, warmed up first."
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad = torch.ones_like(inputs[0])

    def block(fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            o = fn(*leaves)
            if backward:
                o.backward(grad)
        t = time.perf_counter() - t0
        for x in leaves:
            x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)                   # untimed: the next block starts with an idle GPU
        return t / n

    for fn in paths.values():
        block(fn, max(10, calls // 5))
    out = {name: [] for name in paths}
    gc.collect()
    gc.disable()
    try:
        for _ in range(blocks):
            for name, fn in paths.items():
                out[name].append(block(fn, calls))
    finally:
        gc.enable()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="10 calls x 10 blocks per path (a smoke test)")
    p.add_argument("--calls", type=int, default=None, help="calls per timed block (default 50; 10 with --quick)")
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per path (default 160; 10 with --quick)")
    p.add_argument("--rows", type=int, default=4, help="rows of the tiny input (default 4)")
    p.add_argument("--dim", type=int, default=64, help="its width (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: PyTorch's choice")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/op_overhead_<device>[_quick].json)")
    args = p.parse_args(argv)
    cuda = setup_device(p, args)
    for flag in ("calls", "blocks", "rows", "dim"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    calls = args.calls or (10 if args.quick else 50)
    blocks = args.blocks or (10 if args.quick else 160)
    device = torch.device(args.device)
    try:
        paths = make_paths()
    except ImportError as e:
        p.error(f"the eager path is snakes_lib.ssd_triton's eager_autograd, which needs the triton package ({e}); "
                "pip install triton (Linux)")
    if cuda:
        paths.update(real_paths())
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(args.rows, args.dim, generator=g).to(device) for _ in range(2)]
    inputs.append((1 + 0.1 * torch.randn(args.dim, generator=g)).to(device))
    check_agree({k: v for k, v in paths.items() if not k.startswith("real")}, inputs, 1e-5)
    if cuda:
        check_agree({k: v for k, v in paths.items() if k.startswith("real")}, inputs, 1e-4)

    print(f"host time per call on {device_name(args.device)} (torch {torch.__version__}), input {args.rows} x "
          f"{args.dim} float32, median of {blocks} blocks of {calls} calls")
    rows = []
    for mode, backward in (("forward", False), ("forward+backward", True)):
        times = time_paths(paths, inputs, calls, blocks, backward, device)
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
            rows.append(dict(path=name, mode=mode, median_us=round(statistics.median(ts) * 1e6, 2),
                             p10_us=round(q[0] * 1e6, 2), p90_us=round(q[-1] * 1e6, 2)))
    med = {(r["path"], r["mode"]): r["median_us"] for r in rows}
    print(f"\n| path | forward µs | forward+backward µs |\n|---|---|---|")
    for name in paths:
        print(f"| {name} | {med[name, 'forward']:.1f} | {med[name, 'forward+backward']:.1f} |")
    extra = {mode: round(med["custom_op", mode] - med["eager_autograd", mode], 2)
             for mode in ("forward", "forward+backward")}
    print(f"\nthe custom op costs {extra['forward']:+.1f} µs per forward call and {extra['forward+backward']:+.1f} µs "
          f"per forward+backward over the eager Function")
    doc = dict(benchmark="op_overhead", device=device_name(args.device), device_type=device.type,
               torch=torch.__version__, threads=torch.get_num_threads(), quick=args.quick, shape=[args.rows, args.dim],
               dtype="float32", calls_per_block=calls, blocks=blocks, rows=rows, custom_op_extra_us=extra,
               command=" ".join(["python", "benchmarks/op_overhead.py", *(argv if argv is not None else sys.argv[1:])]))
    if cuda:
        doc["real_custom_op_extra_us"] = {mode: round(med["real custom_op", mode] - med["real eager_autograd", mode], 2)
                                          for mode in ("forward", "forward+backward")}
    out = args.out or ROOT / "benchmarks" / "results" / f"op_overhead_{device.type}{'_quick' if args.quick else ''}.json"
    write_json_atomic(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

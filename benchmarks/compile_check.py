"""torch.compile check of snakes' SSD and model on CUDA: compiled vs eager, forward and backward, graph breaks.

Run from a checkout (snakes_lib is imported from it):

    python benchmarks/compile_check.py                     # all cases (~3 min on an H200)
    python benchmarks/compile_check.py --quick             # float32 only, fewer cases
    python benchmarks/compile_check.py --only Mamba2LM     # only the cases whose name contains the text
    python benchmarks/compile_check.py --quick --device cpu  # a dry run of the script itself (slow CPU compiles)

`ssd_chunked` is compiled with backend="torch" (Inductor compiles the PyTorch code); `Mamba2LM` uses its default,
which on CUDA is chapter 09's Triton op (Inductor keeps it as one opaque node).
Prints one table row per case and writes everything, with each failure's traceback, to
benchmarks/results/compile_check_<device>.json (or $OUT/compile_check.json when OUT is set). A failing case is reported and the next one runs. Columns: status (ok; MISMATCH: compiled
numbers off; BREAKS: torch._dynamo.explain found graph breaks; ERROR: an exception, its last line printed below),
max rel err (max |compiled - eager| / max |eager| over outputs and gradients; for bfloat16 both are measured against a
float32 eager reference, and "(eager)" is eager bfloat16's own error: compiled passes at <= 2x that + 2e-3),
breaks (graph breaks of the forward), the first compiled call's time (compilation included), then warm eager and
warm compiled times of one forward+backward. Exit status 0 when every case is ok."""
import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import torch
import torch.nn.functional as F

import snakes_lib
from snakes_lib import ssd
from snakes_lib.model import Mamba2Config, Mamba2LM

DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rel_err(a, b):
    "max |a - b| / max |b| (both upcast to float32)."
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def explain(fn, *args, **kw):
    "Graph breaks of fn(*args, **kw) as dynamo sees them: (graph_count, graph_break_count, [reasons])."
    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(*args, **kw)
    reasons = [str(getattr(r, "reason", r)).splitlines()[0][:200] for r in e.break_reasons]
    return e.graph_count, e.graph_break_count, reasons


def ssd_inputs(seqlen, dtype, ngroups=2, nheads=8, headdim=64, dstate=64, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x, B, C = r(batch, seqlen, nheads, headdim), r(batch, seqlen, ngroups, dstate), r(batch, seqlen, ngroups, dstate)
    dt = F.softplus(r(batch, seqlen, nheads) - 2)
    A, D = -torch.exp(r(nheads) * 0.5), r(nheads)
    h0 = r(batch, nheads, headdim, dstate) * 0.1
    acts = [t.to(DEV, dtype) for t in (x, B, C, h0)]
    params = [t.to(DEV, torch.float32) for t in (dt, A, D)]
    x, B, C, h0 = acts
    dt, A, D = params
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0)


def fwd_bwd(fn, inputs, loss_of):
    "Run fn on fresh leaf copies of inputs; return (outputs, grads) with grads in inputs' order."
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    out = fn(**leaves)
    loss_of(out).backward()
    sync()
    return out, {k: v.grad for k, v in leaves.items() if v.grad is not None}


def timed(f):
    sync()
    t0 = time.perf_counter()
    r = f()
    sync()
    return r, time.perf_counter() - t0


def compare(c, e, ref=None):
    """Relative errors of the compiled results c against the eager e (float32) or, for low precision, of both against
    the float32 reference ref. Returns (errors of compiled, errors of eager or None)."""
    if ref is None:
        return {k: rel_err(c[k], e[k]) for k in e}, None
    return {k: rel_err(c[k], ref[k]) for k in ref}, {k: rel_err(e[k], ref[k]) for k in ref}


def eager_vs_compiled(fn, run, ref):
    """run(fn) eagerly (after a warm-up) and run(torch.compile(fn)) twice: (errors of compiled vs eager, eager's own
    errors vs ref, warm eager time, first compiled time (compilation included), warm compiled time)."""
    run(fn)
    e, t_eager = timed(lambda: run(fn))
    torch._dynamo.reset()
    compiled = torch.compile(fn)
    c, t_first = timed(lambda: run(compiled))
    _, t_second = timed(lambda: run(compiled))
    errs, eager_errs = compare(c, e, ref)
    return errs, eager_errs, t_eager, t_first, t_second


def case_ssd(dtype, chunk, seqlen=1000, batch=2, ngroups=2, nheads=8):
    inputs = ssd_inputs(seqlen, dtype, ngroups=ngroups, nheads=nheads, batch=batch)
    fn = lambda **kw: ssd.ssd_chunked(**kw, chunk_size=chunk, backend="torch")
    w = torch.randn(inputs["x"].shape, device=DEV)        # a loss that weighs every output differently
    loss = lambda out: (out[0].float() * w).sum() + out[1].float().pow(2).sum()

    def results(f, ins):
        (y, s), g = fwd_bwd(f, ins, loss)
        return dict(y=y, state=s, **{f"d{k}": v for k, v in g.items()})

    ref = results(fn, {k: v.float() for k, v in inputs.items()}) if dtype != torch.float32 else None
    errs, eager_errs, t_eager, t_first, t_second = eager_vs_compiled(fn, lambda f: results(f, inputs), ref)
    gcount, breaks, reasons = explain(fn, **inputs)
    return dict(errs=errs, eager_errs=eager_errs, graphs=gcount, graph_breaks=breaks, break_reasons=reasons,
                eager_s=t_eager, compile_first_s=t_first, compiled_s=t_second)


def case_model(dtype, mode, seqlen=1000, cache=False):
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=256, n_layer=2, vocab_size=1000, d_state=64, headdim=64, ngroups=1, chunk_size=64)
    model = Mamba2LM(cfg).to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (2, seqlen), device=DEV)
    model.train(mode == "train")

    def results(m, low_precision):
        model.zero_grad(set_to_none=True)
        kw = {}
        if cache:
            kw["cache"] = model.allocate_inference_cache(ids.shape[0], dtype=torch.float32)
        # a cache is for inference: filled under no_grad (with grad on, its in-place update is an autograd error)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=low_precision), torch.set_grad_enabled(not cache):
            logits = m(ids, **kw)
        out = dict(logits=logits.detach().float())
        if mode == "train":
            F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.roll(-1, 1).reshape(-1)).backward()
            out.update({f"d{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if cache:
            out.update(conv_state=kw["cache"].conv_states[-1].clone(), ssm_state=kw["cache"].ssm_states[-1].clone())
        sync()
        return out

    low = dtype != torch.float32
    ref = results(model, False) if low else None
    errs, eager_errs, t_eager, t_first, t_second = eager_vs_compiled(model, lambda m: results(m, low), ref)
    squash = lambda d: d and {**{k: v for k, v in d.items() if not k.startswith("d")},
                              "grads (worst parameter)": max([v for k, v in d.items() if k.startswith("d")], default=0.0)}
    errs, eager_errs = squash(errs), squash(eager_errs)
    kw = dict(cache=model.allocate_inference_cache(ids.shape[0], dtype=torch.float32)) if cache else {}
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=low), torch.set_grad_enabled(not cache):
        gcount, breaks, reasons = explain(model, ids, **kw)
    return dict(errs=errs, eager_errs=eager_errs, graphs=gcount, graph_breaks=breaks, break_reasons=reasons,
                eager_s=t_eager, compile_first_s=t_first, compiled_s=t_second)


def case_pattern(name, Q):
    "Compile one of ssd.py's cumsum helpers alone at a chunk's shape (b, g, c, r, Q), forward and backward."
    f = getattr(ssd, name)
    a = -torch.rand(2, 2, 16, 4, Q, device=DEV) * 0.1
    (ye, ge), _ = timed(lambda: fwd_bwd(lambda a: f(a), dict(a=a), lambda y: y.nan_to_num(0, 0, 0).sum()))
    torch._dynamo.reset()
    cf = torch.compile(f)
    (yc, gc), t_first = timed(lambda: fwd_bwd(lambda a: cf(a), dict(a=a), lambda y: y.nan_to_num(0, 0, 0).sum()))
    fin = torch.isfinite(ye)
    errs = dict(y=rel_err(yc[fin], ye[fin]), da=rel_err(gc["a"], ge["a"]))
    return dict(errs=errs, graphs=None, graph_breaks=None, break_reasons=[], compile_first_s=t_first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fp32 only, one chunk size, no pattern probes")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    ap.add_argument("--only", default=None, metavar="TEXT", help="run only the cases whose name contains TEXT")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU machine (--device cpu for a dry run)")
    tol = 2e-3        # float32: compiled vs eager; bfloat16: compiled may be at most 2x (+ tol) as far from float32 as eager
    cases = []
    for dtype in (torch.float32,) if args.quick else (torch.float32, torch.bfloat16):
        name = str(dtype)[6:]
        for chunk in (64,) if args.quick else (64, 256):
            cases.append((f"ssd_chunked {name} chunk {chunk} L1000 fwd+bwd", lambda d=dtype, q=chunk: case_ssd(d, q)))
        cases.append((f"ssd_chunked {name} chunk 256 L200 b1 h4 fwd+bwd",
                      lambda d=dtype: case_ssd(d, 256, seqlen=200, batch=1, ngroups=1, nheads=4)))
        for mode in ("train", "eval"):
            cases.append((f"Mamba2LM {name} {mode} L1000" + (" fwd+bwd" if mode == "train" else " fwd"),
                          lambda d=dtype, m=mode: case_model(d, m)))
    if not args.quick:
        cases.append(("Mamba2LM float32 eval L1000 prefill+cache", lambda: case_model(torch.float32, "eval", cache=True)))
        names = [n for n in ("segsum", "_sum_after", "_decay_matrix") if hasattr(ssd, n)]
        for name in names:
            for Q in (1, 64, 256):
                cases.append((f"pattern {name} Q={Q}", lambda n=name, q=Q: case_pattern(n, q)))

    if args.only:
        cases = [(name, fn) for name, fn in cases if args.only in name]
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if DEV == "cuda" else DEV,
               triton=getattr(__import__("importlib").import_module("triton"), "__version__", None)
               if __import__("importlib").util.find_spec("triton") else None,
               snakes_lib=os.path.dirname(snakes_lib.__file__))
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results = []
    hdr = f"{'case':44s} {'status':8s} {'max rel err':>11s} {'(eager)':>9s} {'breaks':>6s} {'compile s':>9s} {'eager s':>8s} {'compiled s':>10s}"
    print(hdr + "\n" + "-" * len(hdr), flush=True)
    for name, fn in cases:
        rec = dict(case=name, tolerance=tol)
        try:
            rec.update(fn())
            ee = rec.get("eager_errs")
            close = all(v <= (tol if ee is None else 2 * ee[k] + tol) for k, v in rec["errs"].items())
            rec["max_rel_err"] = max(rec["errs"].values())
            rec["eager_max_rel_err"] = max(ee.values()) if ee else None
            rec["status"] = "ok" if close and not rec.get("graph_breaks") else ("BREAKS" if close else "MISMATCH")
        except Exception as e:                                    # report and go on with the next case
            rec.update(status="ERROR", error=f"{type(e).__name__}: {str(e)[:2000]}", traceback=traceback.format_exc()[-6000:])
        results.append(rec)
        f = lambda k, fmt: format(rec[k], fmt) if rec.get(k) is not None else "-"
        print(f"{name:44s} {rec['status']:8s} {f('max_rel_err', '11.2e')} {f('eager_max_rel_err', '9.2e')} {f('graph_breaks', '>6')} "
              f"{f('compile_first_s', '9.1f')} {f('eager_s', '8.3f')} {f('compiled_s', '10.3f')}", flush=True)
        if rec["status"] == "ERROR":
            print("    " + rec["error"].splitlines()[0][:300] if rec["error"] else "", flush=True)
        for r in rec.get("break_reasons") or []:
            print("    break:", r, flush=True)
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "compile_check.json")
    else:
        path = os.path.join(ROOT, "benchmarks", "results", f"compile_check_{'cuda' if DEV == 'cuda' else 'cpu'}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(dict(env=env, results=results), fh, indent=2, default=str)
    n_ok = sum(r["status"] == "ok" for r in results)
    print(f"\n{n_ok}/{len(results)} cases ok; details in {path}")
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

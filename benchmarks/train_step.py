"""Training-step time and peak memory of Mamba2LM and its parameter-matched Transformer++, side by side in one run.

    python benchmarks/train_step.py --device cuda                  # the 115M config, L = 2048 / 8192 / 16384
    python benchmarks/train_step.py --device cuda --compile        # also torch.compile(model) for both models
    python benchmarks/train_step.py --device cuda --profile 2048   # plus a torch.profiler table of one Mamba-2 step
    python benchmarks/train_step.py --device cuda --cuda-graph     # also the whole step captured in one CUDA graph
    python benchmarks/train_step.py --quick                        # CPU smoke run (tiny model)

One step = forward under bf16 autocast (fp32 on CPU) + cross-entropy + backward + fused AdamW, at a fixed number of
tokens per step (batch = tokens // L). The Mamba-2 model takes whatever SSD backend `ssd_chunked` picks ("auto":
the Triton kernels on CUDA). Timing: median of the timed steps after warm-up, synchronised. Memory: CUDA
max_memory_allocated over the timed steps. Writes benchmarks/results/train_step_<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from snakes_lib.model import Mamba2Config, Mamba2LM  # noqa: E402
from snakes_lib.transformer import TransformerLM, matched_transformer_config  # noqa: E402
from _common import device_name, setup_device, write_json_atomic  # noqa: E402

CONFIG_115M = dict(d_model=768, n_layer=24, d_state=128, headdim=64, vocab_size=32768, chunk_size=256)
CONFIG_QUICK = dict(d_model=64, n_layer=2, d_state=16, headdim=16, vocab_size=512, chunk_size=32)


def ssd_only(model):
    "The Triton SSD (chapter 09) without chapter 10's fused conv and gated norm: the 'before' of chapter 10."
    for block in model.backbone.layers:
        block.mixer._fused = lambda t: None
    return model


def torch_path(model):
    model.kernels = "torch"
    return model


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_fn(model, opt, x, amp_dtype, dev):
    def step():
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def graphed_step_fn(model, opt, x, amp_dtype, dev, warmup=3):
    """The step of step_fn captured once in a CUDA graph: each call replays it, one launch instead of thousands.
    The warm-up steps run on a side stream (as torch.cuda.graph asks), and they train: the weights move."""
    static_x = x.clone()

    def body():
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False):
            logits = model(static_x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), static_x[:, 1:].flatten())
        loss.backward()
        opt.step()
        return loss
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream(dev).wait_stream(side)
    opt.zero_grad(set_to_none=True)      # the captured backward then writes fresh gradients on every replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = body()

    def step():
        graph.replay()
        return static_loss
    return step


def graph_matches_eager(build, L, batch, dev, amp_dtype, steps=6):
    "Losses of the eager and the graphed step from the same start, step by step: the largest relative difference."
    losses = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build().to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed)
        x = torch.randint(0, model.config.vocab_size, (batch, L + 1), generator=torch.Generator().manual_seed(0)).to(dev)
        if graphed:
            step = graphed_step_fn(model, opt, x, amp_dtype, dev, warmup=3)
            losses[graphed] = [float(step()) for _ in range(steps - 3)]
        else:
            step = step_fn(model, opt, x, amp_dtype, dev)
            losses[graphed] = [float(step()) for _ in range(steps)][3:]
        del model, opt
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True]))
    return dict(seq_len=L, batch=batch, eager=losses[False], graphed=losses[True], max_rel_diff=rel)


def measure(name, build, L, batch, dev, amp_dtype, compile_, steps, warmup, graphed=False):
    "One row: median ms per step, tokens/s, peak memory. OOM is a result (row['oom'] = True)."
    row = dict(model=name, seq_len=L, batch=batch, compiled=compile_, graphed=graphed, ms=None, tokens_per_s=None,
               peak_gib=None, oom=False, first_step_s=None, loss=None)
    model = opt = None
    try:
        torch.manual_seed(0)
        model = build().to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda", capturable=graphed)
        fwd = torch.compile(model, dynamic=False) if compile_ else model
        x = torch.randint(0, model.config.vocab_size, (batch, L + 1), generator=torch.Generator().manual_seed(0)).to(dev)
        if dev.type == "cuda" and graphed:        # the graph's private memory pool is filled while capturing
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev); t0 = time.perf_counter()
        step = (graphed_step_fn if graphed else step_fn)(fwd, opt, x, amp_dtype, dev)
        step()
        sync(dev); row["first_step_s"] = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            step()
        if dev.type == "cuda" and not graphed:
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(steps):
            sync(dev); t0 = time.perf_counter()
            loss = step()
            sync(dev); times.append(time.perf_counter() - t0)
        ms = 1000 * statistics.median(times)
        row.update(ms=ms, tokens_per_s=batch * L / ms * 1000, loss=float(loss))
        if dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
    except torch.OutOfMemoryError:
        row["oom"] = True
    finally:
        del model, opt
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def profile_table(build, L, batch, dev, amp_dtype, rows=30):
    "Top kernels of one eager Mamba-2 training step (after a warm-up step), by device time."
    from torch.profiler import ProfilerActivity, profile
    model = build().to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x = torch.randint(0, model.config.vocab_size, (batch, L + 1)).to(dev)
    step = step_fn(model, opt, x, amp_dtype, dev)
    step(); sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(); sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    # kernels only (self device time), so the rows add up to the step's device time
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    evs = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    evs.sort(key=lambda e: -getattr(e, attr))
    top = [dict(name=e.key[:160], self_ms=getattr(e, attr) / 1000, calls=e.count) for e in evs]
    del model, opt
    return table, top


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, short lengths (CPU smoke run)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default 2048 8192 16384")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (default 16384)")
    p.add_argument("--models", nargs="+", default=["mamba2", "transformer"],
                   choices=["mamba2", "transformer", "mamba2_ssd_only", "mamba2_torch"],
                   help="mamba2: every fast kernel (model.kernels='auto'); mamba2_ssd_only: the Triton SSD but "
                        "PyTorch conv and gated norm; mamba2_torch: chapter 05's PyTorch code throughout")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) (dynamic=False)")
    p.add_argument("--compile-lengths", type=int, nargs="+", default=None, help="lengths to compile at (default all)")
    p.add_argument("--cuda-graph", action="store_true", help="also time the whole step captured in a CUDA graph")
    p.add_argument("--graph-models", nargs="+", default=["mamba2", "transformer"], help="models to graph (default both)")
    p.add_argument("--profile", type=int, default=None, metavar="L", help="print a profiler table of one Mamba-2 step")
    p.add_argument("--profile-models", nargs="+", default=["mamba2"], help="models to profile (default mamba2)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step_<device>.json)")
    args = p.parse_args(argv)
    cuda = setup_device(p, args)
    if args.cuda_graph and not cuda:
        p.error("--cuda-graph needs --device cuda (CUDA graphs are a CUDA feature)")
    dev = torch.device(args.device)
    amp = torch.bfloat16 if cuda else None
    mcfg = Mamba2Config(**(CONFIG_QUICK if args.quick else CONFIG_115M))
    tcfg = matched_transformer_config(mcfg)
    builders = {"mamba2": lambda: Mamba2LM(mcfg), "transformer": lambda: TransformerLM(tcfg),
                "mamba2_ssd_only": lambda: ssd_only(Mamba2LM(mcfg)), "mamba2_torch": lambda: torch_path(Mamba2LM(mcfg))}
    lengths = args.lengths or ([64, 256] if args.quick else [2048, 8192, 16384])
    tokens = 512 if args.quick and args.tokens == 16384 else args.tokens
    doc = dict(benchmark="train_step", command=" ".join(sys.argv), device=device_name(args.device), torch=torch.__version__,
               date=datetime.date.today().isoformat(), amp="bfloat16" if amp else "float32", tokens_per_step=tokens,
               mamba2_config=mcfg.to_dict() if hasattr(mcfg, "to_dict") else vars(mcfg), transformer_config=vars(tcfg),
               params={k: sum(q.numel() for q in builders[k]().parameters()) for k in ("mamba2", "transformer")}, rows=[])
    for L in lengths:
        modes = [(False, False)] + [(True, False)] * (args.compile and (args.compile_lengths is None or L in args.compile_lengths))
        for compile_, graphed in modes + [(False, True)] * args.cuda_graph:
            for name in args.models:
                if graphed and name not in args.graph_models:
                    continue
                row = measure(name, builders[name], L, max(1, tokens // L), dev, amp, compile_, args.steps, args.warmup,
                              graphed=graphed)
                doc["rows"].append(row)
                ms = "OOM" if row["oom"] else f"{row['ms']:8.1f} ms  {row['tokens_per_s']/1e3:7.1f}k tok/s"
                mem = f"  {row['peak_gib']:.2f} GiB" if row["peak_gib"] else ""
                mode = "compiled" if compile_ else "graphed " if graphed else "eager   "
                print(f"{name:12s} L={L:6d} b={row['batch']:3d} {mode}  {ms}{mem}"
                      f"  (first step {row['first_step_s'] or 0:.1f} s)", flush=True)
    if args.cuda_graph:
        L = lengths[0]
        doc["graph_check"] = {name: graph_matches_eager(builders[name], L, max(1, tokens // L), dev, amp)
                              for name in args.graph_models}
        for name, c in doc["graph_check"].items():
            print(f"graph vs eager, {name} L={L}: losses {c['eager']} vs {c['graphed']}, max rel diff {c['max_rel_diff']:.2e}")
    if args.profile:
        doc["profile"] = {}
        for name in args.profile_models:
            table, top = profile_table(builders[name], args.profile, max(1, tokens // args.profile), dev, amp)
            print(f"profile of one {name} step at L={args.profile}:\n{table}")
            doc["profile"][name] = dict(seq_len=args.profile, batch=max(1, tokens // args.profile), top=top)
    out = args.out or ROOT / "benchmarks" / "results" / f"train_step_{'cuda' if cuda else 'cpu'}{'_quick' if args.quick else ''}.json"
    write_json_atomic(out, doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

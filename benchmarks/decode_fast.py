"""Decoding speed of the 115M Mamba-2 next to its parameter-matched Transformer++, each eager and as a CUDA graph
(chapter 10b), side by side in one run, after prompts of 1K to 32K tokens.

    python benchmarks/decode_fast.py --device cuda            # bf16; batch 1 and 8; writes decode_fast_cuda.json
    python benchmarks/decode_fast.py --quick                  # CPU smoke run: tiny model, eager only

Each row: prefill the prompt (random tokens) into a fresh cache, 3 untimed steps, then the median over --tokens
timed steps of one decoding step (synchronised), greedy. The Transformer++ decodes from a KV cache preallocated for
the prompt plus the new tokens. Also checks that the graph decodes the same greedy tokens as the eager step.
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

from snakes_lib.model import Mamba2Config, Mamba2LM  # noqa: E402
from snakes_lib.transformer import TransformerLM, matched_transformer_config  # noqa: E402
from _common import device_name, setup_device, write_json_atomic  # noqa: E402
from train_step import CONFIG_115M, CONFIG_QUICK, sync  # noqa: E402


def make_step(name, model, cache):
    "The step to time: eager, or a CUDA graph; `mamba2_torchstep_graph` graphs chapter 05's step without chapter 10c's kernels."
    if name == "mamba2_torchstep_graph":
        from snakes_lib.graph_decode import GraphedStep
        model.kernels = "torch"
        try:
            return GraphedStep(model, cache)
        finally:
            model.kernels = "auto"
    if name.endswith("_graph"):
        from snakes_lib.graph_decode import GraphedStep
        return GraphedStep(model, cache)
    return lambda t: model.step(t, cache)


def measure(name, model, batch, context, n_tokens, dev):
    row = dict(model=name, batch=batch, context=context, ms_per_token=None, prefill_s=None, oom=False)
    try:
        prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0)).to(dev)
        kw = dict(max_seqlen=context + n_tokens + 8) if name.startswith("transformer") else {}
        cache = model.allocate_inference_cache(batch, **kw)
        with torch.no_grad():
            sync(dev); t0 = time.perf_counter()
            tok = model(prompt, cache=cache)[:, -1].argmax(-1)
            sync(dev); row["prefill_s"] = time.perf_counter() - t0
            step = make_step(name, model, cache)
            for _ in range(3):
                tok = step(tok).argmax(-1)
            times = []
            for _ in range(n_tokens):
                sync(dev); t0 = time.perf_counter()
                tok = step(tok).argmax(-1)
                sync(dev); times.append(time.perf_counter() - t0)
        row["ms_per_token"] = 1000 * statistics.median(times)
    except torch.OutOfMemoryError:
        row["oom"] = True
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def graph_equals_eager(model, dev, n=48):
    "Greedy tokens of the eager step and of GraphedStep from the same prompt (batch 2): identical?"
    from snakes_lib.graph_decode import GraphedStep
    prompt = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1)).to(dev)
    out = {}
    for name in ("eager", "graph"):
        cache = model.allocate_inference_cache(2)
        with torch.no_grad():
            tok = model(prompt, cache=cache)[:, -1].argmax(-1)
            step = GraphedStep(model, cache) if name == "graph" else (lambda t: model.step(t, cache))
            toks = []
            for _ in range(n):
                tok = step(tok).argmax(-1)
                toks.append(tok.clone())
        out[name] = torch.stack(toks, 1)
    return bool(torch.equal(out["eager"], out["graph"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="default 1024 4096 16384 32768")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=64, help="timed steps per row (default 64)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = setup_device(p, args)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if cuda else torch.float32
    mcfg = Mamba2Config(**(CONFIG_QUICK if args.quick else CONFIG_115M))
    tcfg = matched_transformer_config(mcfg)
    torch.manual_seed(0)
    models = {"mamba2": Mamba2LM(mcfg).to(dev, dtype).eval(), "transformer": TransformerLM(tcfg).to(dev, dtype).eval()}
    names = (["mamba2", "mamba2_graph", "mamba2_torchstep_graph", "transformer", "transformer_graph"] if cuda
             else ["mamba2", "transformer"])
    contexts = args.contexts or ([64, 256] if args.quick else [1024, 4096, 16384, 32768])
    doc = dict(benchmark="decode_fast", command=" ".join(sys.argv), device=device_name(args.device),
               torch=torch.__version__, date=datetime.date.today().isoformat(), dtype=str(dtype).replace("torch.", ""),
               mamba2_config=mcfg.to_dict(), transformer_config=tcfg.to_dict(), rows=[],
               fused_step=cuda)   # on a GPU, mamba2 rows step with chapter 10c's kernels; torchstep rows without
    if cuda:
        doc["graph_equals_eager"] = graph_equals_eager(models["mamba2"], dev)
        print("graph == eager (greedy tokens):", doc["graph_equals_eager"], flush=True)
    for batch in args.batches:
        for ctx in contexts:
            for name in names:
                row = measure(name, models[name.split("_")[0]], batch, ctx, args.tokens, dev)
                doc["rows"].append(row)
                ms = "OOM" if row["oom"] else f"{row['ms_per_token']:7.2f} ms/token (prefill {row['prefill_s']:.2f} s)"
                print(f"batch {batch:2d} context {ctx:6d} {name:14s} {ms}", flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"decode_fast_{'cuda' if cuda else 'cpu'}{'_quick' if args.quick else ''}.json"
    write_json_atomic(out, doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

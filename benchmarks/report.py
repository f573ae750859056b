"""Render the README's benchmark tables from the JSON files the benchmarks write (benchmarks/results/*.json).

    python benchmarks/report.py            # prints markdown; numbers come only from the stored results

Each table names the device and torch version it was measured with. Rerun a benchmark to refresh its file."""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MiB, GiB = 2**20, 2**30


def size(n) -> str:
    "bytes -> a readable size"
    if n is None:
        return "-"
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def ssd_table(d: dict) -> str:
    cfg = d["config"]
    out = [f"**SSD forms on {d['device']}** (torch {d['torch']}, {d['threads']} threads; batch {cfg['batch']}, "
           f"{cfg['nheads']} heads x headdim {cfg['headdim']}, dstate {cfg['dstate']}, chunk {cfg['chunk_size']}, "
           f"{cfg['dtype']}): time / peak memory", "",
           "| seqlen | pass | recurrent | quadratic | chunked |", "|---|---|---|---|---|"]
    cells = {}
    for r in d["results"]:
        mode = r.get("mode", "forward")
        if r.get("time_ms") is None:
            txt = "skipped"
        else:
            txt = f"{r['time_ms']:,.1f} ms / {r['peak_mib']:,.0f} MiB"
        cells[(r["seqlen"], mode, r["form"])] = txt
    for L in sorted({k[0] for k in cells}):
        for mode in ("forward", "forward+backward"):
            if any(k[:2] == (L, mode) for k in cells):
                row = [cells.get((L, mode, f), "-") for f in ("recurrent", "quadratic", "chunked")]
                out.append(f"| {L:,} | {mode} | " + " | ".join(row) + " |")
    checks = d.get("checks", {})
    notes = []
    for key, c in checks.items():
        if key.startswith("speedup"):
            notes.append(f"chunked vs recurrent at 4096 ({key.rsplit('_', 1)[-1]}): **{c['value']:.1f}x**")
        elif key.startswith("memory_growth"):
            notes.append(f"{key.replace('memory_growth_', '')} memory grows as seqlen^{c['exponent']:.2f}")
    return "\n".join(out) + ("\n\n" + "; ".join(notes) + "." if notes else "")


def memory_table(d: dict) -> str:
    out = [f"**Peak training memory on {d['device']}** (torch {d['torch']}; a few optimizer steps on random tokens)", "",
           "| run | model | params | length | batch | vocab | block ckpt | chunked CE | SSD recompute | "
           "peak allocated | peak reserved | budget / goal | tokens/s |", "|" + "---|" * 13]
    for r in d["rows"]:
        limit = r.get("budget_gb") or r.get("goal_gb")
        ok = "" if r.get("ok") is None else (" ✓" if r["ok"] else " ✗")
        out.append(f"| {r['name']} | {r['size']} | {r.get('params', 0) / 1e6:.1f}M | {r['seq_len']} | {r['batch']} | "
                   f"{r['vocab']:,} | {'yes' if r['ckpt'] else 'no'} | {'yes' if r['chunked_ce'] else 'no'} | "
                   f"{'yes' if r.get('recompute_ssd') else 'no'} | {r.get('peak_allocated_gb', float('nan')):.2f} GiB | "
                   f"{r.get('peak_reserved_gb', float('nan')):.2f} GiB | {f'{limit:g} GB' if limit else '-'}{ok} | "
                   f"{r.get('tokens_per_s', 0):,.0f} |")
    return "\n".join(out)


def decode_table(d: dict) -> str:
    c = d["config"]
    out = [f"**Decoding on {d['device']}** (torch {d['torch']}, {d['dtype']}, batch {d['batch']}; Mamba-2 d_model "
           f"{c['d_model']}, {c['n_layer']} layers, {d['parameters'] / 1e6:.1f}M params)", "",
           "| context | prefill tokens/s | ms per generated token | cache |", "|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['context']:,} | {r['prefill_tokens_per_s']:,.0f} | {r['step_ms']:.2f} | {size(r['cache_bytes'])} |")
    out.append(f"\nper-token time, longest over shortest context: {d['step_time_ratio_median']:.2f}x "
               f"({'flat' if d['step_time_flat'] else 'NOT flat'}).")
    return "\n".join(out)


def compare_table(d: dict) -> str:
    e = d["experiments"]
    out = [f"**Mamba-2 vs Transformer++ on {d['device']}** (torch {d['torch']})", ""]
    if "lm" in e:
        best = e["lm"]["best"]
        parts = []
        for m in ("mamba2", "transformer"):
            b = best.get(m) or {}
            loss = b.get("best_val_loss", b.get("val_loss"))
            if loss is not None:
                parts.append(f"{m} {loss:.3f} (lr {b.get('lr')})")
        out.append("- language modelling, best validation loss at the same token budget: " + ", ".join(parts))
    if "train" in e:
        rows = [r for r in e["train"]["rows"] if not r.get("oom")]
        mem_key = "peak_memory_bytes" if any(r.get("peak_memory_bytes") for r in rows) else "activation_bytes"
        mem_name = "peak memory" if mem_key == "peak_memory_bytes" else "saved activations"
        out += ["", f"training steps at a fixed number of tokens per step:", "",
                f"| seq len | Mamba-2 ms/step | Transformer++ ms/step | Mamba-2 {mem_name} | Transformer++ {mem_name} |",
                "|---|---|---|---|---|"]
        for L in sorted({r["seq_len"] for r in rows}):
            m = next((r for r in rows if r["seq_len"] == L and r["model"] == "mamba2"), None)
            t = next((r for r in rows if r["seq_len"] == L and r["model"] == "transformer"), None)
            f = lambda r, k, s=1.0, fmt="{:,.0f}": fmt.format(r[k] / s) if r and r.get(k) is not None else "-"
            out.append(f"| {L:,} | {f(m, 'ms_per_step')} | {f(t, 'ms_per_step')} | {size((m or {}).get(mem_key))} | "
                       f"{size((t or {}).get(mem_key))} |")
    if "decode" in e:
        rows = e["decode"]["rows"]
        out += ["", "| context | Mamba-2 ms/token | Transformer++ ms/token | Mamba-2 state | Transformer++ KV cache |",
                "|---|---|---|---|---|"]
        for L in sorted({r["context_len"] for r in rows}):
            m = next((r for r in rows if r["context_len"] == L and r["model"] == "mamba2"), {})
            t = next((r for r in rows if r["context_len"] == L and r["model"] == "transformer"), {})
            g = lambda r, k, fmt: fmt(r[k]) if r.get(k) is not None else "-"
            out.append(f"| {L:,} | {g(m, 'ms_per_token', '{:.2f}'.format)} | {g(t, 'ms_per_token', '{:.2f}'.format)} | "
                       f"{size(m.get('cache_bytes'))} | {size(t.get('cache_bytes'))} |")
        cx = e["decode"].get("crossovers", {})
        out.append(f"\nthe Mamba-2 state is smaller than the KV cache from {e['decode'].get('analytic_crossover_context_len')} "
                   f"tokens (analytic; measured grid: {cx.get('smaller_cache_from')}); decoding is faster from: "
                   f"{cx.get('faster_decoding_from') or 'never, in this range'}.")
    return "\n".join(out)


def main() -> int:
    sections = [("ssd_cpu.json", ssd_table), ("ssd_cuda.json", ssd_table), ("memory_cuda.json", memory_table),
                ("decode_cpu.json", decode_table), ("decode_cuda.json", decode_table),
                ("compare_cpu.json", compare_table), ("compare_cuda.json", compare_table)]
    for name, render in sections:
        d = load(name)
        if d is None:
            print(f"_{name}: not measured yet_\n")
            continue
        print(render(d) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

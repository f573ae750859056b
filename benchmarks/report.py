"""Render the README's benchmark tables from the JSON files the benchmarks write (benchmarks/results/*.json).

    python benchmarks/report.py                  # prints markdown; numbers come only from the stored results
    python benchmarks/report.py --write-readme   # puts it into README.md between the report markers

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


# ------------------------------------------------------------------------------------------------------------------
# the "kernels" section of ssd_cuda.json (benchmarks/ssd.py --device cuda): the Triton SSD kernels against the PyTorch
# path, the official mamba_ssm kernels and causal FlashAttention. Pure Python: benchmarks/ssd.py imports these too.
KERNEL_IMPLS = ("snakes_torch", "snakes_triton", "snakes_triton_unfused", "official_triton", "sdpa_flash", "io_floor")
GRAD_NAMES = ("dx", "ddt", "dA", "dB", "dC", "dD")


def kernel_row(k: dict, impl: str, batch: int, seqlen: int, key: str | None = None):
    "The row of `impl` at (batch, seqlen), or its field `key` (None when missing, skipped or failed)."
    r = next((r for r in k["rows"] if r["impl"] == impl and r["batch"] == batch and r["seqlen"] == seqlen), None)
    if key is None:
        return r
    return None if r is None else r.get(key)


def _ratio(num, den):
    return round(num / den, 2) if num is not None and den else None


def kernel_shapes(k: dict) -> list[tuple[int, int]]:
    "The measured (batch, seqlen) pairs in the order they were measured."
    seen = []
    for r in k["rows"]:
        if (r["batch"], r["seqlen"]) not in seen:
            seen.append((r["batch"], r["seqlen"]))
    return seen


def kernels_summary(k: dict) -> dict:
    """Ratios and goal checks from the rows of a "kernels" section. Speedups are other time / snakes_triton time
    (> 1: snakes_triton is faster). crossover_seqlen: the shortest seqlen of the fixed-token sweep from which on
    snakes_triton's forward+backward is faster than sdpa_flash's at every longer measured seqlen (None: never)."""
    goals = k["config"]["goals"]
    gb, gL = goals["shape"]
    t = lambda impl, b, L, key: kernel_row(k, impl, b, L, key)
    per_shape = []
    for b, L in kernel_shapes(k):
        per_shape.append(dict(
            batch=b, seqlen=L,
            vs_torch_fwd=_ratio(t("snakes_torch", b, L, "fwd_ms"), t("snakes_triton", b, L, "fwd_ms")),
            vs_torch_fb=_ratio(t("snakes_torch", b, L, "fb_ms"), t("snakes_triton", b, L, "fb_ms")),
            vs_official_fwd=_ratio(t("official_triton", b, L, "fwd_ms"), t("snakes_triton", b, L, "fwd_ms")),
            vs_official_fb=_ratio(t("official_triton", b, L, "fb_ms"), t("snakes_triton", b, L, "fb_ms")),
            vs_sdpa_fb=_ratio(t("sdpa_flash", b, L, "fb_ms"), t("snakes_triton", b, L, "fb_ms")),
            unfused_vs_fused_fb=_ratio(t("snakes_triton_unfused", b, L, "fb_ms"), t("snakes_triton", b, L, "fb_ms"))))
    sweep = sorted({(r["seqlen"], r["batch"]) for r in k["rows"] if r.get("sweep")})
    both = [(L, b) for L, b in sweep
            if t("snakes_triton", b, L, "fb_ms") is not None and t("sdpa_flash", b, L, "fb_ms") is not None]
    faster = [L for L, b in both if t("snakes_triton", b, L, "fb_ms") < t("sdpa_flash", b, L, "fb_ms")]
    crossover = None
    for i, (L, b) in enumerate(both):
        if all(L2 in faster for L2, _ in both[i:]):
            crossover = L
            break
    g = lambda key: t("snakes_triton", gb, gL, key)
    speedup = _ratio(t("snakes_torch", gb, gL, "fb_ms"), g("fb_ms"))
    earlier = k.get("torch_side_by_side_earlier")
    if speedup is None and earlier:                    # the PyTorch path measured side by side in an earlier run
        e = lambda impl: next((r["fb_ms"] for r in earlier["rows"]
                               if r["impl"] == impl and (r["batch"], r["seqlen"]) == (gb, gL)), None)
        speedup = _ratio(e("snakes_torch"), e("snakes_triton"))
    checks = {}
    for name, value, target, ok in (
            ("fwd_ms", g("fwd_ms"), f"<= {goals['fwd_ms']}", lambda v: v <= goals["fwd_ms"]),
            ("fb_ms", g("fb_ms"), f"<= {goals['fb_ms']}", lambda v: v <= goals["fb_ms"]),
            ("peak_gib", g("peak_gib"), f"<= {goals['peak_gib']}", lambda v: v <= goals["peak_gib"]),
            ("speedup_vs_torch_fb", speedup, f">= {goals['speedup_vs_torch']}", lambda v: v >= goals["speedup_vs_torch"])):
        checks[name] = dict(value=value, target=target, ok=None if value is None else bool(ok(value)))
    return dict(goal_shape=[gb, gL], checks=checks, per_shape=per_shape, sweep_faster_than_sdpa=faster,
                crossover_seqlen=crossover, sweep_measured=[L for L, _ in both])


def _ms(v, digits=3):
    return "-" if v is None else f"{v:,.{digits}f} ms"


def _x(v):
    return "-" if v is None else f"{v:,.2f}x"


def _cell(text: str) -> str:
    "Text safe inside a markdown table cell."
    return str(text).replace("|", "\\|").replace("\n", " ")


def other_shapes_line(s: dict, goal_shape, min_speedup: float, goal_shapes) -> str:
    "The goals at the other goal shapes: ahead of the official kernel (at least within 1.5x of it), and >= 10x PyTorch."
    parts = []
    for r in s["per_shape"]:
        shape = (r["batch"], r["seqlen"])
        if shape == tuple(goal_shape) or shape not in {tuple(g) for g in goal_shapes} or r["vs_official_fb"] is None:
            continue
        ahead = r["vs_official_fwd"] >= 1 and r["vs_official_fb"] >= 1
        within = r["vs_official_fwd"] >= 1 / 1.5 and r["vs_official_fb"] >= 1 / 1.5
        torch_ok = r["vs_torch_fb"] is not None and r["vs_torch_fb"] >= min_speedup
        parts.append(f"{r['batch']} x {r['seqlen']:,}: official / snakes_triton {r['vs_official_fwd']:.2f}x forward, "
                     f"{r['vs_official_fb']:.2f}x forward+backward ({'ahead ✓' if ahead else 'within 1.5x ✓' if within else 'behind by more than 1.5x ✗'}), "
                     f"PyTorch path / snakes_triton {_x(r['vs_torch_fb'])} forward+backward ({'✓' if torch_ok else f'under {min_speedup:g}x ✗'})")
    return "At the other goal shapes (goal: ahead of the official kernel, at least within 1.5x of it, and >= " \
           f"{min_speedup:g}x faster than the PyTorch path): " + "; ".join(parts) + "."


def kernels_table(k: dict) -> str:
    "The kernels section as README markdown: goals, the goal shapes, the sweep against attention, correctness."
    c, s = k["config"], k.get("summary") or kernels_summary(k)
    gb, gL = c["goals"]["shape"]
    mark = lambda ok: "" if ok is None else (" ✓" if ok else " ✗")
    ch = s["checks"]
    out = [f"**SSD Triton kernels on {k['device']}** (torch {k['torch']}, triton {k['triton']}; {c['dtype']} x/B/C, "
           f"float32 dt/A/D, {c['nheads']} heads x headdim {c['headdim']}, dstate {c['dstate']}, ngroups {c['ngroups']}, "
           f"chunk {c['chunk_size']}, D on; median of triton.testing.do_bench; peak: max_memory_allocated above what "
           f"was allocated before one forward+backward)", "",
           f"Goals at batch {gb} x seqlen {gL:,}: forward <= {c['goals']['fwd_ms']} ms "
           f"(measured {_ms(ch['fwd_ms']['value'])}{mark(ch['fwd_ms']['ok'])}), forward+backward <= {c['goals']['fb_ms']} ms "
           f"(measured {_ms(ch['fb_ms']['value'])}{mark(ch['fb_ms']['ok'])}), peak <= {c['goals']['peak_gib']} GiB "
           f"(measured {'-' if ch['peak_gib']['value'] is None else format(ch['peak_gib']['value'], '.3f') + ' GiB'}"
           f"{mark(ch['peak_gib']['ok'])}), >= {c['goals']['speedup_vs_torch']:g}x faster than the PyTorch path "
           f"(snakes_torch, forward+backward: {_x(ch['speedup_vs_torch_fb']['value'])}{mark(ch['speedup_vs_torch_fb']['ok'])}).",
           "", other_shapes_line(s, (gb, gL), c["goals"]["speedup_vs_torch"], c["goal_shapes"]),
           "", "| batch x seqlen | implementation | forward | forward, CUDA graph | forward+backward | peak (f+b) | "
           "snakes_torch / this (f+b) | official / this (fwd, f+b) |", "|---|---|---|---|---|---|---|---|"]
    goal_shapes = [tuple(x) for x in c["goal_shapes"]]
    for b, L in goal_shapes:
        shape = f"{b} x {L:,}"
        if (b, L) == (gb, gL):
            shape = f"**{shape}**"
        for impl in KERNEL_IMPLS:
            r = kernel_row(k, impl, b, L)
            if r is None:
                continue
            if impl == "io_floor":
                out.append(f"| {shape} | floor: I/O at {r['copy_bw'] / 1e12:.1f} TB/s (FLOPs at {r['peak_flops'] / 1e12:.0f} "
                           f"TFLOP/s) | {_ms(r['fwd_ms'])} ({_ms(r.get('flop_fwd_ms'))}) | - | {_ms(r['fb_ms'])} "
                           f"({_ms(r.get('flop_fb_ms'))}) | - | - | - |")
                continue
            if r.get("fwd_ms") is None:
                out.append(f"| {shape} | {impl} | {_cell(r.get('skipped') or 'error: ' + str(r.get('error', ''))[:80])} "
                           "| | | | | |")
                continue
            ref = lambda other, key: _ratio(kernel_row(k, other, b, L, key), r.get(key))
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.3f} GiB"
            out.append(f"| {shape} | {impl} | {_ms(r['fwd_ms'])} | {_ms(r.get('fwd_graph_ms'))} | {_ms(r.get('fb_ms'))} | "
                       f"{peak} | {_x(ref('snakes_torch', 'fb_ms'))} | {_x(ref('official_triton', 'fwd_ms'))}, "
                       f"{_x(ref('official_triton', 'fb_ms'))} |")
    sweep = sorted({(r["seqlen"], r["batch"]) for r in k["rows"] if r.get("sweep")})
    if sweep:
        out += ["", f"Against causal attention at {c['sweep_tokens']:,} tokens per call (forward+backward; attention: "
                f"F.scaled_dot_product_attention, flash backend, {c['nheads']} heads x headdim {c['headdim']}):", "",
                "| seqlen | batch | snakes_triton | official_triton | sdpa_flash | snakes_torch | sdpa_flash / snakes_triton |",
                "|---|---|---|---|---|---|---|"]
        for L, b in sweep:
            f = lambda impl: kernel_row(k, impl, b, L, "fb_ms")
            out.append(f"| {L:,} | {b} | {_ms(f('snakes_triton'))} | {_ms(f('official_triton'))} | {_ms(f('sdpa_flash'))} | "
                       f"{_ms(f('snakes_torch'))} | {_x(_ratio(f('sdpa_flash'), f('snakes_triton')))} |")
        cx = s["crossover_seqlen"]
        out.append("\n" + (f"snakes_triton's forward+backward is faster than FlashAttention's from seqlen **{cx:,}** on."
                           if cx is not None else "snakes_triton's forward+backward is not faster than FlashAttention's "
                           "at the longest measured seqlen." if s["sweep_measured"] else
                           "(no seqlen where both snakes_triton and sdpa_flash were measured)"))
    ps = next((p for p in s["per_shape"] if (p["batch"], p["seqlen"]) == (gb, gL)), None)
    if ps:
        torch_part = (f"snakes_torch takes {_x(ps['vs_torch_fb'])} snakes_triton's forward+backward time; "
                      if ps["vs_torch_fb"] is not None else "")
        out.append(f"At {gb} x {gL:,}, {torch_part}"
                   f"official_triton takes {_x(ps['vs_official_fwd'])} its forward and {_x(ps['vs_official_fb'])} its "
                   f"forward+backward time (> 1: snakes_triton is faster).")
    earlier = k.get("torch_side_by_side_earlier")
    if earlier:
        out += ["", f"{_cell(k.get('errata', ''))}", "",
                f"Side by side in that earlier run ({earlier['device']}, torch {earlier['torch']}, triton {earlier['triton']}; "
                f"{_cell(earlier['note'])}):", "",
                "| batch x seqlen | implementation | forward | forward+backward | peak (f+b, inputs included) | "
                "snakes_torch / this (fwd, f+b) |", "|---|---|---|---|---|---|"]
        for r in earlier["rows"]:
            base = next((q for q in earlier["rows"] if q["impl"] == "snakes_torch"
                         and (q["batch"], q["seqlen"]) == (r["batch"], r["seqlen"])), None)
            ratios = "-" if base is None else f"{_x(_ratio(base['fwd_ms'], r['fwd_ms']))}, {_x(_ratio(base['fb_ms'], r['fb_ms']))}"
            out.append(f"| {r['batch']} x {r['seqlen']:,} | {r['impl']} | {_ms(r['fwd_ms'])} | {_ms(r['fb_ms'])} | "
                       f"{r['peak_gib']:.3f} GiB | {ratios} |")
    cases = k.get("correctness") or []
    if cases:
        out += ["", "Relative error ||a - b|| / ||b|| against snakes_torch in float64 on the same (upcast) inputs:", "",
                "| case | implementation | y | " + " | ".join(GRAD_NAMES) + " |", "|---|---|---|" + "---|" * len(GRAD_NAMES)]
        for case in cases:
            name = (f"{case['batch']} x {case['seqlen']:,}, ngroups {case['ngroups']}, chunk {case['chunk_size']}, "
                    f"{case['dtype']}")
            for impl, errs in case["errors"].items():
                if isinstance(errs, str):
                    out.append(f"| {name} | {impl} | {_cell('error: ' + errs[:80])} |" + " |" * len(GRAD_NAMES))
                    continue
                e = lambda key: "-" if errs.get(key) is None else f"{errs[key]:.1e}"
                out.append(f"| {name} | {impl} | {e('y')} | " + " | ".join(e(g) for g in GRAD_NAMES) + " |")
    if k.get("errors"):
        out += ["", "Errors: " + "; ".join(f"{e.get('impl')} at {e.get('shape')}: {str(e.get('error'))[:120]}"
                                           for e in k["errors"])]
    return "\n".join(out)


def train_step_table(d: dict) -> str:
    "benchmarks/train_step.py: ms per training step and peak memory per model and length."
    rows = [r for r in d["rows"] if not r["oom"]]
    lengths = sorted({r["seq_len"] for r in rows})
    label = dict(mamba2="Mamba-2, every kernel (default)", mamba2_ssd_only="Mamba-2, Triton SSD only (chapter 09)",
                 mamba2_torch="Mamba-2, chapter 05's PyTorch", transformer="Transformer++ (SDPA)")
    out = [f"**Training step on {d['device']}** (torch {d['torch']}; 115M Mamba-2 (d_model 768, 24 layers, dstate 128) and "
           f"its parameter-matched Transformer++; {d['tokens_per_step']:,} tokens per step, {d['amp']} autocast, fused "
           "AdamW; median ms per step, peak memory)", "",
           "| model | " + " | ".join(f"L = {L:,}" for L in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        for mode, suffix in (("eager", ""), ("compiled", ", torch.compile"), ("graphed", ", whole step in a CUDA graph")):
            cells = {r["seq_len"]: r for r in rows if r["model"] == m and _mode(r) == mode}
            if cells:
                out.append(f"| {label.get(m, m) + suffix} | " + " | ".join(
                    f"{cells[L]['ms']:.1f} ms, {cells[L]['peak_gib']:.1f} GiB" if L in cells else "-" for L in lengths) + " |")
    if d.get("note"):
        out += ["", d["note"]]
    return "\n".join(out)


def _mode(row: dict) -> str:
    return "compiled" if row["compiled"] else "graphed" if row.get("graphed") else "eager"


def decode_fast_table(d: dict) -> str:
    "benchmarks/decode_fast.py: ms per generated token, eager and CUDA graph, against the Transformer++."
    out = [f"**Decoding on {d['device']}** (torch {d['torch']}, {d['dtype']}; the 115M models; median ms per generated "
           f"token after a prompt of the given length; CUDA graph == eager greedy tokens: {d.get('graph_equals_eager')})", ""]
    for batch in sorted({r["batch"] for r in d["rows"]}):
        rows = [r for r in d["rows"] if r["batch"] == batch and r["ms_per_token"]]
        ctxs = sorted({r["context"] for r in rows})
        out += ["", f"batch {batch}:", "", "| model | " + " | ".join(f"{c:,}" for c in ctxs) + " |",
                "|---" * (len(ctxs) + 1) + "|"]
        for m in dict.fromkeys(r["model"] for r in rows):
            v = {r["context"]: r["ms_per_token"] for r in rows if r["model"] == m}
            out.append(f"| {m} | " + " | ".join(f"{v[c]:.2f}" if c in v else "-" for c in ctxs) + " |")
    return "\n".join(out)


def fast_model_goals(train: dict, decode: dict) -> str:
    "Issue 11's goals, computed from train_step and decode_fast results measured side by side (one run each)."
    rows = {(r["model"], r["seq_len"], _mode(r)): r for r in train["rows"] if not r["oom"]}
    lengths = sorted({L for m, L, mode in rows if m == "mamba2" and ("transformer", L, "eager") in rows})

    def ratios(mine: str, theirs: str) -> str:
        return ", ".join(f"{rows[('mamba2', L, mine)]['ms'] / rows[('transformer', L, theirs)]['ms']:.2f}x at {L:,}"
                         for L in lengths if ('mamba2', L, mine) in rows and ('transformer', L, theirs) in rows)
    lighter = all(rows[("mamba2", L, "eager")]["peak_gib"] <= rows[("transformer", L, "eager")]["peak_gib"] for L in lengths)
    out = [f"Training step, Mamba-2 / Transformer++ (SDPA) time, both eager: {ratios('eager', 'eager')} tokens"
           + (f"; Mamba-2's step in a CUDA graph against the eager Transformer++: {ratios('graphed', 'eager')}; both "
              f"graphed: {ratios('graphed', 'graphed')}" if any(k[2] == "graphed" for k in rows) else "")
           + f" (goal: <= 1.2x at 2,048, < 1x at 8,192 and beyond); peak memory below the Transformer++'s at every "
           f"length: {'yes' if lighter else 'no'}."]
    graph = {(r["batch"], r["context"]): r["ms_per_token"] for r in decode["rows"]
             if r["model"] == "mamba2_graph" and r["ms_per_token"]}
    if graph:
        ctx = sorted({c for b, c in graph if b == 1})
        flat = max(graph[(1, c)] for c in ctx) / min(graph[(1, c)] for c in ctx)
        best_rival = {}
        for r in decode["rows"]:
            if r["model"].startswith("transformer") and r["ms_per_token"] and r["batch"] == 1:
                best_rival[r["context"]] = min(best_rival.get(r["context"], float("inf")), r["ms_per_token"])
        wins = [c for c in ctx if c in best_rival and graph[(1, c)] < best_rival[c]]
        graphed_rival = any(r["model"] == "transformer_graph" for r in decode["rows"])
        out.append(f"Decoding at batch 1 with the CUDA graph: {min(graph[(1, c)] for c in ctx):.2f}-"
                   f"{max(graph[(1, c)] for c in ctx):.2f} ms per token (goal: <= 2 ms), {flat:.2f}x between the slowest and fastest of {ctx[0]:,} to "
                   f"{ctx[-1]:,} tokens of context (goal: <= 1.1x); faster than the Transformer++'s best"
                   f"{' (eager or graphed)' if graphed_rival else ' (eager only: its graphed step is not measured yet)'}"
                   f" at {len(wins)} of {len(ctx)} context lengths.")
    return " ".join(out)


def graph_train_table(d: dict) -> str:
    "benchmarks/graph_train.py: snakes_lib.train.train eager and with each step recorded as a CUDA graph (chapter 10d)."
    out = [f"**The trainer with its step as a CUDA graph on {d['device']}** (torch {d['torch']}; `snakes train --preset P "
           f"--max-steps {d['steps']}` eagerly and with `--cuda-graph`, same seed, no evaluations; tokens/s: the "
           "trainer's own figure, median over the second half of the steps)", "",
           "| preset | settings | eager tokens/s | `--cuda-graph` tokens/s | speed-up | peak GiB (eager / graphed) | "
           "largest relative loss difference |", "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if "error" in r:
            out.append(f"| {r['preset']} | {r['label']} | failed: {r['error']} | | | | |")
            continue
        out.append(f"| {r['preset']} | {r['label']} | {r['eager_tokens_per_s']:,.0f} | {r['graphed_tokens_per_s']:,.0f} | "
                   f"{r['speedup']:.2f}x | {r['eager_peak_gib']:.1f} / {r['graphed_peak_gib']:.1f} | {r['max_rel_diff']:.1e} |")
    return "\n".join(out)


def seq_idx_table(d: dict) -> str:
    "benchmarks/ssd.py --seq-idx: the Triton SSD with packed documents (seq_idx) against the same call without."
    cfg = d["config"]
    out = [f"**Packed documents in the Triton SSD on {d['device']}** (torch {d['torch']}; {cfg['dtype']}, "
           f"{cfg['nheads']} heads x headdim {cfg['headdim']}, dstate {cfg['dstate']}, chunk {cfg['chunk_size']}; "
           "`seq_idx` resets the state at each new document)", "",
           "| batch x seqlen | documents (mean length) | forward | forward+backward | vs no seq_idx (fwd, f+b) | peak (f+b) |",
           "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        docs = "one per row" if r["mean_doc_len"] is None else f"{r['documents']:,} (~{r['mean_doc_len']:,} tokens)"
        out.append(f"| {r['batch']} x {r['seqlen']:,} | {docs} | {r['fwd_ms']:.3f} ms | {r['fb_ms']:.3f} ms | "
                   f"{r['fwd_vs_none']:.2f}x, {r['fb_vs_none']:.2f}x | {r['peak_gib']:.3f} GiB |")
    worst = {c["dtype"]: max(c["errors"].values()) for c in d.get("correctness", [])}
    if worst:
        out += ["", "Largest relative error of y and every gradient against float64 PyTorch with the same seq_idx: "
                + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + "."]
    return "\n".join(out)


def distributed_table(d: dict) -> str:
    "benchmarks/distributed.py: tokens/s and peak memory per GPU on 1 and 2 GPUs, DDP and FSDP, same global batch."
    out = [f"**Data-parallel training on {' + '.join(d['devices'])}** (torch {d['torch']}; bf16 autocast, the presets' "
           "memory savers; one optimizer step = the same global batch on every GPU count; torchrun, NCCL)", "",
           "| model | GPUs | mode | per-GPU batch x accumulation x GPUs | tokens/s | speed-up | peak GiB per GPU |",
           "|---|---|---|---|---|---|---|"]
    one = {r["size"]: r["tokens_per_s"] for r in d["rows"] if r.get("gpus") == 1 and "tokens_per_s" in r}
    for r in d["rows"]:
        if "tokens_per_s" not in r:
            out.append(f"| {r['size']} | {r['gpus']} | {r['parallel']} | failed: {r.get('error')} | | | |")
            continue
        up = r["tokens_per_s"] / one[r["size"]] if r["size"] in one else None
        out.append(f"| {r['size']} ({r['params_m']:.0f}M, L {r['seq_len']:,}) | {r['gpus']} | "
                   f"{r['parallel'] if r['gpus'] > 1 else '-'} | {r['per_rank_batch']} x {r['accumulation']} x {r['gpus']}"
                   f" = {r['global_batch']} | {r['tokens_per_s']:,.0f} | {'-' if up is None else f'{up:.2f}x'} | "
                   f"{max(r['peak_gib_per_gpu']):.2f} |")
    return "\n".join(out)


FAST_MODEL_INTRO = ("The fast model (chapters 10, 10b, 10c and 10d), measured side by side in one run on the H200, against "
                    "issue 11's goals (computed by `report.py` from the two tables below): ")


def sections() -> list[str]:
    "The README's benchmark block, in reading order; numbers only from benchmarks/results/*.json."
    out = []
    for name in ("ssd_cpu.json", "ssd_cuda.json"):
        d = load(name)
        if d is None:
            out.append(f"_{name}: not measured yet_")
            continue
        if "results" in d:
            out.append(ssd_table(d))
        if "kernels" in d:
            out.append(kernels_table(d["kernels"]))
        if "seq_idx" in d:
            out.append(seq_idx_table(d["seq_idx"]))
    train, decode = load("train_step_cuda.json"), load("decode_fast_cuda.json")
    if train and decode:
        out.append(FAST_MODEL_INTRO + fast_model_goals(train, decode))
    for name, render in [("train_step_cuda.json", train_step_table), ("graph_train_cuda.json", graph_train_table),
                         ("decode_fast_cuda.json", decode_fast_table),
                         ("distributed_cuda.json", distributed_table), ("memory_cuda.json", memory_table),
                         ("decode_cpu.json", decode_table), ("decode_cuda.json", decode_table),
                         ("compare_cpu.json", compare_table), ("compare_cuda.json", compare_table)]:
        d = load(name)
        out.append(f"_{name}: not measured yet_" if d is None else render(d))
    return out


BEGIN, END = "<!-- report.py: begin -->", "<!-- report.py: end -->"


def write_readme(readme: Path) -> None:
    "Replace the text between the BEGIN and END markers of the README with sections()."
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    body = "\n\n".join(sections())
    readme.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")
    print(f"rewrote the benchmark block of {readme}")


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write-readme", action="store_true", help="rewrite the README's block between the report markers")
    args = p.parse_args(argv)
    if args.write_readme:
        write_readme(RESULTS.parents[1] / "README.md")
    else:
        print("\n\n".join(sections()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tests for snakes_lib.compare: the MQAR generator, the state-size arithmetic (widget callback), and the
experiment functions at tiny settings (they must return well-formed, JSON-serializable data)."""
import json

import pytest
import torch

from snakes_lib.compare import (IGNORE_INDEX, analytic_cache_bytes, crossovers, decode_benchmark, kv_cache_numbers,
                                lm_summary, mamba2_state_numbers, matched_pair, mqar_batch, mqar_experiment, state_size_report,
                                train_mqar, train_step_benchmark)
from snakes_lib.model import Mamba2Config
from snakes_lib.transformer import TransformerConfig, matched_transformer_config


def tiny_pair():
    mc = Mamba2Config(d_model=32, n_layer=2, d_state=8, headdim=16, vocab_size=64, chunk_size=16)
    return {"mamba2": mc, "transformer": matched_transformer_config(mc)}


# -- MQAR -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, q, L, V", [(1, 1, 3, 2), (4, 4, 16, 16), (8, 3, 41, 40), (16, 16, 64, 64)])
def test_mqar_batch_structure(n, q, L, V):
    g = torch.Generator().manual_seed(n + L)
    inp, tgt = mqar_batch(17, num_kv_pairs=n, seq_len=L, vocab_size=V, num_queries=q, generator=g)
    assert inp.shape == tgt.shape == (17, L) and inp.dtype == tgt.dtype == torch.int64
    assert inp.min() >= 0 and inp.max() < V
    keys, vals = inp[:, 0:2 * n:2], inp[:, 1:2 * n:2]
    assert (keys < V // 2).all() and (vals >= V // 2).all(), "keys and values from disjoint ranges"
    assert all(len(set(r.tolist())) == n for r in keys), "distinct keys within a sequence"
    mask = tgt != IGNORE_INDEX
    assert (mask.sum(1) == q).all() and not mask[:, :2 * n].any(), "q answer positions, all after the pairs"
    for b, t in mask.nonzero().tolist():
        row = keys[b].tolist()
        assert inp[b, t].item() in row, "every query is one of the keys"
        assert tgt[b, t] == vals[b, row.index(inp[b, t].item())], "its target is that key's value"
    queried = [inp[b][mask[b]].tolist() for b in range(17)]
    assert all(len(set(r)) == q for r in queried), "each query asks a different key"


def test_mqar_batch_seeded_and_errors():
    a = mqar_batch(4, generator=torch.Generator().manual_seed(1))
    b = mqar_batch(4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="vocab_size"):
        mqar_batch(2, num_kv_pairs=9, vocab_size=16)
    with pytest.raises(ValueError, match="seq_len"):
        mqar_batch(2, num_kv_pairs=8, seq_len=20)
    with pytest.raises(ValueError, match="num_queries"):
        mqar_batch(2, num_kv_pairs=4, num_queries=5)


def test_train_mqar_and_experiment_rows():
    mc = Mamba2Config(d_model=16, n_layer=1, d_state=4, headdim=8, vocab_size=16, chunk_size=16)
    r = train_mqar(mc, steps=3, batch_size=4, num_kv_pairs=2, seq_len=8, vocab_size=16, eval_size=8)
    assert r["model"] == "mamba2" and 0 <= r["accuracy"] <= 1 and r["state_numbers"] == sum(mamba2_state_numbers(mc).values())
    mq = mqar_experiment(d_models=(16,), d_states=(4,), steps=2, batch_size=4, num_kv_pairs=2, seq_len=8, vocab_size=16,
                         progress=False)
    assert [x["model"] for x in mq["runs"]] == ["mamba2", "transformer"]
    assert mq["runs"][1]["state_numbers"] == kv_cache_numbers({"n_layer": 2, "d_model": 16}, 8)
    json.dumps(mq)


# -- state sizes and the widget callback ---------------------------------------------------------------------------
def test_state_size_report_crossover_is_exact():
    for d_state in (16, 64, 128):
        r = state_size_report(d_model=256, n_layer=8, d_state=d_state, context_len=1, state_bytes=2, kv_bytes=2)
        L = r["crossover_context_len"]
        assert state_size_report(d_model=256, n_layer=8, d_state=d_state, context_len=L, state_bytes=2)["kv_over_state"] >= 1
        assert state_size_report(d_model=256, n_layer=8, d_state=d_state, context_len=L - 1, state_bytes=2)["kv_over_state"] < 1
    small = state_size_report(d_state=16)["crossover_context_len"]
    assert small < state_size_report(d_state=128)["crossover_context_len"]
    assert state_size_report(num_kv_pairs=8)["state_numbers_per_kv_pair"] > 0
    json.dumps(state_size_report())


def test_analytic_cache_bytes_match_allocated_caches():
    from snakes_lib.compare import build_model, cache_nbytes
    for name, cfg in tiny_pair().items():
        m = build_model(cfg).eval()
        cache = m.allocate_inference_cache(1) if name == "mamba2" else m.allocate_inference_cache(1, max_seqlen=32)
        with torch.no_grad():
            m(torch.randint(0, 64, (1, 21)), cache=cache)
        assert cache_nbytes(cache) == analytic_cache_bytes(cfg, 21)


# -- the cost benchmarks and the fair setup, tiny ------------------------------------------------------------------
def test_matched_pair_report():
    p = matched_pair(tiny_pair()["mamba2"])
    assert abs(p["non_embedding_mismatch"]) < 0.05
    assert p["parameters"]["mamba2"]["embedding"] == p["parameters"]["transformer"]["embedding"]
    json.dumps(p)


def test_train_step_and_decode_benchmarks_tiny():
    pair = tiny_pair()
    rows = train_step_benchmark(pair, seq_lens=(16, 32), tokens_per_step=64, steps=1, warmup=0, progress=False)
    assert len(rows) == 4 and {r["batch_size"] for r in rows} == {4, 2}
    assert all(r["ms_per_step"] > 0 and r["activation_bytes"] > 0 and not r["oom"] for r in rows)
    dec = decode_benchmark(pair, context_lens=(8, 64), new_tokens=2, warmup=1, progress=False)
    assert all(r["cache_bytes"] == r["analytic_cache_bytes"] for r in dec)
    m = [r["cache_bytes"] for r in dec if r["model"] == "mamba2"]
    t = [r["cache_bytes"] for r in dec if r["model"] == "transformer"]
    assert m[0] == m[1] and t[1] == 8 * t[0], "the state is constant, the KV cache linear in the context"
    c = crossovers(dec)
    assert set(c) == {"smaller_cache_from", "faster_decoding_from"}
    json.dumps({"train": rows, "decode": dec, "crossovers": c})


def test_crossovers_logic():
    rows = [{"model": m, "context_len": L, "cache_bytes": cb, "ms_per_token": ms}
            for m, L, cb, ms in [("mamba2", 1, 10, 5), ("transformer", 1, 2, 1), ("mamba2", 2, 10, 5),
                                 ("transformer", 2, 20, 4), ("mamba2", 4, 10, 5), ("transformer", 4, 40, 8)]]
    assert crossovers(rows) == {"smaller_cache_from": 2, "faster_decoding_from": 4}


def test_transformer_config_type_dispatch():
    from snakes_lib.compare import build_model, model_type
    assert model_type(TransformerConfig(d_model=32, n_head=2)) == "transformer"
    assert model_type(tiny_pair()["mamba2"]) == "mamba2"
    assert type(build_model(tiny_pair()["transformer"])).__name__ == "TransformerLM"


# -- the LM sweep's summary over seeds ---------------------------------------------------------------------------------
def _runs(best_lrs, lrs=(1e-3, 3e-3, 1e-2, 3e-2), seeds=(0, 1, 2), noise=0.01):
    g = torch.Generator().manual_seed(0)
    return [{"model": m, "lr": lr, "seed": s, "run_dir": f"{m}/{lr}/{s}",
             "best_val_loss": 3.0 + abs(torch.tensor(lr / b).log10().item()) + noise * torch.rand(1, generator=g).item()}
            for m, b in best_lrs.items() for lr in lrs for s in seeds]


@pytest.mark.parametrize("best_lrs, edges", [({"mamba2": 1e-2, "transformer": 3e-3}, {"mamba2": False, "transformer": False}),
                                             ({"mamba2": 3e-2, "transformer": 1e-3}, {"mamba2": True, "transformer": True})])
def test_lm_summary_best_rate_and_edge(best_lrs, edges):
    runs = _runs(best_lrs)
    s = lm_summary(runs)
    assert len(s["rows"]) == 8 and all(r["seeds"] == [0, 1, 2] for r in s["rows"])
    for m, b in s["best"].items():
        mine = [r["best_val_loss"] for r in runs if r["model"] == m and r["lr"] == b["lr"]]
        assert b["lr"] == best_lrs[m] and b["at_edge"] is edges[m] and b["n_seeds"] == 3
        assert b["best_val_loss"] == pytest.approx(sum(mine) / 3) and b["min"] == min(mine) and b["max"] == max(mine)
        assert b["std"] == pytest.approx(torch.tensor(mine, dtype=torch.float64).std().item())
        assert b["run_dir"] == min((r for r in runs if r["model"] == m and r["lr"] == b["lr"]), key=lambda r: r["best_val_loss"])["run_dir"]
    json.dumps(s)


def test_lm_summary_mean_over_seeds_not_one_lucky_run():
    "The best rate is the one with the lowest mean: one lucky seed at another rate does not win."
    runs = [{"model": "mamba2", "lr": lr, "seed": s, "run_dir": "r", "best_val_loss": v}
            for lr, vals in ((1e-3, [2.0, 2.0, 2.0]), (1e-2, [1.5, 2.6, 2.6]), (1e-1, [3.0, 3.0, 3.0])) for s, v in enumerate(vals)]
    b = lm_summary(runs)["best"]["mamba2"]
    assert b["lr"] == 1e-3 and b["at_edge"] is True and b["std"] == 0.0     # 1e-3 is the lowest rate swept


def test_lm_summary_reads_files_without_seeds():
    "Results written before seeds existed (one run per rate, no 'seed' key) still summarize: seed 0, std 0."
    runs = [{k: v for k, v in r.items() if k != "seed"} for r in _runs({"mamba2": 1e-2}, seeds=(0,))]
    s = lm_summary(runs)
    assert [r["seeds"] for r in s["rows"]] == [[0]] * 4 and all(r["std"] == 0.0 for r in s["rows"])
    assert s["best"]["mamba2"]["lr"] == 1e-2 and s["best"]["mamba2"]["n_seeds"] == 1


def _compare_script():
    import importlib.util
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("bench_compare", bench / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_gpu_settings_run_the_seeded_sweep():
    "`benchmarks/compare.py --device cuda` runs the LM sweep with 3 seeds over the wide range of rates."
    S = _compare_script().settings("cuda", quick=False)["lm"]
    assert len(S["seeds"]) == 3 and min(S["lrs"]) <= 1e-3 and max(S["lrs"]) >= 1e-1 and len(S["lrs"]) >= 5


@pytest.mark.parametrize("flags", [["--lm-lrs", "1e-2", "1e-2"], ["--lm-seeds", "0", "0"], ["--lm-steps", "0"]])
def test_benchmark_lm_flags_refuse_bad_values(flags, capsys):
    with pytest.raises(SystemExit) as e:
        _compare_script().main(flags + ["--out", "/nonexistent/never-written.json"])
    assert e.value.code == 2 and "--lm-" in capsys.readouterr().err


def test_benchmark_combines_mqar_seeds_into_medians():
    "Per-seed MQAR results become one row per config: the median accuracy, and every seed's beside it."
    def result(seed, accs):
        return {"settings": {"seed": seed, "steps": 10},
                "runs": [{"model": "mamba2", "d_model": 64, "d_state": n, "accuracy": a} for n, a in zip((8, 32), accs)]
                + [{"model": "transformer", "d_model": 64, "d_state": None, "accuracy": accs[0] / 2}]}
    mq = _compare_script().combine_mqar_seeds([result(0, (0.2, 0.9)), result(1, (0.3, 0.2)), result(2, (0.1, 0.95))])
    assert mq["settings"] == {"steps": 10, "seeds": [0, 1, 2]}
    acc = {(r["model"], r["d_state"]): r["accuracy"] for r in mq["runs"]}
    assert acc == {("mamba2", 8): 0.2, ("mamba2", 32): 0.9, ("transformer", None): 0.1}
    row = next(r for r in mq["runs"] if r["d_state"] == 32)
    assert row["accuracy_per_seed"] == {"0": 0.9, "1": 0.2, "2": 0.95}

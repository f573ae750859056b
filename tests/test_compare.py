"""Tests for snakes_lib.compare: the state-size arithmetic (widget callback), out of memory as a result, and the
experiment functions at tiny settings (they must return well-formed, JSON-serializable data). MQAR: test_mqar.py."""
import json

import pytest
import torch

import snakes_lib.compare as compare
from snakes_lib.compare import (analytic_cache_bytes, crossovers, decode_benchmark, lm_summary, matched_pair,
                                oom_is_a_result, state_size_report, train_step_benchmark)
from snakes_lib.model import Mamba2Config
from snakes_lib.transformer import TransformerConfig, matched_transformer_config


def tiny_pair():
    mc = Mamba2Config(d_model=32, n_layer=2, d_state=8, headdim=16, vocab_size=64, chunk_size=16)
    return {"mamba2": mc, "transformer": matched_transformer_config(mc)}


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


class FakeOOM(RuntimeError):
    "What CUDA raises when an allocation fails, as a plain RuntimeError (older PyTorch)."
    def __init__(self):
        super().__init__("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_oom_is_a_result_marks_the_row_and_drops_what_it_held():
    import weakref
    row, dead = {"model": "mamba2", "oom": False}, set()
    with oom_is_a_result(row, dead, "cpu") as held:
        held["model"] = torch.nn.Linear(8, 8)
        ref = weakref.ref(held["model"])
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert row["oom"] is True and dead == {"mamba2"} and held == {} and ref() is None
    row2 = {"model": "transformer", "oom": False}
    with oom_is_a_result(row2, dead, "cpu") as held:
        raise FakeOOM()                                   # matched by its message too
    assert row2["oom"] and dead == {"mamba2", "transformer"}
    row3 = {"model": "mamba2", "oom": False}
    with oom_is_a_result(row3, set(), "cpu") as held:     # no error: nothing marked, still cleaned up
        held["x"] = torch.zeros(3)
    assert row3["oom"] is False and held == {}


def test_oom_is_a_result_lets_other_errors_through():
    row, dead = {"model": "mamba2", "oom": False}, set()
    with pytest.raises(ValueError, match="bad shape"):
        with oom_is_a_result(row, dead, "cpu") as held:
            held["model"] = torch.nn.Linear(2, 2)
            raise ValueError("bad shape")
    assert row["oom"] is False and dead == set() and held == {}


def test_benchmarks_record_oom_and_skip_the_model_afterwards(monkeypatch):
    pair = tiny_pair()
    real_step = compare._time_train_step

    def step(model, x, *a, **k):                          # the Transformer runs out of memory at length 32 ...
        if type(model).__name__ == "TransformerLM" and x.shape[1] == 33:
            raise FakeOOM()
        return real_step(model, x, *a, **k)

    monkeypatch.setattr(compare, "_time_train_step", step)
    rows = train_step_benchmark(pair, seq_lens=(16, 32, 64), tokens_per_step=64, steps=1, warmup=0, progress=False)
    oom = {(r["model"], r["seq_len"]): r["oom"] for r in rows}
    assert oom == {("mamba2", 16): False, ("transformer", 16): False, ("mamba2", 32): False, ("transformer", 32): True,
                   ("mamba2", 64): False, ("transformer", 64): True}      # ... and is not tried again at 64
    assert all(r["ms_per_step"] is None for r in rows if r["oom"]) and all(r["ms_per_step"] > 0 for r in rows if not r["oom"])

    real_nbytes = compare.cache_nbytes

    def nbytes(cache):                                     # decoding: the Mamba-2 state "fails" at context 64 ...
        if not hasattr(cache, "used_nbytes") and cache.seqlen_offset == 64:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_nbytes(cache)

    monkeypatch.setattr(compare, "cache_nbytes", nbytes)
    dec = decode_benchmark(pair, context_lens=(8, 64, 128), new_tokens=1, warmup=0, progress=False)
    assert [(r["model"], r["context_len"]) for r in dec if r["oom"]] == [("mamba2", 64), ("mamba2", 128)]  # ... skipped at 128
    assert all(r["cache_bytes"] is None for r in dec if r["oom"])

    monkeypatch.setattr(compare, "_time_train_step", lambda *a, **k: 1 / 0)     # any other error: raised
    with pytest.raises(ZeroDivisionError):
        train_step_benchmark(pair, seq_lens=(16,), tokens_per_step=64, progress=False)


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

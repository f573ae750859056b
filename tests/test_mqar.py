"""Tests for snakes_lib.mqar: the MQAR generator, training and grid at tiny settings (well-formed, JSON-serializable
rows), and the state-size slider's callback over any grid and over the committed GPU file."""
import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from snakes_lib.compare import kv_cache_numbers, mamba2_state_numbers
from snakes_lib.model import Mamba2Config
from snakes_lib.mqar import (IGNORE_INDEX, SOLVED, mqar_batch, mqar_experiment, mqar_grid, mqar_state_view,
                             seed_accuracies, train_mqar)

GPU_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compare_cuda.json"


# -- the generator --------------------------------------------------------------------------------------------------
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


# -- training and the grid ------------------------------------------------------------------------------------------
def test_train_mqar_and_experiment_rows():
    mc = Mamba2Config(d_model=16, n_layer=1, d_state=4, headdim=8, vocab_size=16, chunk_size=16)
    r = train_mqar(mc, steps=3, batch_size=4, num_kv_pairs=2, seq_len=8, vocab_size=16, eval_size=8)
    assert r["model"] == "mamba2" and 0 <= r["accuracy"] <= 1 and r["state_numbers"] == sum(mamba2_state_numbers(mc).values())
    mq = mqar_experiment(d_models=(16,), d_states=(4,), steps=2, batch_size=4, num_kv_pairs=2, seq_len=8, vocab_size=16,
                         progress=False)
    assert [x["model"] for x in mq["runs"]] == ["mamba2", "transformer"]
    assert mq["runs"][1]["state_numbers"] == kv_cache_numbers({"n_layer": 2, "d_model": 16}, 8)
    json.dumps(mq)
    v = mqar_state_view(mq, 16, 4, draw=False)            # the callback reads what the experiment returns
    assert v["accuracy"] == mq["runs"][0]["accuracy"] and v["kv_cache_numbers"] == mq["runs"][1]["state_numbers"]


# -- the slider's callback ------------------------------------------------------------------------------------------
def synthetic_results(d_models, d_states, vocab_size=64, num_kv_pairs=8, seq_len=64, n_layer=2, seed=0, seeds=None):
    """Runs shaped like mqar_experiment's, with random accuracies and the real state-size formulas; with `seeds`, shaped
    like benchmarks/compare.py's combined rows (accuracy_per_seed, the median in accuracy)."""
    rnd = random.Random(seed)
    runs = []
    for d in d_models:
        for n in d_states:
            runs.append({"model": "mamba2", "d_model": d, "n_layer": n_layer, "d_state": n, "lr": 1e-3,
                         "accuracy": rnd.random(),
                         "state_numbers": sum(mamba2_state_numbers({"d_model": d, "n_layer": n_layer, "d_state": n}).values())})
        runs.append({"model": "transformer", "d_model": d, "n_layer": n_layer, "d_state": None, "lr": 3e-3,
                     "accuracy": rnd.random(), "state_numbers": kv_cache_numbers({"n_layer": n_layer, "d_model": d}, seq_len)})
    settings = {"n_layer": n_layer, "num_kv_pairs": num_kv_pairs, "seq_len": seq_len, "vocab_size": vocab_size}
    if seeds is not None:                                  # a lottery: each seed either solves it or stays on the plateau
        for r in runs:
            r["accuracy_per_seed"] = {str(k): rnd.choice([rnd.uniform(0.15, 0.3), rnd.uniform(SOLVED, 1.0)]) for k in seeds}
            r["accuracy"] = statistics.median(r["accuracy_per_seed"].values())
        settings["seeds"] = list(seeds)
    rnd.shuffle(runs)                                      # the callback must not depend on the order of the rows
    return {"settings": settings, "runs": runs}


@pytest.mark.parametrize("d_models, d_states", [((64, 128), (8, 16, 32, 64, 128)), ((24,), (3,)), ((16, 40, 72), (5, 7))])
def test_state_view_any_grid(d_models, d_states):
    res = synthetic_results(d_models, d_states, vocab_size=50, num_kv_pairs=5, seq_len=33)
    assert mqar_grid(res) == {"mamba2": {d: sorted(d_states) for d in sorted(d_models)}, "transformer": sorted(d_models)}
    for d in d_models:
        for n in d_states:
            v = mqar_state_view(res, d, n, draw=False)
            m = next(r for r in res["runs"] if r["model"] == "mamba2" and (r["d_model"], r["d_state"]) == (d, n))
            t = next(r for r in res["runs"] if r["model"] == "transformer" and r["d_model"] == d)
            assert (v["d_model"], v["d_state"], v["accuracy"], v["state_numbers"]) == (d, n, m["accuracy"], m["state_numbers"])
            assert (v["transformer_accuracy"], v["kv_cache_numbers"]) == (t["accuracy"], 2 * 2 * d * 33)
            assert v["chance"] == 1 / 25 and v["numbers_per_pair"] == m["state_numbers"] / 5
            assert v["state_over_kv"] == pytest.approx(m["state_numbers"] / t["state_numbers"])
            assert [p[0] for p in v["curves"][d]] == sorted(d_states) and v["figure"] is None
    for d in d_models:                                     # the state grows with d_state along every line
        sizes = [p[1] for p in mqar_state_view(res, d, d_states[0], draw=False)["curves"][d]]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_state_view_missing_point_names_the_grid():
    res = synthetic_results((64, 128), (8, 32))
    with pytest.raises(ValueError, match=r"no Mamba-2 run at d_model=64, d_state=16.*d_model 64: d_state 8, 32; "
                                         r"d_model 128: d_state 8, 32.*Transformer\+\+ runs at d_model 64, 128"):
        mqar_state_view(res, 64, 16)
    with pytest.raises(ValueError, match="no Mamba-2 run at d_model=96"):
        mqar_state_view(res, 96, 8)
    res["runs"] = [r for r in res["runs"] if not (r["model"] == "transformer" and r["d_model"] == 128)]
    with pytest.raises(ValueError, match=r"no Transformer\+\+ run at d_model=128.*Transformer\+\+ runs at d_model 64$"):
        mqar_state_view(res, 128, 8)
    res["runs"].append(dict(next(r for r in res["runs"] if r["model"] == "mamba2" and r["d_model"] == 64 and r["d_state"] == 8)))
    with pytest.raises(ValueError, match="2 runs match"):
        mqar_state_view(res, 64, 8)


@pytest.mark.parametrize("bad", [None, [], {"runs": []}, {"settings": {}}, {"settings": {}, "runs": [{"model": "rwkv"}]}])
def test_state_view_refuses_what_is_not_mqar_results(bad):
    with pytest.raises(ValueError, match="mqar_experiment|unknown model"):
        mqar_state_view(bad, 64, 8, draw=False)


def test_state_view_draws_the_chosen_point():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = synthetic_results((64, 128), (8, 16, 32))
    v = mqar_state_view(res, 128, 16)
    ax = v["figure"].axes[0]
    xy = {(round(x), round(y, 9)) for line in ax.get_lines() for x, y in line.get_xydata()}
    assert (v["state_numbers"], round(v["accuracy"], 9)) in xy and (v["kv_cache_numbers"], round(v["transformer_accuracy"], 9)) in xy
    assert "d_model 128, d_state 16" in ax.get_title()
    plt.close(v["figure"])


@pytest.mark.skipif(not GPU_FILE.exists(), reason="benchmarks/results/compare_cuda.json is not in this checkout")
def test_state_view_over_the_committed_gpu_file():
    mq = json.loads(GPU_FILE.read_text())["experiments"]["mqar"]
    grid, s = mqar_grid(mq), mq["settings"]
    assert grid["mamba2"] and set(grid["mamba2"]) <= set(grid["transformer"])
    for d, states in grid["mamba2"].items():
        views = [mqar_state_view(mq, d, n, draw=False) for n in states]
        for v in views:
            row = next(r for r in mq["runs"] if r["model"] == "mamba2" and (r["d_model"], r["d_state"]) == (d, v["d_state"]))
            assert v["state_numbers"] == sum(mamba2_state_numbers(row).values())       # the file agrees with the formula
            assert v["kv_cache_numbers"] == kv_cache_numbers({"n_layer": s["n_layer"], "d_model": d}, s["seq_len"])
            assert 0 <= v["accuracy"] <= 1 and v["chance"] == 1 / (s["vocab_size"] // 2)
        assert [v["state_numbers"] for v in views] == sorted(v["state_numbers"] for v in views)
        for v in views:                                    # the median of the seeds the row holds, each seed beside it
            row = next(r for r in mq["runs"] if r["model"] == "mamba2" and (r["d_model"], r["d_state"]) == (d, v["d_state"]))
            assert v["accuracy_per_seed"] == {str(k): a for k, a in row.get("accuracy_per_seed", {"0": row["accuracy"]}).items()}
            assert v["accuracy"] == pytest.approx(statistics.median(v["accuracy_per_seed"].values()))
            assert set(v["accuracy_per_seed"]) <= {str(k) for k in s.get("seeds", [s.get("seed", 0)])}
            assert v["solved_seeds"] == [k for k, a in v["accuracy_per_seed"].items() if a >= SOLVED]


# -- the benchmark script: `--only mqar` replaces the grid and keeps the file's other experiments ---------------------
def test_benchmark_only_mqar_keeps_the_other_experiments(tmp_path, monkeypatch):
    import importlib.util
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_compare_mqar", bench / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tiny = dict(bench_model=dict(d_model=16, n_layer=1, d_state=4, headdim=8, vocab_size=16, chunk_size=16),
                mqar=dict(d_models=(16,), d_states=(4, 8), lrs=(1e-3,), steps=1, batch_size=4, num_kv_pairs=2, seq_len=8,
                          vocab_size=16))
    monkeypatch.setattr(mod, "settings", lambda device_type, quick: {k: dict(v) for k, v in tiny.items()})
    out = tmp_path / "compare_cpu.json"
    old = {"device": "an old CPU", "device_type": "cpu", "torch": "2.0", "date": "2026-01-01T00:00:00+00:00",
           "settings": {"lm": {"x": 1}}, "seconds": {"lm": 5.0, "mqar": 9.0},
           "experiments": {"lm": {"runs": ["kept"]}, "mqar": {"settings": {}, "runs": ["replaced"]}}}
    out.write_text(json.dumps(old))
    mod.main(["--only", "mqar", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["experiments"]["lm"] == {"runs": ["kept"]} and doc["seconds"]["lm"] == 5.0 and doc["settings"]["lm"] == {"x": 1}
    assert doc["provenance"]["lm"] == {"device": "an old CPU", "torch": "2.0", "date": "2026-01-01T00:00:00+00:00"}
    assert doc["provenance"]["mqar"]["date"] == doc["date"] and doc["seconds"]["mqar"] != 9.0
    assert mqar_grid(doc["experiments"]["mqar"]) == {"mamba2": {16: [4, 8]}, "transformer": [16]}
    assert not list(tmp_path.glob(".*")), "written atomically: no temporary file left behind"
    old["device_type"] = "cuda"
    out.write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="holds cuda results"):
        mod.main(["--only", "mqar", "--out", str(out)])


# -- several seeds per point ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seeds", [(0, 1, 2), (3, 11), (5,), (0, 1, 2, 3, 4)])
def test_state_view_reads_every_seed(seeds):
    res = synthetic_results((32, 96), (4, 16, 64), seed=len(seeds), seeds=seeds)
    for r in res["runs"]:
        v = mqar_state_view(res, r["d_model"], r["d_state"] or 4, draw=False)
        if r["model"] == "mamba2":
            assert v["accuracy_per_seed"] == r["accuracy_per_seed"] and v["accuracy"] == r["accuracy"]
            assert v["n_seeds"] == len(seeds) and list(v["accuracy_per_seed"]) == [str(k) for k in sorted(seeds)]
            assert v["solved_seeds"] == [str(k) for k in sorted(seeds) if r["accuracy_per_seed"][str(k)] >= SOLVED]
            pts = {p[0]: p for p in v["curves_per_seed"][r["d_model"]]}
            assert pts[r["d_state"]] == (r["d_state"], r["state_numbers"], r["accuracy_per_seed"])
        else:
            assert v["transformer_accuracy_per_seed"] == r["accuracy_per_seed"] and v["transformer_n_seeds"] == len(seeds)
            assert v["transformer_solved_seeds"] == [k for k, a in r["accuracy_per_seed"].items() if a >= SOLVED]
        assert v["solved_at"] == SOLVED


def test_seed_accuracies_old_and_new_rows():
    assert seed_accuracies({"accuracy": 0.4}, {}) == {"0": 0.4}                     # one seed, before seeds existed
    assert seed_accuracies({"accuracy": 0.4}, {"seed": 7}) == {"7": 0.4}
    row = {"accuracy": 0.3, "accuracy_per_seed": {"10": 0.9, "2": 0.3, "1": 0.1}}  # sorted as numbers, keys as JSON has them
    assert list(seed_accuracies(row, {"seeds": [1, 2, 10]})) == ["1", "2", "10"]
    assert list(seed_accuracies({"accuracy": 0.3, "accuracy_per_seed": {1: 0.3}}, {})) == ["1"]
    with pytest.raises(ValueError, match="empty 'accuracy_per_seed'"):
        seed_accuracies({"model": "mamba2", "accuracy": 0.3, "accuracy_per_seed": {}}, {})


def test_state_view_draws_each_seed():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = synthetic_results((64,), (8, 16), seeds=(0, 1, 2))
    v = mqar_state_view(res, 64, 16)
    ys = [round(y, 9) for line in v["figure"].axes[0].get_lines() for _, y in line.get_xydata()]
    for _, _, accs in v["curves_per_seed"][64]:
        assert all(round(a, 9) in ys for a in accs.values()), "every seed's accuracy is drawn"
    assert "solved in" in v["figure"].axes[0].get_title()
    plt.close(v["figure"])
    one = synthetic_results((64,), (8, 16))                                        # one seed: no extra dots
    v1 = mqar_state_view(one, 64, 16)
    n_lines = lambda fig: len(fig.axes[0].get_lines())
    assert n_lines(v1["figure"]) < n_lines(mqar_state_view(res, 64, 16)["figure"])
    plt.close("all")

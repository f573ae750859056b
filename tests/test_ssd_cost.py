"""snakes_lib.ssd_cost (chapter 03b): counted FLOPs and bytes, measured time and peak memory, the sliders' callback."""
import pytest
import torch

from snakes_lib.ssd_cost import PeakTensorMemory, measure_ssd, ssd_cost, ssd_cost_explorer


def test_cost_scaling():
    kw = dict(chunk_size=64, dstate=64, nheads=8, headdim=64, ngroups=2)
    c1, c2 = ssd_cost(seqlen=1024, **kw), ssd_cost(seqlen=4096, **kw)
    assert c1["nchunks"] == 16 and c2["nchunks"] == 64
    for form in ("chunked", "recurrent"):
        assert c2[form]["flops"] == 4 * c1[form]["flops"]
        assert c2[form]["bytes"] == 4 * c1[form]["bytes"]
    for step in c1["steps"]:
        assert c2["steps"][step]["flops"] == 4 * c1["steps"][step]["flops"]
    assert 15 < c2["quadratic"]["flops"] / c1["quadratic"]["flops"] <= 16
    assert 14 < c2["quadratic"]["peak_bytes"] / c1["quadratic"]["peak_bytes"] <= 16
    assert c2["chunked"]["peak_bytes"] == 4 * c1["chunked"]["peak_bytes"]
    # batch is a plain multiplier; state size: steps 2-4 linear in dstate
    assert ssd_cost(1024, batch=3, **kw)["chunked"]["flops"] == 3 * c1["chunked"]["flops"]
    n1, n2 = ssd_cost(1024, 64, 32, 8, 64), ssd_cost(1024, 64, 64, 8, 64)
    for step in ("2 chunk states", "3 state passing"):
        assert n2["steps"][step]["flops"] > 1.9 * n1["steps"][step]["flops"]
    # step 1 grows with the chunk size, step 3 shrinks with it
    q1, q2 = ssd_cost(1024, 32, 64, 8, 64), ssd_cost(1024, 128, 64, 8, 64)
    assert q2["steps"]["1 diagonal blocks"]["flops"] > 3.9 * q1["steps"]["1 diagonal blocks"]["flops"]
    assert q2["steps"]["3 state passing"]["flops"] * 4 == q1["steps"]["3 state passing"]["flops"]
    # at chunk_size == seqlen, the diagonal blocks are the whole quadratic form's matmuls
    full = ssd_cost(256, 256, 16, 4, 8)
    assert full["steps"]["1 diagonal blocks"]["flops"] < full["quadratic"]["flops"]
    # padding: a ragged last chunk costs a whole chunk
    assert ssd_cost(1000, 64, 16, 4, 8)["nchunks"] == 16


def test_cost_checks_arguments():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        ssd_cost(128, 0, 16, 4, 8)
    with pytest.raises(ValueError, match=r"nheads \(4\) must be a multiple of ngroups \(3\)"):
        ssd_cost(128, 16, 16, 4, 8, ngroups=3)


def test_peak_tensor_memory_counts_live_storage():
    with PeakTensorMemory() as mem:
        a = torch.ones(1000, 1000)            # 4 MB
        v = a[:10]                            # a view: no new storage
        b = a * 2                             # 8 MB live
        del a, v
        c = torch.ones(500, 1000)             # 4 + 2 = 6 MB live
    assert mem.peak == 8_000_000 and mem.live == 6_000_000
    del b, c


def test_measure_ssd_memory_linear_vs_quadratic():
    kw = dict(dstate=16, nheads=2, headdim=16, repeats=1)
    ch = [measure_ssd("chunked", seqlen=L, chunk_size=32, **kw)["peak_bytes"] for L in (256, 1024)]
    qu = [measure_ssd("quadratic", seqlen=L, **kw)["peak_bytes"] for L in (256, 1024)]
    assert 3 < ch[1] / ch[0] < 5          # x4 length -> ~x4 memory
    assert 12 < qu[1] / qu[0] < 17        # x4 length -> ~x16 memory
    m = measure_ssd("recurrent", seqlen=32, backward=True, **kw)
    assert m["time_s"] > 0 and m["peak_bytes"] > 0 and "PeakTensorMemory" in m["memory_method"]
    with pytest.raises(ValueError, match="form must be one of"):
        measure_ssd("fast")


def test_cost_explorer_callback():
    import matplotlib.pyplot as plt
    res = ssd_cost_explorer(chunk_size=24, dstate=32, seqlen=256, nheads=2, headdim=8, measure=True,
                            chunk_sizes=(8, 16, 64), dstates=(16, 64), repeats=1)
    try:
        assert res["chunk_size"] == 24 and res["dstate"] == 32 and res["seqlen"] == 256
        assert res["sweep"]["chunk_size"]["values"] == [8, 16, 24, 64]     # the chosen value joins the sweep
        assert res["sweep"]["dstate"]["values"] == [16, 32, 64]
        assert res["gflops"] == pytest.approx(ssd_cost(256, 24, 32, 2, 8)["chunked"]["flops"] / 1e9)
        assert res["best_chunk_size"] in (8, 16, 24, 64)
        assert res["time_ms"] > 0 and res["peak_mib"] > 0
        assert len(res["figure"].axes) == 10
        # the chunk size changes the cost, never the result: float32 stays within rounding of float64 on every point
        assert all(d < 1e-5 for v in ("chunk_size", "dstate") for d in res["sweep"][v]["rel_diff"])
        assert res["max_rel_diff"] == res["sweep"]["chunk_size"]["rel_diff"][2]
        g = res["sweep"]["dstate"]["gflops"]
        assert g[0] < g[1] < g[2]                                          # more state, more work
    finally:
        plt.close(res["figure"])
    res = ssd_cost_explorer(chunk_size=16, dstate=16, seqlen=128, nheads=2, headdim=8, measure=False)
    assert res["time_ms"] is None and res["peak_mib"] is None and res["max_rel_diff"] < 1e-5
    plt.close(res["figure"])


def test_measure_ssd_reports_every_run_and_the_median():
    m = measure_ssd("chunked", seqlen=64, chunk_size=16, dstate=8, nheads=2, headdim=4, repeats=3)
    assert len(m["times_s"]) == 3 and m["time_s"] == min(m["times_s"])
    assert m["time_median_s"] == sorted(m["times_s"])[1]

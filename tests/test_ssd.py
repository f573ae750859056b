"""Tests for snakes_lib.ssd (chapter 03): the recurrent, quadratic and chunked forms agree, states carry over,
gradients agree, nothing overflows, bad input is reported clearly, and the cost model scales as it should."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

from snakes_lib.ssd import (check_ssd_inputs, document_ids, segsum, semiseparable_matrix, ssd_chunked, ssd_minimal,
                            ssd_quadratic, ssd_recurrent, ssd_step)


def make_inputs(batch=2, seqlen=37, nheads=4, headdim=8, ngroups=2, dstate=16, dtype=torch.float64, seed=0, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x = r(batch, seqlen, nheads, headdim)
    dt = F.softplus(r(batch, seqlen, nheads) - 1) * dt_scale
    A = -torch.exp(r(nheads) * 0.5)
    B, C = r(batch, seqlen, ngroups, dstate), r(batch, seqlen, ngroups, dstate)
    D = r(nheads)
    h0 = r(batch, nheads, headdim, dstate)
    return [t.to(dtype) for t in (x, dt, A, B, C, D, h0)]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------- equivalence
shapes = st.fixed_dictionaries(dict(
    batch=st.integers(1, 2),
    seqlen=st.sampled_from([1, 2, 3, 5, 7, 13, 31, 37, 64, 97]),
    chunk_size=st.sampled_from([1, 2, 3, 5, 7, 16, 24, 64, 100]),
    ngroups=st.sampled_from([1, 2, 4]),
    heads_per_group=st.integers(1, 2),
    headdim=st.sampled_from([1, 3, 8]),
    dstate=st.sampled_from([1, 4, 16]),
    use_D=st.booleans(),
    use_h0=st.booleans(),
    seed=st.integers(0, 10_000),
))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes)
def test_three_forms_agree_float64(s):
    x, dt, A, B, C, D, h0 = make_inputs(s["batch"], s["seqlen"], s["ngroups"] * s["heads_per_group"], s["headdim"],
                                        s["ngroups"], s["dstate"], seed=s["seed"])
    D = D if s["use_D"] else None
    h0 = h0 if s["use_h0"] else None
    y_r, s_r = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=h0)
    y_q, s_q = ssd_quadratic(x, dt, A, B, C, D=D, initial_state=h0)
    y_c, s_c = ssd_chunked(x, dt, A, B, C, chunk_size=s["chunk_size"], D=D, initial_state=h0)
    assert y_c.shape == x.shape and s_c.shape == (x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    assert y_c.dtype == s_c.dtype == torch.float64
    assert rel(y_q, y_r) <= 1e-10 and rel(s_q, s_r) <= 1e-10
    assert rel(y_c, y_r) <= 1e-10 and rel(s_c, s_r) <= 1e-10


@settings(max_examples=15, deadline=None)
@given(shapes)
def test_three_forms_agree_float32(s):
    x, dt, A, B, C, D, h0 = make_inputs(s["batch"], s["seqlen"], s["ngroups"] * s["heads_per_group"], s["headdim"],
                                        s["ngroups"], s["dstate"], seed=s["seed"])
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=h0)
    f32 = [t.float() for t in (x, dt, A, B, C, D, h0)]
    for y, st_ in (ssd_recurrent(*f32[:5], D=f32[5], initial_state=f32[6]),
                   ssd_quadratic(*f32[:5], D=f32[5], initial_state=f32[6]),
                   ssd_chunked(*f32[:5], chunk_size=s["chunk_size"], D=f32[5], initial_state=f32[6])):
        assert y.dtype == torch.float32
        assert rel(y, y_ref) <= 1e-4 and rel(st_, s_ref) <= 1e-4


def test_longer_sequence_many_chunk_sizes():
    x, dt, A, B, C, D, h0 = make_inputs(batch=1, seqlen=257, nheads=4, ngroups=4, dstate=8)
    y_r, s_r = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=h0)
    for cs in (1, 17, 64, 256, 257, 1000):
        y_c, s_c = ssd_chunked(x, dt, A, B, C, chunk_size=cs, D=D, initial_state=h0)
        assert rel(y_c, y_r) <= 1e-10 and rel(s_c, s_r) <= 1e-10, cs


def test_empty_sequence():
    x, dt, A, B, C, D, h0 = make_inputs(seqlen=0)
    for fn in (ssd_recurrent, ssd_quadratic, lambda *a, **k: ssd_chunked(*a, chunk_size=4, **k)):
        y, s = fn(x, dt, A, B, C, D=D, initial_state=h0)
        assert y.shape == x.shape and torch.equal(s, h0)


@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_gradients_agree_float64(ngroups):
    inputs = make_inputs(batch=2, seqlen=23, nheads=4, headdim=3, ngroups=ngroups, dstate=5, seed=ngroups)
    g = torch.Generator().manual_seed(7)
    wy, ws = torch.randn(2, 23, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, s = fn(*leaves[:5], D=leaves[5], initial_state=leaves[6])
        ((y * wy).sum() + (s * ws).sum()).backward()
        return [t.grad for t in leaves]

    ref = grads(ssd_recurrent)
    for fn in (ssd_quadratic, lambda *a, **k: ssd_chunked(*a, chunk_size=5, **k)):
        for name, g_ref, g_fn in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), ref, grads(fn)):
            assert g_fn is not None and rel(g_fn, g_ref) <= 1e-10, name


def test_gradcheck_chunked():
    x, dt, A, B, C, D, h0 = make_inputs(batch=1, seqlen=6, nheads=2, headdim=2, ngroups=1, dstate=3)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    assert torch.autograd.gradcheck(lambda *t: ssd_chunked(*t[:5], chunk_size=4, D=t[5], initial_state=t[6]), leaves)


# ----------------------------------------------------------------------------------------------- states
@pytest.mark.parametrize("cut", [1, 16, 30, 36])
def test_split_sequence_carries_state(cut):
    x, dt, A, B, C, D, h0 = make_inputs()
    y_full, s_full = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, initial_state=h0)
    y1, s1 = ssd_chunked(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], chunk_size=8, D=D, initial_state=h0)
    y2, s2 = ssd_chunked(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], chunk_size=8, D=D, initial_state=s1)
    assert rel(torch.cat([y1, y2], 1), y_full) <= 1e-10 and rel(s2, s_full) <= 1e-10
    # the quadratic form carries state too
    q1, t1 = ssd_quadratic(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], D=D, initial_state=h0)
    q2, t2 = ssd_quadratic(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], D=D, initial_state=t1)
    assert rel(torch.cat([q1, q2], 1), y_full) <= 1e-10 and rel(t2, s_full) <= 1e-10


def test_initial_state_matters():
    x, dt, A, B, C, D, h0 = make_inputs()
    y0, _ = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D)
    y1, _ = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, initial_state=h0)
    assert rel(y0, y1) > 1e-3


def test_step_iterated_equals_recurrent():
    x, dt, A, B, C, D, h0 = make_inputs(ngroups=4)
    y_r, s_r = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=h0)
    state, ys = h0, []
    for t in range(x.shape[1]):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert y_t.shape == (2, 4, 8)
        ys.append(y_t)
    assert rel(torch.stack(ys, 1), y_r) <= 1e-13 and rel(state, s_r) <= 1e-13


# ----------------------------------------------------------------------------------------------- stability
def test_segsum_values_and_stability():
    a = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=torch.float64)
    s = segsum(a)
    expected = torch.tensor([[0, -math.inf, -math.inf, -math.inf], [-2, 0, -math.inf, -math.inf],
                             [-5, -3, 0, -math.inf], [-9, -7, -4, 0]], dtype=torch.float64)
    assert torch.equal(s, expected)
    g = torch.Generator().manual_seed(0)
    a = -5 * torch.rand(2, 3000, generator=g, dtype=torch.float64)
    ref = torch.exp(segsum(a))
    got = torch.exp(segsum(a.float())).double()
    mask = ref > 1e-6
    assert ((got - ref).abs() / ref)[mask].max() < 1e-5       # cumsum differences give ~1e-3 here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strong_decay_long_sequence_is_finite(dtype):
    x, dt, A, B, C, D, h0 = make_inputs(batch=1, seqlen=4000, nheads=2, headdim=4, ngroups=1, dstate=8,
                                        dtype=torch.float32, dt_scale=100.0)
    leaves = [t.to(dtype).requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    for fn in (lambda *a, **k: ssd_chunked(*a, chunk_size=64, **k), lambda *a, **k: ssd_chunked(*a, chunk_size=37, **k)):
        y, s = fn(*leaves[:5], D=leaves[5], initial_state=leaves[6])
        (y.float().sum() + s.float().sum()).backward()
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        for t in leaves:
            assert torch.isfinite(t.grad).all()
            t.grad = None


def test_quadratic_strong_decay_is_finite():
    x, dt, A, B, C, D, h0 = make_inputs(batch=1, seqlen=600, nheads=2, headdim=4, ngroups=1, dstate=8,
                                        dtype=torch.float32, dt_scale=100.0)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    y, s = ssd_quadratic(*leaves[:5], D=leaves[5], initial_state=leaves[6])
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(t.grad).all() for t in leaves)


def test_bfloat16_close_to_float32():
    x, dt, A, B, C, D, h0 = make_inputs(batch=2, seqlen=300, nheads=4, headdim=16, ngroups=2, dstate=16, dtype=torch.float32)
    y32, s32 = ssd_chunked(x, dt, A, B, C, chunk_size=64, D=D, initial_state=h0)
    y16, s16 = ssd_chunked(*(t.bfloat16() for t in (x, dt, A, B, C)), chunk_size=64, D=D.bfloat16(), initial_state=h0.bfloat16())
    assert y16.dtype == s16.dtype == torch.bfloat16
    assert rel(y16, y32) <= 1e-2 and rel(s16, s32) <= 1e-2
    # float32 decay parameters with bfloat16 activations (as the official kernels take them)
    y16b, _ = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), chunk_size=64, D=D, initial_state=h0.bfloat16())
    assert rel(y16b, y32) <= 1e-2


def test_semiseparable_matrix_matches_recurrence_and_is_low_rank():
    x, dt, A, B, C, _, _ = make_inputs(batch=1, seqlen=30, nheads=2, headdim=3, ngroups=1, dstate=3)
    M = semiseparable_matrix(dt, A, B, C)
    assert M.shape == (1, 2, 30, 30) and torch.equal(M.triu(1), torch.zeros_like(M))
    y = torch.einsum("bhls,bshp->blhp", M, x * dt[..., None])
    assert rel(y, ssd_recurrent(x, dt, A, B, C)[0]) <= 1e-12
    assert torch.linalg.matrix_rank(M[0, 0, 12:, :13]).item() <= 3


# ----------------------------------------------------------------------------------------------- bad input
def good():
    return dict(zip(("x", "dt", "A", "B", "C", "D", "initial_state"),
                    make_inputs(batch=2, seqlen=5, nheads=4, headdim=3, ngroups=2, dstate=6)))


@pytest.mark.parametrize("change, pattern", [
    (dict(x=torch.randn(2, 5, 4)), r"x must be \(batch, seqlen, nheads, headdim\), got shape \(2, 5, 4\)"),
    (dict(dt=torch.rand(2, 5, 3, dtype=torch.float64)), r"dt must be \(batch, seqlen, nheads\) = \(2, 5, 4\).*got \(2, 5, 3\)"),
    (dict(A=-torch.rand(3, dtype=torch.float64)), r"A must be \(nheads,\) = \(4,\).*got \(3,\)"),
    (dict(B=torch.randn(2, 6, 2, 6, dtype=torch.float64)), r"B must be \(batch, seqlen, ngroups, dstate\).*got \(2, 6, 2, 6\)"),
    (dict(C=torch.randn(2, 5, 2, 7, dtype=torch.float64)), r"C must have the shape of B \(2, 5, 2, 6\), got \(2, 5, 2, 7\)"),
    (dict(B=torch.randn(2, 5, 3, 6, dtype=torch.float64), C=torch.randn(2, 5, 3, 6, dtype=torch.float64)),
     r"nheads \(4, from x \(2, 5, 4, 3\)\) must be a multiple of ngroups \(3, from B \(2, 5, 3, 6\)\)"),
    (dict(D=torch.randn(3, dtype=torch.float64)), r"D must be \(nheads,\) = \(4,\) or None, got \(3,\)"),
    (dict(initial_state=torch.randn(2, 4, 3, 5, dtype=torch.float64)),
     r"initial_state must be \(batch, nheads, headdim, dstate\) = \(2, 4, 3, 6\), got \(2, 4, 3, 5\)"),
    (dict(dt=-torch.ones(2, 5, 4, dtype=torch.float64)), r"dt must be positive.*-1"),
    (dict(dt=torch.zeros(2, 5, 4, dtype=torch.float64)), r"dt must be positive"),
    (dict(B=torch.randn(2, 5, 2, 6, dtype=torch.float32), C=torch.randn(2, 5, 2, 6, dtype=torch.float32)),
     r"B has dtype torch.float32 but x has torch.float64"),
    (dict(A=-torch.rand(4).half()), r"A has dtype torch.float16"),
    (dict(x=[[1.0]]), r"x must be a torch.Tensor, got list"),
    (dict(B=torch.ones(2, 5, 2, 6, dtype=torch.long)), r"B must be a floating-point tensor, got dtype torch.int64"),
])
def test_bad_input_message(change, pattern):
    kw = good()
    kw.update(change)
    for fn in (ssd_recurrent, ssd_quadratic, ssd_chunked):
        with pytest.raises(ValueError, match=pattern):
            fn(**kw)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "64"])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=r"chunk_size must be an integer >= 1, got"):
        ssd_chunked(**good(), chunk_size=chunk_size)


def test_check_returns_sizes():
    assert check_ssd_inputs(**good()) == (2, 5, 4, 3, 2, 6)


# ----------------------------------------------------------------------------------------------- costs
def test_check_values_false_skips_only_the_value_check():
    # the model passes check_values=False (its dt is clamped positive) to avoid a device sync per layer;
    # shape errors must still be raised, and valid inputs give the same result
    kw = good()
    y1, s1 = ssd_chunked(**kw, chunk_size=2)
    y2, s2 = ssd_chunked(**kw, chunk_size=2, check_values=False)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    bad_dt = dict(kw, dt=-torch.ones(2, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="dt must be positive"):
        ssd_chunked(**bad_dt)
    ssd_chunked(**bad_dt, check_values=False)                 # no value check, no error
    with pytest.raises(ValueError, match=r"dt must be \(batch, seqlen, nheads\)"):
        ssd_chunked(**dict(kw, dt=torch.rand(2, 5, 3, dtype=torch.float64)), check_values=False)


# ----------------------------------------------------------------------------------------------- torch.compile
def _chunked_fwd_bwd(fn, inputs, chunk_size):
    "Outputs and the gradients of every input under a loss that weighs each output differently."
    leaves = [t.clone().requires_grad_() for t in inputs]
    y, s = fn(*leaves[:5], chunk_size=chunk_size, D=leaves[5], initial_state=leaves[6])
    g = torch.Generator().manual_seed(3)
    ((y * torch.randn(y.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()).backward()
    return [y, s] + [t.grad for t in leaves]


@pytest.mark.slow
def test_compiled_chunked_matches_eager_forward_and_backward():
    # CPU Inductor; odd seqlen (a padded tail chunk), two groups, D and an initial state, float32
    inputs = make_inputs(batch=2, seqlen=45, nheads=4, headdim=8, ngroups=2, dstate=8, dtype=torch.float32)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(ssd_chunked)(*inputs[:5], chunk_size=16, D=inputs[5], initial_state=inputs[6])
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons      # the dt check is skipped while tracing
    want = _chunked_fwd_bwd(ssd_chunked, inputs, 16)
    got = _chunked_fwd_bwd(torch.compile(ssd_chunked), inputs, 16)
    for name, a, b in zip(("y", "state", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"), got, want):
        assert rel(a, b) <= 1e-5, (name, rel(a, b))


def test_chunked_scans_only_inside_segsum_on_gpu_devices():
    # Inductor makes a cumsum with few rows (batch * heads * chunks) a split scan, whose CUDA code generation failed
    # (torch 2.11) when dt * A was fused into it. Off the CPU the chunked form's only cumsums, forward and backward,
    # are segsum's over (..., Q, Q), which has Q times more rows. Traced on the meta device: no GPU needed.
    from torch.fx.experimental.proxy_tensor import make_fx
    inputs = [t.to("meta") for t in make_inputs(batch=1, seqlen=45, nheads=4, headdim=8, ngroups=2, dstate=8,
                                                dtype=torch.float32)]

    def fwd_bwd(*ins):
        y, s = ssd_chunked(*ins[:5], chunk_size=16, D=ins[5], initial_state=ins[6], check_values=False)
        return torch.autograd.grad(y.sum() + s.sum(), ins)

    gm = make_fx(fwd_bwd)(*[t.requires_grad_() for t in inputs])
    scans = [n for n in gm.graph.nodes if n.target == torch.ops.aten.cumsum.default]
    assert len(scans) == 2                                    # segsum forward, and its backward
    for n in scans:
        shape = n.args[0].meta["val"].shape
        assert len(shape) == 6 and shape[-1] == shape[-2] == 16, shape


# ----------------------------------------------------------------------------------------------- packed documents
def _one_by_one(x, dt, A, B, C, D, h0, splits):
    "Each document of each row run alone (the first with the row's initial state, if any); the last one's final state."
    ys, finals = [], []
    for b, lengths in enumerate(splits):
        start, parts = 0, []
        for k, n in enumerate(lengths):
            p = slice(start, start + n)
            h = None if h0 is None or k else h0[b:b + 1]
            y_d, s_d = ssd_recurrent(x[b:b + 1, p], dt[b:b + 1, p], A, B[b:b + 1, p], C[b:b + 1, p], D=D, initial_state=h)
            parts.append(y_d)
            start += n
        ys.append(torch.cat(parts, 1))
        finals.append(s_d)
    return torch.cat(ys), torch.cat(finals)


def _seq_idx(splits, labels=None):
    "(batch, seqlen) document labels from per-row lengths; `labels` maps document k to its label (default k)."
    rows = []
    for lengths in splits:
        lab = torch.tensor([labels(k) if labels else k for k in range(len(lengths))])
        rows.append(torch.repeat_interleave(lab, torch.tensor(lengths)))
    return torch.stack(rows)


packed = st.fixed_dictionaries(dict(
    batch=st.integers(1, 3),
    seqlen=st.sampled_from([1, 2, 7, 13, 37, 64, 97]),
    chunk_size=st.sampled_from([1, 3, 5, 8, 16, 64, 100]),
    ngroups=st.sampled_from([1, 2]),
    heads_per_group=st.integers(1, 2),
    headdim=st.sampled_from([1, 3]),
    dstate=st.sampled_from([1, 4, 8]),
    use_D=st.booleans(),
    use_h0=st.booleans(),
    seed=st.integers(0, 10_000),
))


def _random_splits(batch, seqlen, seed):
    "Random document lengths per row summing to seqlen (some of length 1, some across several chunks)."
    g = torch.Generator().manual_seed(seed)
    splits = []
    for _ in range(batch):
        ncuts = int(torch.randint(0, min(seqlen, 6), (1,), generator=g))
        cuts = sorted(set(torch.randint(1, seqlen, (ncuts,), generator=g).tolist())) if seqlen > 1 else []
        bounds = [0] + cuts + [seqlen]
        splits.append([b - a for a, b in zip(bounds, bounds[1:])])
    return splits


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packed)
def test_packed_documents_equal_one_by_one_float64(s):
    nheads = s["ngroups"] * s["heads_per_group"]
    x, dt, A, B, C, D, h0 = make_inputs(s["batch"], s["seqlen"], nheads, s["headdim"], s["ngroups"], s["dstate"],
                                        seed=s["seed"])
    D = D if s["use_D"] else None
    h0 = h0 if s["use_h0"] else None
    splits = _random_splits(s["batch"], s["seqlen"], s["seed"])
    seq_idx = _seq_idx(splits, labels=lambda k: (5 * k + 3) % 4)   # labels need not count up, only change
    y_ref, s_ref = _one_by_one(x, dt, A, B, C, D, h0, splits)
    for y, st_ in (ssd_recurrent(x, dt, A, B, C, D=D, initial_state=h0, seq_idx=seq_idx),
                   ssd_quadratic(x, dt, A, B, C, D=D, initial_state=h0, seq_idx=seq_idx),
                   ssd_chunked(x, dt, A, B, C, chunk_size=s["chunk_size"], D=D, initial_state=h0, seq_idx=seq_idx)):
        assert y.shape == x.shape and y.dtype == torch.float64
        assert rel(y, y_ref) <= 1e-10 and rel(st_, s_ref) <= 1e-10


@pytest.mark.parametrize("chunk_size", [4, 8, 9])
def test_packed_documents_float32_and_gradients(chunk_size):
    # starts inside chunks (5, 21) and on chunk boundaries (8, 16 for chunk size 4 and 8), one-token documents
    splits = [[5, 3, 8, 5, 19], [8, 8, 1, 1, 22]]
    x, dt, A, B, C, D, h0 = make_inputs(batch=2, seqlen=40, nheads=4, headdim=3, ngroups=2, dstate=5, seed=chunk_size)
    seq_idx = _seq_idx(splits)
    y_ref, s_ref = _one_by_one(x, dt, A, B, C, D, h0, splits)
    f32 = [t.float() for t in (x, dt, A, B, C, D, h0)]
    y32, s32 = ssd_chunked(*f32[:5], chunk_size=chunk_size, D=f32[5], initial_state=f32[6], seq_idx=seq_idx)
    assert y32.dtype == torch.float32 and rel(y32, y_ref) <= 1e-4 and rel(s32, s_ref) <= 1e-4
    g = torch.Generator().manual_seed(1)
    wy, ws = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(s_ref.shape, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, h0)]
        y, s = fn(*leaves)
        ((y * wy).sum() + (s * ws).sum()).backward()
        return [t.grad for t in leaves]

    ref = grads(lambda *t: _one_by_one(*t, splits))
    got = grads(lambda *t: ssd_chunked(*t[:5], chunk_size=chunk_size, D=t[5], initial_state=t[6], seq_idx=seq_idx))
    for name, g_ref, g_got in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), ref, got):
        assert rel(g_got, g_ref) <= 1e-10, name


def test_seq_idx_one_document_changes_nothing_and_no_state_leaks():
    x, dt, A, B, C, D, h0 = make_inputs()
    one = torch.full(x.shape[:2], 3, dtype=torch.int32)
    for fn in (ssd_recurrent, ssd_quadratic, lambda *a, **k: ssd_chunked(*a, chunk_size=8, **k)):
        y0, s0 = fn(x, dt, A, B, C, D=D, initial_state=h0)
        y1, s1 = fn(x, dt, A, B, C, D=D, initial_state=h0, seq_idx=one)
        assert rel(y1, y0) <= 1e-12 and rel(s1, s0) <= 1e-12
    # a second document: its outputs do not depend on the first document's inputs at all
    seq_idx = _seq_idx([[20, 17], [20, 17]])
    x2 = x.clone()
    x2[:, :20] += 1.0
    ya, _ = ssd_chunked(x, dt, A, B, C, chunk_size=8, seq_idx=seq_idx)
    yb, _ = ssd_chunked(x2, dt, A, B, C, chunk_size=8, seq_idx=seq_idx)
    assert torch.equal(ya[:, 20:], yb[:, 20:]) and rel(ya[:, :20], yb[:, :20]) > 1e-3


@pytest.mark.parametrize("seq_idx, pattern", [
    (torch.zeros(2, 4, dtype=torch.long), r"seq_idx must be \(batch, seqlen\) = \(2, 5\) to match x, got \(2, 4\)"),
    (torch.zeros(2, 5), r"seq_idx must be an integer tensor"),
    (torch.zeros(2, 5, dtype=torch.bool), r"seq_idx must be an integer tensor"),
    ([[0] * 5] * 2, r"seq_idx must be an integer tensor"),
])
def test_bad_seq_idx(seq_idx, pattern):
    for fn in (ssd_recurrent, ssd_quadratic, ssd_chunked):
        with pytest.raises(ValueError, match=pattern):
            fn(**good(), seq_idx=seq_idx)


@pytest.mark.parametrize("seed", range(5))
def test_document_ids_count_label_changes(seed):
    g = torch.Generator().manual_seed(seed)
    batch, seqlen = 3, int(torch.randint(1, 40, (1,), generator=g))
    seq_idx = torch.randint(-2, 3, (batch, seqlen), generator=g)          # any integers; a change starts a document
    doc = document_ids(seq_idx, batch, seqlen, "cpu")
    assert doc.shape == (batch, seqlen) and doc.dtype == torch.int64
    for r in range(batch):                                                  # the plain loop
        want, n = [], 0
        for t in range(seqlen):
            n += t > 0 and int(seq_idx[r, t]) != int(seq_idx[r, t - 1])
            want.append(n)
        assert doc[r].tolist() == want
    assert document_ids(None, batch, seqlen, "cpu") is None
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch, seqlen\)"):
        document_ids(seq_idx, batch, seqlen + 1, "cpu")


def test_seq_idx_backends():
    x, dt, A, B, C, D, h0 = make_inputs()
    seq_idx = _seq_idx([[20, 17], [3, 34]])
    ya, _ = ssd_chunked(x, dt, A, B, C, chunk_size=8, seq_idx=seq_idx)                  # "auto": the PyTorch path
    yt, _ = ssd_chunked(x, dt, A, B, C, chunk_size=8, seq_idx=seq_idx, backend="torch")
    assert torch.equal(ya, yt)
    # the Triton kernels take seq_idx (tests/test_ssd_triton.py); these float64 CPU inputs are refused for other reasons
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call") as refused:
        ssd_chunked(x, dt, A, B, C, chunk_size=16, seq_idx=seq_idx, backend="triton")
    assert "seq_idx" not in str(refused.value)



# ----------------------------------------------------------------------------------------------- minimal form, A = 0
minimal_shapes = st.fixed_dictionaries(dict(
    batch=st.integers(1, 2), nchunks=st.integers(1, 5), chunk_size=st.sampled_from([1, 2, 3, 8, 13]),
    ngroups=st.sampled_from([1, 2]), heads_per_group=st.integers(1, 2), headdim=st.sampled_from([1, 3]),
    dstate=st.sampled_from([1, 5]), use_h0=st.booleans(), seed=st.integers(0, 10_000)))


@settings(max_examples=30, deadline=None)
@given(minimal_shapes)
def test_minimal_form_both_state_passings_equal_recurrent(s):
    nheads = s["ngroups"] * s["heads_per_group"]
    x, dt, A, B, C, _, h0 = make_inputs(s["batch"], s["nchunks"] * s["chunk_size"], nheads, s["headdim"], s["ngroups"],
                                        s["dstate"], seed=s["seed"])
    h0 = h0 if s["use_h0"] else None
    y_r, s_r = ssd_recurrent(x, dt, A, B, C, initial_state=h0)
    for passing in ("loop", "matrix"):
        y_m, s_m = ssd_minimal(x, dt, A, B, C, s["chunk_size"], initial_state=h0, passing=passing)
        assert y_m.shape == x.shape and rel(y_m, y_r) <= 1e-10 and rel(s_m, s_r) <= 1e-10, passing


def test_minimal_form_refuses_ragged_length_and_unknown_passing():
    x, dt, A, B, C, _, _ = make_inputs(seqlen=10)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        ssd_minimal(x, dt, A, B, C, 4)
    with pytest.raises(ValueError, match="passing 'loop' or 'matrix'"):
        ssd_minimal(x, dt, A, B, C, 5, passing="scan")


@pytest.mark.parametrize("seqlen, chunk_size", [(1, 1), (17, 4), (37, 8), (64, 64)])
def test_A_zero_is_causal_linear_attention(seqlen, chunk_size):
    x, dt, A, B, C, _, _ = make_inputs(seqlen=seqlen, nheads=4, ngroups=2)
    A0 = torch.zeros_like(A)
    q, k = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in (C, B))
    v = (x * dt[..., None]).transpose(1, 2)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    y_att = ((q @ k.transpose(-1, -2)).masked_fill(~causal, 0) @ v).transpose(1, 2)
    for y, _ in (ssd_recurrent(x, dt, A0, B, C), ssd_quadratic(x, dt, A0, B, C), ssd_chunked(x, dt, A0, B, C, chunk_size=chunk_size)):
        assert rel(y, y_att) <= 1e-10

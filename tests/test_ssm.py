"""Tests for snakes_lib.ssm (chapter 02): LTI recurrence == convolution, the selective scan, the copying task."""
import math

import pytest
import torch
import torch.nn.functional as F

from snakes_lib.hippo import discretize_zoh, make_hippo_legs
from snakes_lib.ssm import (MARKER, NOISE, CopyModel, LTISSMLayer, SelectiveSSMLayer, causal_conv, causal_conv_fft,
                            copying_accuracy, parallel_scan, scan_combine, scan_cost, selective_copying_batch,
                            selective_scan, selective_scan_parallel, ssm_kernel, ssm_scan, train_copying)

f64 = torch.float64


def _random_stable(N, g):
    A = -torch.eye(N, dtype=f64) + 0.3 * torch.randn(N, N, generator=g, dtype=f64) / math.sqrt(N)
    return A, torch.randn(N, generator=g, dtype=f64), torch.randn(N, generator=g, dtype=f64)


@pytest.mark.parametrize("seed", range(6))
def test_recurrence_equals_convolution_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    N = int(torch.randint(1, 12, (1,), generator=g))
    L = int(torch.randint(1, 80, (1,), generator=g)) | 1          # odd lengths
    batch = tuple(int(s) for s in torch.randint(1, 4, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g))
    A, B, C = _random_stable(N, g)
    Ab, Bb = discretize_zoh(A, B, float(torch.rand(1, generator=g)) * 0.5 + 0.01)
    u = torch.randn(*batch, L, generator=g, dtype=f64)
    y = ssm_scan(Ab, Bb, C, u)
    K = ssm_kernel(Ab, Bb, C, L)
    assert y.shape == u.shape and K.shape == (L,)
    assert torch.allclose(causal_conv(u, K), y, atol=1e-12, rtol=1e-10)
    assert torch.allclose(causal_conv_fft(u, K), y, atol=1e-12, rtol=1e-10)


def test_kernel_definition_and_impulse_response():
    A, B = make_hippo_legs(6)
    Ab, Bb = discretize_zoh(A, B, 0.05)
    C = torch.arange(6, dtype=f64)
    K = ssm_kernel(Ab, Bb, C, 9)
    assert torch.allclose(K[3], C @ torch.linalg.matrix_power(Ab, 3) @ Bb, atol=1e-14)
    impulse = torch.zeros(9, dtype=f64)
    impulse[0] = 1
    assert torch.allclose(ssm_scan(Ab, Bb, C, impulse), K, atol=1e-14)   # the kernel is the impulse response


def _ssd_inputs(g, b, l, h, p, n, ng, dtype=f64):
    x = torch.randn(b, l, h, p, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, h, generator=g, dtype=dtype) - 1)
    A = -torch.exp(torch.randn(h, generator=g, dtype=dtype))
    B = torch.randn(b, l, ng, n, generator=g, dtype=dtype)
    C = torch.randn(b, l, ng, n, generator=g, dtype=dtype)
    D = torch.randn(h, generator=g, dtype=dtype)
    h0 = torch.randn(b, h, p, n, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, h0


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 17, 4, 3, 5, 2), (3, 31, 6, 2, 8, 3), (1, 8, 4, 4, 16, 4)])
def test_selective_scan_equals_ssd_recurrent(shape):
    ssd = pytest.importorskip("snakes_lib.ssd")
    g = torch.Generator().manual_seed(sum(shape))
    x, dt, A, B, C, D, h0 = _ssd_inputs(g, *shape)
    for kw in (dict(), dict(D=D), dict(D=D, initial_state=h0)):
        y, s = selective_scan(x, dt, A, B, C, **kw)
        y_ref, s_ref = ssd.ssd_recurrent(x, dt, A, B, C, **kw)
        assert torch.allclose(y, y_ref, atol=1e-12, rtol=1e-10) and torch.allclose(s, s_ref, atol=1e-12, rtol=1e-10)


def test_selective_scan_scalar_vs_diagonal_A_and_splitting():
    g = torch.Generator().manual_seed(0)
    x, dt, A, B, C, D, h0 = _ssd_inputs(g, 2, 21, 4, 3, 5, 2)
    y1, s1 = selective_scan(x, dt, A, B, C, D=D, initial_state=h0)
    y2, s2 = selective_scan(x, dt, A[:, None].expand(4, 5), B, C, D=D, initial_state=h0)
    assert torch.allclose(y1, y2, atol=1e-13) and torch.allclose(s1, s2, atol=1e-13)
    # running two halves with the state passed on == running the whole sequence
    ya, sa = selective_scan(x[:, :10], dt[:, :10], A, B[:, :10], C[:, :10], D=D, initial_state=h0)
    yb, sb = selective_scan(x[:, 10:], dt[:, 10:], A, B[:, 10:], C[:, 10:], D=D, initial_state=sa)
    assert torch.allclose(torch.cat([ya, yb], 1), y1, atol=1e-12) and torch.allclose(sb, s1, atol=1e-12)


def test_selective_scan_diagonal_A_matches_per_state_loop():
    g = torch.Generator().manual_seed(3)
    b, l, h, n = 2, 13, 3, 4
    x = torch.randn(b, l, h, 1, generator=g, dtype=f64)
    dt = F.softplus(torch.randn(b, l, h, generator=g, dtype=f64))
    A = -torch.rand(h, n, generator=g, dtype=f64) * 3
    B, C = torch.randn(b, l, 1, n, generator=g, dtype=f64), torch.randn(b, l, 1, n, generator=g, dtype=f64)
    y, _ = selective_scan(x, dt, A, B, C)
    state = torch.zeros(b, h, n, dtype=f64)
    for t in range(l):
        state = torch.exp(dt[:, t, :, None] * A) * state + dt[:, t, :, None] * x[:, t] * B[:, t]
        assert torch.allclose(y[:, t, :, 0], (state * C[:, t]).sum(-1), atol=1e-12)


def test_selective_scan_shape_errors():
    g = torch.Generator().manual_seed(0)
    x, dt, A, B, C, D, h0 = _ssd_inputs(g, 2, 5, 4, 3, 5, 2)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(x, dt, A[:3], B, C)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        selective_scan(x, dt, A, B[:, :, :1].expand(2, 5, 3, 5), C[:, :, :1].expand(2, 5, 3, 5))
    with pytest.raises(ValueError, match="shapes"):
        selective_scan(x, dt[:, :4], A, B, C)


@pytest.mark.parametrize("n_tokens,n_colors,seq_len", [(1, 1, 1), (3, 8, 48), (5, 4, 9), (4, 16, 4)])
def test_copying_batch_invariants(n_tokens, n_colors, seq_len):
    g = torch.Generator().manual_seed(0)
    inp, tgt = selective_copying_batch(64, n_tokens, n_colors, seq_len, generator=g)
    T = seq_len + n_tokens
    assert inp.shape == tgt.shape == (64, T) and inp.dtype == tgt.dtype == torch.long
    assert bool((inp[:, seq_len:] == MARKER).all()) and bool((tgt[:, :seq_len] == -100).all())
    body = inp[:, :seq_len]
    assert bool(((body == NOISE) | (body >= 2)).all()) and int(body.max()) < 2 + n_colors
    assert bool(((body >= 2).sum(1) == n_tokens).all())                         # exactly n_tokens colours
    assert torch.equal(body[body >= 2].view(64, n_tokens), tgt[:, seq_len:])    # targets = colours in order
    # reproducible with a generator, different with another seed
    inp2, _ = selective_copying_batch(64, n_tokens, n_colors, seq_len, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inp, inp2)
    if seq_len > n_tokens:
        inp3, _ = selective_copying_batch(64, n_tokens, n_colors, seq_len, generator=torch.Generator().manual_seed(1))
        assert not torch.equal(inp, inp3)


def test_copying_batch_positions_are_spread():
    inp, _ = selective_copying_batch(2000, 3, 8, 48, generator=torch.Generator().manual_seed(0))
    first = (inp[:, :48] >= 2).float().argmax(1)
    assert first.min() == 0 and first.max() > 30             # positions are random, not fixed


def test_copying_batch_errors():
    with pytest.raises(ValueError, match="n_tokens"):
        selective_copying_batch(2, n_tokens=5, seq_len=4)
    with pytest.raises(ValueError, match="n_colors"):
        selective_copying_batch(2, n_colors=0)


def test_layers_shapes_and_lti_equivalence():
    torch.manual_seed(0)
    u = torch.randn(3, 17, 16)
    lti = LTISSMLayer(16, 8)
    assert lti(u).shape == (3, 17, 16) and lti.kernel(17).shape == (16, 17)
    assert torch.allclose(lti(u, mode="conv"), lti(u, mode="scan"), atol=1e-5)
    lti64 = LTISSMLayer(16, 8).double()
    assert torch.allclose(lti64(u.double(), mode="conv"), lti64(u.double(), mode="scan"), atol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        lti(u, mode="fast")
    sel = SelectiveSSMLayer(16, 8, nheads=4)
    assert sel(u).shape == (3, 17, 16)
    x, dt, B, C = sel.ssm_inputs(u)
    assert x.shape == (3, 17, 4, 4) and dt.shape == (3, 17, 4) and B.shape == C.shape == (3, 17, 1, 8)
    assert bool((dt > 0).all())
    with pytest.raises(ValueError, match="divisible"):
        SelectiveSSMLayer(10, 4, nheads=3)


def test_layers_are_causal():
    torch.manual_seed(0)
    u = torch.randn(1, 12, 16, dtype=f64)
    u2 = u.clone()
    u2[:, 7:] += 1.0
    for layer in (LTISSMLayer(16, 4).double(), SelectiveSSMLayer(16, 4, nheads=4).double()):
        assert torch.allclose(layer(u)[:, :7], layer(u2)[:, :7], atol=1e-12)
        assert not torch.allclose(layer(u)[:, 7:], layer(u2)[:, 7:])


def test_copy_model_and_short_training():
    torch.manual_seed(0)
    for kind in ("lti", "selective"):
        m = CopyModel(kind, 6, d_model=8, d_state=4, nheads=2)
        ids, tgt = selective_copying_batch(4, 2, 4, 6, generator=torch.Generator().manual_seed(0))
        assert m(ids).shape == (4, 8, 6)
        hist = train_copying(m, steps=25, batch_size=16, lr=1e-2, n_tokens=2, n_colors=4, seq_len=6)
        assert len(hist["loss"]) == len(hist["acc"]) == 25
        assert sum(hist["loss"][-5:]) / 5 < sum(hist["loss"][:5]) / 5          # it learns something
    with pytest.raises(ValueError, match="kind"):
        CopyModel("transformer", 10)


def test_copying_accuracy():
    targets = torch.tensor([[-100, 3, 4], [-100, -100, 2]])
    logits = F.one_hot(torch.tensor([[0, 3, 5], [1, 1, 2]]), 6).float()
    assert copying_accuracy(logits, targets) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------- parallel scan
@pytest.mark.parametrize("seed", range(8))
def test_parallel_scan_equals_loop_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    ngroups = ri(1, 3)
    b, l, h, p, n = ri(1, 3), [0, 1, 2, 3, 7, 31, 33, 64, 97][seed % 9 if seed < 8 else 0], ngroups * ri(1, 3), ri(1, 4), ri(1, 6)
    x = torch.randn(b, l, h, p, generator=g, dtype=f64)
    dt = F.softplus(torch.randn(b, l, h, generator=g, dtype=f64))
    B, C = torch.randn(b, l, ngroups, n, generator=g, dtype=f64), torch.randn(b, l, ngroups, n, generator=g, dtype=f64)
    D = torch.randn(h, generator=g, dtype=f64) if seed % 2 else None
    h0 = torch.randn(b, h, p, n, generator=g, dtype=f64) if seed % 3 else None
    for A in (-torch.exp(torch.randn(h, generator=g, dtype=f64)), -torch.exp(torch.randn(h, n, generator=g, dtype=f64))):
        y_loop, s_loop = selective_scan(x, dt, A, B, C, D=D, initial_state=h0)
        y_par, s_par = selective_scan_parallel(x, dt, A, B, C, D=D, initial_state=h0)
        assert y_par.shape == y_loop.shape and s_par.shape == s_loop.shape
        torch.testing.assert_close(y_par, y_loop, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s_par, s_loop, rtol=1e-12, atol=1e-12)


def test_parallel_scan_float32_and_gradients():
    g = torch.Generator().manual_seed(0)
    a, bb = torch.rand(3, 45, 2, generator=g, dtype=f64), torch.randn(3, 45, 2, generator=g, dtype=f64)
    h, ref = torch.zeros(3, 2, dtype=f64), []
    for t in range(45):
        h = a[:, t] * h + bb[:, t]
        ref.append(h)
    ref = torch.stack(ref, 1)
    torch.testing.assert_close(parallel_scan(a, bb, dim=1), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parallel_scan(a.float(), bb.float(), dim=1).double(), ref, rtol=1e-5, atol=1e-5)
    # along another dim, and gradients through it
    torch.testing.assert_close(parallel_scan(a.transpose(0, 1), bb.transpose(0, 1), dim=0), ref.transpose(0, 1))
    assert torch.autograd.gradcheck(lambda a_, b_: parallel_scan(a_, b_, dim=1),
                                    (a[:, :9].clone().requires_grad_(), bb[:, :9].clone().requires_grad_()))


def test_scan_combine_is_associative_and_cost_is_counted():
    g = torch.Generator().manual_seed(1)
    s1, s2, s3 = [(torch.rand(4, generator=g, dtype=f64), torch.randn(4, generator=g, dtype=f64)) for _ in range(3)]
    left, right = scan_combine(scan_combine(s1, s2), s3), scan_combine(s1, scan_combine(s2, s3))
    torch.testing.assert_close(left, right)
    for T in (0, 1, 2, 3, 4, 5, 17, 64, 100, 1024, 1025):
        stats = {}
        parallel_scan(torch.rand(T, 1), torch.randn(T, 1), dim=0, stats=stats)
        assert stats == scan_cost(T)["hillis_steele"], T
        assert scan_cost(T)["loop"] == dict(depth=T, combines=T)
    assert scan_cost(1024)["hillis_steele"] == dict(depth=10, combines=9217)
    assert scan_cost(1025)["hillis_steele"]["depth"] == 11

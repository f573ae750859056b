"""Tests for snakes_lib.hippo (chapter 01): HiPPO-LegS, discretization, online approximation, initializers."""
import math

import pytest
import torch
import torch.nn.functional as F

from snakes_lib.hippo import (discretize, discretize_bilinear, discretize_zoh, hippo_legs_online,
                              hippo_legs_reconstruct, init_A_log, init_dt_bias, legendre, make_hippo_legs)


@pytest.mark.parametrize("N", [1, 2, 5, 8, 13, 16])
def test_legs_structure_and_eigenvalues(N):
    A, B = make_hippo_legs(N)
    assert A.shape == (N, N) and B.shape == (N,) and A.dtype == torch.float64
    assert torch.equal(A, torch.tril(A))
    exact = -torch.arange(1, N + 1, dtype=torch.float64)
    ev = torch.linalg.eigvals(A)
    ev = ev[ev.real.argsort(descending=True)]
    # triangular: the eigenvalues are the diagonal, found to rounding
    assert torch.allclose(ev.real, exact, atol=1e-12) and ev.imag.abs().max() <= 1e-12
    # entries from the definition
    n = torch.arange(N, dtype=torch.float64)
    assert torch.allclose(B, torch.sqrt(2 * n + 1))
    if N > 2:
        assert A[2, 1].item() == pytest.approx(-math.sqrt(5) * math.sqrt(3))


def test_legs_eigenvalues_in_rotated_basis_within_bauer_fike():
    g = torch.Generator().manual_seed(1)
    eps = torch.finfo(torch.float64).eps
    for N in (8, 10, 12):
        A, _ = make_hippo_legs(N)
        Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
        ev = torch.linalg.eigvals(Q @ A @ Q.T)
        ev = ev[ev.real.argsort(descending=True)]
        kappa = torch.linalg.cond(torch.linalg.eig(A).eigenvectors).item()
        bound = 10 * kappa * eps * torch.linalg.matrix_norm(A, 2).item()
        assert (ev - (-torch.arange(1, N + 1, dtype=torch.float64))).abs().max().item() <= bound


def test_make_hippo_legs_rejects_bad_N():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="N"):
            make_hippo_legs(bad)


def test_zoh_scalar_is_exact_exponential():
    for a, b, dt in [(-2.0, 0.7, 0.1), (-0.01, 3.0, 2.0), (-15.0, -1.0, 1e-3)]:
        Ab, Bb = discretize_zoh(torch.tensor([[a]], dtype=torch.float64), torch.tensor([b], dtype=torch.float64), dt)
        assert Ab.item() == pytest.approx(math.exp(a * dt), rel=1e-14)
        assert Bb.item() == pytest.approx(b / a * math.expm1(a * dt), rel=1e-12)


def test_zoh_handles_singular_A_and_matrix_B():
    A = torch.zeros(3, 3, dtype=torch.float64)
    B = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Ab, Bb = discretize_zoh(A, B, 0.5)
    assert torch.allclose(Ab, torch.eye(3, dtype=torch.float64)) and torch.allclose(Bb, 0.5 * B, atol=1e-15)
    assert Bb.shape == (3, 2)


def test_zoh_matches_diagonal_closed_form():
    a = -torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)
    Ab, Bb = discretize_zoh(torch.diag(a), b, 0.3)
    assert torch.allclose(Ab, torch.diag(torch.exp(0.3 * a)), atol=1e-15)
    assert torch.allclose(Bb, b / a * torch.expm1(0.3 * a), atol=1e-14)


@pytest.mark.parametrize("N", [4, 8])
def test_zoh_and_bilinear_agree_to_third_order(N):
    A, B = make_hippo_legs(N)
    errs = []
    for dt in (4e-3, 2e-3, 1e-3):
        (Az, Bz), (Ab, Bb) = discretize_zoh(A, B, dt), discretize_bilinear(A, B, dt)
        err = max((Az - Ab).abs().max().item(), (Bz - Bb).abs().max().item())
        assert err < 1e-5 * (dt / 1e-3) ** 2          # O(dt^2) at least ...
        errs.append(err)
    for r in (errs[0] / errs[1], errs[1] / errs[2]):
        assert 7.0 < r < 9.0                             # ... in fact O(dt^3): halving dt divides it by 8


def test_bilinear_known_value_and_dispatch():
    A, B = torch.tensor([[-2.0]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    Ab, Bb = discretize(A, B, 0.1, "bilinear")
    assert Ab.item() == pytest.approx(0.9 / 1.1) and Bb.item() == pytest.approx(0.1 / 1.1)
    with pytest.raises(ValueError, match="zoh"):
        discretize(A, B, 0.1, "euler")
    with pytest.raises(ValueError, match="square"):
        discretize_zoh(torch.zeros(2, 3), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="B must be"):
        discretize_bilinear(torch.zeros(2, 2), torch.zeros(3), 0.1)


def test_legendre_matches_closed_forms():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    P = legendre(4, x)
    assert P.shape == (11, 4)
    assert torch.allclose(P[:, 2], (3 * x**2 - 1) / 2) and torch.allclose(P[:, 3], (5 * x**3 - 3 * x) / 2)
    assert legendre(1, x).shape == (11, 1)


def _signal(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.arange(L, dtype=torch.float64) + 0.5) / L
    k = torch.arange(1, 6, dtype=torch.float64)
    amps = torch.randn(5, generator=g, dtype=torch.float64) / k
    return t, (amps * torch.sin(2 * math.pi * k * t[:, None] + k)).sum(-1)


def test_online_state_is_the_projection():
    L, N = 600, 12
    _, f = _signal(L)
    c = hippo_legs_online(f, N)
    assert c.shape == (L, N)
    mid = (torch.arange(L, dtype=torch.float64) + 0.5) / L
    proj = (f[:, None] * legendre(N, 2 * mid - 1) * torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)).mean(0)
    assert torch.allclose(c[-1], proj, atol=5.0 / L)
    # ZOH per step gives nearly the same states
    cz = hippo_legs_online(f, N, method="zoh")
    assert torch.allclose(cz[-1], c[-1], atol=5.0 / L)


def test_reconstruction_error_falls_with_N():
    t, f = _signal(500, seed=3)
    errs = [(hippo_legs_reconstruct(hippo_legs_online(f, N)[-1], t) - f).pow(2).mean().sqrt().item() for N in (2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.2 * errs[1]


def test_constant_signal_is_remembered_exactly():
    L = 400
    f = torch.full((L,), 2.5, dtype=torch.float64)
    c = hippo_legs_online(f, 6)
    # a constant lives in P_0 alone; the bilinear start-up transient dies out like 1/k
    assert abs(c[-1, 0].item() - 2.5) < 2.5 * 2 / L
    assert c[-1, 1:].abs().max() < 2.5 * 2 / L
    assert abs(c[-1, 0].item() - 2.5) < abs(c[L // 10, 0].item() - 2.5)


def test_online_rejects_2d():
    with pytest.raises(ValueError, match="1-D"):
        hippo_legs_online(torch.zeros(3, 4), 4)


@pytest.mark.parametrize("nheads", [1, 2, 7, 16, 24])
def test_init_A_log_methods_ranges_and_shapes(nheads):
    for method in ("mamba2", "s4d_real", "constant"):
        A_log = init_A_log(nheads, method=method, generator=torch.Generator().manual_seed(0))
        assert A_log.shape == (nheads,) and A_log.dtype == torch.float32
        A = -torch.exp(A_log)
        assert bool(((A <= -1.0 + 1e-5) & (A >= -16.0 - 1e-4)).all()), (method, A)
    s4d = -torch.exp(init_A_log(nheads, "s4d_real", a_min=2.0, a_max=8.0))
    assert s4d[0].item() == pytest.approx(-2.0, rel=1e-6)
    if nheads > 1:
        assert s4d[-1].item() == pytest.approx(-8.0, rel=1e-6)
        assert bool((s4d[1:] < s4d[:-1]).all())      # evenly spaced, increasingly negative
    assert torch.allclose(-torch.exp(init_A_log(nheads, "constant", a_min=3.0)), torch.full((nheads,), -3.0))


def test_init_A_log_s4d_real_is_legs_spectrum():
    A = -torch.exp(init_A_log(16, "s4d_real").double())
    legs_eigs = torch.linalg.eigvals(make_hippo_legs(16)[0]).real.sort(descending=True).values
    assert torch.allclose(A, legs_eigs, atol=1e-5)


def test_init_A_log_mamba2_is_uniform_and_reproducible():
    a = -(-torch.exp(init_A_log(20000, generator=torch.Generator().manual_seed(0))))
    assert abs(a.mean().item() - 8.5) < 0.1 and a.min() >= 1.0 - 1e-5 and a.max() <= 16.0 + 1e-4
    x = init_A_log(9, generator=torch.Generator().manual_seed(5))
    y = init_A_log(9, generator=torch.Generator().manual_seed(5))
    z = init_A_log(9, generator=torch.Generator().manual_seed(6))
    assert torch.equal(x, y) and not torch.equal(x, z)
    assert torch.equal(init_A_log(4, a_min=5.0, a_max=5.0), torch.log(torch.full((4,), 5.0)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(nheads=4, method="hippo"), "unknown"),
    (dict(nheads=0), "nheads"),
    (dict(nheads=4, a_min=0.0), "a_min"),
    (dict(nheads=4, a_min=8.0, a_max=2.0), "a_min"),
    (dict(nheads=4, a_min=-1.0), "a_min"),
])
def test_init_A_log_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        init_A_log(**kwargs)


def test_init_dt_bias_round_trip():
    dt_bias = init_dt_bias(5000, generator=torch.Generator().manual_seed(0))
    assert dt_bias.shape == (5000,) and dt_bias.dtype == torch.float32
    dt = F.softplus(dt_bias.double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert abs(torch.log(dt).mean().item() - (math.log(1e-3) + math.log(1e-1)) / 2) < 0.1   # log-uniform
    # float32 inverse softplus round trip for a known dt
    one = init_dt_bias(3, dt_min=0.05, dt_max=0.05)
    assert torch.allclose(F.softplus(one), torch.full((3,), 0.05), rtol=1e-5)


def test_init_dt_bias_floor_and_determinism():
    dt = F.softplus(init_dt_bias(100, dt_min=1e-6, dt_max=1e-5, dt_floor=1e-4).double())
    assert torch.allclose(dt, torch.full((100,), 1e-4, dtype=torch.float64), rtol=1e-4)
    a = init_dt_bias(7, generator=torch.Generator().manual_seed(2))
    b = init_dt_bias(7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dt_min"):
        init_dt_bias(4, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="nheads"):
        init_dt_bias(0)


# ----------------------------------------------------------------------------------------------- the explorer widget
from snakes_lib.hippo import HIPPO_SIGNALS, hippo_explorer, hippo_signal


@pytest.mark.parametrize("kind", HIPPO_SIGNALS)
def test_hippo_signal_shapes_and_determinism(kind):
    t, f = hippo_signal(kind, L=101, seed=3)
    assert t.shape == f.shape == (101,) and f.dtype == torch.float64 and torch.isfinite(f).all()
    assert torch.equal(f, hippo_signal(kind, L=101, seed=3)[1])
    assert 0 < t.min() and t.max() < 1


def test_hippo_explorer_callback():
    small, big = hippo_explorer(4, "smooth", L=400, draw=False), hippo_explorer(32, "smooth", L=400, draw=False)
    assert small["figure"] is None and small["reconstruction"].shape == (400,)
    assert big["rmse"] < small["rmse"] and big["max_error"] < small["max_error"]
    # the returned numbers are those of the reconstruction it returns
    t, f = hippo_signal("smooth", L=400)
    torch.testing.assert_close(big["reconstruction"], hippo_legs_reconstruct(hippo_legs_online(f, 32)[-1], t))
    assert abs(big["rmse"] - (big["reconstruction"] - f).pow(2).mean().sqrt().item()) < 1e-12
    drawn = hippo_explorer(8, "square wave", L=300)
    assert drawn["figure"] is not None and len(drawn["figure"].axes) == 2 and drawn["signal"] == "square wave"
    import matplotlib.pyplot as plt
    plt.close(drawn["figure"])


@pytest.mark.parametrize("kw, pattern", [(dict(signal="sine"), r"signal must be one of"), (dict(N=0), r"N must be a positive integer"),
                                         (dict(N=2.5), r"N must be a positive integer")])
def test_hippo_explorer_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        hippo_explorer(**{"N": 4, **kw}, draw=False)


def test_widget_bundle_has_the_view_and_a_picture():
    import base64

    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from snakes_lib.hippo import widget_bundle
    w = widgets.interactive(lambda N=4: hippo_explorer(N, L=50), N=widgets.IntSlider(value=4, min=1, max=8))
    fig = w.result["figure"]
    bundle = widget_bundle(w, fig)
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == w.model_id
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "run the notebook" in bundle["text/plain"] and "interactive(" not in bundle["text/plain"]
    assert "image/png" not in widget_bundle(w)                       # no figure, no picture
    plt.close(fig)


def _two_moves_at_once(slider):
    "Move `slider` from two threads at once, as two kernel threads handling two widget messages would."
    import threading
    threads = [threading.Thread(target=setattr, args=(slider, "value", v)) for v in (3, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_one_redraw_at_a_time_serializes_widget_callbacks():
    "JupyterLab may deliver two slider moves in two kernel threads; show_widget's lock makes the redraws take turns."
    import threading
    import time

    widgets = pytest.importorskip("ipywidgets")
    from snakes_lib.hippo import one_redraw_at_a_time
    runs = {"inside": 0, "most": 0, "calls": 0}
    lock = threading.Lock()

    def slow(x=0):
        with lock:
            runs["inside"] += 1
            runs["calls"] += 1
            runs["most"] = max(runs["most"], runs["inside"])
        deadline = time.monotonic() + 0.5
        while runs["inside"] < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        with lock:
            runs["inside"] -= 1
        return x

    for serialized in (False, True):
        w = widgets.interactive(slow, x=widgets.IntSlider(0, 0, 10))
        box = widgets.VBox([widgets.HTML("status"), w])          # found inside a container too
        if serialized:
            one_redraw_at_a_time(box)
            one_redraw_at_a_time(box)                              # twice: still one callback per move
        runs.update(most=0, calls=0)
        _two_moves_at_once(w.children[0])
        assert runs["calls"] == 2 and w.result in (3, 7)
        assert runs["most"] == (1 if serialized else 2), (serialized, runs)
    w.children[0].value = 5
    assert runs["calls"] == 3 and w.result == 5

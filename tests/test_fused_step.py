"""Chapter 10c's decoding-step kernels (conv step, SSM step, the mixer's fused step) against chapter 03/05's PyTorch.
Without a GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) in float32 at small sizes."""
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

from snakes_lib import fused_step as FS  # noqa: E402
from snakes_lib.model import Mamba2Config, Mamba2LM  # noqa: E402
from snakes_lib.ssd import ssd_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


@pytest.mark.parametrize("b,C,K,seed", [(1, 3, 4, 0), (2, 131, 4, 1), (3, 50, 3, 2), (1, 17, 2, 3)])
def test_conv_step_shifts_the_window_and_matches_conv_silu(b, C, K, seed):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(b, C + 7, generator=gen).to(DEVICE)
    x = wide[:, 2:2 + C]                                          # a strided view, as the in_proj split gives
    state = torch.randn(b, C, K, generator=gen).to(DEVICE)
    w, bias = torch.randn(C, K, generator=gen).to(DEVICE), torch.randn(C, generator=gen).to(DEVICE)
    window = torch.cat([state[:, :, 1:], x[:, :, None]], dim=-1)
    want = F.silu((window * w).sum(-1) + bias)
    got = FS.conv_step(x, state, w, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(state, window)


@pytest.mark.parametrize("b,nheads,P,N,ng", [(1, 1, 4, 4, 1), (2, 6, 12, 20, 3), (3, 4, 16, 9, 2), (1, 8, 72, 8, 1)])
def test_ssm_step_matches_ssd_step_with_softplus(b, nheads, P, N, ng):
    gen = torch.Generator().manual_seed(b * 100 + nheads * 10 + P)
    xBC = torch.randn(b, nheads * P + 2 * ng * N, generator=gen).to(DEVICE)
    dt = (torch.rand(b, nheads, generator=gen) * 60 - 30).to(DEVICE)      # both ends of the softplus
    state = torch.randn(b, nheads, P, N, generator=gen).to(DEVICE)
    dt_bias, A_log, D = (torch.randn(nheads, generator=gen).to(DEVICE) for _ in range(3))
    x, B, C = torch.split(xBC, [nheads * P, ng * N, ng * N], dim=-1)
    delta = F.softplus(dt + dt_bias).clamp_min(torch.finfo(torch.float32).tiny)
    want_y, want_state = ssd_step(state, x.reshape(b, nheads, P), delta, -torch.exp(A_log), B.reshape(b, ng, N),
                                  C.reshape(b, ng, N), D)
    got = FS.ssm_step(xBC, dt, state, dt_bias, A_log, D, ng)
    torch.testing.assert_close(got, want_y.reshape(b, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)


def test_step_kernels_refuse_states_they_cannot_update_in_place():
    state = torch.zeros(2, 4, 5, device=DEVICE).transpose(1, 2)      # not contiguous
    with pytest.raises(ValueError, match="contiguous conv_state"):
        FS.conv_step(torch.zeros(2, 5, device=DEVICE), state, torch.zeros(5, 4, device=DEVICE),
                     torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="do not fit together"):
        FS.ssm_step(torch.zeros(1, 10, device=DEVICE), torch.zeros(1, 2, device=DEVICE),
                    torch.zeros(1, 2, 4, 3, device=DEVICE), *(torch.zeros(2, device=DEVICE),) * 3, ngroups=1)


@pytest.mark.parametrize("ngroups,d_conv", [(1, 4), (2, 3)])
def test_fused_model_step_decodes_what_the_pytorch_step_decodes(ngroups, d_conv):
    cfg = Mamba2Config(d_model=32, n_layer=2, d_state=8, headdim=8, vocab_size=61, chunk_size=8, ngroups=ngroups,
                       d_conv=d_conv)
    torch.manual_seed(ngroups)
    model = Mamba2LM(cfg).float().to(DEVICE).eval()
    prompt = torch.randint(0, 61, (2, 9), device=DEVICE)
    runs = {}
    for kernels in ("torch", "triton"):
        model.kernels = "torch"
        cache = model.allocate_inference_cache(2)
        with torch.no_grad():
            logits = model(prompt, cache=cache)[:, -1]
            model.kernels = kernels
            toks, outs = [], []
            for _ in range(10):
                tok = logits.argmax(-1)
                toks.append(tok)
                logits = model.step(tok, cache)
                outs.append(logits)
        runs[kernels] = torch.stack(toks, 1), torch.stack(outs, 1), cache
    assert torch.equal(runs["torch"][0], runs["triton"][0])
    torch.testing.assert_close(runs["triton"][1], runs["torch"][1], rtol=1e-4, atol=1e-4)
    for a, b in zip(runs["triton"][2].ssm_states, runs["torch"][2].ssm_states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kernels_triton_step_refuses_float64_like_the_forward():
    cfg = Mamba2Config(d_model=32, n_layer=1, d_state=8, headdim=8, vocab_size=61, chunk_size=8)
    model = Mamba2LM(cfg).double().to(DEVICE)
    cache = model.allocate_inference_cache(1)
    model.kernels = "triton"
    with pytest.raises(ValueError, match="kernels='triton' cannot run"):
        model.step(torch.tensor([3], device=DEVICE), cache)

"""Chapter 10's fused block kernels (gated RMSNorm, causal depthwise conv + SiLU) and chapter 10b's CUDA-graph decoding
step, against chapter 05's PyTorch. Without a GPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1) in float32 at small sizes; on a GPU the same tests run compiled, plus a bf16 model test."""
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

from snakes_lib import fused_block as FB  # noqa: E402
from snakes_lib.graph_decode import GraphedStep  # noqa: E402
from snakes_lib.model import GatedRMSNorm, Mamba2Config, Mamba2LM  # noqa: E402
from snakes_lib.transformer import TransformerConfig, TransformerLM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("M,D,G,lead", [(1, 8, 8, ()), (7, 48, 16, ()), (5, 40, 40, (2,)), (3, 30, 10, (2, 1))])
def test_gated_rmsnorm_forward_and_gradients_match_the_module(M, D, G, lead):
    gen = torch.Generator().manual_seed(M * D)
    y = torch.randn(*lead, M, D, generator=gen, dtype=torch.float64).to(DEVICE)
    z = torch.randn(*lead, M, D + 3, generator=gen, dtype=torch.float64).to(DEVICE)[..., 1:1 + D]   # strided
    ref = GatedRMSNorm(D, G).double().to(DEVICE)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(D, generator=gen, dtype=torch.float64))
    yr, zr = y.clone().requires_grad_(), z.clone().requires_grad_()
    out_ref = ref(yr, zr)
    do = torch.randn_like(out_ref)
    out_ref.backward(do)
    w = ref.weight.detach().float().requires_grad_()
    yf, zf = y.float().requires_grad_(), z.float().requires_grad_()
    out = FB.gated_rmsnorm(yf, zf, w, G, ref.eps)
    out.backward(do.float())
    assert out.shape == out_ref.shape and out.dtype == torch.float32
    for a, b in [(out, out_ref), (yf.grad, yr.grad), (zf.grad, zr.grad), (w.grad, ref.weight.grad)]:
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("b,L,C,K", [(1, 1, 5, 4), (2, 7, 20, 4), (1, 70, 130, 4), (3, 5, 9, 3), (1, 66, 3, 2)])
def test_causal_conv_silu_forward_and_gradients_match_conv1d(b, L, C, K):
    gen = torch.Generator().manual_seed(b * L + C)
    x = torch.randn(b, L, C + 2, generator=gen, dtype=torch.float64).to(DEVICE)[:, :, 2:]       # strided, as in the model
    w = torch.randn(C, K, generator=gen, dtype=torch.float64).to(DEVICE)
    bias = torch.randn(C, generator=gen, dtype=torch.float64).to(DEVICE)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, bias))
    out_ref = F.silu(F.conv1d(F.pad(xr.transpose(1, 2), (K - 1, 0)), wr[:, None, :], br, groups=C)).transpose(1, 2)
    do = torch.randn_like(out_ref)
    out_ref.backward(do)
    xf, wf, bf = (t.float().requires_grad_() for t in (x, w, bias))
    out = FB.causal_conv1d_silu(xf, wf, bf)
    out.backward(do.float())
    for a, r in [(out, out_ref), (xf.grad, xr.grad), (wf.grad, wr.grad), (bf.grad, br.grad)]:
        assert rel(a, r) < 1e-5


def test_ops_pass_opcheck():
    y, z = torch.randn(3, 5, 16, device=DEVICE), torch.randn(3, 5, 16, device=DEVICE)
    torch.library.opcheck(FB._norm_fwd_op, (y.requires_grad_(), z.requires_grad_(), torch.randn(16, device=DEVICE), 8, 1e-5))
    x = torch.randn(2, 9, 12, device=DEVICE, requires_grad=True)
    w, b = torch.randn(12, 4, device=DEVICE), torch.randn(12, device=DEVICE)
    torch.library.opcheck(FB._conv_fwd_op, (x, w, b, None))
    torch.library.opcheck(FB._conv_fwd_op, (x, w, b, (torch.arange(9, device=DEVICE) // 4).expand(2, 9)))


def conv_per_document(x, w, bias, seq_idx):
    "silu(conv) run on each run of equal labels separately. x (b, L, C), seq_idx (b, L)."
    K, rows = w.shape[-1], []
    for xb, sb in zip(x, seq_idx.tolist()):
        starts = [0] + [t for t in range(1, len(sb)) if sb[t] != sb[t - 1]] + [len(sb)]
        rows.append(torch.cat([F.silu(F.conv1d(F.pad(xb[s:e].t()[None], (K - 1, 0)), w[:, None, :], bias,
                                                groups=w.shape[0]))[0].t() for s, e in zip(starts, starts[1:])]))
    return torch.stack(rows)


@pytest.mark.parametrize("b,L,C,K,p_new", [(1, 1, 3, 4, 0.5), (2, 67, 21, 4, 0.1), (3, 130, 9, 3, 0.3), (1, 20, 5, 2, 1.0)])
def test_causal_conv_with_seq_idx_equals_each_document_alone(b, L, C, K, p_new):
    gen = torch.Generator().manual_seed(L * C)
    seq_idx = torch.cumsum(torch.rand(b, L, generator=gen) < p_new, dim=1) % 2     # labels recur: 0, 1, 0, ...
    x = torch.randn(b, L, C, dtype=torch.float64, generator=gen)
    w, bias = torch.randn(C, K, dtype=torch.float64, generator=gen), torch.randn(C, dtype=torch.float64, generator=gen)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, bias))
    ref = conv_per_document(xr, wr, br, seq_idx)
    do = torch.randn_like(ref)
    ref.backward(do)
    xf, wf, bf = (t.float().to(DEVICE).requires_grad_() for t in (x, w, bias))
    out = FB.causal_conv1d_silu(xf, wf, bf, seq_idx=seq_idx.to(DEVICE))
    out.backward(do.float().to(DEVICE))
    for a, r in [(out, ref), (xf.grad, xr.grad), (wf.grad, wr.grad), (bf.grad, br.grad)]:
        assert rel(a.cpu(), r) < 1e-5
    # one document everywhere is the plain convolution
    same = FB.causal_conv1d_silu(xf.detach(), wf.detach(), bf.detach(), seq_idx=torch.zeros_like(seq_idx).to(DEVICE))
    assert torch.equal(same, FB.causal_conv1d_silu(xf.detach(), wf.detach(), bf.detach()))


def logits_and_grads(model, ids, kernels, **forward_kw):
    "The logits and every parameter's gradient of a fixed weighted sum of them, with model.kernels = kernels."
    model.kernels = kernels
    model.zero_grad()
    logits = model(ids, **forward_kw)
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_logits_and_grads(got, want, logits_tol=1e-5, grad_tol=1e-4):
    assert rel(got[0], want[0]) < logits_tol
    for name, g in want[1].items():
        assert rel(got[1][name], g) < grad_tol, name


@pytest.mark.parametrize("ngroups,L", [(1, 1), (2, 37), (1, 64)])
def test_model_with_every_kernel_equals_the_pytorch_model(ngroups, L):
    cfg = Mamba2Config(d_model=32, n_layer=2, d_state=16, headdim=16, ngroups=ngroups, vocab_size=97, chunk_size=16)
    torch.manual_seed(L)
    model = Mamba2LM(cfg).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, L), device=DEVICE)
    want = logits_and_grads(model, ids, "torch")
    got = logits_and_grads(model, ids, "triton")
    assert model.kernels == "triton"
    assert_same_logits_and_grads(got, want)


def test_model_with_every_kernel_takes_packed_documents():
    cfg = Mamba2Config(d_model=32, n_layer=2, d_state=16, headdim=16, ngroups=2, vocab_size=97, chunk_size=16)
    torch.manual_seed(3)
    model = Mamba2LM(cfg).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, 37), device=DEVICE)
    seq_idx = torch.tensor([[0] * 16 + [1] * 5 + [2] * 16, [4] * 1 + [5] * 30 + [4] * 6], device=DEVICE)
    want = logits_and_grads(model, ids, "torch", seq_idx=seq_idx)
    got = logits_and_grads(model, ids, "triton", seq_idx=seq_idx)
    assert_same_logits_and_grads(got, want)
    plain = logits_and_grads(model, ids, "triton")
    assert rel(plain[0], want[0]) > 1e-3, "seq_idx changed nothing"


def test_kernels_knob_is_validated_and_unsupported_inputs_are_refused():
    cfg = Mamba2Config(d_model=32, n_layer=1, d_state=16, headdim=16, vocab_size=50, chunk_size=16)
    model = Mamba2LM(cfg)
    with pytest.raises(ValueError, match="kernels must be"):
        model.kernels = "cuda"
    model = model.double().to(DEVICE)
    model.kernels = "triton"
    with pytest.raises(ValueError, match="kernels='triton' cannot run"):
        model(torch.randint(0, 50, (1, 5), device=DEVICE))
    model.kernels = "auto"                        # float64: PyTorch everywhere, no error
    assert model(torch.randint(0, 50, (1, 5), device=DEVICE)).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU (the interpreter has no bf16)")
def test_bf16_model_on_gpu_matches_the_pytorch_path():
    cfg = Mamba2Config(d_model=256, n_layer=2, d_state=64, headdim=64, vocab_size=1000, chunk_size=64)
    torch.manual_seed(0)
    model = Mamba2LM(cfg).cuda()
    ids = torch.randint(0, 1000, (2, 333), device="cuda")
    out = {}
    for kernels in ("torch", "auto"):
        model.kernels = kernels
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids)
        logits.float().pow(2).mean().backward()
        out[kernels] = logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}
    assert rel(out["auto"][0], out["torch"][0]) < 2e-2
    for name, g in out["torch"][1].items():
        assert rel(out["auto"][1][name], g) < 5e-2, name


def test_graphed_step_refuses_cpu_and_growing_caches():
    mcfg = Mamba2Config(d_model=32, n_layer=1, d_state=16, headdim=16, vocab_size=50, chunk_size=16)
    model = Mamba2LM(mcfg)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedStep(model, model.allocate_inference_cache(1, device="cpu"))
    tmodel = TransformerLM(TransformerConfig(d_model=32, n_layer=1, n_head=2, intermediate_size=64, vocab_size=50))
    with pytest.raises(TypeError, match="fixed-size"):
        GraphedStep(tmodel, tmodel.allocate_inference_cache(1))
    with pytest.raises(ValueError, match="prefill"):
        GraphedStep(tmodel, tmodel.allocate_inference_cache(1, max_seqlen=16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_step_decodes_what_the_eager_step_decodes():
    cfg = Mamba2Config(d_model=64, n_layer=3, d_state=16, headdim=16, vocab_size=300, chunk_size=32)
    torch.manual_seed(0)
    model = Mamba2LM(cfg).cuda().eval()
    prompt = torch.randint(0, 300, (3, 41), device="cuda")
    runs = {}
    for name in ("eager", "graph"):
        cache = model.allocate_inference_cache(3)
        with torch.no_grad():
            tok = model(prompt, cache=cache)[:, -1].argmax(-1)
            step = GraphedStep(model, cache) if name == "graph" else (lambda t: model.step(t, cache))
            toks, logits = [], []
            for _ in range(40):
                out = step(tok)
                logits.append(out.clone())
                tok = out.argmax(-1)
                toks.append(tok)
        runs[name] = torch.stack(toks, 1), torch.stack(logits, 1), cache.seqlen_offset
    assert torch.equal(runs["eager"][0], runs["graph"][0])
    assert torch.allclose(runs["eager"][1], runs["graph"][1], atol=1e-5, rtol=1e-5)
    assert runs["eager"][2] == runs["graph"][2] == 41 + 40


@pytest.mark.parametrize("shape", [(1, 8), (2, 5, 24), (3, 1, 40)])
def test_rmsnorm_without_gate_matches_the_module(shape):
    from snakes_lib.model import RMSNorm
    D = shape[-1]
    ref = RMSNorm(D).double().to(DEVICE)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(D, dtype=torch.float64))
    x = torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out_ref = ref(x)
    do = torch.randn_like(out_ref)
    out_ref.backward(do)
    xf, wf = x.detach().float().requires_grad_(), ref.weight.detach().float().requires_grad_()
    out = FB.rmsnorm(xf, wf, ref.eps)
    out.backward(do.float())
    for a, b in [(out, out_ref), (xf.grad, x.grad), (wf.grad, ref.weight.grad)]:
        assert rel(a, b) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_transformer_step_decodes_what_the_eager_step_decodes():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(d_model=64, n_layer=2, n_head=4, intermediate_size=128, vocab_size=300)).cuda().eval()
    prompt = torch.randint(0, 300, (3, 41), device="cuda")
    runs = {}
    for name in ("eager", "graph"):
        cache = model.allocate_inference_cache(3, max_seqlen=100)
        with torch.no_grad():
            tok = model(prompt, cache=cache)[:, -1].argmax(-1)
            step = GraphedStep(model, cache) if name == "graph" else (lambda t: model.step(t, cache))
            toks, logits = [], []
            for _ in range(40):
                out = step(tok)
                logits.append(out.clone())
                tok = out.argmax(-1)
                toks.append(tok)
        runs[name] = torch.stack(toks, 1), torch.stack(logits, 1), cache.seqlen_offset, int(cache.position)
    assert torch.equal(runs["eager"][0], runs["graph"][0])
    assert torch.allclose(runs["eager"][1], runs["graph"][1], atol=1e-5, rtol=1e-5)
    assert runs["eager"][2:] == runs["graph"][2:] == (81, 81)


def test_eager_functions_and_the_ops_give_identical_gradients():
    "The norm and the conv also run their op only under torch.compile (chapter 09's eager_autograd): same numbers."
    gen = torch.Generator().manual_seed(4)
    y, z = torch.randn(3, 7, 16, generator=gen).to(DEVICE), torch.randn(3, 7, 16, generator=gen).to(DEVICE)
    w = torch.randn(16, generator=gen).to(DEVICE)
    x, cw, cb = (torch.randn(2, 11, 12, generator=gen).to(DEVICE), torch.randn(12, 4, generator=gen).to(DEVICE),
                 torch.randn(12, generator=gen).to(DEVICE))
    cases = [(FB._norm_fwd_op, FB._norm_call, (y, z, w), (8, 1e-5)),
             (FB._conv_fwd_op, FB._conv_call, (x, cw, cb), (None,))]
    for op, call, tensors, rest in cases:
        got = []
        for fn in (op, call):
            leaves = [t.clone().requires_grad_() for t in tensors]
            out = fn(*leaves, *rest)
            out = out[0] if isinstance(out, tuple) else out
            out.square().sum().backward()
            got.append([out] + [t.grad for t in leaves])
        for a, e in zip(*got):
            assert torch.equal(a, e)

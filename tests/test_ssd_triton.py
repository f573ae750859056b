"""Chapter 09's Triton SSD kernels against the recurrence. Without a GPU they run in Triton's interpreter (conftest
sets TRITON_INTERPRET=1), in float32 at small sizes; on a GPU the same tests run the compiled kernels, plus bf16."""
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

from snakes_lib import ssd_triton as T  # noqa: E402
from snakes_lib.ssd import document_ids, ssd_chunked, ssd_recurrent  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


def make(b, L, h, P, g, N, with_d=True, with_h=True, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    ins = [r(b, L, h, P), torch.rand(b, L, h, generator=gen) * 0.5 + 0.05, -(torch.rand(h, generator=gen) * 2 + 0.1),
           r(b, L, g, N), r(b, L, g, N), r(h) if with_d else None, r(b, h, P, N) if with_h else None]
    return [None if t is None else t.to(DEVICE, dtype if i in (0, 3, 4, 6) else torch.float32) for i, t in enumerate(ins)]


def reference(ins, dy, dfinal):
    "float64 autograd through the plain loop: outputs and every gradient."
    ref = [None if t is None else t.detach().double().requires_grad_() for t in ins]
    y, final = ssd_recurrent(*ref[:5], ref[5], ref[6])
    torch.autograd.backward([y, final], [dy.double(), dfinal.double()])
    return y, final, [None if r is None else r.grad for r in ref]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


# (b, L, h, P, g, N, chunk, D, initial_state): seqlen 1, a prime, shorter than a chunk, not a multiple, an exact
# multiple; 1, 2 and 4 groups; headdim and dstate that are not powers of two (masked tiles)
SHAPES = [
    (1, 1, 2, 16, 1, 16, 16, True, False),
    (2, 13, 4, 8, 2, 12, 16, False, True),
    (1, 7, 2, 16, 1, 16, 32, True, True),
    (2, 37, 4, 16, 2, 16, 16, True, True),
    (1, 32, 4, 16, 4, 16, 16, False, False),
    (1, 50, 6, 20, 3, 20, 32, True, False),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_L{}_h{}_P{}_g{}_N{}_Q{}_D{}_h0{}".format(*s))
def test_forward_and_every_gradient_match_the_recurrence(shape):
    b, L, h, P, g, N, Q, with_d, with_h = shape
    ins = make(b, L, h, P, g, N, with_d, with_h, seed=L)
    leaves = [None if t is None else t.clone().requires_grad_() for t in ins]
    y, final = T.ssd_chunked_triton(*leaves[:5], Q, leaves[5], leaves[6])
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    torch.autograd.backward([y, final], [dy, dfinal])
    y_ref, final_ref, grads_ref = reference(ins, dy, dfinal)
    assert y.dtype == ins[0].dtype and final.shape == (b, h, P, N)
    assert rel(y, y_ref) < 1e-5 and rel(final, final_ref) < 1e-5
    for name, leaf, want in zip(NAMES, leaves, grads_ref):
        if leaf is None:
            continue
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
        tol = 1e-4 if name != "A" else 1e-3     # dA sums every position: more float32 rounding
        assert (leaf.grad.double() - want).abs().max() <= tol * max(want.abs().max().item(), 1.0), name


def test_fused_and_unfused_state_kernels_agree(monkeypatch):
    ins = make(2, 37, 4, 16, 2, 16)
    dy = torch.randn(2, 37, 4, 16, device=DEVICE)
    dfinal = torch.randn(2, 4, 16, 16, device=DEVICE)
    out = {}
    for fuse in (True, False):
        monkeypatch.setitem(T.KERNEL_CONFIG, "fuse_states", fuse)
        y, final, _, _ = T.ssd_forward(*ins[:5], 16, ins[5], ins[6])
        out[fuse] = (y, final, T.ssd_backward(dy, dfinal, *ins, 16))
    assert torch.allclose(out[True][0], out[False][0], atol=1e-6)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-6)
    for name, a, b in zip(NAMES, out[True][2], out[False][2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name


def test_heads_split_across_programs_sum_the_group_gradients(monkeypatch):
    """With few chunks the backward spreads a group's heads over several programs and adds dB, dC atomically."""
    ins = make(1, 20, 8, 16, 1, 16, with_h=False)
    dy, dfinal = torch.randn(1, 20, 8, 16, device=DEVICE), torch.zeros(1, 8, 16, 16, device=DEVICE)
    whole = T.ssd_backward(dy, dfinal, *ins, 16)
    monkeypatch.setitem(T.KERNEL_CONFIG, "min_programs", 10**9)      # forces one head per program
    assert T._heads_per_program(8, 1, 2) == 1
    split = T.ssd_backward(dy, dfinal, *ins, 16)
    for name, a, b in zip(NAMES, whole, split):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name


def test_registered_op_passes_opcheck_and_compiles_without_graph_break():
    x, dt, A, B, C, D, h0 = make(1, 19, 2, 16, 1, 16)
    torch.library.opcheck(torch.ops.snakes.ssd_chunked_triton_fwd.default, (x, dt, A, B, C, D, h0, 16))

    def layer(x, dt, A, B, C):
        return T.ssd_chunked_triton(x, dt, A, B, C, 16, check_values=False)[0].sum()

    explained = torch._dynamo.explain(layer)(x, dt, A, B, C)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_only_y_used_still_differentiates():
    ins = [t.clone().requires_grad_() for t in make(1, 21, 2, 16, 1, 16, with_d=False, with_h=False)[:5]]
    y, _ = T.ssd_chunked_triton(*ins, 16)
    y.sum().backward()
    ref = [t.detach().double().requires_grad_() for t in ins]
    ssd_recurrent(*ref)[0].sum().backward()
    for a, r in zip(ins, ref):
        assert rel(a.grad, r.grad) < 1e-4


def test_unsupported_inputs_are_refused_clearly(monkeypatch):
    x, dt, A, B, C, _, _ = make(1, 8, 2, 16, 1, 16)
    with pytest.raises(ValueError, match="chunk_size 24 is not one of"):
        T.ssd_chunked_triton(x, dt, A, B, C, chunk_size=24)
    with pytest.raises(ValueError, match="dt must be positive"):
        T.ssd_chunked_triton(x, -dt, A, B, C, chunk_size=16)
    assert "float64" in T.triton_unsupported_reason(x.double(), B.double(), 16)
    assert "headdim 256" in T.triton_unsupported_reason(torch.zeros(1, 8, 2, 256, device=DEVICE), B, 16)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "CUDA" in T.triton_unsupported_reason(x, B, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU (the interpreter has no bf16)")
@pytest.mark.parametrize("shape", [(2, 1000, 8, 64, 1, 128, 256), (2, 777, 8, 64, 2, 64, 128)])
def test_bf16_on_gpu_matches_the_pytorch_path(shape):
    b, L, h, P, g, N, Q = shape
    ins = make(b, L, h, P, g, N, with_h=False, dtype=torch.bfloat16)
    leaves = [None if t is None else t.clone().requires_grad_() for t in ins]
    y, _ = T.ssd_chunked_triton(*leaves[:5], Q, leaves[5])
    ref = [None if t is None else t.detach().double().requires_grad_() for t in ins]
    y_ref, _ = ssd_chunked(*ref[:5], Q, ref[5])
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(y.dtype))
    y_ref.backward(dy)
    norm_rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()
    assert norm_rel(y, y_ref) < 1e-2
    for name, leaf, r in zip(NAMES, leaves, ref):
        if leaf is not None:
            assert norm_rel(leaf.grad, r.grad) < (5e-2 if name == "A" else 1e-2), name


def test_ssd_chunked_backends_dispatch():
    x, dt, A, B, C, D, h0 = make(2, 23, 4, 16, 2, 16, seed=3)
    y_torch, f_torch = ssd_chunked(x, dt, A, B, C, 16, D, h0, backend="torch")
    y_triton, f_triton = ssd_chunked(x, dt, A, B, C, 16, D, h0, backend="triton")
    assert rel(y_triton, y_torch) < 1e-5 and rel(f_triton, f_torch) < 1e-5
    y_auto, _ = ssd_chunked(x, dt, A, B, C, 16, D, h0)                 # auto: Triton on CUDA, else PyTorch
    assert torch.equal(y_auto, y_triton if DEVICE == "cuda" else y_torch)
    with pytest.raises(ValueError, match="chunk_size 24 is not one of"):
        ssd_chunked(x, dt, A, B, C, 24, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        ssd_chunked(x, dt, A, B, C, 16, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the automatic choice of Triton needs CUDA tensors")
def test_auto_backend_falls_back_with_one_warning():
    x, dt, A, B, C, D, _ = make(1, 40, 2, 16, 1, 16)
    with pytest.warns(UserWarning, match="chunk_size 24"):
        y, _ = ssd_chunked(x, dt, A, B, C, 24, D)
    assert torch.allclose(y, ssd_chunked(x, dt, A, B, C, 24, D, backend="torch")[0])


def test_inductor_compiles_the_op_with_strided_inputs_forward_and_backward():
    """In the model x is a transposed view (the conv's output); the compiled graph checks the op's output strides
    against its fake implementation, so they must agree (found on an H200: the backward's fake copied x's strides)."""
    x0, dt, A, B, C, D, _ = make(1, 19, 2, 16, 1, 16, with_h=False)
    x_t = x0.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()      # same values, (L, h, P) strided
    assert not x_t.is_contiguous()

    def loss(x, dt, B, C):
        return ssd_chunked(x, dt, A, B, C, 16, D, check_values=False, backend="triton")[0].square().sum()

    leaves = [x_t, dt.clone().requires_grad_(), B.clone().requires_grad_(), C.clone().requires_grad_()]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    grads_eager = torch.autograd.grad(loss(*leaves), leaves)
    for g, e in zip(grads, grads_eager):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ packed documents: seq_idx
def packed_seq_idx(splits):
    "(batch, seqlen) labels from per-row document lengths; the labels repeat (3, 0, 3, ...) since only changes count."
    rows = [torch.repeat_interleave(torch.tensor([3 * (k % 2) for k in range(len(s))]), torch.tensor(s)) for s in splits]
    return torch.stack(rows).to(DEVICE)


def random_packed_case(seed):
    "Random odd shapes and document splits, with one document start forced onto a chunk edge and one of length 1."
    gen = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]
    Q = pick([16, 32])
    L = Q + 3 + 2 * int(torch.randint(0, Q, (1,), generator=gen))            # odd, over one chunk
    g = pick([1, 2])
    h, P, N = g * pick([1, 2]), pick([8, 16]), pick([8, 12, 16])
    splits = []
    for row in range(pick([1, 2])):
        cuts = {Q, Q + 1} if row == 0 else set()                              # a chunk edge and a one-token document
        cuts |= set(torch.randint(1, L, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen).tolist())
        bounds = [0] + sorted(cuts) + [L]
        splits.append([e - s for s, e in zip(bounds, bounds[1:])])
    return (len(splits), L, h, P, g, N, Q, bool(seed % 2), seed % 3 != 0, splits)


# (b, L, h, P, g, N, chunk, D, initial_state, per-row document lengths): starts on chunk edges (16, 32) and inside
# chunks, one-token documents (first token, middle, last token), a row that is one document, every row different
PACKED = [
    (2, 37, 4, 16, 2, 16, 16, True, True, [[16, 5, 1, 15], [3, 29, 5]]),
    (1, 50, 2, 16, 1, 12, 32, False, True, [[1, 31, 1, 16, 1]]),
    (2, 13, 2, 8, 1, 16, 16, True, False, [[13], [6, 1, 1, 5]]),
] + [random_packed_case(seed) for seed in (1, 2, 3)]


def torch_reference(ins, seq_idx, Q, dy, dfinal):
    "float64 autograd through chapter 03's `ssd_chunked` with seq_idx: outputs and every gradient."
    ref = [None if t is None else t.detach().double().requires_grad_() for t in ins]
    y, final = ssd_chunked(*ref[:5], Q, ref[5], ref[6], backend="torch", seq_idx=seq_idx)
    torch.autograd.backward([y, final], [dy.double(), dfinal.double()])
    return y, final, [None if r is None else r.grad for r in ref]


@pytest.mark.parametrize("case", PACKED, ids=lambda s: "b{}_L{}_h{}_P{}_g{}_N{}_Q{}_D{}_h0{}".format(*s[:9]))
def test_seq_idx_forward_and_every_gradient_match_the_pytorch_path(case):
    b, L, h, P, g, N, Q, with_d, with_h, splits = case
    assert all(sum(s) == L for s in splits)
    ins = make(b, L, h, P, g, N, with_d, with_h, seed=L)
    seq_idx = packed_seq_idx(splits)
    leaves = [None if t is None else t.clone().requires_grad_() for t in ins]
    y, final = T.ssd_chunked_triton(*leaves[:5], Q, leaves[5], leaves[6], seq_idx=seq_idx)
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    torch.autograd.backward([y, final], [dy, dfinal])
    y_ref, final_ref, grads_ref = torch_reference(ins, seq_idx, Q, dy, dfinal)
    assert rel(y, y_ref) < 1e-5 and rel(final, final_ref) < 1e-5
    for name, leaf, want in zip(NAMES, leaves, grads_ref):
        if leaf is not None:
            tol = 1e-4 if name != "A" else 1e-3
            assert (leaf.grad.double() - want).abs().max() <= tol * max(want.abs().max().item(), 1.0), name
    # the masks matter here: without seq_idx the same inputs give other outputs
    assert all(len(s) == 1 for s in splits) or rel(T.ssd_chunked_triton(*ins[:5], Q, ins[5], ins[6])[0], y_ref) > 1e-3


def test_seq_idx_packed_row_equals_its_documents_one_by_one():
    splits = [[5, 16, 1, 15], [16, 21]]                  # starts inside chunks, on the edge 16, a one-token document
    x, dt, A, B, C, D, h0 = make(2, 37, 2, 16, 1, 16, seed=5)
    y, final = T.ssd_chunked_triton(x, dt, A, B, C, 16, D, h0, seq_idx=packed_seq_idx(splits))
    for row, lengths in enumerate(splits):
        start = 0
        for k, n in enumerate(lengths):
            piece = slice(start, start + n)
            y_doc, s_doc = T.ssd_chunked_triton(x[row:row + 1, piece], dt[row:row + 1, piece], A, B[row:row + 1, piece],
                                                C[row:row + 1, piece], 16, D, h0[row:row + 1] if k == 0 else None)
            assert rel(y[row:row + 1, piece], y_doc) < 1e-5, (row, k)
            start += n
        assert rel(final[row:row + 1], s_doc) < 1e-5, row         # the final state is the last document's


def kernel_doc(seq_idx, x):
    "The int32 document numbers the kernels take, as ssd_chunked_triton makes them from seq_idx (b, L)."
    return document_ids(seq_idx, x.shape[0], x.shape[1], x.device).to(torch.int32)


def test_seq_idx_fused_and_unfused_state_kernels_agree(monkeypatch):
    ins = make(2, 37, 2, 16, 1, 16)
    doc = kernel_doc(packed_seq_idx([[16, 1, 20], [7, 30]]), ins[0])
    assert doc[0].tolist() == [0] * 16 + [1] + [2] * 20
    dy, dfinal = torch.randn(2, 37, 2, 16, device=DEVICE), torch.randn(2, 2, 16, 16, device=DEVICE)
    out = {}
    for fuse in (True, False):
        monkeypatch.setitem(T.KERNEL_CONFIG, "fuse_states", fuse)
        y, final, _, _ = T.ssd_forward(*ins[:5], 16, ins[5], ins[6], doc)
        out[fuse] = (y, final, T.ssd_backward(dy, dfinal, *ins, 16, doc))
    assert torch.allclose(out[True][0], out[False][0], atol=1e-6)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-6)
    for name, a, b in zip(NAMES, out[True][2], out[False][2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name


def test_seq_idx_op_passes_opcheck_and_dispatches():
    x, dt, A, B, C, D, h0 = make(2, 19, 2, 16, 1, 16, seed=7)
    seq_idx = packed_seq_idx([[16, 3], [2, 17]])
    torch.library.opcheck(torch.ops.snakes.ssd_chunked_triton_fwd.default,
                          (x, dt, A, B, C, D, h0, 16, kernel_doc(seq_idx, x)))
    y_torch, _ = ssd_chunked(x, dt, A, B, C, 16, D, h0, backend="torch", seq_idx=seq_idx)
    y_triton, _ = ssd_chunked(x, dt, A, B, C, 16, D, h0, backend="triton", seq_idx=seq_idx)
    assert rel(y_triton, y_torch) < 1e-5
    y_auto, _ = ssd_chunked(x, dt, A, B, C, 16, D, h0, seq_idx=seq_idx)    # auto: Triton on CUDA, else PyTorch
    assert torch.equal(y_auto, y_triton if DEVICE == "cuda" else y_torch)
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch, seqlen\) = \(2, 19\)"):
        T.ssd_chunked_triton(x, dt, A, B, C, 16, seq_idx=seq_idx[:, :5])
    with pytest.raises(ValueError, match="seq_idx must be an integer tensor"):
        T.ssd_chunked_triton(x, dt, A, B, C, 16, seq_idx=seq_idx.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU (the interpreter has no bf16)")
@pytest.mark.parametrize("shape", [(2, 1000, 8, 64, 1, 128, 256), (2, 777, 8, 64, 2, 64, 128)])
def test_seq_idx_bf16_on_gpu_matches_the_pytorch_path(shape):
    b, L, h, P, g, N, Q = shape
    splits = [[Q, 1, L - Q - 1], [100, L - 300, 1, 199]]            # a chunk edge, one-token documents, inside chunks
    seq_idx = packed_seq_idx(splits)
    ins = make(b, L, h, P, g, N, dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in ins]
    y, final = T.ssd_chunked_triton(*leaves[:5], Q, leaves[5], leaves[6], seq_idx=seq_idx)
    ref = [t.detach().double().requires_grad_() for t in ins]
    y_ref, final_ref = ssd_chunked(*ref[:5], Q, ref[5], ref[6], backend="torch", seq_idx=seq_idx)
    dy, dfinal = torch.randn_like(y_ref), torch.randn_like(final_ref)
    torch.autograd.backward([y, final], [dy.to(y.dtype), dfinal.to(final.dtype)])
    torch.autograd.backward([y_ref, final_ref], [dy, dfinal])
    norm_rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()
    assert norm_rel(y, y_ref) < 1e-2 and norm_rel(final, final_ref) < 1e-2
    for name, leaf, r in zip(NAMES, leaves, ref):
        assert norm_rel(leaf.grad, r.grad) < (5e-2 if name == "A" else 1e-2), name


@pytest.mark.parametrize("shape,with_h", [((1, 37, 2, 16, 1, 8, 16), True), ((2, 70, 4, 8, 2, 16, 32), False)])
def test_eager_function_and_the_op_give_identical_outputs_and_gradients(shape, with_h):
    """ssd_chunked_triton calls the custom op only under torch.compile; in eager mode an autograd.Function runs the
    same Python (chapter 09, `eager_autograd`). Both paths must agree bit for bit, in every gradient."""
    b, L, h, P, g, N, Q = shape
    ins = make(b, L, h, P, g, N, with_h=with_h, seed=3)
    got = {}
    for name, call in (("op", T._ssd_fwd_op), ("eager", T._ssd_call)):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in ins]
        y, final = call(*leaves, Q, None)
        (y.square().sum() + final.sin().sum()).backward()
        got[name] = [y, final] + [t.grad for t in leaves if t is not None]
    assert len(got["op"]) == len(got["eager"]) == 2 + sum(t is not None for t in ins)
    for a, e in zip(got["op"], got["eager"]):
        assert torch.equal(a, e)

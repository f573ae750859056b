"""The objective and the optimizer (chapter 06c, snakes_lib.optim): chunked cross-entropy equals the plain one, the
learning-rate schedules, AdamW's no-decay group, and the optimizer's state through safetensors."""
import json

import pytest
import torch
import torch.nn.functional as F

from snakes_lib.model import Mamba2Config, Mamba2LM
from snakes_lib.optim import (chunked_cross_entropy, lr_at, make_optimizer, no_weight_decay, optimizer_from_safetensors,
                              optimizer_to_safetensors)
from snakes_lib.presets import wsd_decay_start

from test_train import MICRO


# ---- chunked cross-entropy --------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,chunk", [(37, 1), (37, 8), (37, 37), (37, 100), (5, 2)])
def test_chunked_ce_equals_plain_ce_values_and_grads(rows, chunk):
    g = torch.Generator().manual_seed(rows * 31 + chunk)
    d, vocab = 12, 29
    h = torch.randn(rows, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(vocab, d, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::5] = -100                                            # ignored positions count in neither form
    ref = F.cross_entropy(F.linear(h, w, b), t, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    out = chunked_cross_entropy(h, w, t, bias=b, chunk_rows=chunk)
    grads = torch.autograd.grad(out, (h, w, b))
    assert abs(out.item() - ref.item()) < 1e-12
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-12, rtol=0)


def test_chunked_ce_batched_shapes_match_plain():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 11, 8, dtype=torch.float64, generator=g)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g)
    t = torch.randint(0, 50, (3, 11), generator=g)
    ref = F.cross_entropy((h @ w.T).reshape(-1, 50), t.reshape(-1))
    assert torch.allclose(chunked_cross_entropy(h, w, t, chunk_rows=7), ref, atol=1e-12)
    with pytest.raises(ValueError, match="rows"):
        chunked_cross_entropy(h, w, t[:, :5])


# ---- schedule and optimizer -------------------------------------------------------------------------------
def test_lr_schedule_warmup_cosine_floor():
    lrs = [lr_at(s, 1.0, 0.1, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10]))        # rising during warmup
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:100], lrs[11:100]))   # falling after
    assert lrs[55] == pytest.approx(0.1 + 0.45, abs=0.02)                    # half-way down the cosine
    assert all(lr == pytest.approx(0.1) for lr in lrs[100:])


def test_weight_decay_groups_on_mamba2():
    m = Mamba2LM(Mamba2Config(vocab_size=64, **MICRO))
    names = {n: no_weight_decay(n, p) for n, p in m.named_parameters()}
    for n, nd in names.items():
        last = n.split(".")[-1]
        if last in ("dt_bias", "A_log", "D", "bias") or "norm" in n:
            assert nd, f"{n} must not be decayed"
    assert not names["backbone.layers.0.mixer.in_proj.weight"]
    assert not names["backbone.layers.0.mixer.out_proj.weight"]
    opt = make_optimizer(m, 1e-3, 0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert id(m.backbone.layers[0].mixer.A_log) not in decayed
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == m.num_parameters()                                       # tied weights counted once


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    opt = make_optimizer(m, 1e-2, 0.1)
    for _ in range(3):
        m(torch.randn(4, 5)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_to_safetensors(opt)
    save_file(tensors, str(tmp_path / "o.safetensors"))
    (tmp_path / "o.json").write_text(json.dumps(meta))
    opt2 = make_optimizer(m, 1e-2, 0.1)
    opt2.load_state_dict(optimizer_from_safetensors(load_file(str(tmp_path / "o.safetensors")),
                                                    json.loads((tmp_path / "o.json").read_text())))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def test_lr_schedule_wsd_holds_then_decays():
    lrs = [lr_at(s, 1.0, 0.1, 2, 10, "wsd", 0.2) for s in range(12)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2:8] == [1.0] * 6                 # warmup, then stable
    assert wsd_decay_start(10, 2, 0.2) == 8 and lrs[8] == 1.0 and 0.1 < lrs[9] < 1.0 and lrs[10:] == [0.1, 0.1]
    # a longer horizon leaves every step before the shorter one's decay unchanged: what makes extension exact
    assert [lr_at(s, 1.0, 0.1, 2, 20, "wsd", 0.2) for s in range(8)] == lrs[:8]
    with pytest.raises(ValueError, match="cosine, wsd"):
        lr_at(5, 1.0, 0.1, 2, 10, "linear")


def test_document_labels_and_a_packed_loss_equal_each_document_alone():
    from snakes_lib.model import Mamba2Config, Mamba2LM
    from snakes_lib.optim import document_labels, lm_loss
    x = torch.tensor([[5, 0, 7, 8, 0, 0, 9], [0, 3, 3, 3, 3, 3, 0]])
    assert document_labels(x, 0).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=16, n_layer=1, vocab_size=12, d_state=4, headdim=4, chunk_size=4)).double()
    docs = [torch.tensor([[4, 5, 6, 0]]), torch.tensor([[7, 8, 0]]), torch.tensor([[9, 10, 11, 3, 2]])]
    ids = torch.cat(docs, dim=1)
    x, y = ids[:, :-1], ids[:, 1:]
    alone = torch.cat([model(d) for d in docs], dim=1)[:, :-1]
    want = F.cross_entropy(alone.reshape(-1, alone.shape[-1]), y.reshape(-1))
    for chunked in (False, True):
        got = lm_loss(model, x, y, chunked=chunked, eos_id=0)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(lm_loss(model, x, y), want)

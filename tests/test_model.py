"""Tests for snakes_lib.model: forward, cache/step, checkpoints, init (the config: test_config.py)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from snakes_lib.model import (GatedRMSNorm, Mamba2Cache, Mamba2Config, Mamba2LM, RMSNorm, load_model)


def tiny(**kw):
    base = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, ngroups=1, chunk_size=8)
    base.update(kw)
    return Mamba2Config(**base)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -- layers ---------------------------------------------------------------------------------------------------------
def test_gated_norm_groups():
    torch.manual_seed(0)
    y, z = torch.randn(3, 24, dtype=torch.float64), torch.randn(3, 24, dtype=torch.float64)
    n = GatedRMSNorm(24, group_size=8).double()
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
    g = (y * F.silu(z)).view(3, 3, 8)
    ref = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 24) * n.weight
    assert rel(n(y, z), ref) < 1e-13


def test_rmsnorm_bf16_returns_input_dtype():
    x = torch.randn(4, 16).bfloat16()
    assert RMSNorm(16)(x).dtype == torch.bfloat16


# -- model ----------------------------------------------------------------------------------------------------------
def test_parameter_names_follow_official_layout():
    m = Mamba2LM(tiny(n_layer=1, tie_embeddings=False))
    names = set(dict(m.named_parameters()))
    mix = "backbone.layers.0.mixer."
    assert names == {"backbone.embedding.weight", "backbone.layers.0.norm.weight", "backbone.norm_f.weight",
                     "lm_head.weight"} | {mix + k for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias",
                                                              "dt_bias", "A_log", "D", "norm.weight",
                                                              "out_proj.weight")}
    mx = m.backbone.layers[0].mixer
    c = m.config
    assert mx.in_proj.weight.shape == (c.d_in_proj, c.d_model)
    assert mx.conv1d.weight.shape == (c.conv_dim, 1, c.d_conv)


def test_official_init():
    torch.manual_seed(1)
    c = tiny(d_model=128, headdim=4, n_layer=9)                   # 64 heads per layer
    m = Mamba2LM(c)
    dt = torch.cat([F.softplus(l.mixer.dt_bias) for l in m.backbone.layers]).detach()
    A = torch.cat([-torch.exp(l.mixer.A_log) for l in m.backbone.layers]).detach()
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6 and dt.log10().std() > 0.4   # spread over decades
    assert A.min() >= -16 and A.max() <= -1 and A.std() > 2
    for l in m.backbone.layers:
        assert torch.equal(l.mixer.D.detach(), torch.ones(c.nheads))
        assert l.mixer.dt_bias._no_weight_decay and l.mixer.A_log._no_weight_decay
    assert abs(m.backbone.embedding.weight.std().item() - 0.02) < 2e-3
    bound = 1 / math.sqrt(c.d_inner) / math.sqrt(c.n_layer)        # kaiming-uniform bound, then / sqrt(n_layer)
    w = m.backbone.layers[0].mixer.out_proj.weight
    assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.9 * bound


def test_tied_and_untied_heads_and_num_parameters():
    tied, untied = Mamba2LM(tiny()), Mamba2LM(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.backbone.embedding.weight
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    emb = tied.backbone.embedding.weight.numel()
    assert untied.num_parameters() == tied.num_parameters() + emb
    assert tied.num_parameters(exclude_embedding=True) == tied.num_parameters() - emb
    assert untied.num_parameters(exclude_embedding=True) == tied.num_parameters(exclude_embedding=True)


def test_forward_hidden_states_and_lm_head():
    torch.manual_seed(0)
    m = Mamba2LM(tiny()).double()
    ids = torch.randint(0, 50, (2, 13))
    h = m.hidden_states(ids)
    assert h.shape == (2, 13, 32)
    assert torch.allclose(m(ids), (h @ m.lm_head.weight.T)[..., :50], atol=1e-12)


def test_causal_and_order_sensitive():
    torch.manual_seed(0)
    m = Mamba2LM(tiny()).double()
    ids = torch.randint(0, 50, (1, 17))
    ids2 = ids.clone(); ids2[0, 9] = (ids[0, 9] + 1) % 50
    a, b = m(ids), m(ids2)
    assert torch.equal(a[:, :9], b[:, :9]) and not torch.allclose(a[:, 9:], b[:, 9:])


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    m = Mamba2LM(tiny()).double().train()
    ids = torch.randint(0, 50, (2, 11))
    m(ids).sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    m(ids).sum().backward()
    for a, p in zip(g1, m.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_recompute_ssd_same_loss_and_grads(ngroups):
    torch.manual_seed(0)
    m = Mamba2LM(tiny(ngroups=ngroups, n_layer=3)).double().train()
    ids = torch.randint(0, 50, (2, 13))
    loss1 = F.cross_entropy(m(ids).flatten(0, 1), ids.flatten())
    loss1.backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    assert m.recompute_ssd is False
    m.recompute_ssd = True
    assert all(b.mixer.recompute_ssd for b in m.backbone.layers) and m.recompute_ssd
    loss2 = F.cross_entropy(m(ids).flatten(0, 1), ids.flatten())
    loss2.backward()
    assert loss1.item() == loss2.item()
    for a, p in zip(g1, m.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-12)
    # inference with a cache ignores the knob: prefill + step still match the parallel logits
    m.eval()
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_inference_cache(2)
        m(ids[:, :-1], cache=cache)
        last = m.step(ids[:, -1], cache)
    assert rel(last, full[:, -1]) < 1e-10


def test_bad_input_ids_errors():
    m = Mamba2LM(tiny())
    with pytest.raises(ValueError, match="token ids"):
        m(torch.tensor([[1, 2, 999]]))
    with pytest.raises(TypeError, match="int64"):
        m(torch.zeros(1, 3))


def test_bf16_forward_runs():
    torch.manual_seed(0)
    m = Mamba2LM(tiny())
    ids = torch.randint(0, 50, (2, 9))
    ref = m(ids)
    out = m.to(torch.bfloat16)(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel(out.float(), ref) < 5e-2


# -- cache / step ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("n_prompt", [1, 5, 8, 19])
def test_prefill_then_step_matches_parallel_fp64(ngroups, n_prompt):
    torch.manual_seed(n_prompt + 10 * ngroups)
    m = Mamba2LM(tiny(ngroups=ngroups)).double().eval()
    ids = torch.randint(0, 50, (3, 23))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_inference_cache(3)
        out = [m(ids[:, :n_prompt], cache=cache)]
        out += [m.step(ids[:, t], cache)[:, None] for t in range(n_prompt, 23)]
    assert cache.seqlen_offset == 23
    assert rel(torch.cat(out, 1), full) < 1e-11


@pytest.mark.parametrize("ngroups", [1, 2])
def test_prefill_then_step_matches_parallel_fp32(ngroups):
    torch.manual_seed(3)
    m = Mamba2LM(tiny(ngroups=ngroups)).eval()
    ids = torch.randint(0, 50, (2, 21))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_inference_cache(2)
        out = [m(ids[:, :11], cache=cache)] + [m.step(ids[:, t:t + 1], cache)[:, None] for t in range(11, 21)]
    assert rel(torch.cat(out, 1), full) < 1e-4


def test_step_from_empty_cache_and_chunked_prefill():
    torch.manual_seed(0)
    m = Mamba2LM(tiny(ngroups=2)).double().eval()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_inference_cache(2)
        steps = torch.stack([m.step(ids[:, t], cache) for t in range(30)], 1)
        assert rel(steps, full) < 1e-11
        cache = m.allocate_inference_cache(2)
        pieces = [m(ids[:, a:b], cache=cache) for a, b in ((0, 1), (1, 4), (4, 13), (13, 30))]
        assert rel(torch.cat(pieces, 1), full) < 1e-11
        one = m.allocate_inference_cache(2)
        m(ids, cache=one)
        for s1, s2 in zip(cache.ssm_states + cache.conv_states, one.ssm_states + one.conv_states):
            assert torch.allclose(s1, s2, rtol=1e-11, atol=1e-13)


def test_cache_shapes_size_constant_and_reset():
    m = Mamba2LM(tiny(ngroups=2)).eval()
    c = m.config
    cache = m.allocate_inference_cache(4)
    assert m.allocate_inference_cache(4, max_seqlen=10**6).nbytes() == cache.nbytes()   # KV-cache style callers
    assert isinstance(cache, Mamba2Cache) and len(cache.conv_states) == c.n_layer
    assert cache.conv_states[0].shape == (4, c.conv_dim, c.d_conv)
    assert cache.ssm_states[0].shape == (4, c.nheads, c.headdim, c.d_state)
    n0 = cache.nbytes()
    with torch.no_grad():
        m(torch.randint(0, 50, (4, 40)), cache=cache)
        m.step(torch.zeros(4, dtype=torch.long), cache)
    assert cache.nbytes() == n0 and cache.seqlen_offset == 41
    assert any(s.abs().sum() > 0 for s in cache.ssm_states)
    cache.reset()
    assert cache.seqlen_offset == 0 and all(s.abs().sum() == 0 for s in cache.ssm_states + cache.conv_states)
    with pytest.raises(ValueError, match="batch"):
        m.step(torch.zeros(3, dtype=torch.long), cache)


def test_bf16_model_cache_keeps_fp32_ssm_state():
    m = Mamba2LM(tiny()).to(torch.bfloat16).eval()
    cache = m.allocate_inference_cache(2)
    assert cache.ssm_states[0].dtype == torch.float32 and cache.conv_states[0].dtype == torch.bfloat16
    with torch.no_grad():
        m(torch.randint(0, 50, (2, 7)), cache=cache)
        out = m.step(torch.ones(2, dtype=torch.long), cache)
    assert out.shape == (2, 50) and torch.isfinite(out.float()).all()


# -- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    torch.manual_seed(0)
    m = Mamba2LM(tiny(ngroups=2, tie_embeddings=tie)).eval()
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "mamba2" and cfg["ssm_cfg"]["layer"] == "Mamba2"
    assert (tmp_path / "model.safetensors").is_file()
    m2 = Mamba2LM.from_pretrained(tmp_path)
    m3 = load_model(tmp_path)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids)) and torch.equal(m(ids), m3(ids))
    assert (m2.lm_head.weight is m2.backbone.embedding.weight) == tie


def test_load_official_folder_pytorch_bin_and_flat_config(tmp_path):
    torch.manual_seed(0)
    m = Mamba2LM(tiny(vocab_size=45, pad_vocab_size_multiple=8)).eval()
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 45,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": True}))
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")           # official checkpoints store lm_head too
    m2 = Mamba2LM.from_pretrained(tmp_path)
    ids = torch.randint(0, 45, (1, 12))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))  # our flat format reads too
    assert torch.equal(load_model(tmp_path).lm_head.weight, m.lm_head.weight)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Mamba2LM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Mamba2LM.from_pretrained(tmp_path)
    m = Mamba2LM(tiny())
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Mamba2LM.from_pretrained(tmp_path)
    # weights that do not match the config
    m.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "config.json").write_text(json.dumps(tiny(d_state=16).to_dict()))
    with pytest.raises(ValueError, match="shape"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny(n_layer=3).to_dict()))
    with pytest.raises(ValueError, match="missing"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tiny().to_dict(), "model_type": "rnn"}))
    with pytest.raises(ValueError, match="model_type"):
        load_model(tmp_path)


def test_load_model_dispatches_to_transformer(tmp_path):
    T = pytest.importorskip("snakes_lib.transformer")
    import dataclasses
    fields = {f.name for f in dataclasses.fields(T.TransformerConfig)}
    kw = {k: v for k, v in dict(d_model=32, n_layer=1, vocab_size=50, n_head=2, n_heads=2).items() if k in fields}
    tf = T.TransformerLM(T.TransformerConfig(**kw)).eval()
    tf.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded).__name__ == "TransformerLM"
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), tf(ids))


# -- torch.compile --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_model_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    m = Mamba2LM(tiny(ngroups=2))
    ids = torch.randint(0, 50, (2, 21))                    # 21 tokens: a padded tail chunk
    for training in (True, False):
        m.train(training)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(m)(ids)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), (training, ex.break_reasons)
    m.train()
    torch._dynamo.reset()
    compiled = torch.compile(m)

    def run(f):
        m.zero_grad(set_to_none=True)
        logits = f(ids)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.roll(-1, 1).reshape(-1)).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    (l_e, g_e), (l_c, g_c) = run(m), run(compiled)
    assert rel(l_c, l_e) <= 1e-5
    assert g_e.keys() == g_c.keys() and max(rel(g_c[n], g_e[n]) for n in g_e) <= 1e-4
    with pytest.raises(ValueError, match="wrong tokenizer"):              # eager keeps the clear error
        m(torch.tensor([[1, 2, 999]]))


@pytest.mark.parametrize("lengths,chunk,d_conv", [([1, 6], 4, 4), ([5, 1, 9], 4, 3), ([13, 17], 8, 4), ([2, 2, 2, 2, 3], 2, 2)])
def test_packed_documents_with_seq_idx_equal_each_document_alone(lengths, chunk, d_conv):
    torch.manual_seed(sum(lengths))
    cfg = Mamba2Config(d_model=24, n_layer=2, vocab_size=40, d_state=6, headdim=6, ngroups=2, chunk_size=chunk,
                       d_conv=d_conv)
    model = Mamba2LM(cfg).double()
    docs = [torch.randint(0, 40, (2, n)) for n in lengths]
    labels = torch.cat([torch.full((2, n), i % 2) for i, n in enumerate(lengths)], dim=1)   # labels recur: 0, 1, 0
    packed = model(torch.cat(docs, dim=1), seq_idx=labels)
    alone = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    # the same with the memory knobs: checkpointed blocks and a recomputed SSD give the same loss gradients
    model.train()
    grads = {}
    for knobs in ((False, False), (True, True)):
        model.gradient_checkpointing = knobs[0]
        for block in model.backbone.layers:
            block.mixer.recompute_ssd = knobs[1]
        model.zero_grad()
        model(torch.cat(docs, dim=1), seq_idx=labels).sum().backward()
        grads[knobs] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[(False, False)], grads[(True, True)]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_seq_idx_with_a_cache_is_refused():
    model = Mamba2LM(Mamba2Config(d_model=16, n_layer=1, vocab_size=20, d_state=4, headdim=4))
    cache = model.allocate_inference_cache(1)
    with pytest.raises(ValueError, match="not with a cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache, seq_idx=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("ngroups,headdim,d_state,L", [(2, 8, 8, 11), (4, 4, 6, 5)])
def test_in_proj_rows_of_one_group_never_reach_another_groups_output(ngroups, headdim, d_state, L):
    """Chapter 05b's tensor-parallel claim: up to out_proj, group g's output depends only on group g's rows of
    in_proj (its heads' z, x, dt and its B, C): conv, SSD, gate and per-group norm never mix groups."""
    from snakes_lib.model import Mamba2Mixer
    cfg = Mamba2Config(d_model=32, n_layer=1, d_state=d_state, headdim=headdim, ngroups=ngroups, vocab_size=50,
                       chunk_size=4)
    torch.manual_seed(ngroups)
    mixer = Mamba2Mixer(cfg).double()
    u = torch.randn(2, L, cfg.d_model, dtype=torch.float64)
    seen = []
    mixer.out_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    D, N, H, G = cfg.d_inner, cfg.d_state, cfg.nheads, ngroups
    per_d, per_h = D // G, H // G
    for g in range(G):
        rows = [*range(g * per_d, (g + 1) * per_d), *range(D + g * per_d, D + (g + 1) * per_d),
                *range(2 * D + g * N, 2 * D + (g + 1) * N), *range(2 * D + G * N + g * N, 2 * D + G * N + (g + 1) * N),
                *range(2 * D + 2 * G * N + g * per_h, 2 * D + 2 * G * N + (g + 1) * per_h)]
        seen.clear()
        mixer(u)
        with torch.no_grad():
            mixer.in_proj.weight[rows] += torch.randn(len(rows), cfg.d_model, dtype=torch.float64)
        mixer(u)
        before, after = seen
        mine = slice(g * per_d, (g + 1) * per_d)
        others = torch.ones(D, dtype=torch.bool)
        others[mine] = False
        assert torch.equal(after[..., others], before[..., others])
        assert not torch.allclose(after[..., mine], before[..., mine])

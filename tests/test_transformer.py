"""Tests for snakes_lib.transformer: config, KV cache equivalences, causality, saving/loading, parameter matching."""
import json

import pytest
import torch

from snakes_lib.transformer import (KVCache, TransformerConfig, TransformerLM, mamba2_num_parameters,
                                    matched_transformer_config, transformer_num_parameters)


def tiny(**kw):
    base = dict(d_model=32, n_layer=2, n_head=2, vocab_size=50)
    base.update(kw)
    return TransformerConfig(**base)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_config_round_trip_and_errors():
    c = tiny(intermediate_size=40, tie_embeddings=False)
    d = json.loads(c.to_json())
    assert d["model_type"] == "transformer" and TransformerConfig.from_dict(d) == c
    assert tiny().intermediate_size == 88  # round_up(8/3 * 32, 8)
    with pytest.raises(ValueError, match="model_type"):
        TransformerConfig.from_dict({**d, "model_type": "mamba2"})
    with pytest.raises(ValueError, match="unknown"):
        TransformerConfig.from_dict({**d, "n_embd": 3})
    with pytest.raises(ValueError, match="multiple of n_head"):
        tiny(n_head=3)


def test_shapes_tied_head_and_param_count():
    m = TransformerLM(tiny(vocab_size=50, pad_vocab_size_multiple=16))
    ids = torch.randint(0, 50, (2, 7))
    assert m(ids).shape == (2, 7, 50) and m.hidden_states(ids).shape == (2, 7, 32)
    assert m.lm_head.weight is m.backbone.embedding.weight and m.backbone.embedding.weight.shape == (64, 32)
    assert m.num_parameters() - m.num_parameters(exclude_embedding=True) == 64 * 32
    assert m.num_parameters(exclude_embedding=True) == transformer_num_parameters(m.config)
    u = TransformerLM(tiny(tie_embeddings=False))
    assert u.num_parameters() == transformer_num_parameters(u.config, exclude_embedding=False)
    with pytest.raises(ValueError, match="token ids"):
        m(torch.tensor([[64]]))


def _three_ways(model, ids, split, chunks, max_seqlen=None):
    full = model(ids)
    cache = model.allocate_inference_cache(ids.shape[0], max_seqlen=max_seqlen)
    out = [model(ids[:, :split], cache=cache)]
    for t in range(split, ids.shape[1]):
        out.append(model.step(ids[:, t], cache)[:, None])
    assert cache.seqlen_offset == ids.shape[1]
    cache2 = model.allocate_inference_cache(ids.shape[0], max_seqlen=max_seqlen)
    ch, s = [], 0
    for c in chunks:
        ch.append(model(ids[:, s:s + c], cache=cache2)); s += c
    return full, torch.cat(out, 1), torch.cat(ch, 1)


@pytest.mark.parametrize("split, chunks", [(1, (1, 22)), (9, (5, 1, 13, 4)), (23, (23,))])
def test_prefill_step_chunked_match_parallel_fp64(split, chunks):
    torch.manual_seed(split)
    m = TransformerLM(tiny(n_head=4)).double().eval()
    ids = torch.randint(0, 50, (3, 23))
    with torch.no_grad():
        full, stepped, chunked = _three_ways(m, ids, split, chunks)
    assert rel(stepped, full) < 1e-12 and rel(chunked, full) < 1e-12


def test_prefill_step_match_parallel_fp32_preallocated():
    torch.manual_seed(1)
    m = TransformerLM(tiny()).eval()
    ids = torch.randint(0, 50, (2, 31))
    with torch.no_grad():
        full, stepped, chunked = _three_ways(m, ids, 6, (10, 10, 11), max_seqlen=31)
    assert rel(stepped, full) < 1e-4 and rel(chunked, full) < 1e-4


def test_growing_cache_doubles_and_preallocated_cache_refuses():
    torch.manual_seed(2)
    m = TransformerLM(tiny()).double().eval()
    ids = torch.randint(0, 50, (1, 20))
    cache = KVCache(2, 1, 2, 16, dtype=torch.float64, initial_capacity=4)
    with torch.no_grad():
        out = [m(ids[:, :3], cache=cache)] + [m.step(ids[:, t], cache)[:, None] for t in range(3, 20)]
        assert rel(torch.cat(out, 1), m(ids)) < 1e-12
    assert cache.capacity == 32 and cache.used_nbytes() == 2 * 2 * 20 * 32 * 8
    small = m.allocate_inference_cache(1, max_seqlen=5)
    with pytest.raises(ValueError, match="max_seqlen"):
        m(ids[:, :6], cache=small)
    assert small.reset().seqlen_offset == 0


def test_causality():
    torch.manual_seed(3)
    m = TransformerLM(tiny()).double().eval()
    a = torch.randint(0, 50, (2, 17))
    b = a.clone(); b[:, 9:] = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.allclose(m(a)[:, :9], m(b)[:, :9], rtol=0, atol=1e-13)
        assert not torch.allclose(m(a)[:, 9:], m(b)[:, 9:])


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(4)
    m = TransformerLM(tiny()).double()
    ids = torch.randint(0, 50, (2, 9))
    grads = []
    for ckpt in (False, True):
        m.zero_grad(); m.gradient_checkpointing = ckpt
        m(ids).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    torch.manual_seed(5)
    m = TransformerLM(tiny(tie_embeddings=tie)).eval()
    m.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_type"] == "transformer"
    m2 = TransformerLM.from_pretrained(tmp_path / "run").eval()
    ids = torch.randint(0, 50, (1, 8))
    assert torch.equal(m(ids), m2(ids))
    assert (m2.lm_head.weight is m2.backbone.embedding.weight) == tie
    from snakes_lib.model import load_model
    assert torch.equal(load_model(tmp_path / "run")(ids), m(ids))
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformerLM.from_pretrained(tmp_path / "nothing")


@pytest.mark.parametrize("d_model, n_layer, d_state, headdim", [(32, 1, 8, 16), (64, 2, 16, 32), (128, 4, 64, 32),
                                                                 (256, 8, 128, 64), (768, 24, 128, 64)])
def test_matched_transformer_within_3_percent(d_model, n_layer, d_state, headdim):
    from snakes_lib.model import Mamba2Config, Mamba2LM
    mc = Mamba2Config(d_model=d_model, n_layer=n_layer, d_state=d_state, headdim=headdim, vocab_size=1000)
    with torch.device("meta"):
        mamba = Mamba2LM(mc)
        tc = matched_transformer_config(mc)
        tf = TransformerLM(tc)
    target = mamba.num_parameters(exclude_embedding=True)
    assert mamba2_num_parameters(mc) == target
    assert mamba2_num_parameters(mc, exclude_embedding=False) == mamba.num_parameters()
    assert abs(tf.num_parameters(exclude_embedding=True) - target) / target < 0.03
    assert tf.num_parameters() - tf.num_parameters(exclude_embedding=True) == \
        mamba.num_parameters() - mamba.num_parameters(exclude_embedding=True)  # same embedding


def test_preallocated_cache_decodes_with_the_static_step_exactly_like_the_growing_cache():
    "Chapter 10b: a max_seqlen cache attends over all positions, masked after cache.position (fixed shapes)."
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(d_model=64, n_layer=2, n_head=4, intermediate_size=128, vocab_size=100)).eval()
    prompt = torch.randint(0, 100, (2, 9))
    runs = {}
    for max_seqlen in (None, 31):
        cache = model.allocate_inference_cache(2, max_seqlen=max_seqlen)
        with torch.no_grad():
            tok = model(prompt, cache=cache)[:, -1].argmax(-1)
            toks, logits = [], []
            for _ in range(22):
                out = model.step(tok, cache)
                logits.append(out)
                tok = out.argmax(-1)
                toks.append(tok)
        assert int(cache.position) == cache.seqlen_offset == 9 + 22
        runs[max_seqlen] = torch.stack(toks, 1), torch.stack(logits, 1)
    assert torch.equal(runs[None][0], runs[31][0])
    assert torch.allclose(runs[None][1], runs[31][1], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="max_seqlen=31"):
        model.step(tok, cache)                           # position 31 of a 31-position cache


@pytest.mark.parametrize("lengths", [[1, 4], [6, 1, 7], [3, 3, 3, 3]])
def test_packed_documents_with_seq_idx_equal_each_document_alone(lengths):
    torch.manual_seed(len(lengths))
    model = TransformerLM(TransformerConfig(d_model=32, n_layer=2, n_head=4, vocab_size=60)).double()
    docs = [torch.randint(0, 60, (2, n)) for n in lengths]
    labels = torch.cat([torch.full((2, n), i % 2) for i, n in enumerate(lengths)], dim=1)
    packed = model(torch.cat(docs, dim=1), seq_idx=labels)
    torch.testing.assert_close(packed, torch.cat([model(d) for d in docs], dim=1), rtol=1e-10, atol=1e-10)
    model.train()
    model.gradient_checkpointing = True
    model(torch.cat(docs, dim=1), seq_idx=labels).sum().backward()        # the checkpointed path takes the mask too
    with pytest.raises(ValueError, match="not with a cache"):
        model(docs[0], cache=model.allocate_inference_cache(2), seq_idx=labels[:, :lengths[0]])


@pytest.mark.slow
def test_compiled_transformer_has_no_graph_break_and_keeps_the_eager_error():
    "The token-id check reads ids back; under torch.compile it is skipped (chapter 08), so the forward is one graph."
    torch.manual_seed(0)
    m = TransformerLM(tiny())
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    for training in (True, False):
        m.train(training)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(m)(ids)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), (training, ex.break_reasons)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="wrong tokenizer"):
        m(torch.tensor([[1, 2, m.config.padded_vocab_size]]))

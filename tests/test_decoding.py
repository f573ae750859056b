"""Tests for snakes_lib.decoding (chapter 07a): the sampling rules, the stream decoder, stop strings, the sliders' callback."""
import pytest
import torch

from snakes_lib.decoding import (StopFilter, StreamDecoder, apply_repetition_penalty, next_token_probs, process_logits,
                                 sample_next_token, sampling_explorer, top_k_filter, top_p_filter)


class ByteTokenizer:
    "One token per UTF-8 byte (ids 0..255); <|endoftext|> = 256: the worst case for a stream decoder."
    vocab_size, eos_id = 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOK = ByteTokenizer()


# ---------------------------------------------------------------------------------------------------------------
# Logits processors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5, 17, 63])
def test_top_k_keeps_exactly_k_even_with_ties(rng, k):
    z = torch.randint(0, 4, (3, 64), generator=rng).double()       # many exact ties
    out = top_k_filter(z, k)
    assert (torch.isfinite(out).sum(-1) == k).all()
    kept_min = out.masked_fill(~torch.isfinite(out), float("inf")).min(-1).values
    dropped_max = z.masked_fill(torch.isfinite(out), float("-inf")).max(-1).values
    assert (kept_min >= dropped_max).all()                          # never drops a larger logit for a smaller one
    assert torch.equal(out[torch.isfinite(out)], z[torch.isfinite(out)])


def test_top_k_none_or_large_is_identity(rng):
    z = torch.randn(2, 10, generator=rng)
    assert torch.equal(top_k_filter(z, None), z) and torch.equal(top_k_filter(z, 10), z) and torch.equal(top_k_filter(z, 0), z)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_smallest_nucleus(rng, p):
    z = torch.randn(5, 50, generator=rng, dtype=torch.float64) * 2
    probs = z.softmax(-1)
    out = top_p_filter(z, p)
    for row in range(5):
        keep = torch.isfinite(out[row])
        order = probs[row].argsort(descending=True)
        n = int(keep.sum())
        assert keep[order[:n]].all()                                  # the kept set is a head of the ranking
        assert probs[row][keep].sum() >= p - 1e-6                    # it reaches p ...
        assert probs[row][order[:n - 1]].sum() < p + 1e-6            # ... and one fewer would not


def test_top_p_always_keeps_top_token_and_one_is_identity():
    z = torch.tensor([[5.0, 0.0, 0.0]])
    assert torch.isfinite(top_p_filter(z, 1e-9)).tolist() == [[True, False, False]]
    assert torch.equal(top_p_filter(z, 1.0), z)
    with pytest.raises(ValueError):
        top_p_filter(z, 0.0)


def test_temperature_zero_is_greedy_and_temperature_scales(rng):
    z = torch.randn(4, 30, generator=rng)
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    assert torch.equal(sample_next_token(z, g, temperature=0), z.argmax(-1))
    p1, p_hot, p_cold = (next_token_probs(z, temperature=t) for t in (1.0, 3.0, 0.3))
    ent = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1)
    assert (ent(p_hot) > ent(p1)).all() and (ent(p1) > ent(p_cold)).all()
    assert torch.allclose(next_token_probs(z, temperature=2.0), (z / 2).softmax(-1), atol=1e-6)
    with pytest.raises(ValueError):
        process_logits(z, temperature=-1)


def test_repetition_penalty_direction():
    z = torch.tensor([[3.0, -3.0, 3.0, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(z, seen, 1.5)
    assert out.tolist() == [[2.0, -4.5, 3.0, -3.0]]                # seen tokens go down, unseen untouched
    out = apply_repetition_penalty(z, seen, 0.5)                   # < 1 encourages repeats
    assert out[0, 0] > 3 and out[0, 1] > -3
    assert torch.equal(apply_repetition_penalty(z, seen, 1.0), z)
    p = next_token_probs(z, seen=seen, repetition_penalty=1.5)
    assert p[0, 0] < p[0, 2]


def test_sampling_follows_the_distribution(rng):
    z = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]])).repeat(4000, 1)
    draws = sample_next_token(z, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64), atol=0.03)
    draws_k = sample_next_token(z, torch.Generator().manual_seed(0), top_k=2)
    assert set(draws_k.tolist()) == {0, 1}


# ---------------------------------------------------------------------------------------------------------------
# Text: streaming decoder and stop strings
# ---------------------------------------------------------------------------------------------------------------
TEXTS = ["", "plain ascii", "Maia 🐍🐍 héllo 你好 👩‍👩‍👧 end", "🙂", "é", "a\ufffdb"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_pieces_concatenate_and_never_split_a_character(text):
    dec = StreamDecoder(TOK)
    pieces = [dec.push(t) for t in TOK.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)
    for p in pieces:                                               # every piece is valid UTF-8 on its own
        p.encode("utf-8")


def test_stream_decoder_flushes_a_truncated_character():
    dec = StreamDecoder(TOK)
    ids = TOK.encode("ok🐍")[:-1]                                   # the snake is cut short
    pieces = [dec.push(t) for t in ids]
    assert "".join(pieces) == "ok"
    assert dec.flush() == "\ufffd"


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_stop_filter_any_split(split):
    text = "Maia naps.\n\nThe End. Then more text."
    pieces = [text[i:i + split] for i in range(0, len(text), split)]
    for stops, expected in [(["\n\n"], "Maia naps."), (["The End"], "Maia naps.\n\n"), (["zzz"], text),
                            (["End", "naps"], "Maia "), (["s.\n", "Maia"], "")]:
        sf = StopFilter(stops)
        out = "".join(sf.push(p) for p in pieces) + sf.flush()
        assert out == expected, (stops, split)
        assert sf.stopped == (expected != text)


def test_stop_filter_rejects_empty():
    with pytest.raises(ValueError):
        StopFilter(["ok", ""])


def test_sampling_explorer_callback():
    logits = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))
    full = sampling_explorer(logits, temperature=1.0, draw=False)
    assert full["kept"] == 6 and abs(full["entropy_bits"] - float(-(full["raw"] * full["raw"].log2()).sum())) < 1e-5
    assert full["shown"] == [0, 1, 2, 3, 4, 5] and full["figure"] is None
    assert sampling_explorer(logits, temperature=0, draw=False)["kept"] == 1
    k3 = sampling_explorer(logits, temperature=1.0, top_k=3, draw=False)
    assert k3["kept"] == 3 and abs(k3["probs"][:3].sum().item() - 1) < 1e-6
    p = sampling_explorer(logits, temperature=1.0, top_p=0.5, draw=False)
    assert p["kept"] == 2 and p["entropy_bits"] < k3["entropy_bits"] < full["entropy_bits"]
    hot = sampling_explorer(logits, temperature=2.0, draw=False)
    assert hot["entropy_bits"] > full["entropy_bits"] and hot["top_prob"] < full["top_prob"]
    drawn = sampling_explorer(logits, top_k=2, labels=lambda i: f"t{i}", n_show=4)
    assert drawn["figure"] is not None and [t.get_text() for t in drawn["figure"].axes[0].get_xticklabels()] == ["t0", "t1", "t2", "t3"]
    import matplotlib.pyplot as plt
    plt.close(drawn["figure"])
    with pytest.raises(ValueError, match="one vector"):
        sampling_explorer(logits[None])

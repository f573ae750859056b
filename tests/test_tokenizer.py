"""snakes_lib.tokenizer: exact round trips for any text, save/load, fingerprints and mismatch errors."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from snakes_lib.tokenizer import (EOS_TOKEN, PAD_TOKEN, SnakesTokenizer, TokenizerMismatchError,
                                  check_tokenizer_fingerprint)

TEXTS = ["Maia was a baby girl. She liked the moon and the stars.",
         "Once upon a time, a little fox found a shiny shell by the river.",
         "def hello():\n    return 'snakes'\n"] * 30


@pytest.fixture(scope="module")
def tok():
    return SnakesTokenizer.train(TEXTS, vocab_size=400)


ODD = ["", " ", "\n", "a", "Maia 🐍👩‍👩‍👧‍👦🏽", "中文字符和日本語のテキスト", "한국어", "e\u0301\u0302 o\u0308", "\x00\x01\x07\x1b[31m\x7f",
       "\r\n\r\n\t\t", "<|endoftext|>", "a<|pad|>b<|endoftext|>", "<|endof", "\ufeffBOM", "\u200b\u200d\u2028\u2029",
       "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "\U0010ffff\ue000", "x" * 50_000, "word " * 20_000, "  two  spaces  "]


@pytest.mark.parametrize("text", ODD, ids=range(len(ODD)))
def test_round_trip_odd_strings(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=50), max_size=8))
def test_encode_batch_matches_encode(tok, texts):
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_special_tokens(tok):
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.encode(EOS_TOKEN) == [tok.eos_id] and tok.encode(PAD_TOKEN) == [tok.pad_id]
    assert tok.decode([tok.eos_id]) == EOS_TOKEN


def test_compresses_training_text(tok):
    text = TEXTS[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2  # merges were learned


def test_training_is_deterministic():
    a = SnakesTokenizer.train(TEXTS, vocab_size=350)
    b = SnakesTokenizer.train(iter(TEXTS), vocab_size=350)
    assert a.fingerprint == b.fingerprint and a == b
    c = SnakesTokenizer.train(TEXTS, vocab_size=340)
    assert c.fingerprint != a.fingerprint


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 258"):
        SnakesTokenizer.train(TEXTS, vocab_size=100)


def test_save_load_dir_and_file(tok, tmp_path):
    f = tok.save(tmp_path)
    assert f == tmp_path / "tokenizer.json" and f.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary files left behind
    for src in (tmp_path, f):
        t2 = SnakesTokenizer.load(src)
        assert t2.fingerprint == tok.fingerprint and t2.vocab_size == tok.vocab_size
        assert t2.encode("Maia 🐍") == tok.encode("Maia 🐍")
    g = tok.save(tmp_path / "sub" / "my_tok.json")
    assert g.name == "my_tok.json" and SnakesTokenizer.load(g).fingerprint == tok.fingerprint


def test_fingerprint_ignores_json_formatting(tok, tmp_path):
    f = tok.save(tmp_path)
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(json.loads(f.read_text()), separators=(",", ":")))
    assert SnakesTokenizer.load(compact).fingerprint == tok.fingerprint
    assert len(tok.fingerprint) == 16 and int(tok.fingerprint, 16) >= 0


def test_fingerprint_sees_a_changed_merge(tok, tmp_path):
    f = tok.save(tmp_path)
    d = json.loads(f.read_text())
    d["model"]["merges"] = d["model"]["merges"][:-1]
    (tmp_path / "edited.json").write_text(json.dumps(d))
    assert SnakesTokenizer.load(tmp_path / "edited.json").fingerprint != tok.fingerprint


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SnakesTokenizer.load(tmp_path)


def test_load_requires_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="special token"):
        SnakesTokenizer.load(tmp_path)


def test_mismatch_error_names_both_and_what_to_do():
    check_tokenizer_fingerprint("abc", "abc", "run x")  # equal: no error
    with pytest.raises(TokenizerMismatchError) as e:
        check_tokenizer_fingerprint("aaaa1111", "bbbb2222", "the run directory runs/x")
    msg = str(e.value)
    assert "aaaa1111" in msg and "bbbb2222" in msg and "runs/x" in msg and "tokenizer.json" in msg
    assert isinstance(e.value, ValueError)

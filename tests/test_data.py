"""snakes_lib.data: the streamed token cache, splits, batches (reading folders: test_documents.py)."""
import json
from pathlib import Path
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

from snakes_lib.data import (MAX_DOCUMENT_BYTES, EmptyDataError, TokenData, _token_dtype,
                             corpus_fingerprint, load_documents,
                             prepare_data, random_batch, sequential_batches, train_tokenizer_for)
from snakes_lib.tokenizer import SnakesTokenizer, TokenizerMismatchError

WORDS = "the a little girl named Maia saw moon star fox river tree and she he went to played with happy sad".split()


def _doc(i: int, n: int = 60) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, n)) + f". Document {i}.\n"


@pytest.fixture(scope="module")
def tok():
    return SnakesTokenizer.train([_doc(i) for i in range(50)], vocab_size=300)


def test_empty_inputs_raise_actionable_errors(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.bin.txt").write_bytes(b"\x00" * 10)
    for folder in (tmp_path / "empty", tmp_path / "junk"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(EmptyDataError, match="bundled corpus"):
                load_documents(folder)
            with pytest.raises(EmptyDataError, match=str(folder)):
                prepare_data(folder, tok, tmp_path / "cache", progress=False)
            with pytest.raises(EmptyDataError):
                train_tokenizer_for(folder, vocab_size=300)
    with pytest.raises(EmptyDataError, match="a.bin.txt"):
        load_documents(tmp_path / "junk", skipped=[])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "nope")
    with pytest.raises(EmptyDataError, match="include"):
        load_documents(tmp_path / "junk", include=["*.md"])
    assert not any((tmp_path / "cache").glob("tokens-*"))  # a failed build leaves no cache behind


def _corpus(root, n=40, start=0):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (root / f"d{i:03d}.txt").write_text(_doc(i, n=20 + 7 * (i % 13)))
    return root


def _docs_of(tokens, tok):
    ends = np.flatnonzero(np.asarray(tokens) == tok.eos_id)
    out, prev = [], 0
    for e in ends:
        out.append(tok.decode(tokens[prev:e].tolist()))
        prev = e + 1
    assert prev == len(tokens)  # every split ends with eos
    return out


def test_prepare_data_split_and_cache(tmp_path, tok):
    src = _corpus(tmp_path / "c", n=60)
    (tmp_path / "c" / "dup.txt").write_text(_doc(3, n=20 + 7 * 3))  # duplicate of d003
    data = prepare_data(src, tok, tmp_path / "cache", val_fraction=0.2, seed=1, progress=False)
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert data.meta["duplicates_dropped"] == 1 and data.meta["documents"] == 60
    train_docs, val_docs = _docs_of(data.train, tok), _docs_of(data.val, tok)
    assert len(train_docs) + len(val_docs) == 60 and 3 <= len(val_docs) <= 25
    assert not set(train_docs) & set(val_docs)  # no document leaks between splits
    texts = {_doc(i, n=20 + 7 * (i % 13)) for i in range(60)}
    assert set(train_docs) | set(val_docs) == texts  # every character survives, exactly
    assert data.tokenizer_fingerprint == tok.fingerprint
    assert data.corpus_fingerprint == corpus_fingerprint(src, val_fraction=0.2, seed=1, text_column=None,
                                                        max_document_bytes=MAX_DOCUMENT_BYTES)
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["train_tokens"] == len(data.train) and meta["tokenizer_fingerprint"] == tok.fingerprint
    # reopening is a cache hit: same folder, files untouched
    mtime = (data.path / "train.bin").stat().st_mtime_ns
    again = prepare_data(src, tok, tmp_path / "cache", val_fraction=0.2, seed=1, progress=False)
    assert again.path == data.path and (data.path / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(again.train, data.train)
    # the split depends on documents, not on file names or order
    moved = tmp_path / "moved"
    for i, f in enumerate(sorted(src.glob("d*.txt"), reverse=True)):
        (moved / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, moved / f"sub{i % 3}" / f"x{i}.md")
    data2 = prepare_data(moved, tok, tmp_path / "cache", val_fraction=0.2, seed=1, progress=False)
    assert data2.path != data.path and set(_docs_of(data2.val, tok)) == set(val_docs)
    # editing a file changes the corpus fingerprint
    (src / "d000.txt").write_text("changed text\n")
    assert prepare_data(src, tok, tmp_path / "cache", val_fraction=0.2, seed=1, progress=False).path != data.path


def test_cache_with_other_tokenizer_raises(tmp_path, tok):
    src = _corpus(tmp_path / "c", n=10)
    data = prepare_data(src, tok, tmp_path / "cache", progress=False)
    other = SnakesTokenizer.train([_doc(i) for i in range(50)], vocab_size=290)
    with pytest.raises(TokenizerMismatchError) as e:
        TokenData.load(data.path, other)
    assert tok.fingerprint in str(e.value) and other.fingerprint in str(e.value) and str(data.path) in str(e.value)
    # a cache folder copied under the other tokenizer's name is caught too
    target = data.path.parent / data.path.name.replace(tok.fingerprint, other.fingerprint)
    shutil.copytree(data.path, target)
    with pytest.raises(TokenizerMismatchError):
        prepare_data(src, other, tmp_path / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match="not a token cache"):
        TokenData.load(tmp_path, tok)


def test_streaming_with_a_tiny_buffer_matches(tmp_path, tok):
    src = _corpus(tmp_path / "c", n=50)
    big = prepare_data(src, tok, tmp_path / "big", progress=False)
    small = prepare_data(src, tok, tmp_path / "small", max_buffer_tokens=64, progress=False)
    assert small.meta["flushes"] > 20 and big.meta["flushes"] <= 2
    assert np.array_equal(small.train, big.train) and np.array_equal(small.val, big.val)


def test_tiny_corpora(tmp_path, tok):
    two = _corpus(tmp_path / "two", n=2)
    d = prepare_data(two, tok, tmp_path / "cache", val_fraction=0.05, progress=False)
    assert d.meta["val_documents"] == 1 and len(_docs_of(d.val, tok)) == 1 and len(_docs_of(d.train, tok)) == 1
    one = _corpus(tmp_path / "one", n=1)
    with pytest.warns(UserWarning, match="Only one document"):
        d1 = prepare_data(one, tok, tmp_path / "cache", val_fraction=0.1, progress=False)
    assert len(d1.train) > 0 and len(d1.val) > 0
    full = tok.encode(_doc(0, n=20)) + [tok.eos_id]
    assert np.concatenate([d1.train, d1.val]).tolist() == full
    d0 = prepare_data(two, tok, tmp_path / "cache0", val_fraction=0.0, progress=False)
    assert len(d0.val) == 0 and d0.meta["documents"] == 2
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data(two, tok, tmp_path / "cache", val_fraction=1.0)


def test_token_dtype():
    assert _token_dtype(65536) == np.uint16 and _token_dtype(65537) == np.uint32


def test_random_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = random_batch(tokens, 5, 37, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (5, 37) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive ids: the target is the next token
    x2, _ = random_batch(tokens, 5, 37, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)
    xs, ys = random_batch(np.arange(8), 3, 7, torch.Generator().manual_seed(0))  # exactly seq_len + 1 tokens
    assert torch.equal(xs, torch.arange(7).expand(3, 7)) and int(ys.max()) == 7
    with pytest.raises(ValueError, match="fewer than seq_len"):
        random_batch(np.arange(7), 1, 7, torch.Generator())


@pytest.mark.parametrize("n,b,L", [(101, 3, 10), (11, 4, 10), (1000, 7, 13), (50, 100, 1)])
def test_sequential_batches_cover_in_order(n, b, L):
    tokens = np.arange(n, dtype=np.uint32)
    batches = list(sequential_batches(tokens, b, L))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    n_win = (n - 1) // L
    assert xs.shape == (n_win, L) and all(x.shape[0] <= b for x, _ in batches)
    assert torch.equal(xs.reshape(-1), torch.arange(n_win * L)) and torch.equal(ys, xs + 1)


def test_hf_dataset_folder(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": [1, 2, 3, 4], "text": ["Maia went out.", "The fox ran.", "", "Maia went out."]})
    ds.save_to_disk(str(tmp_path / "hfds"))
    docs = load_documents(tmp_path / "hfds")
    assert [d.text for d in docs] == ["Maia went out.", "The fox ran."]  # empty row skipped, duplicate dropped
    assert [d.text for d in load_documents(f"hf:{tmp_path / 'hfds'}")] == ["Maia went out.", "The fox ran."]
    data = prepare_data(tmp_path / "hfds", tok, tmp_path / "cache", val_fraction=0.5, progress=False)
    assert len(_docs_of(data.train, tok)) + len(_docs_of(data.val, tok)) == 2
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"story": ["Once upon a time."]})})
    dd.save_to_disk(str(tmp_path / "hfdd"))
    assert [d.text for d in load_documents(tmp_path / "hfdd")] == ["Once upon a time."]  # first string column


def test_large_file_is_read_in_exact_pieces(tmp_path, tok):
    rng = np.random.default_rng(0)
    paras = [" ".join(rng.choice(WORDS, int(rng.integers(5, 80)))) + ("\r\n" if i % 7 == 0 else "\n") * int(rng.integers(1, 3))
             for i in range(400)]
    text = "".join(paras) + "🐍 no newline at the end"
    f = tmp_path / "big" / "book.txt"
    f.parent.mkdir()
    f.write_bytes(b"\xef\xbb\xbf" + text.encode())
    docs = load_documents(f.parent, max_document_bytes=2000)
    assert len(docs) > 10 and "".join(d.text for d in docs) == text  # nothing lost, nothing added
    assert [d.path.rsplit("#", 1)[1] for d in docs[:3]] == ["0", "1", "2"]
    assert sum(d.text.endswith("\n") for d in docs[:-1]) >= len(docs) - 3  # cut at line ends
    assert load_documents(f.parent)[0].text == text  # below the default limit: one document
    data = prepare_data(f.parent, tok, tmp_path / "cache", max_document_bytes=2000, val_fraction=0.2, progress=False)
    assert data.meta["documents"] == len(docs) and data.meta["val_documents"] >= 1
    # an invalid byte near the end of a big file: the whole file is skipped, none of its pieces is used
    g = tmp_path / "bad" / "book.txt"
    g.parent.mkdir()
    g.write_bytes(text.encode() + b"\xff tail")
    skipped = []
    with pytest.raises(EmptyDataError):
        load_documents(g.parent, max_document_bytes=2000, skipped=skipped)
    assert skipped and "UTF-8" in skipped[0].reason


@pytest.mark.skipif(sys.platform == "win32", reason="named pipes and symlinks")
def test_symlink_loop_and_named_pipe_are_skipped_not_hung_on(tmp_path):
    import os
    import signal
    from snakes_lib.data import corpus_fingerprint, load_documents
    (tmp_path / "a.txt").write_text("Maia found a small red ball in the garden.\n")
    os.symlink("loop.txt", tmp_path / "loop.txt")                     # a link to itself: ELOOP when opened
    os.mkfifo(tmp_path / "pipe.txt")                                   # opening it for reading waits for a writer
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hung on the data folder")))
    signal.alarm(20)
    try:
        skipped = []
        docs = load_documents([tmp_path], skipped=skipped)
        fingerprint = corpus_fingerprint([tmp_path])
    finally:
        signal.alarm(0)
    assert [d.text for d in docs] == ["Maia found a small red ball in the garden.\n"] and len(fingerprint) == 16
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert "cannot be opened" in reasons["loop.txt"] and "not a regular file" in reasons["pipe.txt"]

"""snakes_lib.corpus: the bundled, generated corpus is deterministic, cached, sized as promised and pinned."""
import hashlib

from snakes_lib.corpus import CORPUS_VERSION, bundled_corpus_dir, generate_corpus


def test_bundled_corpus_is_deterministic(tmp_path):
    a = bundled_corpus_dir(tmp_path / "a", n_documents=30, seed=5)
    b = generate_corpus(tmp_path / "b", n_documents=30, seed=5)
    fa, fb = sorted(a.glob("*.txt")), sorted(b.glob("*.txt"))
    assert len(fa) == 30 and [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]
    assert bundled_corpus_dir(tmp_path / "a", n_documents=30, seed=5) == a  # cached
    c = generate_corpus(tmp_path / "c", n_documents=30, seed=6)
    assert [f.read_bytes() for f in sorted(c.glob("*.txt"))] != [f.read_bytes() for f in fb]
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".corpus-")]  # no temp folders left


def test_default_bundled_corpus_size(tmp_path):
    d = bundled_corpus_dir(tmp_path)
    texts = [f.read_text() for f in sorted(d.glob("*.txt"))]
    total = sum(len(t.encode()) for t in texts)
    assert 1_000_000 < total < 5_000_000
    assert any("Maia" in t for t in texts)
    assert all(t.strip() and t.isascii() for t in texts)


def test_generator_change_requires_version_bump(tmp_path):
    """The corpus's bytes are pinned. If this fails you changed the generator: bump CORPUS_VERSION (so cached corpora
    under the old name are not reused) and update both numbers here."""
    d = generate_corpus(tmp_path, n_documents=40, seed=0)
    h = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(d.glob("*.txt")))).hexdigest()[:16]
    assert (CORPUS_VERSION, h) == (2, "63825876412c414a")

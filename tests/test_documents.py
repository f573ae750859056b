"""snakes_lib.documents (chapter 04d): messy folders read as documents, bad files reported, hub datasets offline."""
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from snakes_lib.documents import DatasetUnavailableError, EmptyDataError, decode_text, load_documents


def _make_pdf(text: str) -> bytes:
    "A minimal one-page PDF showing `text` in Helvetica (byte offsets computed, so the xref table is valid)."
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    (root / "notes" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "node_modules").mkdir()
    (root / "notes" / "a.md").write_text("# A\n\nMaia is a baby girl. 🌙\n")
    (root / "notes" / "deep" / "copy.txt").write_text("# A\n\nMaia is a baby girl. 🌙\n")  # exact duplicate
    (root / "code.py").write_text("print('hi')\n")
    (root / "conf.toml").write_text("[model]\nd_model = 64\n")
    (root / "data.json").write_text('{"text": "hello"}\n')
    (root / "empty.txt").write_text("  \n\n")
    (root / "utf16.txt").write_bytes("utf-16 text: naïve".encode("utf-16"))
    (root / "bom.md").write_bytes(b"\xef\xbb\xbfwith a BOM")
    (root / "binary.txt").write_bytes(b"abc\x00\x01\x02")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    (root / "unknown.xyz").write_text("not on the list")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "config.txt").write_text("git internals")
    (root / "node_modules" / "x.js").write_text("vendor code")
    (root / "doc.pdf").write_bytes(_make_pdf("Hello from a PDF"))
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    return root


def test_load_messy_folder(messy):
    skipped = []
    docs = load_documents(messy, skipped=skipped)
    names = sorted(d.path.split("/")[-1] for d in docs)
    assert names == ["a.md", "bom.md", "code.py", "conf.toml", "data.json", "doc.pdf", "utf16.txt"]
    by = {d.path.split("/")[-1]: d.text for d in docs}
    assert by["utf16.txt"] == "utf-16 text: naïve" and by["bom.md"] == "with a BOM"
    assert "Hello from a PDF" in by["doc.pdf"]
    reasons = {s.path.split("/")[-1]: s.reason for s in skipped}
    assert set(reasons) == {"binary.txt", "latin1.txt", "broken.pdf"}
    assert "binary" in reasons["binary.txt"] and "UTF-8" in reasons["latin1.txt"]


def test_skipped_files_warn_when_not_collected(messy):
    with pytest.warns(UserWarning, match=r"(?s)Skipped 3 file\(s\).*latin1.txt"):
        load_documents(messy)


def test_include_exclude(messy):
    md = load_documents(messy, include=["*.md"], skipped=[])
    assert sorted(d.path.split("/")[-1] for d in md) == ["a.md", "bom.md"]
    assert [d.path.split("/")[-1] for d in load_documents(messy, include=["*.xyz"])] == ["unknown.xyz"]
    rest = load_documents(messy, exclude=["notes/**", "*.pdf", "latin1.txt", "binary.txt"], skipped=[])
    names = {d.path.split("/")[-1] for d in rest}
    assert "a.md" not in names and "copy.txt" not in names and "doc.pdf" not in names and "code.py" in names


def test_single_file_and_list_of_paths(messy):
    docs = load_documents([messy / "code.py", messy / "notes"], skipped=[])
    assert [d.path.split("/")[-1] for d in docs] == ["code.py", "a.md"]  # duplicate in notes/deep dropped


def test_pypdf_missing_is_reported_not_raised(messy, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # `import pypdf` now raises ImportError
    skipped = []
    docs = load_documents(messy, skipped=skipped)
    assert "doc.pdf" not in {d.path.split("/")[-1] for d in docs}
    reason = {s.path.split("/")[-1]: s.reason for s in skipped}["doc.pdf"]
    assert "pip install" in reason and "pypdf" in reason


def test_decode_text_never_drops_characters():
    assert decode_text("Maia 🐍 é".encode()) == "Maia 🐍 é"
    with pytest.raises(UnicodeDecodeError):
        decode_text(b"caf\xe9")
    with pytest.raises(ValueError, match="binary"):
        decode_text(b"\x00\x00\x00")


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0, reason="needs POSIX permissions (not root)")
def test_unreadable_folder_is_reported(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "x.txt").write_text("secret")
    locked.chmod(0)
    try:
        skipped = []
        assert [d.text for d in load_documents(tmp_path, skipped=skipped)] == ["fine"]
        assert "not readable" in skipped[0].reason
    finally:
        locked.chmod(0o755)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_hf_name_without_a_network_is_one_clear_error_at_once(monkeypatch):
    "No 30 s of retries: the Hub is tried for a few seconds first (here an endpoint that refuses at once)."
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="cannot be reached.*HF_HUB_OFFLINE=1"):
        load_documents("hf:nobody/no-such-dataset")
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
@pytest.mark.parametrize("env,said", [({"HF_HUB_OFFLINE": "1"}, "not in the local Hugging Face cache"),
                                      ({"HF_ENDPOINT": "closed"}, "cannot be reached")])
def test_cli_hf_name_not_available_offline(tmp_path, env, said):
    "snakes train --data hf:NAME that cannot be had offline: one line, exit status 2, no traceback, no retries."
    pytest.importorskip("datasets")
    env = {k: (f"http://127.0.0.1:{_closed_port()}" if v == "closed" else v) for k, v in env.items()}
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "snakes_lib", "train", "--preset", "cpu", "--device", "cpu",
                        "--data", "hf:nobody/no-such-dataset", "--out", str(tmp_path / "run"), "--max-steps", "1"],
                       capture_output=True, text=True, timeout=120,
                       env={**clean, "HF_HOME": str(tmp_path / "hf"), **env})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("snakes: error: hf:nobody/no-such-dataset") and said in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Retrying" not in r.stderr
    print(f"{env}: {time.perf_counter() - t0:.1f} s")

"""snakes_lib.datagen against a fake Ollama server speaking the real HTTP protocol (tests/fake_ollama.py).

No function is mocked: the real `ollama` client talks HTTP to a server on 127.0.0.1 that can misbehave."""
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_ollama import FakeOllama, default_reply, free_port  # noqa: E402

from snakes_lib.data import load_documents
from snakes_lib.datagen import (NEAR_DUP_SUFFIX, ModelNotFoundError, NearDuplicateIndex, OllamaUnavailableError,
                                clean_output, generate_dataset, jaccard, read_template,
                                read_topics, shingles, topic_filename)

pytest.importorskip("ollama")
TOPICS = ["the moon", "honeybees", "rainbows", "volcanoes", "the ocean"]
FAST = dict(backoff=0.001, progress=False, timeout=10)


def _texts(out):
    return {p.name: p.read_text() for p in sorted(Path(out).glob("*.txt"))}


def test_generates_one_file_per_topic_then_resumes(tmp_path):
    with FakeOllama() as srv:
        r = generate_dataset(TOPICS, tmp_path, template="encyclopedia", host=srv.url, concurrency=3, **FAST)
        assert sorted(r.written) == sorted(topic_filename(t) for t in TOPICS) and not r.failed
        texts = _texts(tmp_path)
        prompt = read_template("encyclopedia").format(topic="honeybees")
        assert texts[topic_filename("honeybees")] == clean_output(default_reply(prompt)) + "\n"
        assert not any(t.startswith("Here is") for t in texts.values())  # chatty preamble removed
        n = len(srv.requests)
        assert n == len(TOPICS) and all(q["model"] == "llama3.1" for q in srv.requests)
        r2 = generate_dataset(TOPICS + ["comets"], tmp_path, host=srv.url, **FAST)
        assert r2.already_done == 5 and r2.written == [topic_filename("comets")]
        assert len(srv.requests) == n + 1  # finished topics were not asked again
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    with FakeOllama() as srv:
        first = generate_dataset(TOPICS, tmp_path, host=srv.url, limit=2, **FAST)
        assert len(first.written) == 2
        (tmp_path / ".the-ocean-123.txt.abc.tmp").write_text("half a file from a killed run")
        rest = generate_dataset(TOPICS, tmp_path, host=srv.url, **FAST)
        assert rest.already_done == 2 and len(rest.written) == 3
        assert len(_texts(tmp_path)) == 5 and len(srv.requests) == 5
    assert len(load_documents(tmp_path)) == 5  # the stray temp file is hidden from the loader too


@pytest.mark.parametrize("failure", ["die", "truncated", "error500", "malformed"])
def test_transient_failures_are_retried(tmp_path, failure):
    with FakeOllama(script=[failure, failure]) as srv:
        r = generate_dataset(["the moon"], tmp_path, host=srv.url, retries=2, concurrency=1, **FAST)
        assert r.written == [topic_filename("the moon")] and not r.failed and len(srv.requests) == 3
        text = (tmp_path / r.written[0]).read_text()
        assert text == clean_output(default_reply(read_template("encyclopedia").format(topic="the moon"))) + "\n"


def test_persistent_bad_replies_fail_that_topic_only(tmp_path):
    with FakeOllama(script=["malformed"] * 3) as srv:
        r = generate_dataset(["the moon", "honeybees"], tmp_path, host=srv.url, retries=2, concurrency=1, **FAST)
        assert list(r.failed) == ["the moon"] and "JSONDecodeError" in r.failed["the moon"]
        assert r.written == [topic_filename("honeybees")]
        r2 = generate_dataset(["the moon", "honeybees"], tmp_path, host=srv.url, **FAST)  # the server recovered
        assert r2.written == [topic_filename("the moon")] and r2.already_done == 1


def test_non_streaming_and_too_short(tmp_path):
    with FakeOllama(reply=lambda p: "Short." if "tiny" in p else default_reply(p)) as srv:
        r = generate_dataset(["the moon", "tiny"], tmp_path, host=srv.url, stream=False, concurrency=1, **FAST)
        assert r.written == [topic_filename("the moon")] and "too short" in r.failed["tiny"]
        assert all(q["stream"] is False for q in srv.requests)


def test_server_down_is_clear_and_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    t = time.perf_counter()
    with pytest.raises(OllamaUnavailableError) as e:
        generate_dataset(TOPICS, tmp_path, host=url, **FAST)
    assert url in str(e.value) and "ollama serve" in str(e.value)
    assert time.perf_counter() - t < 10 and not list(tmp_path.iterdir())


def test_model_not_pulled(tmp_path):
    with FakeOllama(models=["mistral:latest"]) as srv:
        with pytest.raises(ModelNotFoundError) as e:
            generate_dataset(TOPICS, tmp_path, host=srv.url, **FAST)
        assert "ollama pull llama3.1" in str(e.value) and "mistral:latest" in str(e.value)
        assert srv.requests == []  # found out before generating anything
        r = generate_dataset(TOPICS[:1], tmp_path, host=srv.url, model="mistral", **FAST)
        assert len(r.written) == 1


def test_model_removed_during_run(tmp_path):
    with FakeOllama(script=["ok", "notfound"]) as srv:
        with pytest.raises(ModelNotFoundError, match="ollama pull"):
            generate_dataset(TOPICS, tmp_path, host=srv.url, concurrency=1, **FAST)
        assert len(_texts(tmp_path)) == 1


def test_server_dies_during_run_then_resume(tmp_path):
    calls = []
    srv = FakeOllama(reply=lambda p: (calls.append(p), default_reply(p))[1])
    srv.__enter__()
    original = srv.reply

    def reply(p):
        text = original(p)
        if len(calls) == 2:  # after the second reply, the server goes away for good
            threading.Thread(target=srv.kill).start()
        return text
    srv.reply = reply
    try:
        with pytest.raises(OllamaUnavailableError):
            generate_dataset(TOPICS, tmp_path, host=srv.url, concurrency=1, retries=2, **FAST)
    finally:
        srv.kill()
    done = _texts(tmp_path)
    assert 1 <= len(done) <= 2 and all(t.endswith("\n") and len(t) > 100 for t in done.values())  # complete files only
    with FakeOllama() as srv2:
        r = generate_dataset(TOPICS, tmp_path, host=srv2.url, **FAST)
        assert r.already_done == len(done) and len(_texts(tmp_path)) == 5


def test_near_duplicates_are_set_aside(tmp_path):
    same = "Maia looked at the moon every night, and the moon seemed to smile back at her from the dark sky. " * 3

    def reply(p):
        return same if ("moon" in p or "night" in p) else default_reply(p)
    with FakeOllama(reply=reply) as srv:
        r = generate_dataset(["the moon", "honeybees", "the night sky"], tmp_path, host=srv.url, concurrency=1, **FAST)
        assert r.written == [topic_filename("the moon"), topic_filename("honeybees")]
        assert r.near_duplicates[0][:2] == (topic_filename("the night sky"), topic_filename("the moon"))
        assert (tmp_path / (topic_filename("the night sky") + NEAR_DUP_SUFFIX)).exists()
        n = len(srv.requests)
        r2 = generate_dataset(["the moon", "honeybees", "the night sky"], tmp_path, host=srv.url, **FAST)
        assert r2.already_done == 3 and len(srv.requests) == n  # a set-aside topic is not regenerated
    assert len(load_documents(tmp_path)) == 2  # the loader ignores *.near-duplicate files


def test_shingles_and_jaccard():
    a = shingles("one two three four five six seven")
    assert len(a) == 3 and jaccard(a, a) == 1.0 and jaccard(set(), set()) == 0.0
    assert jaccard(a, shingles("One, two; three four five six seven!")) == 1.0  # case and punctuation ignored
    assert jaccard(a, shingles("eight nine ten eleven twelve")) == 0.0
    idx = NearDuplicateIndex()
    idx.add("x", "one two three four five six seven")
    assert idx.find("one two three four five six seven eight", 0.5) == ("x", 0.75)
    assert idx.find("one two three four five six seven eight", 0.8) is None


def test_topics_and_templates(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# my topics\nthe moon\n\nhoneybees  # insects\nthe moon\n")
    assert read_topics(f) == ["the moon", "honeybees"]
    assert topic_filename("a/b\\..") != topic_filename("a b") and "/" not in topic_filename("a/b")
    (tmp_path / "bad.txt").write_text("no placeholder")
    with pytest.raises(ValueError, match="topic"):
        read_template(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError, match="words"):
        read_template("nope")


def _cli(argv):
    "Run `snakes ARGV` through the entry point, the one place where errors become messages and exit statuses."
    from snakes_lib.cli import main
    return main(argv)


def test_cli_generate(tmp_path, capsys):
    topics = tmp_path / "topics" / "words.txt"
    topics.parent.mkdir()
    topics.write_text("lantern\npebble\n")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "words.txt").write_text("Tell a tale about a {topic}, please.")
    with FakeOllama() as srv:
        rc = _cli(["data", "generate", "--topics", str(topics), "--out", str(tmp_path / "out"), "--host", srv.url,
                   "--seed", "3", "--temperature", "0.5"])
        assert rc == 0 and len(_texts(tmp_path / "out")) == 2
        assert srv.requests[0]["prompt"] in ("Tell a tale about a lantern, please.", "Tell a tale about a pebble, please.")
        assert srv.requests[0]["options"]["seed"] == 3 and srv.requests[0]["options"]["temperature"] == 0.5
    assert "2 written" in capsys.readouterr().out
    rc = _cli(["data", "generate", "--topics", str(topics), str(topics), "--out", str(tmp_path / "o2"),
               "--host", f"http://127.0.0.1:{free_port()}", "--retries", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "ollama serve" in err
    assert _cli(["data", "generate", "--topics", str(tmp_path / "missing.txt")]) == 2


def test_something_else_on_the_port(tmp_path):
    "A server that is not Ollama (here: answers /api/tags with HTML) gives a clear error, not a traceback."
    with FakeOllama() as srv:
        srv.models = []  # reachable Ollama without models: the model error lists none
        with pytest.raises(ModelNotFoundError, match="no models"):
            generate_dataset(TOPICS, tmp_path, host=srv.url, **FAST)
    import http.server

    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Html)
    t = threading.Thread(target=web.serve_forever, daemon=True)
    t.start()
    try:
        with pytest.raises(OllamaUnavailableError, match="not like Ollama"):
            generate_dataset(TOPICS, tmp_path, host=f"http://127.0.0.1:{web.server_address[1]}", **FAST)
    finally:
        web.shutdown()
        web.server_close()


def test_cli_fails_when_every_topic_failed(tmp_path, capsys):
    "So that `snakes data generate && snakes train` does not go on with nothing."
    topics = tmp_path / "words.txt"
    topics.write_text("lantern\npebble\n")
    with FakeOllama(default="error500") as srv:
        rc = _cli(["data", "generate", "--topics", str(topics), "--out", str(tmp_path / "out"), "--host", srv.url,
                   "--retries", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and f"every topic of {topics} failed and no text was written" in err
    with FakeOllama(script=["error500"]) as srv:             # one topic failed, one written: a partial success
        rc = _cli(["data", "generate", "--topics", str(topics), "--out", str(tmp_path / "o2"), "--host", srv.url,
                   "--retries", "0", "--concurrency", "1"])
    assert rc == 0 and "failed: " in capsys.readouterr().err


def test_cli_without_the_ollama_package(tmp_path, capsys, monkeypatch):
    "A missing optional package is one line with the install command (MissingPackageError), exit status 2."
    topics = tmp_path / "words.txt"
    topics.write_text("lantern\n")
    monkeypatch.setitem(sys.modules, "ollama", None)                  # `import ollama` now raises ImportError
    assert _cli(["data", "generate", "--topics", str(topics), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snakes: error: Data generation needs the `ollama` package: pip install 'snakes_lib[data]'")
    assert "Traceback" not in err and not (tmp_path / "out").exists()

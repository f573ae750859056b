"""A small fake Ollama server for tests: real HTTP on 127.0.0.1 (random free port), the real JSON protocol.

Endpoints: GET /api/tags, POST /api/generate and POST /api/chat (streaming NDJSON or one JSON object).
Each request to /api/generate or /api/chat takes the next *behavior* from `server.script` (then `default`):
  "ok"          a normal reply (text from `server.reply(prompt)`)
  "die"         the stream sends a few chunks and the connection is closed mid-stream (no terminating chunk)
  "truncated"   the stream ends cleanly but without the final {"done": true}
  "malformed"   status 200 with a body that is not JSON
  "error500"    status 500 {"error": "..."}
  "notfound"    status 404 {"error": "model ... not found"}
An unknown model always gets the real server's 404. Usage: `with FakeOllama(models=["llama3.1:latest"]) as srv:`
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def default_reply(prompt: str) -> str:
    "A deterministic, prompt-specific text of ~80 words, different enough between prompts not to be near-duplicates."
    words = "moon river fox lantern garden whale honey meadow cloud pebble orchard comet harbor violin maple tide".split()
    h = hashlib.sha256(prompt.encode()).digest()
    out = [words[b % len(words)] + ("." if i % 9 == 8 else "") for i, b in enumerate(h * 3)]
    return "Here is a short text:\n" + " ".join(out[:80]).capitalize()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FakeOllama"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self._dead():
            return
        if self.path == "/api/tags":
            self._json(200, {"models": [{"name": m, "model": m, "modified_at": "2024-07-23T00:00:00Z", "size": 1,
                                         "digest": "0" * 64, "details": {}} for m in self.server.models]})
        elif self.path == "/":
            body = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._json(404, {"error": "not found"})

    def _dead(self) -> bool:
        "After kill(), requests on kept-alive connections get the connection slammed shut."
        if self.server.dead:
            self.close_connection = True
            self.connection.shutdown(2)
        return self.server.dead

    def do_POST(self):
        if self._dead():
            return
        length = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        if self.path not in ("/api/generate", "/api/chat"):
            return self._json(404, {"error": "not found"})
        chat = self.path == "/api/chat"
        prompt = req["messages"][-1]["content"] if chat else req.get("prompt", "")
        with self.server.lock:
            self.server.requests.append({"path": self.path, **req})
            behavior = self.server.script.pop(0) if self.server.script else self.server.default
        model = req.get("model", "")
        if behavior == "notfound" or model not in self.server.models and f"{model}:latest" not in self.server.models:
            return self._json(404, {"error": f"model '{model}' not found, try pulling it first"})
        if behavior == "error500":
            return self._json(500, {"error": "llama runner process has terminated"})
        if behavior == "malformed":
            body = b"<html>502 Bad Gateway</html>\n"
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.server.delay:
            time.sleep(self.server.delay)
        text = self.server.reply(prompt)

        def msg(piece, done):
            base = {"model": model, "created_at": "2024-07-23T00:00:00Z", "done": done}
            if chat:
                base["message"] = {"role": "assistant", "content": piece}
            else:
                base["response"] = piece
            if done:
                base.update(done_reason="stop", total_duration=1, eval_count=len(text.split()))
            return base

        if req.get("stream", True) is False:
            return self._json(200, msg(text, True))
        pieces = [w + " " for w in text.split(" ")]
        pieces[-1] = pieces[-1][:-1]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        if behavior in ("die", "truncated"):
            self.send_header("Connection", "close")
        self.end_headers()

        def chunk(obj):
            data = (json.dumps(obj) + "\n").encode()
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            self.wfile.flush()

        if behavior == "die":
            for p in pieces[:3]:
                chunk(msg(p, False))
            self.close_connection = True
            self.connection.shutdown(2)  # abrupt: no terminating zero-length chunk
            return
        for p in pieces if behavior != "truncated" else pieces[:3]:
            chunk(msg(p, False))
        if behavior != "truncated":
            chunk(msg("", True))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        if behavior == "truncated":
            self.close_connection = True


class FakeOllama(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, models=("llama3.1:latest",), script=(), default="ok", reply=default_reply, delay=0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.models, self.script, self.default = list(models), list(script), default
        self.reply, self.delay = reply, delay
        self.requests, self.lock, self.dead = [], threading.Lock(), False
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.kill()
        self.thread.join(timeout=5)

    def kill(self) -> None:
        "Stop for good: the port refuses connections and open connections are closed on their next request."
        if not self.dead:
            self.dead = True
            self.shutdown()
            self.server_close()


def free_port() -> int:
    "A port nothing listens on (bound, then released)."
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Tests for snakes_lib.generate: the loop, batching, the cache contract, the CLI (sampling and text: test_decoding.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from snakes_lib.generate import CacheInterfaceError, RunDirError, check_run_dir, generate

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# A tiny fake LM with the Mamba2LM inference interface, and a worst-case byte tokenizer
# ---------------------------------------------------------------------------------------------------------------
class ByteTokenizer:
    "One token per UTF-8 byte (ids 0..255); <|endoftext|> = 256, <|pad|> = 257."
    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FakeLM(nn.Module):
    """A diagonal linear recurrence h_t = a * h_{t-1} + E[x_t], logits = W tanh(h_t), in float64.

    forward(ids, cache) runs the same loop as step, so prefill + steps == forward on the full sequence exactly.
    Records every call so tests can check how generation uses the model."""

    def __init__(self, vocab=260, d=24, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, d, generator=g, dtype=torch.float64))
        self.decay = nn.Parameter(torch.rand(d, generator=g, dtype=torch.float64) * 0.9)
        self.out = nn.Parameter(torch.randn(vocab, d, generator=g, dtype=torch.float64) * 3)
        self.forward_lengths, self.step_calls, self.step_inputs = [], 0, []

    def allocate_inference_cache(self, batch_size):
        return {"h": torch.zeros(batch_size, self.emb.shape[1], dtype=torch.float64)}

    def _advance(self, h, tok):
        return self.decay * h + self.emb[tok]

    def forward(self, input_ids, cache=None):
        self.forward_lengths.append(input_ids.shape[1])
        h = cache["h"] if cache is not None else torch.zeros(input_ids.shape[0], self.emb.shape[1], dtype=torch.float64)
        outs = []
        for t in range(input_ids.shape[1]):
            h = self._advance(h, input_ids[:, t])
            outs.append(torch.tanh(h) @ self.out.T)
        if cache is not None:
            cache["h"] = h
        return torch.stack(outs, dim=1)

    def step(self, token_ids, cache):
        assert token_ids.shape == (cache["h"].shape[0],), token_ids.shape
        self.step_calls += 1
        self.step_inputs.append(token_ids.tolist())
        cache["h"] = self._advance(cache["h"], token_ids)
        return torch.tanh(cache["h"]) @ self.out.T


class NoCacheLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, ids):
        return torch.zeros(*ids.shape, 4)


@pytest.fixture
def lm():
    return FakeLM()


TOK = ByteTokenizer()


def reference_greedy(model, ids, n):
    "Greedy decoding the slow, obviously right way: re-run the whole sequence for every token."
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        logits[TOK.vocab_size:] = float("-inf")
        t = int(logits.argmax())
        out.append(t)
        ids.append(t)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The generation loop
# ---------------------------------------------------------------------------------------------------------------
def test_greedy_matches_rerunning_the_prefix(lm):
    prompt = "Once upon a time"
    ref = reference_greedy(FakeLM(), TOK.encode(prompt), 12)
    res = generate(lm, TOK, prompt, max_new_tokens=12, temperature=0, stop_at_eos=False, return_details=True)
    assert res.token_ids == ref
    assert res.finish_reason == "length" and res.prompt_tokens == len(prompt)


@pytest.mark.parametrize("n_new", [1, 7])
def test_one_prefill_then_one_step_per_token(lm, n_new):
    prompt = "Maia finds a toy boat and"
    generate(lm, TOK, prompt, max_new_tokens=n_new, temperature=0, stop_at_eos=False)
    assert lm.forward_lengths == [len(prompt)]                      # the prompt is run once, in parallel
    assert lm.step_calls == n_new - 1                               # then exactly one step per further token


def test_batched_equals_one_by_one_greedy_and_sampled(lm):
    prompts = ["Hi", "Once upon a time, Maia", "🐍 snake", "A cat named Whiskers"]
    for opts in [dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3), dict(temperature=0.9, top_p=0.8, seed=11,
                                                                                  repetition_penalty=1.3)]:
        batch = generate(FakeLM(), TOK, prompts, max_new_tokens=9, stop_at_eos=False, return_details=True, **opts)
        for i, p in enumerate(prompts):
            o = dict(opts)
            if "seed" in o:
                o["seed"] += i                                       # row i of a batch uses seed + i
            single = generate(FakeLM(), TOK, p, max_new_tokens=9, stop_at_eos=False, return_details=True, **o)
            assert batch[i].token_ids == single.token_ids, (opts, p)
            assert batch[i].text == single.text


def test_batched_prefills_the_shortest_and_never_feeds_pads(lm):
    prompts = ["abc", "abcdefg"]
    generate(lm, TOK, prompts, max_new_tokens=4, temperature=0, stop_at_eos=False)
    assert lm.forward_lengths == [3]
    assert lm.step_calls == (7 - 3) + 4 - 1
    fed_row1 = [s[1] for s in lm.step_inputs][:4]
    assert fed_row1 == TOK.encode("defg")                           # the long row consumes its own prompt tokens
    assert TOK.pad_id not in {t for s in lm.step_inputs for t in s}


def test_seed_reproducible_and_seeds_differ(lm):
    a = generate(lm, TOK, "The garden", max_new_tokens=20, temperature=1.5, seed=1, stop_at_eos=False)
    b = generate(lm, TOK, "The garden", max_new_tokens=20, temperature=1.5, seed=1, stop_at_eos=False)
    c = generate(lm, TOK, "The garden", max_new_tokens=20, temperature=1.5, seed=2, stop_at_eos=False)
    assert a == b and a != c


def test_stop_string_truncates_and_stops_early(lm):
    full = generate(lm, TOK, "Go", max_new_tokens=40, temperature=0, stop_at_eos=False, return_details=True)
    text = full.text
    assert len(text) >= 6
    stop = text[3:5]
    lm2 = FakeLM()
    res = generate(lm2, TOK, "Go", max_new_tokens=40, temperature=0, stop=stop, stop_at_eos=False, return_details=True)
    assert res.text == text[:text.find(stop)] and stop not in res.text
    assert res.finish_reason == "stop"
    assert len(res.token_ids) < 40 and lm2.step_calls < 39          # it really stopped early
    streamed = "".join(generate(FakeLM(), TOK, "Go", max_new_tokens=40, temperature=0, stop=stop,
                                stop_at_eos=False, stream=True))
    assert streamed == res.text


def test_eos_ends_a_row():
    lm = FakeLM()
    with torch.no_grad():
        lm.out[TOK.eos_id] = 0
        lm.out[TOK.eos_id, 0] = 1e4 * torch.sign(lm.emb[ord("!"), 0])   # a huge eos logit after "!"
    res = generate(lm, TOK, ["Hello!", "Hello"], max_new_tokens=5, temperature=0, return_details=True)
    assert res[0].finish_reason == "eos" and res[0].token_ids == [TOK.eos_id] and res[0].text == ""


def test_streaming_pieces_concatenate_and_callback(lm):
    # a model whose greedy output is emoji bytes: bias the output layer towards a fixed byte cycle
    seen = []
    pieces = list(generate(lm, TOK, "Maia 🐍", max_new_tokens=30, temperature=1.0, seed=0, stream=True,
                           stop_at_eos=False, on_text=seen.append))
    full = generate(FakeLM(), TOK, "Maia 🐍", max_new_tokens=30, temperature=1.0, seed=0, stop_at_eos=False)
    assert "".join(pieces) == full and pieces == seen
    assert all(p for p in pieces)
    batch = list(generate(FakeLM(), TOK, ["a", "bb"], max_new_tokens=5, temperature=0, stream=True, stop_at_eos=False))
    assert all(isinstance(r, int) and isinstance(p, str) for r, p in batch)


def test_streaming_never_splits_characters_with_multibyte_output():
    lm = FakeLM()
    snake = TOK.encode("🐍")                                          # 4 bytes, each its own token here
    # Make the model emit the snake's bytes in a cycle: token t is followed by the next byte of the snake.
    with torch.no_grad():
        lm.decay.zero_()
        lm.emb.copy_(torch.eye(lm.emb.shape[0], lm.emb.shape[1], dtype=torch.float64) * 0)
        lm.emb.copy_(torch.zeros_like(lm.emb))
        for j, b in enumerate(snake):
            lm.emb[b, j] = 5.0
        lm.emb[ord(">"), 3] = 5.0
        lm.out.zero_()
        for j in range(4):
            lm.out[snake[(j + 1) % 4], j] = 10.0
    pieces = list(generate(lm, TOK, ">", max_new_tokens=16, temperature=0, stream=True, stop_at_eos=False))
    assert "".join(pieces) == "🐍" * 4
    assert all(p and "\ufffd" not in p for p in pieces) and len(pieces) == 4


def test_max_new_tokens_zero_and_empty_prompt(lm):
    assert generate(lm, TOK, "abc", max_new_tokens=0) == "" and lm.forward_lengths == []
    res = generate(lm, TOK, "", max_new_tokens=3, temperature=0, stop_at_eos=False, return_details=True)
    assert lm.forward_lengths == [1] and len(res.token_ids) == 3    # the empty prompt starts from <|endoftext|>


def test_model_without_cache_is_a_clear_error():
    with pytest.raises(CacheInterfaceError, match="allocate_inference_cache"):
        generate(NoCacheLM(), TOK, "hi")


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0),
                                 dict(max_new_tokens=-1), dict(stop=[""])])
def test_bad_options_raise_before_running(lm, bad):
    with pytest.raises(ValueError):
        generate(lm, TOK, "hi", **bad)
    assert lm.forward_lengths == []


def test_padded_vocab_ids_are_never_sampled():
    lm = FakeLM(vocab=300)                                            # logits wider than the tokenizer's vocab
    with torch.no_grad():
        lm.out[TOK.vocab_size:] *= 100
    res = generate(lm, TOK, "x", max_new_tokens=30, temperature=1.0, seed=0, stop_at_eos=False, return_details=True)
    assert max(res.token_ids) < TOK.vocab_size


def test_generation_restores_training_mode(lm):
    lm.train()
    generate(lm, TOK, "x", max_new_tokens=2)
    assert lm.training


# ---------------------------------------------------------------------------------------------------------------
# Run directories and the command line
# ---------------------------------------------------------------------------------------------------------------
import argparse
import io

import snakes_lib.generate as G


def parse(*argv):
    p = argparse.ArgumentParser(prog="snakes")
    G.add_generate_command(p.add_subparsers(dest="command"))
    return p.parse_args(["generate", *argv])


def test_check_run_dir_messages(tmp_path):
    with pytest.raises(RunDirError, match=r"does not exist.*snakes train --preset cpu --out"):
        check_run_dir(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        check_run_dir(f)
    with pytest.raises(RunDirError, match=r"missing tokenizer.json.*snakes train --preset cpu --out"):
        check_run_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"missing config.json .* and model.safetensors \(the trained weights\).*--resume"):
        check_run_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"missing model.safetensors \(the trained weights\), and no checkpoint"):
        check_run_dir(tmp_path)
    ck = tmp_path / "checkpoints" / "step-00000010"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"")
    assert check_run_dir(tmp_path) == tmp_path                      # a run still training: its checkpoint will do
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert check_run_dir(tmp_path) == tmp_path


def test_cli_parser_flags():
    a = parse("--run", "r", "--prompt", "p", "--max-new-tokens", "5", "--temperature", "0", "--top-k", "3",
              "--top-p", "0.5", "--repetition-penalty", "1.2", "--stop", "x", "--stop", "\n", "--seed", "4",
              "--device", "cpu")
    assert (a.run, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.stop,
            a.seed, a.device) == ("r", "p", 5, 0.0, 3, 0.5, 1.2, ["x", "\n"], 4, "cpu")
    assert a.func is G.run_generate_command


@pytest.fixture
def fake_run(monkeypatch):
    lm = FakeLM()
    monkeypatch.setattr(G, "load_for_generation", lambda run, device="cpu": (lm, TOK))
    return lm


def test_cli_prompt_prints_streamed_completion(fake_run):
    out, err = io.StringIO(), io.StringIO()
    code = G.run_generate_command(parse("--run", "x", "--prompt", "Maia", "--temperature", "0",
                                        "--max-new-tokens", "6", "--device", "cpu"), stdout=out, stderr=err)
    expected = generate(FakeLM(), TOK, "Maia", max_new_tokens=6, temperature=0)
    assert code == 0 and out.getvalue() == expected + "\n"


def test_cli_bad_option_is_exit_2(fake_run, capsys):
    with pytest.raises(SystemExit) as e:                   # refused when the command line is read, naming the flag
        parse("--run", "x", "--prompt", "a", "--top-p", "2", "--device", "cpu")
    assert e.value.code == 2 and "argument --top-p: 2 is out of range" in capsys.readouterr().err


def test_cli_errors_reach_the_one_error_mechanism(fake_run, tmp_path, capsys, monkeypatch):
    "run_generate_command raises; snakes_lib.cli.main turns the error into one line and exit status 2."
    from snakes_lib.cli import main
    with pytest.raises(ValueError, match="non-empty"):                  # an empty --stop: refused before any prompt
        G.run_generate_command(parse("--run", "x", "--prompt", "a", "--stop", "", "--device", "cpu"),
                               stdout=io.StringIO(), stderr=io.StringIO())
    assert main(["generate", "--run", "x", "--prompt", "a", "--stop", "", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snakes: error: ") and "non-empty" in err and "Traceback" not in err
    monkeypatch.undo()                                                   # the real loader: a missing run directory
    assert main(["generate", "--run", str(tmp_path / "missing"), "--prompt", "a", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snakes: error: ") and "does not exist" in err and err.count("\n") == 1


class ScriptedStdin:
    "readline() returns the scripted lines; a KeyboardInterrupt item is raised instead (Ctrl-C at the prompt)."
    def __init__(self, items):
        self.items = list(items)

    def readline(self):
        if not self.items:
            return ""
        item = self.items.pop(0)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item


def test_cli_interactive_ctrl_c_and_eof(fake_run, monkeypatch):
    out = io.StringIO()
    code = G.run_generate_command(parse("--run", "x", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"),
                                  stdin=ScriptedStdin(["ab\n", KeyboardInterrupt, "\n", "cd\n"]), stdout=out,
                                  stderr=io.StringIO())
    expected = [generate(FakeLM(), TOK, p, max_new_tokens=4, temperature=0) for p in ("ab", "cd")]
    assert code == 0
    assert out.getvalue() == f"> {expected[0]}\n> \n[cancelled]\n> > {expected[1]}\n> \n"

    # Ctrl-C during a generation cancels that generation only
    real = G.generate
    def interrupted(*a, **k):
        def pieces():
            yield "par"
            raise KeyboardInterrupt
        return pieces()
    monkeypatch.setattr(G, "generate", interrupted)
    out = io.StringIO()
    code = G.run_generate_command(parse("--run", "x", "--device", "cpu"), stdin=ScriptedStdin(["ab\n"]), stdout=out,
                                  stderr=io.StringIO())
    assert code == 0 and out.getvalue() == "> par\n[cancelled]\n> \n"


def test_cli_stop_escapes_and_options_reach_generate(fake_run, monkeypatch):
    seen = {}
    def fake_generate(model, tok, prompt, **kw):
        seen.update(kw, prompt=prompt)
        return iter(["ok"])
    monkeypatch.setattr(G, "generate", fake_generate)
    out = io.StringIO()
    code = G.run_generate_command(parse("--run", "x", "--prompt", "hi", "--stop", "\\n", "--stop", "END", "--top-k", "7",
                                        "--seed", "3", "--device", "cpu"), stdout=out, stderr=io.StringIO())
    assert code == 0 and out.getvalue() == "ok\n"
    assert seen["stop"] == ["\n", "END"] and seen["top_k"] == 7 and seen["seed"] == 3 and seen["prompt"] == "hi"


# ---------------------------------------------------------------------------------------------------------------
# The real thing: a tiny Mamba2LM run directory and the `snakes` entry point in a subprocess
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model_mod = pytest.importorskip("snakes_lib.model")
    from snakes_lib.tokenizer import SnakesTokenizer
    texts = ["Once upon a time, Maia found a toy boat and sailed it. 🐍 The cat Whiskers yawned."] * 20
    tok = SnakesTokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = model_mod.Mamba2Config(d_model=32, n_layer=2, vocab_size=tok.vocab_size, d_state=8, headdim=16, chunk_size=8)
    model = model_mod.Mamba2LM(cfg).eval()
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run)
    tok.save(run)
    return run, model, tok


def test_real_model_streaming_and_batched(tiny_run):
    _, model, tok = tiny_run
    m = __import__("copy").deepcopy(model).double()
    prompts = ["Maia", "Once upon a time, Maia found a", "🐍 The cat"]
    batch = generate(m, tok, prompts, max_new_tokens=8, temperature=0, stop_at_eos=False, return_details=True)
    for i, p in enumerate(prompts):
        alone = generate(m, tok, p, max_new_tokens=8, temperature=0, stop_at_eos=False, return_details=True)
        assert alone.token_ids == batch[i].token_ids
    pieces = list(generate(model, tok, "Maia 🐍", max_new_tokens=25, temperature=1.5, seed=0, stop_at_eos=False,
                           stream=True))
    ref = generate(model, tok, "Maia 🐍", max_new_tokens=25, temperature=1.5, seed=0, stop_at_eos=False,
                   return_details=True)
    assert "".join(pieces) == ref.text == tok.decode(ref.token_ids)


def test_load_for_generation_bare_and_exported(tiny_run, tmp_path):
    run, model, tok = tiny_run
    m, t = G.load_for_generation(run)
    assert t.fingerprint == tok.fingerprint and not m.training
    runs = pytest.importorskip("snakes_lib.runs")
    if hasattr(runs, "export_model"):
        out = tmp_path / "exported"
        out.mkdir()
        tok.save(out)
        runs.export_model(model, out, "mamba2", {"step": 1, "val_loss": None})
        m2, _ = G.load_for_generation(out)
        ids = torch.tensor([tok.encode("Maia")])
        with torch.no_grad():
            assert torch.allclose(m2(ids), model(ids), atol=1e-6)


def _snakes(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    if (REPO / "snakes_lib" / "__main__.py").exists():
        cmd = [sys.executable, "-m", "snakes_lib", *args]
    else:                                           # without the hand-written cli: the generate command alone
        cmd = [sys.executable, "-c", "import sys, argparse; from snakes_lib.generate import add_generate_command; "
               "p = argparse.ArgumentParser(prog='snakes'); add_generate_command(p.add_subparsers()); "
               "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO, **kw)


@pytest.mark.slow
def test_cli_subprocess_prompt_interactive_and_errors(tiny_run, tmp_path):
    run, model, tok = tiny_run
    expected = generate(model, tok, "Maia", max_new_tokens=6, temperature=0)
    r = _snakes(["generate", "--run", str(run), "--prompt", "Maia", "--max-new-tokens", "6", "--temperature", "0",
                 "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"

    r = _snakes(["generate", "--run", str(run), "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"],
                input="Maia\n\nMaia\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"> {expected}\n> > {expected}\n> \n"      # the empty line is skipped; EOF exits cleanly
    assert "Ctrl-D exits" in r.stderr

    r = _snakes(["generate", "--run", str(tmp_path / "missing"), "--prompt", "x"])
    assert r.returncode == 2 and "does not exist" in r.stderr and "snakes train" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Left-padded batched prefill (dt = 0 on the pads) == each prompt alone; the sampling widget's callback
# ---------------------------------------------------------------------------------------------------------------
from snakes_lib.generate import prefill_left_padded, prefill_one_by_one


def _tiny_mamba(dtype, seed=0, ngroups=1):
    from snakes_lib.model import Mamba2Config, Mamba2LM
    torch.manual_seed(seed)
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, ngroups=ngroups, chunk_size=8)
    return Mamba2LM(cfg).to(dtype).eval()


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_left_padded_prefill_equals_each_prompt_alone(seed, dtype, tol):
    model = _tiny_mamba(dtype, seed, ngroups=1 + seed % 2)
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 3, 7, 8, 9, 17, 31][: 3 + 2 * seed]               # shorter and longer than d_conv and the chunk
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in lengths]
    lp_logits, lp_cache = prefill_left_padded(model, prompts, pad_id=int(torch.randint(0, 50, (1,), generator=g)))
    ob_logits, ob_cache = prefill_one_by_one(model, prompts)
    assert lp_logits.shape == (len(prompts), 50) and _rel(lp_logits, ob_logits) <= tol
    for a, b in zip(lp_cache.ssm_states, ob_cache.ssm_states):
        assert _rel(a, b) <= tol
    for a, b in zip(lp_cache.conv_states, ob_cache.conv_states):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # greedy continuation from each cache: identical tokens, close logits
    za, zb, toks_a, toks_b = lp_logits, ob_logits, [], []
    with torch.no_grad():
        for _ in range(6):
            ta, tb = za.argmax(-1), zb.argmax(-1)
            toks_a.append(ta.tolist()); toks_b.append(tb.tolist())
            za, zb = model.step(ta, lp_cache), model.step(tb, ob_cache)
    assert toks_a == toks_b and _rel(za, zb) <= tol
    # and each row equals a plain forward over its prompt alone
    with torch.no_grad():
        for i, p in enumerate(prompts):
            assert _rel(lp_logits[i], model(torch.tensor([p]))[0, -1]) <= tol
    # the model is left as it was: no hooks, the class's own _ssm_params
    assert all(not blk.mixer.in_proj._forward_hooks and "_ssm_params" not in vars(blk.mixer) for blk in model.backbone.layers)


def test_plain_padding_would_differ_and_errors():
    model = _tiny_mamba(torch.float64)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    lp, _ = prefill_left_padded(model, prompts)
    with torch.no_grad():
        naive = model(torch.tensor([[0] * 7 + prompts[0], prompts[1]]))[:, -1]     # pads fed in as tokens
    assert _rel(naive[0], lp[0]) > 1e-6 and _rel(naive[1], lp[1]) < 1e-12
    with pytest.raises(ValueError, match="at least one token"):
        prefill_left_padded(model, [[1], []])
    with pytest.raises(TypeError, match="needs a Mamba2LM"):
        prefill_left_padded(FakeLM(), [[1, 2]])

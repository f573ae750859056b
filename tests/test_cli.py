"""The `snakes` command line: train a few steps, generate from the run, clear errors, every flag wired."""
import dataclasses
import json
import subprocess
import sys

import pytest

from snakes_lib.cli import build_parser, config_from_args, main
from snakes_lib.presets import TrainConfig

from test_train import MICRO, make_corpus


def test_every_train_config_field_is_a_flag():
    parser = build_parser()
    args = parser.parse_args(["train", "--preset", "cpu", "--max-steps", "7", "--no-chunked-ce", "--lr", "0.01",
                              "--data", "a", "b", "--model-config", '{"n_layer": 2}', "--device", "cpu"])
    cfg = config_from_args(args)
    assert (cfg.max_steps, cfg.chunked_ce, cfg.lr, cfg.data, cfg.model_config) == (7, False, 0.01, ["a", "b"],
                                                                                   {"n_layer": 2})
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        if f.name != "preset":
            assert "--" + f.name.replace("_", "-") in help_text, f.name


def test_train_then_generate(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    argv = ["train", "--preset", "cpu", "--data", str(corpus), "--out", str(run), "--max-steps", "3",
            "--batch-size", "2", "--seq-len", "16", "--vocab-size", "300", "--device", "cpu", "--eval-every", "2",
            "--eval-batches", "1", "--cache-dir", str(tmp_path / "tok"), "--model-config", json.dumps(MICRO),
            "--log-every", "1"]
    assert main(argv + ["--max-steps", "4", "--stop-at", "3"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 3 (paused by --stop-at; continue with --resume)" in out and "val loss" in out
    assert main(argv) == 2                                  # the run exists: refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(argv[:-2] + ["--max-steps", "4", "--resume"]) == 0
    assert "stopped at step 4" in capsys.readouterr().out
    assert main(["generate", "--run", str(run), "--prompt", "The snake", "--max-new-tokens", "5", "--seed", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["train", "--preset", "cpu", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"),
               "--device", "cpu", "--cache-dir", str(tmp_path / "tok")])
    assert rc == 2 and "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--preset", "9gb"])
    assert main([]) == 2


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "snakes_lib", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("train", "generate", "data", "bench", "demo"):
        assert cmd in r.stdout


@pytest.mark.slow
def test_train_compile_gives_the_eager_losses(tmp_path, capsys):
    from snakes_lib.train import read_metrics
    corpus = make_corpus(tmp_path / "corpus")
    argv = ["train", "--preset", "cpu", "--data", str(corpus), "--max-steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--vocab-size", "300", "--device", "cpu", "--eval-every", "2", "--eval-batches", "1",
            "--cache-dir", str(tmp_path / "tok"), "--model-config", json.dumps(MICRO)]
    assert main(argv + ["--out", str(tmp_path / "eager")]) == 0
    assert main(argv + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    assert "stopped at step 3" in capsys.readouterr().out
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    for key in ("train_loss", "val_loss"):                 # training steps and the (eval mode) validation
        a, b = [r[key] for r in eager if key in r], [r[key] for r in compiled if key in r]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-4), key


def test_resume_keeps_the_runs_identity_and_refuses_another(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    other = make_corpus(tmp_path / "other", seed=1)
    run = tmp_path / "run"
    common = ["train", "--preset", "cpu", "--out", str(run), "--device", "cpu", "--cache-dir", str(tmp_path / "tok"),
              "--eval-every", "2", "--eval-batches", "1"]
    assert main(common + ["--data", str(corpus), "--max-steps", "4", "--stop-at", "2", "--batch-size", "2",
                          "--seq-len", "16", "--vocab-size", "300", "--lr", "0.01",
                          "--model-config", json.dumps(MICRO)]) == 0
    capsys.readouterr()
    for extra, said in ((["--seq-len", "32"], "--seq-len 32 (the run has --seq-len 16)"),
                        (["--model-size", "small"], "--model-size small (the run has --model-size tiny)"),
                        (["--data", str(other)], f"--data {other} (the run has --data {corpus})"),
                        (["--model-config", '{"n_layer": 2}'], '(the run has --model-config {"d_model": 32')):
        assert main(common + ["--resume", "--max-steps", "4"] + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("snakes: error: --resume") and said in err and "drop them" in err, err
    # a bare resume takes the run's data, sizes and learning rate, not the preset's; a new --lr is said out loud
    assert main(common + ["--resume"]) == 0                      # and its --max-steps (the preset's is 300)
    assert "stopped at step 4 (max_steps)" in capsys.readouterr().out
    assert main(common + ["--resume", "--max-steps", "5", "--lr-decay-steps", "5", "--lr", "0.005"]) == 0
    err = capsys.readouterr().err
    assert "--lr 0.005 replaces the run's 0.01 from step 5 on" in err and "--lr-decay-steps 5 replaces" in err


# ---- every flag checked when the command line is read, with a message that names it ----------------------------
@pytest.mark.parametrize("argv, said", [
    (["train", "--batch-size", "0"], "argument --batch-size: 0 is too small: use 1 or more"),
    (["train", "--grad-accum", "0"], "argument --grad-accum: 0 is too small"),
    (["train", "--seed", str(2**63)], f"argument --seed: {2**63} is too large: use at most {2**63 - 1}"),
    (["train", "--lr", "nan"], "argument --lr: nan is out of range"),
    (["train", "--stop-at", "0"], "argument --stop-at: 0 is too small"),
    (["train", "--schedule", "linear"], "argument --schedule: invalid choice"),
    (["train", "--decay-fraction", "1.5"], "argument --decay-fraction: 1.5 is out of range"),
    (["generate", "--run", "r", "--temperature", "nan"], "argument --temperature: nan is out of range"),
    (["generate", "--run", "r", "--repetition-penalty", "nan"], "argument --repetition-penalty: nan is out of range"),
    (["generate", "--run", "r", "--seed", str(2**64)], "argument --seed: 18446744073709551616 is too large"),
    (["data", "generate", "--topics", "t.txt", "--retries", "-1"], "argument --retries: -1 is too small"),
])
def test_bad_numbers_are_refused_when_parsed(argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("extra, said", [
    (["--model-config", '{"n_layers": 1}'], "--model-config: 'n_layers' is not a field of a mamba2 model's config"),
    (["--model-config", "[1, 2]"], "--model-config must be a JSON object such as"),
    (["--model-config", "{bad"], "--model-config '{bad' is not valid JSON"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device torch knows"),
    (["--cache-dir", "__FILE__"], "is a file, not a folder"),
])
def test_bad_settings_are_one_line_errors(extra, said, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    extra = [str(a_file) if x == "__FILE__" else x for x in extra]
    assert main(["train", "--preset", "cpu", "--out", str(tmp_path / "run")] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("snakes: error: ") and said in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()                     # refused before anything was written


def test_a_cache_dir_variable_naming_a_file_and_a_missing_gpu(tmp_path, capsys, monkeypatch):
    import torch
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("SNAKES_CACHE_DIR", str(tmp_path / "a-file"))
    assert main(["train", "--preset", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert f"SNAKES_CACHE_DIR={tmp_path / 'a-file'} is a file, not a folder" in capsys.readouterr().err
    monkeypatch.delenv("SNAKES_CACHE_DIR")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--preset", "cpu", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "sees no CUDA GPU; use --device cpu" in capsys.readouterr().err


def test_broken_pipe_non_utf8_prompts_and_an_ascii_terminal(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    assert main(["train", "--preset", "cpu", "--data", str(corpus), "--out", str(run), "--max-steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--vocab-size", "300", "--device", "cpu", "--eval-every", "0",
                 "--cache-dir", str(tmp_path / "tok"), "--model-config", json.dumps(MICRO), "--no-progress"]) == 0
    gen = [sys.executable, "-m", "snakes_lib", "generate", "--run", str(run), "--device", "cpu", "--seed", "0",
           "--max-new-tokens", "200", "--prompt"]
    r = subprocess.run(" ".join(map(repr, gen)) + " 'Maia é 🐍' | head -c 1", shell=True, capture_output=True,
                       text=True, timeout=300)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    # a prompt whose bytes are not UTF-8 (from argv; on stdin with a NUL too): replaced, said, generated from
    r = subprocess.run(gen[:-1] + ["--max-new-tokens", "3", "--prompt", b"Maia \xff"], capture_output=True, timeout=300)
    assert r.returncode == 0 and b"not UTF-8" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    r = subprocess.run(gen[:-3] + ["--max-new-tokens", "3"], input=b"Maia \xff\x00 ran\n", capture_output=True, timeout=300)
    assert r.returncode == 0 and b"not UTF-8" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    # a terminal that cannot show "ü": the run folder's name is printed with "?" instead of a UnicodeEncodeError
    r = subprocess.run([sys.executable, "-m", "snakes_lib", "train", "--preset", "cpu", "--data", str(corpus), "--out",
                        str(tmp_path / "rün"), "--max-steps", "1", "--batch-size", "2", "--seq-len", "16",
                        "--vocab-size", "300", "--device", "cpu", "--eval-every", "0", "--cache-dir",
                        str(tmp_path / "tok"), "--model-config", json.dumps(MICRO), "--no-progress"],
                       capture_output=True, timeout=300, env={**__import__("os").environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and b"r?n" in r.stdout and b"Traceback" not in r.stderr, r.stderr

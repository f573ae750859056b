"""Issue 9, "never destroy a user's files": the run folder's rules (snakes_lib.runfolder) through the real CLI.

snakes writes only into a new or empty folder or its own run, deletes only what it wrote, keeps a second writer
out, stops on Ctrl-C with one line and no partial files, cleans the debris of killed writes, and reports a full or
read-only disk in one message. Signals hit real subprocesses at known moments (tests/slow_cli.py pauses one
function); full and read-only disks are small tmpfs mounts where this process may mount (root), and simulated
writers (a monkeypatched writer raising ENOSPC / EROFS) everywhere."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from snakes_lib.cli import main
from snakes_lib.runfolder import LOCK_FILE, RUN_MARKER, RunLock, RunLockedError
from snakes_lib.runs import find_checkpoint, read_metrics, verify_checkpoint

from test_train import MICRO, make_corpus

HERE = Path(__file__).parent
DEBRIS_MARKS = (".tmp-", ".old-", ".tmp")


def train_argv(tmp_path, out, *extra, steps=3, model=MICRO):
    return ["train", "--preset", "cpu", "--data", str(tmp_path / "corpus"), "--out", str(out), "--max-steps",
            str(steps), "--batch-size", "2", "--seq-len", "16", "--vocab-size", "300", "--device", "cpu",
            "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2", "--cache-dir",
            str(tmp_path / "tok"), "--model-config", json.dumps(model), "--log-every", "1", "--no-progress", *extra]


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


def debris(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if any(m in p.name for m in DEBRIS_MARKS))


def one_message(err: str) -> str:
    """The CLI's error/interrupt line: exactly one, and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("snakes:")]
    assert len(lines) == 1, err
    return lines[0]


class Paused:
    """`snakes ARGS` in a subprocess, paused after the N-th call of MODULE:FUNCTION (see tests/slow_cli.py)."""

    def __init__(self, spec, args, seconds=60.0):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "slow_cli.py"), spec, str(seconds), "--", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = [], []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()

    def wait_for(self, text, timeout=90.0):
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.out):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"never printed {text!r}:\n{''.join(self.out)}\n{''.join(self.err)}")
            time.sleep(0.05)

    def finish(self, timeout=60.0):
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.1)                              # let the reader threads drain the pipes
        return rc, "".join(self.out), "".join(self.err)


# ---- data loss ------------------------------------------------------------------------------------------------
def test_demo_fresh_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "diary.txt").write_text("dear diary")
    assert main(["demo", "--fresh", "--out", str(mine), "--max-steps", "1"]) == 2
    assert "deletes only snakes runs" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["diary.txt"] and (mine / "diary.txt").read_text() == "dear diary"


@pytest.mark.slow
def test_demo_fresh_starts_its_own_run_over(tmp_path, capsys):
    run = tmp_path / "demo"
    argv = ["demo", "--out", str(run), "--max-steps", "1", "--max-new-tokens", "3"]
    assert main(argv) == 0
    run_id = json.loads((run / RUN_MARKER).read_text())["run_id"]
    assert main(argv) == 0 and "continuing it" in capsys.readouterr().out          # no --fresh: resumes
    assert main(argv + ["--fresh"]) == 0
    assert json.loads((run / RUN_MARKER).read_text())["run_id"] != run_id           # a new run
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r] == [1]


def test_out_empty_is_refused(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text('{"mine": true}')
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(train_argv(tmp_path, "")) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'
    assert main(["demo", "--fresh", "--out", ""]) == 2


def test_out_naming_a_file_is_refused(tmp_path, corpus, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert main(train_argv(tmp_path, f)) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "mine"


def test_another_projects_model_folder_is_not_touched(tmp_path, corpus, capsys):
    other = tmp_path / "other-model"
    other.mkdir()
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(4096)}
    for name, data in files.items():
        (other / name).write_bytes(data)
    assert main(train_argv(tmp_path, other)) == 2
    err = capsys.readouterr().err
    assert "not a snakes run" in err and "config.json" in err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == files      # not even a lock file was written
    assert main(train_argv(tmp_path, other, "--resume")) == 2


def test_a_run_folder_is_marked_and_an_empty_folder_is_fine(tmp_path, corpus):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(train_argv(tmp_path, empty, "--lr-decay-steps", "5")) == 0   # room to extend
    marker = json.loads((empty / RUN_MARKER).read_text())
    assert marker["run_id"] and marker["created_folder"] is False
    assert not (empty / LOCK_FILE).exists()                               # released at the end
    assert main(train_argv(tmp_path, empty, "--resume", steps=4)) == 0
    (empty / RUN_MARKER).unlink()                        # a run made before the marker existed: adopted
    assert main(train_argv(tmp_path, empty, "--resume", steps=5)) == 0
    assert json.loads((empty / RUN_MARKER).read_text())["adopted"] is True


def test_second_writer_is_refused_while_the_first_runs(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    first = Paused("snakes_lib.data:prepare_data", train_argv(tmp_path, run, steps=4), seconds=4)
    first.wait_for("PAUSED")                                             # the first holds the lock, in set-up
    assert main(train_argv(tmp_path, run, "--seed", "7", steps=4)) == 2
    err = capsys.readouterr().err
    assert f"in use by process {first.proc.pid}" in err and "another --out" in err
    rc, out, err = first.finish()
    assert rc == 0, err
    steps = [r["step"] for r in read_metrics(run) if "train_loss" in r]
    assert steps == [1, 2, 3, 4]                                          # every step once, one writer
    assert not (run / LOCK_FILE).exists()


def test_lock_holders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    with RunLock(run, "test"):                                            # a dead process's lock: taken over
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
            RunLock(run).acquire()
    assert not (run / LOCK_FILE).exists()
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunLockedError, match=r"host elsewhere.*delete .*\.snakes\.lock"):
        RunLock(run).acquire()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    killed = Paused("snakes_lib.runs:save_model_dir@2", train_argv(tmp_path, run, steps=4))
    killed.wait_for("PAUSED")                     # step 2: export done, checkpoint step_0000002 half written
    killed.proc.kill()
    killed.finish()
    assert (run / LOCK_FILE).exists()
    left = debris(run)
    assert any(d.startswith("checkpoints/.tmp-step_0000002") for d in left), left
    (run / ".tmp-export-424242").mkdir()                       # an export killed earlier
    (run / ".metrics.jsonl.tmp-424242").write_text("half")
    (run / "my.tmp-notes").write_text("not snakes' own")         # a name snakes never writes: kept
    assert main(train_argv(tmp_path, run, steps=4)) == 0         # no checkpoint yet: a new start in its own run
    err = capsys.readouterr().err
    assert f"from process {killed.proc.pid}" in err and "no longer running" in err
    assert debris(run) == ["my.tmp-notes"]
    assert verify_checkpoint(find_checkpoint(run))["step"] == 4


# ---- clean stops ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["snakes_lib.data:train_tokenizer_for", "snakes_lib.data:_build_cache"])
def test_ctrl_c_during_set_up(tmp_path, corpus, where):
    run = tmp_path / "run"
    p = Paused(where, train_argv(tmp_path, run))
    p.wait_for("PAUSED")
    p.proc.send_signal(signal.SIGINT)
    rc, out, err = p.finish()
    assert rc == 130
    assert "interrupted during set-up: nothing was saved" in one_message(err)
    assert not run.exists()                                       # snakes made it, snakes removed it
    assert not list((tmp_path / "tok").glob(".tokens-*"))        # the token cache's temp folder is gone too


def test_second_ctrl_c_during_the_graceful_stop(tmp_path, corpus):
    run = tmp_path / "run"
    argv = train_argv(tmp_path, run, "--eval-every", "0", steps=3)
    p = Paused("snakes_lib.runs:save_model_dir@3", argv)           # 1, 2: step 2's checkpoint and export
    p.wait_for("PAUSED")                                             # 3: the final checkpoint, half written
    p.proc.send_signal(signal.SIGINT)
    p.wait_for("Ctrl-C: finishing")
    p.proc.send_signal(signal.SIGINT)
    rc, out, err = p.finish()
    assert rc == 130
    msg = one_message(err)
    assert "step_0000002" in msg and "--resume" in msg
    assert debris(run) == [] and not (run / LOCK_FILE).exists()
    assert verify_checkpoint(find_checkpoint(run))["step"] == 2
    assert main(argv + ["--resume"]) == 0


def test_ctrl_c_in_data_generate(tmp_path):
    pytest.importorskip("ollama")
    from fake_ollama import FakeOllama
    topics = tmp_path / "words.txt"
    topics.write_text("lantern\npebble\nriver\nmoon\n")
    out = tmp_path / "out"
    with FakeOllama(delay=1.0) as srv:
        # pytest-xdist's workers ignore SIGINT and a child inherits that (then Python never raises KeyboardInterrupt):
        # give the child the default disposition, as a shell would
        p = subprocess.Popen([sys.executable, "-m", "snakes_lib", "data", "generate", "--topics", str(topics),
                              "--out", str(out), "--host", srv.url, "--concurrency", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while len(list(out.glob("*.txt"))) < 1 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "run the same command again to continue" in err
    assert not [q for q in out.iterdir() if q.name.startswith(".")]     # no partial files


# ---- disks that fill or refuse writes (simulated) -------------------------------------------------------------------
@pytest.mark.parametrize("fail_at", [1, 2])
def test_full_disk_simulated(tmp_path, corpus, monkeypatch, capsys, fail_at):
    """safetensors' writer fails like a full disk on the fail_at-th checkpoint, leaving half a file."""
    import safetensors
    import snakes_lib.runs as T                 # the trainer writes its checkpoints there (_StateMixin)
    real, calls = T._st_save, [0]

    def full_disk(tensors, filename, *a, **k):
        if "optimizer" in str(filename):
            calls[0] += 1
            if calls[0] == fail_at:
                Path(filename).write_bytes(b"\0" * 100)
                raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                                  'message: "No space left on device" }) (os error 28)')
        return real(tensors, filename, *a, **k)
    monkeypatch.setattr(T, "_st_save", full_disk)
    run = tmp_path / "run"
    assert main(train_argv(tmp_path, run, steps=4)) == 2
    msg = one_message(capsys.readouterr().err)
    assert f"no space left on the disk of {run}" in msg and " MB" in msg and "Nothing half-written" in msg
    assert debris(run) == [] and not (run / LOCK_FILE).exists()
    if fail_at == 1:
        assert "No checkpoint of this run was saved yet" in msg and find_checkpoint(run) is None
    else:
        assert "step_0000002" in msg and verify_checkpoint(find_checkpoint(run))["step"] == 2


def test_read_only_disk_simulated(tmp_path, corpus, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(train_argv(tmp_path, run)) == 0
    capsys.readouterr()
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path / "r")) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    for out, extra in ((run, ["--resume", "--max-steps", "5"]), (tmp_path / "run-new", [])):
        assert main(train_argv(tmp_path, out) + extra) == 2
        msg = one_message(capsys.readouterr().err)
        assert "read-only" in msg and str(out) in msg
    assert not (tmp_path / "run-new").exists()


# ---- the same on real small disks (tmpfs; needs root and mount) ------------------------------------------------------
BIG = {"d_model": 128, "n_layer": 2, "d_state": 16, "headdim": 32, "chunk_size": 16}   # 3 MB checkpoints, 1 MB export


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name, size_kb, *opts):
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size_kb}k", *opts]), "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {r.stderr.strip()}")
        mounted.append(d)
        return d
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root; the simulated tests above cover the same code")
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("size_kb,saved", [(3 * 1024, None), (5632, 2)])
def test_full_disk_tmpfs(tmp_path, corpus, tmpfs, capsys, size_kb, saved):
    """3 MB: the first checkpoint does not fit; 5.5 MB: the first fits (with the export), the second does not."""
    run = tmpfs("small", size_kb)
    assert main(train_argv(tmp_path, run, model=BIG, steps=4)) == 2
    msg = one_message(capsys.readouterr().err)
    assert f"no space left on the disk of {run}" in msg and "MB free" in msg and "needs about" in msg
    assert debris(run) == [] and not (run / LOCK_FILE).exists()
    if saved is None:
        assert find_checkpoint(run) is None
    else:
        assert verify_checkpoint(find_checkpoint(run))["step"] == saved and f"step_{saved:07d}" in msg


def test_read_only_tmpfs(tmp_path, corpus, tmpfs, capsys):
    run = tmpfs("ro", 4096)
    assert main(train_argv(tmp_path, run)) == 0
    assert subprocess.run(["mount", "-o", "remount,ro", str(run)]).returncode == 0
    assert main(train_argv(tmp_path, run, "--resume", steps=5)) == 2
    msg = one_message(capsys.readouterr().err)
    assert "read-only" in msg and str(run) in msg
    new = tmpfs("ro-new", 1024, "ro")
    assert main(train_argv(tmp_path, new)) == 2
    assert "read-only" in one_message(capsys.readouterr().err)

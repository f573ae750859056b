"""Chapter 06f: torchrun's environment, each rank's data, and two CPU processes (gloo) training exactly what one
process trains, with DDP and with FSDP2: in a toy loop, and through `snakes train` under torchrun (equal weights and
loss curves, a killed rank then a resume equal to the uninterrupted run, a resume on another world size refused)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from snakes_lib import distributed as D
from snakes_lib.cli import main
from snakes_lib.runs import find_checkpoint, read_metrics


def test_env_from_torchrun_variables():
    env = D.DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.distributed, env.is_main) == (1, 4, 1, True, False)
    assert D.DistEnv.from_env({}) == D.DistEnv(0, 1, 0)
    with pytest.raises(ValueError, match="integers"):
        D.DistEnv.from_env({"RANK": "x"})


def test_rank_batches_are_disjoint_slices_of_a_global_batch_that_depends_on_seed_and_step_only():
    tokens = torch.arange(5000)
    world = 4
    parts = [D.step_batch(tokens, 7, 3, 16, 8, D.DistEnv(r, world, r)) for r in range(world)]
    x_all, y_all = D.step_batch(tokens, 7, 3, 16, 8, D.DistEnv())
    assert torch.equal(torch.cat([p[0] for p in parts]), x_all) and torch.equal(torch.cat([p[1] for p in parts]), y_all)
    assert torch.equal(y_all[:, :-1], x_all[:, 1:])
    assert not torch.equal(D.step_batch(tokens, 7, 4, 16, 8, D.DistEnv())[0], x_all)       # another step, other data
    with pytest.raises(ValueError, match="does not split"):
        D.rank_rows(torch.zeros(6, 2), D.DistEnv(0, 4, 0))


def test_memory_and_communication_formulas():
    assert D.training_state_bytes(10, 4, sharded=True) == 40 and D.training_state_bytes(10, 4) == 160
    assert D.comm_bytes_per_step(100, 1, "ddp") == 0
    assert D.comm_bytes_per_step(100, 2, "ddp") == pytest.approx(400)
    assert D.comm_bytes_per_step(100, 2, "fsdp") == pytest.approx(100 * 0.5 * (2 * 2 + 4))
    with pytest.raises(ValueError):
        D.comm_bytes_per_step(100, 2, "tp")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_train_the_weights_one_process_trains(mode):
    single = D.parallel_train(1, steps=2)
    two = D.parallel_train(2, mode, steps=2)
    assert single.keys() == two.keys()
    worst = max(((two[k] - v).norm() / v.norm()).item() for k, v in single.items())
    assert worst < 1e-5
    assert any((v - D.parallel_train(1, steps=1)[k]).abs().max() > 0 for k, v in single.items())   # steps did train


# ------------------------------------------------------------------ `snakes train` under torchrun (gloo, 2 processes)

HERE = Path(__file__).parent
STEPS = 4


def _train_args(root: Path, out: str, *extra) -> list[str]:
    return ["train", "--preset", "cpu", "--data", str(root / "corpus"), "--out", str(root / out), "--max-steps",
            str(STEPS), "--seq-len", "16", "--vocab-size", "300", "--device", "cpu", "--eval-every", "2",
            "--eval-batches", "2", "--warmup-steps", "1", "--cache-dir", str(root / "tok"), "--model-config",
            json.dumps({"d_model": 32, "n_layer": 2, "d_state": 8, "headdim": 16, "chunk_size": 8}), "--no-progress",
            *extra]


def _torchrun(*args, script=("-m", "snakes_lib")) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script,
            *args]


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, **kw)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _weights(run: Path) -> dict:
    return load_file(str(find_checkpoint(run, verbose=False) / "model.safetensors"))


def _losses(run: Path, key="train_loss") -> list[float]:
    return [r[key] for r in read_metrics(run) if key in r]


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((b[k] - v).norm() / v.norm()).item() for k, v in a.items())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (--sampler step, micro-batch 4) and three 2-rank runs of the same global batch of 4:
    DDP with 1 x 2 accumulation, FSDP with 2 x 1, and FSDP with 2 x 1 killed after its step-2 checkpoint."""
    from test_train import make_corpus
    root = tmp_path_factory.mktemp("dist")
    make_corpus(root / "corpus")
    _run([sys.executable, "-m", "snakes_lib", *_train_args(root, "one", "--sampler", "step", "--batch-size", "4")])
    ddp = _run(_torchrun(*_train_args(root, "ddp", "--batch-size", "1", "--grad-accum", "2")))
    _run(_torchrun(*_train_args(root, "fsdp", "--batch-size", "2", "--parallel", "fsdp")))
    return root, ddp.stdout


def test_torchrun_ddp_trains_what_one_process_trains_with_accumulation(runs):
    root, out = runs
    assert "global batch = 1 per rank x 2 accumulation x 2 ranks = 4 sequences" in out
    assert out.count("stopped at step 4") == 1                            # rank 0 alone reports
    one, ddp = _losses(root / "one"), _losses(root / "ddp")
    assert len(one) == STEPS and np.allclose(one, ddp, rtol=1e-5, atol=0)
    assert _rel(_weights(root / "one"), _weights(root / "ddp")) < 1e-5
    state = json.loads((find_checkpoint(root / "ddp", verbose=False) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["sampler"] == "step" and state["tokens"] == STEPS * 4 * 16


def test_torchrun_fsdp_matches_and_writes_the_single_process_run_folder(runs):
    root, _ = runs
    assert np.allclose(_losses(root / "one"), _losses(root / "fsdp"), rtol=1e-5, atol=0)
    # evaluation splits batches of 2 x 2 rows over the ranks: the validation curve is one process's at batch 4
    assert np.allclose(_losses(root / "one", "val_loss"), _losses(root / "fsdp", "val_loss"), rtol=1e-5, atol=0)
    assert _rel(_weights(root / "one"), _weights(root / "fsdp")) < 1e-5
    ck1, ck2 = (find_checkpoint(root / r, verbose=False) for r in ("one", "fsdp"))
    assert sorted(p.name for p in ck1.iterdir()) == sorted(p.name for p in ck2.iterdir())
    assert json.loads((ck1 / "optimizer.json").read_text())["param_groups"] == \
        json.loads((ck2 / "optimizer.json").read_text())["param_groups"]
    o1, o2 = load_file(str(ck1 / "optimizer.safetensors")), load_file(str(ck2 / "optimizer.safetensors"))
    assert o1.keys() == o2.keys() and _rel(o1, o2) < 1e-4
    from snakes_lib.model import Mamba2LM
    model = Mamba2LM.from_pretrained(root / "fsdp")                      # the export loads in one process
    assert model.config.n_layer == 2


def test_killed_rank_then_resume_equals_the_uninterrupted_run(runs):
    root, _ = runs
    args = _train_args(root, "killed", "--batch-size", "2", "--parallel", "fsdp", "--checkpoint-every", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen(_torchrun(*args, script=(str(HERE / "slow_cli.py"), "snakes_lib.runs:write_checkpoint",
                                                     "120", "--")), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        for line in proc.stdout:                                  # rank 0 has written checkpoint 2 and sleeps
            if "PAUSED" in line:
                break
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        rank1 = [p for p in children if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
        os.kill(int(rank1[0]), signal.SIGKILL)
        t0 = time.time()
        assert proc.wait(timeout=90) != 0                         # torchrun stops the other rank: no hang
        assert time.time() - t0 < 90
    finally:
        if proc.poll() is None:
            proc.kill()
    assert find_checkpoint(root / "killed", verbose=False).name.endswith("2")
    _run(_torchrun(*args, "--resume"))
    assert _losses(root / "killed") == _losses(root / "fsdp")
    a, b = _weights(root / "killed"), _weights(root / "fsdp")
    assert all(torch.equal(a[k], b[k]) for k in a)                # bit for bit: same world size, same backend


def test_resume_on_another_world_size_is_refused_with_the_command(runs, capsys):
    root, _ = runs
    assert main(_train_args(root, "ddp", "--resume")) == 2
    err = capsys.readouterr().err
    assert "trained on 2 process(es)" in err and "--nproc_per_node 2" in err and "this launch has 1" in err


def test_the_plain_trainer_refuses_a_step_sampled_run(runs):
    root, _ = runs
    from snakes_lib.presets import TrainConfig
    from snakes_lib.train import train
    saved = json.loads((root / "one" / "train_config.json").read_text())
    with pytest.raises(ValueError, match="--sampler step"):
        train(TrainConfig.from_dict(saved), resume=True)

"Chapter 10d: what stops a step from being recorded, the refusals before any work, and the checkpoint format."
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snakes_lib.graph_train import GraphedTrainer, graph_blockers
from snakes_lib.presets import TrainConfig
from snakes_lib.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fields, world, expected", [
    (dict(device="cpu"), 1, ["CUDA feature"]),
    (dict(device="cpu", compile=True), 1, ["CUDA feature", "--compile"]),
    (dict(device="cpu"), 4, ["CUDA feature", "4 processes"]),
])
def test_graph_blockers_name_each_reason(fields, world, expected):
    reasons = graph_blockers(TrainConfig(**fields), world_size=world)
    assert len(reasons) == len(expected) and all(e in r for e, r in zip(expected, reasons))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to see a device without blockers")
def test_graph_blockers_accept_bf16_on_cuda_and_refuse_fp16():
    assert graph_blockers(TrainConfig(device="cuda", precision="bf16")) == []
    assert "fp16" in graph_blockers(TrainConfig(device="cuda", precision="fp16"))[0]


def test_graphed_trainer_refuses_before_the_run_folder_exists(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="cannot record the training step as a CUDA graph.*CUDA feature"):
        GraphedTrainer(TrainConfig(device="cpu", out=str(out)))
    with pytest.raises(ValueError, match="cannot record"):
        train(TrainConfig(device="cpu", out=str(out), cuda_graph=True))     # train() picks the graphed trainer
    assert not out.exists()


def test_the_eager_trainer_does_not_ignore_cuda_graph(tmp_path):
    with pytest.raises(ValueError, match="GraphedTrainer"):
        Trainer(TrainConfig(device="cpu", cuda_graph=True, out=str(tmp_path / "run")))


def test_checkpoints_of_the_graphed_trainer_hold_plain_numbers():
    class Opt:
        def state_dict(self):
            return {"state": {0: {"step": torch.tensor(3.0)}},
                    "param_groups": [{"lr": torch.tensor(2e-3, dtype=torch.float64), "capturable": True, "params": [0]},
                                     {"lr": 1e-3, "capturable": False, "params": [1]}]}

    class Stub:
        model, optimizer = "model", Opt()
    model, sd = GraphedTrainer._saveable(Stub())
    assert model == "model" and sd["state"][0]["step"].item() == 3.0
    assert [(g["lr"], g["capturable"]) for g in sd["param_groups"]] == [(2e-3, False), (1e-3, False)]
    json.dumps(sd["param_groups"])


def test_cli_refuses_cuda_graph_on_cpu_with_a_clear_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "snakes_lib", "train", "--device", "cpu", "--cuda-graph", "--out",
                        str(tmp_path / "run"), "--max-steps", "1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "CUDA graphs are a CUDA feature" in r.stderr + r.stdout
    assert not (tmp_path / "run").exists()


def test_graph_train_benchmark_needs_cuda():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "graph_train.py"), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "needs --device cuda" in r.stderr

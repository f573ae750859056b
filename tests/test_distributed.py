"""Chapter 06e: torchrun's environment, each rank's data, and two CPU processes (gloo) training exactly what one
process trains, with DDP and with FSDP2."""
import pytest
import torch

from snakes_lib import distributed as D


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

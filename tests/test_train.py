"""The trainer (chapter 06): chunked cross-entropy, schedule, optimizer groups, checkpoints, exact resume,
NaN handling, tokenizer checks, clear errors. Every run here is a ~30k-parameter Mamba-2 on a tiny corpus."""
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from snakes_lib.presets import resolve_preset
from snakes_lib.runfolder import RunDirError
from snakes_lib.runs import CheckpointCorruptError, find_checkpoint, list_checkpoints, load_run, read_metrics, verify_checkpoint
from snakes_lib.optim import lr_at
from snakes_lib.train import NonFiniteLossError, Trainer, train

WORDS = ("the snake a girl named Maia found small red ball garden cat ran happy tree river sun moon "
         "slow quick under over and then she he it was is to in on").split()
MICRO = {"d_model": 32, "n_layer": 1, "d_state": 8, "headdim": 16, "chunk_size": 16}


def make_corpus(root: Path, n_docs: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(60, 120))]
        (root / f"doc_{i:03d}.txt").write_text(" ".join(words).capitalize() + ".\n")
    return root


def tiny_cfg(tmp_path: Path, name: str = "run", **kw):
    base = dict(out=str(tmp_path / name), data=[str(tmp_path / "corpus")], device="cpu", model_config=dict(MICRO),
                vocab_size=300, batch_size=4, seq_len=24, max_steps=8, warmup_steps=2, eval_every=4, eval_batches=2,
                checkpoint_every=4, progress=False, val_fraction=0.2, patience=0,
                cache_dir=str(tmp_path / "tokens"))
    base.update(kw)
    return resolve_preset("cpu", **base)


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


# ---- exact resume ------------------------------------------------------------------------------------------
def _losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir) if "train_loss" in r]


def _vals(run_dir):
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def _interrupt_at(step):
    def cb(trainer):
        if trainer.step == step:
            raise KeyboardInterrupt
    return cb


def test_resume_is_bit_for_bit(corpus, tmp_path):
    full = train(tiny_cfg(tmp_path, "full", max_steps=10))
    assert full.step == 10 and full.stop_reason == "max_steps"
    # interrupted (Ctrl-C) at step 6, between checkpoints, then resumed to the same max_steps
    part = Trainer(tiny_cfg(tmp_path, "cut", max_steps=10), callbacks=[_interrupt_at(6)]).fit()
    assert part.stop_reason == "interrupted" and part.step == 6
    assert find_checkpoint(tmp_path / "cut").name == "step_0000006"          # Ctrl-C saved a checkpoint
    with pytest.raises(RunDirError, match="--resume"):                        # no silent overwrite
        train(tiny_cfg(tmp_path, "cut", max_steps=10))
    rest = train(tiny_cfg(tmp_path, "cut", max_steps=10, resume=True))
    assert rest.step == 10
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")           # exact floats
    assert _vals(tmp_path / "cut") == _vals(tmp_path / "full")
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_steps_counts_across_resumes(corpus, tmp_path):
    full = train(tiny_cfg(tmp_path, "full", max_steps=9, lr_decay_steps=9))
    first = train(tiny_cfg(tmp_path, "two", max_steps=5, lr_decay_steps=9))
    assert first.step == 5
    second = train(tiny_cfg(tmp_path, "two", max_steps=9, resume=True))
    assert second.step == 9 and full.step == 9
    assert _losses(tmp_path / "two") == _losses(tmp_path / "full")
    again = train(tiny_cfg(tmp_path, "two", max_steps=9, resume=True))       # already there: no more steps
    assert again.step == 9 and len(_losses(tmp_path / "two")) == 9


# ---- checkpoints on disk -----------------------------------------------------------------------------------
def test_truncated_checkpoint_falls_back_to_previous(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path, "run", max_steps=8, keep_checkpoints=3))
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_0000004", "step_0000008"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        verify_checkpoint(ckpts[-1])
    with pytest.warns(UserWarning, match="corrupt"):
        assert find_checkpoint(run) == ckpts[0]
    with pytest.warns(UserWarning, match="corrupt"):
        res = train(tiny_cfg(tmp_path, "run", max_steps=8, resume=True))
    assert res.step == 8                                  # redid steps 5-8 from the good checkpoint
    # a half-written temp folder (crash while saving) is ignored
    (run / "checkpoints" / ".tmp-step_0000012-1").mkdir()
    assert find_checkpoint(run).name == "step_0000008"


def test_load_run_errors_and_fallback(corpus, tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="tokenizer.json"):
        load_run(tmp_path / "empty")
    res = train(tiny_cfg(tmp_path, "run", max_steps=4))
    model, tok = load_run(tmp_path / "run")
    assert not model.training and tok.fingerprint == res.tokenizer.fingerprint
    top = tmp_path / "run" / "model.safetensors"
    top.write_bytes(top.read_bytes()[:100])
    with pytest.warns(UserWarning, match="falling back"):
        model2, _ = load_run(tmp_path / "run")
    x = torch.randint(0, 200, (1, 9))
    ck_model = res.model.eval()
    assert torch.equal(model2(x), ck_model(x))            # the step-4 checkpoint is the final model here


# ---- failures ----------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    def poison(trainer):
        if trainer.step == 5:
            with torch.no_grad():
                trainer.model.backbone.norm_f.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"nan at step 6.*step_0000004"):
        Trainer(tiny_cfg(tmp_path, "nan", max_steps=10), callbacks=[poison]).fit()
    ckpts = list_checkpoints(tmp_path / "nan")
    assert [c.name for c in ckpts] == ["step_0000004"]
    verify_checkpoint(ckpts[0])
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert max(r["step"] for r in read_metrics(tmp_path / "nan")) == 5   # nothing logged for the bad step


def test_tokenizer_mismatch_on_resume(corpus, tmp_path):
    from snakes_lib.tokenizer import SnakesTokenizer, TokenizerMismatchError
    train(tiny_cfg(tmp_path, "run", max_steps=4))
    other = SnakesTokenizer.train(["completely different text " * 50, "zebra quartz " * 40], vocab_size=280)
    other.save(tmp_path / "run" / "tokenizer.json")
    with pytest.raises(TokenizerMismatchError):
        train(tiny_cfg(tmp_path, "run", max_steps=4, resume=True))


def test_empty_data_folder_is_a_clear_error(tmp_path):
    from snakes_lib.data import EmptyDataError
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDataError):
        train(tiny_cfg(tmp_path, "run", data=[str(tmp_path / "empty")]))
    with pytest.raises(EmptyDataError, match="not found"):
        train(tiny_cfg(tmp_path, "run2", data=[str(tmp_path / "missing")]))


def test_trains_from_a_hugging_face_dataset_spec(tmp_path):
    datasets = pytest.importorskip("datasets")
    make_corpus(tmp_path / "corpus")
    texts = [p.read_text() for p in sorted((tmp_path / "corpus").glob("*.txt"))]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hfds"))
    res = train(tiny_cfg(tmp_path, "run", data=[f"hf:{tmp_path / 'hfds'}"], max_steps=2, eval_every=0))
    assert res.step == 2 and math.isfinite(res.train_loss)


def test_resume_without_checkpoint_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(RunDirError, match="no finished checkpoint"):
        train(tiny_cfg(tmp_path, "run", resume=True))


def test_early_stopping_and_outputs(corpus, tmp_path):
    # a huge min_delta: no evaluation counts as an improvement after the first, so patience 2 stops at step 12
    res = train(tiny_cfg(tmp_path, "run", max_steps=40, patience=2, min_delta=100.0))
    assert res.stop_reason == "early_stopping" and res.step == 12
    assert res.best_step == 4
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "metrics.jsonl",
                 "loss.png", "export.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "export.json").read_text())["step"] == 4     # the best model is the exported one
    recs = read_metrics(run)
    assert all("step" in r and ("train_loss" in r or "val_loss" in r) for r in recs)
    assert math.isclose(recs[-1]["val_ppl"], math.exp(recs[-1]["val_loss"]), rel_tol=1e-9)


# ---- schedules and runs that can be extended ---------------------------------------------------------------
from snakes_lib.presets import ResumeConflictError, wsd_decay_start


def _lrs(run_dir):
    return [(r["step"], r["lr"]) for r in read_metrics(run_dir) if "lr" in r]


def test_wsd_extension_before_decay_is_bit_for_bit(corpus, tmp_path):
    full = train(tiny_cfg(tmp_path, "full", schedule="wsd", max_steps=10))
    # a shorter wsd run (decay from step 6 of 8) interrupted at step 5, then extended to 10
    Trainer(tiny_cfg(tmp_path, "ext", schedule="wsd", max_steps=8), callbacks=[_interrupt_at(5)]).fit()
    rest = train(tiny_cfg(tmp_path, "ext", schedule="wsd", max_steps=10, resume=True))
    assert rest.step == 10
    assert _losses(tmp_path / "ext") == _losses(tmp_path / "full") and _lrs(tmp_path / "ext") == _lrs(tmp_path / "full")
    assert _vals(tmp_path / "ext") == _vals(tmp_path / "full")
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_stop_at_pauses_without_changing_the_schedule(corpus, tmp_path, schedule):
    train(tiny_cfg(tmp_path, "full", schedule=schedule, max_steps=10))
    paused = train(tiny_cfg(tmp_path, "cut", schedule=schedule, max_steps=10, stop_at=6))
    assert paused.step == 6 and paused.stop_reason == "stop_at"
    assert find_checkpoint(tmp_path / "cut").name == "step_0000006"
    rest = train(tiny_cfg(tmp_path, "cut", schedule=schedule, max_steps=10, resume=True))
    assert rest.step == 10 and rest.stop_reason == "max_steps"
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full") and _lrs(tmp_path / "cut") == _lrs(tmp_path / "full")
    assert _vals(tmp_path / "cut") == _vals(tmp_path / "full")


def test_extending_past_the_schedule_is_refused_with_the_ways_out(corpus, tmp_path):
    train(tiny_cfg(tmp_path, "cos", max_steps=6))                                       # cosine, finished
    with pytest.raises(ResumeConflictError, match=r"--lr-decay-steps 6 .*--lr-decay-steps 9.*--schedule wsd"):
        train(tiny_cfg(tmp_path, "cos", max_steps=9, resume=True))
    on = train(tiny_cfg(tmp_path, "cos", max_steps=9, resume=True, lr_decay_steps=6))  # at the floor, as asked
    assert on.step == 9 and [lr for s, lr in _lrs(tmp_path / "cos") if s > 6] == [pytest.approx(3e-4)] * 3
    train(tiny_cfg(tmp_path, "w", schedule="wsd", max_steps=8))                         # finished: decayed
    with pytest.raises(ResumeConflictError, match="past step 6 where the decay starts"):
        train(tiny_cfg(tmp_path, "w", schedule="wsd", max_steps=10, resume=True))


@pytest.mark.parametrize("change", [dict(model_size="small"), dict(seq_len=32), dict(data=["elsewhere"]),
                                    dict(schedule="wsd"), dict(batch_size=2)])
def test_resume_with_another_identity_is_refused(corpus, tmp_path, change):
    train(tiny_cfg(tmp_path, "run", max_steps=4))
    flag = "--" + next(iter(change)).replace("_", "-")
    with pytest.raises(ResumeConflictError, match=f"{flag} .*the run has .*drop them"):
        train(tiny_cfg(tmp_path, "run", max_steps=6, lr_decay_steps=6, resume=True, **change))
    assert find_checkpoint(tmp_path / "run").name == "step_0000004"                    # nothing trained


def test_resume_with_a_new_lr_says_so_and_uses_it(corpus, tmp_path, capsys):
    train(tiny_cfg(tmp_path, "run", max_steps=4, lr_decay_steps=6))
    train(tiny_cfg(tmp_path, "run", max_steps=6, lr_decay_steps=6, lr=1e-3, min_lr=1e-4, resume=True))
    err = capsys.readouterr().err
    assert "--lr 0.001 replaces the run's 0.003 from step 5" in err and "--min-lr 0.0001" in err
    assert _lrs(tmp_path / "run")[-1] == (6, lr_at(5, 1e-3, 1e-4, 2, 6))


def test_packed_documents_are_read_alone_by_default_and_fixed_for_the_run(tmp_path):
    rng = random.Random(3)                                                   # short documents: every window holds several
    (tmp_path / "corpus").mkdir()
    for i in range(120):
        (tmp_path / "corpus" / f"d{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))))
    train(tiny_cfg(tmp_path, "on", max_steps=3, eval_every=0, checkpoint_every=3))
    train(tiny_cfg(tmp_path, "off", max_steps=3, eval_every=0, checkpoint_every=3, doc_reset=False, lr_decay_steps=10))
    state = json.loads((find_checkpoint(tmp_path / "on") / "trainer_state.json").read_text())
    assert state["config"]["doc_reset"] is True                              # a new run reads each document alone
    assert _losses(tmp_path / "on")[0] != _losses(tmp_path / "off")[0]      # and that changes the loss
    with pytest.raises(ValueError, match="--doc-reset"):                    # fixed when the run started
        train(tiny_cfg(tmp_path, "off", max_steps=4, resume=True, doc_reset=True))
    assert train(tiny_cfg(tmp_path, "off", max_steps=4, resume=True)).step == 4

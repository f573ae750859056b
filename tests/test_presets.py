"""VRAM presets and model sizes (chapter 06)."""
import dataclasses

import pytest
import torch

from snakes_lib.presets import (MODEL_SIZES, PRESET_NAMES, REFERENCE_VOCAB, SIZE_TARGETS, VRAM_PRESETS, TrainConfig,
                                count_parameters, detect_device, estimate_memory, pick_preset, resolve_precision,
                                resolve_preset)


@pytest.mark.parametrize("name", list(VRAM_PRESETS))
def test_every_preset_resolves(name):
    cfg = resolve_preset(name, device="cpu")
    assert cfg.preset == name and cfg.model_size in MODEL_SIZES
    assert cfg.batch_size >= 1 and cfg.grad_accum >= 1 and cfg.seq_len >= 16
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg                      # JSON-able round trip
    if name != "cpu":
        assert cfg.activation_checkpointing and cfg.chunked_ce


def test_overrides_win_and_none_is_ignored():
    cfg = resolve_preset("8gb", device="cpu", batch_size=3, seq_len=77, model_size="tiny", max_steps=None,
                         activation_checkpointing=False)
    assert (cfg.batch_size, cfg.seq_len, cfg.model_size, cfg.activation_checkpointing) == (3, 77, "tiny", False)
    assert cfg.max_steps == resolve_preset("8gb", device="cpu").max_steps
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset("9gb")
    with pytest.raises(ValueError, match="unknown model size"):
        resolve_preset("cpu", model_size="huge")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        resolve_preset("cpu", batchsize=3)


def test_auto_without_gpu_picks_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert detect_device() == "cpu"
    cfg = resolve_preset("auto")
    assert cfg.preset == "cpu" and cfg.model_size == "tiny"
    assert resolve_precision("auto", "cpu") == "fp32"


def test_pick_preset_by_memory():
    assert pick_preset(None) == "cpu"
    assert pick_preset(4.0) == "cpu"
    assert pick_preset(7.6) == "8gb"                  # an "8 GB" card reports ~7.6 GiB
    assert pick_preset(23.6) == "24gb"
    assert pick_preset(79.1) == "80gb"
    assert pick_preset(139.8) == "80gb"
    assert PRESET_NAMES[-1] == "auto"


def test_analytic_count_matches_the_real_model():
    from snakes_lib.model import Mamba2Config, Mamba2LM
    for name in ("tiny", "ys-71m"):
        s = MODEL_SIZES[name]
        fields = {k: v for k, v in dataclasses.asdict(s).items() if k != "target"}
        vocab = 28590 if name == "ys-71m" else 2048
        with torch.device("meta"):
            m = Mamba2LM(Mamba2Config(vocab_size=vocab, **fields))
        assert m.num_parameters() == count_parameters(s, vocab), name


@pytest.mark.parametrize("name", list(SIZE_TARGETS))
def test_sizes_near_their_targets(name):
    vocab = 28590 if name == "ys-71m" else REFERENCE_VOCAB
    n = count_parameters(name, vocab)
    assert abs(n / SIZE_TARGETS[name] - 1) < 0.15, (name, n)
    assert count_parameters("tiny", 2048) < 2e6


def test_memory_estimate_orders():
    kw = dict(vocab_size=28590, batch_size=64, seq_len=128, precision="bf16")
    plain = estimate_memory("ys-71m", **kw)
    lean = estimate_memory("ys-71m", activation_checkpointing=True, chunked_ce=True, **kw)
    assert set(plain) >= {"parameters", "gradients", "optimizer", "activations", "logits"}
    assert lean["activations"] < plain["activations"] / 4 and lean["logits"] < plain["logits"] / 4
    assert lean["parameters"] == plain["parameters"]

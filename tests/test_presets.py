"""VRAM presets and model sizes (chapter 06)."""
import dataclasses

import pytest
import torch

from snakes_lib.presets import (MODEL_SIZES, NO_CKPT_MAX_FRACTION, PRESET_NAMES, REFERENCE_VOCAB, SIZE_TARGETS,
                                VRAM_PRESETS, ModelSize, TrainConfig, count_parameters, detect_device, estimate_memory,
                                pick_preset, resolve_precision, resolve_preset, saved_tensor_bytes, triton_block_bytes)


@pytest.mark.parametrize("name", list(VRAM_PRESETS))
def test_every_preset_resolves(name):
    cfg = resolve_preset(name, device="cpu")
    assert cfg.preset == name and cfg.model_size in MODEL_SIZES
    assert cfg.batch_size >= 1 and cfg.grad_accum >= 1 and cfg.seq_len >= 16
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg                      # JSON-able round trip
    if name != "cpu":
        assert cfg.chunked_ce


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


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_memory_estimate_orders(kernels):
    kw = dict(vocab_size=28590, batch_size=64, seq_len=128, precision="bf16", kernels=kernels)
    plain = estimate_memory("ys-71m", **kw)
    lean = estimate_memory("ys-71m", activation_checkpointing=True, chunked_ce=True, **kw)
    assert set(plain) >= {"parameters", "gradients", "optimizer", "activations", "logits"}
    assert lean["activations"] < plain["activations"] / (4 if kernels == "torch" else 3)
    assert lean["logits"] < plain["logits"] / 4 and lean["parameters"] == plain["parameters"]
    assert plain["total"] == sum(v for k, v in plain.items() if k != "total")


def test_cpu_preset_and_cpu_estimate_unchanged():
    cfg = resolve_preset("cpu", device="cpu")
    assert (cfg.model_size, cfg.batch_size, cfg.grad_accum, cfg.seq_len, cfg.activation_checkpointing, cfg.chunked_ce,
            cfg.vocab_size, cfg.lr) == ("tiny", 16, 1, 128, False, False, 2048, 3e-3)
    for size, prec in (("tiny", "fp32"), ("ys-71m", "bf16")):           # a CPU runs chapter 05's PyTorch path
        kw = dict(vocab_size=28590, batch_size=64, seq_len=128, precision=prec, chunked_ce=True)
        assert estimate_memory(size, device="cpu", **kw) == estimate_memory(size, kernels="torch", **kw)
    assert round(estimate_memory("ys-71m", 28590, 64, 128, kernels="torch")["total"] / 2**30, 1) == 10.5


def test_kernels_auto_follows_the_model():
    kw = dict(vocab_size=8192, batch_size=8, seq_len=512)
    assert estimate_memory("medium", **kw) == estimate_memory("medium", kernels="triton", **kw)       # default: CUDA
    assert estimate_memory("medium", device="cuda:1", **kw) == estimate_memory("medium", kernels="triton", **kw)
    assert estimate_memory("medium", kernels="triton", **kw)["total"] < estimate_memory("medium", kernels="torch", **kw)["total"]
    wide = ModelSize(d_model=512, n_layer=2, headdim=256)              # headdim > 128: the model falls back to PyTorch
    assert estimate_memory(wide, **kw) == estimate_memory(wide, kernels="torch", **kw)
    with pytest.raises(ValueError, match="Triton kernels cannot run"):
        estimate_memory(wide, kernels="triton", **kw)
    with pytest.raises(ValueError, match="kernels must be"):
        estimate_memory("medium", kernels="cuda", **kw)


@pytest.mark.parametrize("name", [n for n, p in VRAM_PRESETS.items() if p.budget_gb])
def test_gpu_presets_checkpoint_only_when_the_fast_estimate_needs_it(name):
    p = VRAM_PRESETS[name]
    kw = dict(vocab_size=p.vocab_size, batch_size=p.batch_size, seq_len=p.seq_len, chunked_ce=p.chunked_ce)
    without = estimate_memory(p.model_size, **kw)["total"] / 2**30
    as_set = estimate_memory(p.model_size, activation_checkpointing=p.activation_checkpointing, **kw)["total"] / 2**30
    assert p.activation_checkpointing == (without > NO_CKPT_MAX_FRACTION * p.budget_gb)
    assert as_set <= NO_CKPT_MAX_FRACTION * p.budget_gb
    assert pick_preset(p.budget_gb * 0.95) == name                   # each budget still picks its own preset


def test_fast_estimate_matches_the_h200_measurements():
    import json
    from pathlib import Path
    rows = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/memory_cuda.json").read_text())["rows"]
    rows = [r for r in rows if not r.get("recompute_ssd") and "peak_allocated_gb" in r]
    assert len(rows) >= 5
    for r in rows:
        est = estimate_memory(r["size"], r["vocab"], r["batch"], r["seq_len"], r["precision"], r["ckpt"],
                              r["chunked_ce"], kernels="triton")["total"] / 2**30
        assert abs(est / r["peak_allocated_gb"] - 1) < 0.2, (r["name"], est, r["peak_allocated_gb"])


def _can_run_triton():
    import importlib.util
    import os
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _can_run_triton(), reason="needs triton, and a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_block_bytes_is_what_one_block_saves(seed):
    from snakes_lib.model import Mamba2Block, Mamba2Config
    gen = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]
    ngroups, headdim = pick([1, 2]), pick([8, 16])
    s = ModelSize(d_model=pick([16, 24, 32]), n_layer=1, d_state=pick([4, 8]), headdim=headdim, ngroups=ngroups,
                  chunk_size=16, expand=2)
    b, L = pick([1, 2]), int(torch.randint(3, 40, (1,), generator=gen))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    block = Mamba2Block(Mamba2Config(vocab_size=32, **dataclasses.asdict(s))).to(dev).train()
    block.mixer.kernels = "triton"
    h = torch.randn(b, L, s.d_model, device=dev, requires_grad=True)
    _, saved = saved_tensor_bytes(lambda: block(h), block.parameters())
    # per layer, not per token: exp(A_log) and A (nheads float32 each)
    assert saved == b * L * triton_block_bytes(s, "fp32") + 2 * 4 * block.mixer.nheads, (s, b, L)
    assert triton_block_bytes(s, "bf16") < triton_block_bytes(s, "fp32")

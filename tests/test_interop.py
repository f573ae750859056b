"""Folders other libraries load (snakes_lib.interop, chapter 05c): transformers loads the hf folder, the official
folder has what mamba_ssm's loader requires, snakes reads all three back, `snakes export` publishes atomically."""
import json
import logging
import os

import pytest
import torch

from snakes_lib import cli
from snakes_lib.generate import generate
from snakes_lib.interop import (EXPORT_MARKER, FOLDER_FORMATS, OFFICIAL_CONFIG_KEYS, export_run,
                                official_config, save_folder)
from snakes_lib.model import Mamba2Config, Mamba2LM, load_model
from snakes_lib.runfolder import RunDirError
from snakes_lib.runs import export_model
from snakes_lib.tokenizer import SnakesTokenizer

TEXT = "Once upon a time there was a snake. It read the papers, every one of them! "


@pytest.fixture(scope="module")
def tok():
    return SnakesTokenizer.train([TEXT] * 30, vocab_size=300)


def make_model(tok, tie=True, ngroups=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=tok.vocab_size, d_state=8, headdim=8, ngroups=ngroups,
                       chunk_size=8, tie_embeddings=tie, **kw)
    m = Mamba2LM(cfg).eval()
    with torch.no_grad():                       # every weight off its init value, so that each one matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert cfg.padded_vocab_size > cfg.vocab_size     # the vocabulary padding is exercised
    return m


def ids_of(tok, text="Once upon a time there was a snake."):
    return torch.tensor([tok.encode(text)])


# -- the official folder: what mamba_ssm's MambaLMHeadModel.from_pretrained needs ----------------------------------
# mamba_ssm/models/config_mamba.py: the loader calls MambaConfig(**json.load(config.json))
MAMBA_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                       "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
# keyword arguments of mamba_ssm.modules.mamba2.Mamba2 (plus "layer", which create_block pops)
MAMBA2_MIXER_ARGS = {"layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
                     "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit",
                     "bias", "conv_bias", "chunk_size", "use_mem_eff_path"}


def official_shapes(c: dict) -> dict:
    "Parameter names and shapes of mamba_ssm's MambaLMHeadModel with a Mamba2 mixer, from its config.json alone."
    s, d, m = c["ssm_cfg"], c["d_model"], c["pad_vocab_size_multiple"]
    vocab = -(-c["vocab_size"] // m) * m
    d_inner = s["expand"] * d
    nheads, gn = d_inner // s["headdim"], s["ngroups"] * s["d_state"]
    conv_dim = d_inner + 2 * gn
    shapes = {"backbone.embedding.weight": (vocab, d), "backbone.norm_f.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(c["n_layer"]):
        p = f"backbone.layers.{i}."
        shapes.update({p + "norm.weight": (d,), p + "mixer.in_proj.weight": (2 * d_inner + 2 * gn + nheads, d),
                       p + "mixer.conv1d.weight": (conv_dim, 1, s["d_conv"]), p + "mixer.conv1d.bias": (conv_dim,),
                       p + "mixer.dt_bias": (nheads,), p + "mixer.A_log": (nheads,), p + "mixer.D": (nheads,),
                       p + "mixer.norm.weight": (d_inner,), p + "mixer.out_proj.weight": (d, d_inner)})
    return shapes


@pytest.mark.parametrize("tie", [True, False])
def test_official_folder_has_what_mamba_ssm_reads(tmp_path, tok, tie):
    model = make_model(tok, tie=tie)
    model.save_pretrained(tmp_path, format="official")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config) == MAMBA_CONFIG_FIELDS == set(OFFICIAL_CONFIG_KEYS)
    assert config["ssm_cfg"]["layer"] == "Mamba2" and set(config["ssm_cfg"]) <= MAMBA2_MIXER_ARGS
    assert config["d_intermediate"] == 0 and config["attn_layer_idx"] == [] and config["tie_embeddings"] == tie
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)     # tensors only: no code runs
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(config)   # lm_head.weight even when tied
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(Mamba2LM.from_pretrained(tmp_path)(ids), model(ids))


def test_official_refuses_what_its_config_cannot_say(tmp_path, tok):
    model = make_model(tok, norm_eps=1e-6)
    with pytest.raises(ValueError, match=r"norm_eps=1e-06 .*mamba_ssm fixes"):
        model.save_pretrained(tmp_path / "o", format="official")
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
    assert official_config(make_model(tok).config)["fused_add_norm"] is True


# -- the hf folder: transformers loads it --------------------------------------------------------------------------
transformers_or_skip = pytest.importorskip


@pytest.mark.parametrize("tie, ngroups", [(True, 2), (False, 1)])
def test_hf_folder_loads_in_transformers(tmp_path, tok, tie, ngroups):
    transformers = transformers_or_skip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = make_model(tok, tie=tie, ngroups=ngroups)
    model.save_pretrained(tmp_path, format="hf", tokenizer=tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Mamba2ForCausalLM" and hf.config.num_hidden_layers == 2
    assert hf.config.eos_token_id == tok.eos_id and hf.config.pad_token_id == tok.pad_id
    ids = ids_of(tok)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.shape == ours.shape                   # the padding rows were cut: same vocabulary
    assert (theirs - ours).abs().max().item() <= 1e-5
    # greedy generation: the same new tokens as snakes' generate
    g = generate(model, tok, "Once upon a time", max_new_tokens=16, temperature=0, return_details=True)
    prompt = ids_of(tok, "Once upon a time")
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    new = out[0, prompt.shape[1]:].tolist()
    assert new[:len(g.token_ids)] == g.token_ids and len(g.token_ids) > 0
    if g.finish_reason == "length":
        assert len(new) == len(g.token_ids)


def test_hf_tokenizer_round_trips(tmp_path, tok):
    transformers = transformers_or_skip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    make_model(tok).save_pretrained(tmp_path, format="hf", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eos_id, tok.pad_id)
    for text in ["", TEXT, "  two  spaces , and a tab\t!", "snakes 🐍 ünïcödé", "a<|endoftext|>b"]:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids and hf_tok.encode(text) == ids
        assert hf_tok.decode(ids) == text


def test_hf_config_is_read_by_transformers_not_defaulted(tmp_path, tok):
    transformers = transformers_or_skip("transformers")
    model = make_model(tok)
    save_folder(model, tmp_path, "hf")
    hc = transformers.AutoConfig.from_pretrained(tmp_path)
    c = model.config
    assert (hc.hidden_size, hc.num_hidden_layers, hc.num_heads, hc.head_dim, hc.state_size, hc.n_groups,
            hc.conv_kernel, hc.expand, hc.chunk_size, hc.vocab_size, hc.tie_word_embeddings, hc.layer_norm_epsilon,
            hc.hidden_act, hc.use_bias, hc.use_conv_bias, hc.residual_in_fp32, hc.architectures) == (
        c.d_model, c.n_layer, c.nheads, c.headdim, c.d_state, c.ngroups, c.d_conv, c.expand, c.chunk_size,
        c.vocab_size, c.tie_embeddings, c.norm_eps, "silu", False, True, c.residual_in_fp32, ["Mamba2ForCausalLM"])
    assert hc.rescale_prenorm_residual is False        # transformers applies it to loaded weights too


def test_hf_refuses_layernorm_between_blocks(tmp_path, tok):
    with pytest.raises(ValueError, match="rms_norm=False"):
        save_folder(make_model(tok, rms_norm=False), tmp_path, "hf")


# -- snakes reads all three back ------------------------------------------------------------------------------------
def test_every_format_reads_back(tmp_path, tok):
    model = make_model(tok)
    ids = ids_of(tok)
    with torch.no_grad():
        ref = model(ids)
        for fmt in FOLDER_FORMATS:
            model.save_pretrained(tmp_path / fmt, format=fmt)
            back = Mamba2LM.from_pretrained(tmp_path / fmt)(ids)
            assert isinstance(load_model(tmp_path / fmt), Mamba2LM)      # the registry (load_run) reads it too
            if fmt == "hf":       # a head of vocab_size rows instead of the padded count rounds the last bits apart
                assert (back - ref).abs().max().item() <= 1e-6
            else:
                assert torch.equal(back, ref)


def test_default_format_is_unchanged(tmp_path, tok):
    model = make_model(tok)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mamba2"


def test_unknown_format_and_weights_of_another_layout(tmp_path, tok):
    model = make_model(tok)
    with pytest.raises(ValueError, match="format='onnx' is unknown"):
        model.save_pretrained(tmp_path, format="onnx")
    model.save_pretrained(tmp_path)                                   # model.safetensors, read first by a loader
    other = make_model(tok, seed=1)
    other.save_pretrained(tmp_path, format="official")
    assert not (tmp_path / "model.safetensors").exists()              # else snakes would load the stale weights
    ids = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(Mamba2LM.from_pretrained(tmp_path)(ids), other(ids))


def test_only_mamba2_models(tmp_path):
    with pytest.raises(ValueError, match="only Mamba-2 models"):
        save_folder(torch.nn.Linear(2, 2), tmp_path, "hf")


# -- an HF config that describes another network is refused, naming the field ---------------------------------------
def hf_dict(**kw):
    return {"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, "state_size": 8,
            "expand": 2, "head_dim": 8, "num_heads": 8, "n_groups": 2, "chunk_size": 8, "hidden_act": "silu",
            "use_bias": False, "use_conv_bias": True, "time_step_limit": [0.0, {"__float__": "Infinity"}], **kw}


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("hidden_act", "relu"), ("use_bias", True),
                                          ("use_conv_bias", False), ("model_type", "mamba"),
                                          ("time_step_limit", [0.0, 0.1]), ("time_step_limit", [0.01, 1e30]),
                                          ("num_heads", 4)])
def test_hf_config_fields_snakes_does_not_build_are_refused(field, value):
    Mamba2Config.from_dict(hf_dict())                                 # the base config is fine
    with pytest.raises(ValueError, match=field) as e:
        Mamba2Config.from_dict(hf_dict(**{field: value}))
    assert repr(value)[:6] in str(e.value) or str(value)[:6] in str(e.value)


# Every field of transformers' Mamba2Config, sorted by what snakes does with it. A field added by a new transformers
# release fails this test until someone decides which group it belongs to.
HF_READ = {"hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel", "expand", "head_dim",
           "n_groups", "chunk_size", "residual_in_fp32", "tie_word_embeddings", "layer_norm_epsilon", "time_step_min",
           "time_step_max", "time_step_floor"}
HF_CHECKED = {"num_heads", "hidden_act", "use_bias", "use_conv_bias", "time_step_limit"}   # refused unless ours
HF_INERT = {"initializer_range", "rescale_prenorm_residual", "time_step_rank",   # init only / unused by Mamba-2
            "use_cache", "bos_token_id", "eos_token_id", "pad_token_id"}           # runtime and token settings


def test_every_transformers_mamba2_field_is_read_refused_or_inert():
    transformers = transformers_or_skip("transformers")
    fields = set(transformers.Mamba2Config.__annotations__)
    assert fields == HF_READ | HF_CHECKED | HF_INERT, f"unclassified: {sorted(fields - HF_READ - HF_CHECKED - HF_INERT)}"
    other = {"hidden_size": {"hidden_size": 48, "num_heads": 12}, "num_hidden_layers": 3, "vocab_size": 65,
             "state_size": 16, "conv_kernel": 3, "expand": {"expand": 4, "num_heads": 16},
             "head_dim": {"head_dim": 16, "num_heads": 4}, "n_groups": 4, "chunk_size": 16, "residual_in_fp32": False,
             "tie_word_embeddings": True, "layer_norm_epsilon": 1e-6, "time_step_min": 1e-4, "time_step_max": 0.2,
             "time_step_floor": 1e-5}
    assert set(other) == HF_READ
    base = Mamba2Config.from_dict(hf_dict())
    for k, v in other.items():                        # each read field reaches the config snakes builds
        assert Mamba2Config.from_dict(hf_dict(**(v if isinstance(v, dict) else {k: v}))) != base, k
    for k, v in {"initializer_range": 0.5, "rescale_prenorm_residual": True, "time_step_rank": 7, "use_cache": False,
                 "bos_token_id": 5, "eos_token_id": 6, "pad_token_id": 7}.items():
        assert Mamba2Config.from_dict(hf_dict(**{k: v})).d_model == 32, k      # inert: read without complaint


def test_hf_config_from_transformers_defaults_is_read(tok):
    transformers = transformers_or_skip("transformers")
    d = transformers.Mamba2Config(hidden_size=32, num_hidden_layers=1, num_heads=8, head_dim=8, n_groups=1).to_dict()
    assert Mamba2Config.from_dict(d).nheads == 8
    d = transformers.Mamba2Config(hidden_size=32, num_hidden_layers=1, num_heads=8, head_dim=8, n_groups=1,
                                  hidden_act="gelu").to_dict()
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        Mamba2Config.from_dict(d)


# -- snakes export --------------------------------------------------------------------------------------------------
@pytest.fixture()
def run(tmp_path, tok):
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run)
    export_model(make_model(tok), run, "mamba2", info={"step": 0})
    return run


@pytest.mark.parametrize("fmt", ["hf", "official"])
def test_export_command(tmp_path, tok, run, fmt, capsys):
    out = tmp_path / "exports" / "m"
    assert cli.main(["export", "--run", str(run), "--format", fmt, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / EXPORT_MARKER).read_text())["format"] == fmt
    assert (out / "tokenizer.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["m"]           # no temp folder left beside it
    ids = ids_of(tok)
    with torch.no_grad():
        assert (Mamba2LM.from_pretrained(out)(ids) - make_model(tok)(ids)).abs().max().item() <= 1e-6


def test_export_replaces_its_own_export_and_refuses_other_folders(tmp_path, run, capsys):
    out = tmp_path / "m"
    export_run(run, out, "hf")
    export_run(run, out, "official")                                   # ours: replaced whole
    assert not (out / "model.safetensors").exists() and (out / "pytorch_model.bin").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for target in (mine, run):                                         # a foreign folder, the run itself
        before = sorted(os.listdir(target))
        assert cli.main(["export", "--run", str(run), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert "snakes export: error:" in err and str(target) in err and "not empty" in err
        assert sorted(os.listdir(target)) == before
    assert (mine / "notes.txt").read_text() == "keep me"
    assert cli.main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_export_is_atomic(tmp_path, run, monkeypatch):
    from snakes_lib import interop
    out = tmp_path / "m"
    export_run(run, out, "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_then_fail(model, directory, *a, **k):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(interop, "save_folder", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export_run(run, out, "official")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # the earlier export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "run"]  # and no temp folder
    with pytest.raises(OSError):
        export_run(run, tmp_path / "new", "hf")
    assert not (tmp_path / "new").exists()


def test_exported_hf_folder_continues_like_snakes_generate(tmp_path, run, capsys):
    transformers = transformers_or_skip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = tmp_path / "hf"
    assert cli.main(["export", "--run", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    prompt = "Once upon a time"
    assert cli.main(["generate", "--run", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
                     "--device", "cpu"]) == 0
    ours = capsys.readouterr().out[:-1]                               # the continuation, then a newline
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    enc = hf_tok(prompt, return_tensors="pt")
    new = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:]
    theirs = hf_tok.decode(new)
    assert ours and theirs in (ours, ours + hf_tok.eos_token)          # transformers keeps the end-of-text token


def test_export_is_listed_by_snakes_help():
    assert "export" in cli.build_parser().format_help()


def test_export_on_a_full_disk_says_so(tmp_path, run, monkeypatch, capsys):
    import errno
    from snakes_lib import interop

    def full(model, directory, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.safetensors"))
    monkeypatch.setattr(interop, "save_folder", full)
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk" in err and "was not changed" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_model_module_alone_saves_and_loads(tmp_path):
    """`from snakes_lib.model import Mamba2LM` is enough for save_pretrained / from_pretrained: the file code lives in
    snakes_lib.interop, which imports the model module, so the model imports it only when a method is called."""
    import subprocess
    import sys
    code = (
        "import sys, torch\n"
        "from snakes_lib.model import Mamba2Config, Mamba2LM\n"
        "assert 'snakes_lib.interop' not in sys.modules\n"
        "m = Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=50, d_state=8, headdim=16)).eval()\n"
        f"m.save_pretrained({str(tmp_path)!r})\n"
        f"m2 = Mamba2LM.from_pretrained({str(tmp_path)!r})\n"
        "ids = torch.randint(0, 50, (2, 7))\n"
        "assert torch.equal(m(ids), m2(ids))\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]

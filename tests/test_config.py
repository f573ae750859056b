"""Tests for snakes_lib.config (chapter 05a): Mamba2Config's layouts and refusals, the count on paper, the registry."""
import json

import pytest

from snakes_lib.config import MODEL_TYPES, Mamba2Config, build_model, load_model, mamba2_num_parameters, model_class


def tiny(**kw):
    base = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, ngroups=1, chunk_size=8)
    base.update(kw)
    return Mamba2Config(**base)


# -- config ---------------------------------------------------------------------------------------------------------
def test_config_json_round_trip_and_official_layout():
    c = tiny(ngroups=2, A_init_range=(2, 8), tie_embeddings=False)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["model_type"] == "mamba2"
    assert Mamba2Config.from_dict(d) == c
    off = json.loads(json.dumps(c.to_official_dict()))
    assert off["ssm_cfg"]["layer"] == "Mamba2" and off["ssm_cfg"]["d_state"] == 8
    assert Mamba2Config.from_dict(off) == c


def test_config_derived_sizes_and_vocab_padding():
    c = tiny(vocab_size=50, pad_vocab_size_multiple=16)
    assert (c.d_inner, c.nheads, c.conv_dim) == (64, 8, 64 + 16)
    assert c.d_in_proj == 2 * 64 + 2 * 8 + 8
    assert c.padded_vocab_size == 64


@pytest.mark.parametrize("kw, msg", [(dict(headdim=12), "multiple of headdim"),
                                     (dict(ngroups=3), "multiple of ngroups"),
                                     (dict(d_model=0), "positive integer"),
                                     (dict(A_init_range=(0, 1)), "A_init_range")])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


def test_config_rejects_unknown_and_unsupported_fields():
    with pytest.raises(ValueError, match="unknown"):
        Mamba2Config.from_dict({**tiny().to_dict(), "d_fancy": 3})
    off = tiny().to_official_dict()
    off["ssm_cfg"]["norm_before_gate"] = True
    with pytest.raises(ValueError, match="norm_before_gate"):
        Mamba2Config.from_dict(off)
    with pytest.raises(ValueError, match="d_intermediate"):
        Mamba2Config.from_dict({**tiny().to_official_dict(), "d_intermediate": 128})
    with pytest.raises(ValueError, match="model_type"):
        Mamba2Config.from_dict({**tiny().to_dict(), "model_type": "transformer"})


def test_hf_layout_round_trip_and_refusals():
    c = tiny(ngroups=2, tie_embeddings=False)
    hf = c.to_hf_dict()
    assert Mamba2Config.from_dict(hf).to_hf_dict() == hf                      # from_dict recognises the HF layout
    for bad in ({"hidden_act": "gelu"}, {"use_bias": True}, {"num_heads": 3}, {"time_step_limit": [0.01, 1.0]}):
        with pytest.raises(ValueError):
            Mamba2Config.from_hf_dict({**hf, **bad})


def test_num_parameters_equals_the_built_model():
    for c in (tiny(), tiny(ngroups=2, tie_embeddings=False, rms_norm=False), tiny(vocab_size=1000)):
        m = build_model("mamba2", c.to_dict())
        assert type(m).__name__ == "Mamba2LM"
        assert mamba2_num_parameters(c) == m.num_parameters(exclude_embedding=True)
        assert mamba2_num_parameters(c.to_dict(), exclude_embedding=False) == m.num_parameters()


def test_registry_names_classes_lazily_and_refuses_unknown_types(tmp_path):
    assert isinstance(MODEL_TYPES["transformer"], str) or MODEL_TYPES["transformer"].__name__ == "TransformerLM"
    assert model_class("mamba2").__name__ == "Mamba2LM"
    with pytest.raises(ValueError, match="unknown model_type"):
        model_class("rwkv")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    with pytest.raises(ValueError, match="model_type='rwkv'"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nothing")

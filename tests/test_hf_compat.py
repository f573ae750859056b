"""Weight compatibility with transformers' Mamba2ForCausalLM (a test-only dependency), both directions."""
import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

from snakes_lib.interop import hf_to_snakes_state_dict, snakes_to_hf_state_dict  # noqa: E402
from snakes_lib.model import Mamba2Config, Mamba2LM, load_model  # noqa: E402


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_model(ngroups, tie, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Mamba2Config(hidden_size=32, num_hidden_layers=2, vocab_size=40, state_size=8, conv_kernel=4,
                                    expand=2, head_dim=8, num_heads=8, n_groups=ngroups, chunk_size=8,
                                    tie_word_embeddings=tie, layer_norm_epsilon=1e-5, use_cache=False)
    m = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # move every weight off its init value so that each one matters
        for name, p in m.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16)))
            elif name.endswith("dt_bias"):
                p.copy_(torch.empty_like(p).uniform_(-6, -2))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("ngroups, tie", [(1, False), (2, True)])
def test_hf_weights_into_snakes(tmp_path, ngroups, tie):
    hf = hf_model(ngroups, tie)
    hf.save_pretrained(tmp_path)
    ours = Mamba2LM.from_pretrained(tmp_path)                  # reads transformers' config.json and key names
    assert ours.config.ngroups == ngroups and ours.config.tie_embeddings == tie
    ids = torch.randint(0, 40, (2, 21))                       # 21 is not a multiple of chunk_size 8
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert rel(ours(ids), ref) <= 1e-4
        # and the recurrent path of ours against HF's parallel logits
        cache = ours.allocate_inference_cache(2)
        out = [ours(ids[:, :13], cache=cache)] + [ours.step(ids[:, t], cache)[:, None] for t in range(13, 21)]
        assert rel(torch.cat(out, 1), ref) <= 1e-4
    assert isinstance(load_model(tmp_path), Mamba2LM)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_snakes_weights_into_hf(ngroups):
    torch.manual_seed(1)
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=37, d_state=8, headdim=8, ngroups=ngroups, chunk_size=8,
                       pad_vocab_size_multiple=8, tie_embeddings=False)
    ours = Mamba2LM(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg.to_hf_dict())).eval()
    missing, unexpected = hf.load_state_dict(snakes_to_hf_state_dict(ours.state_dict()), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, 37, (3, 19))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits[..., :37]
        assert rel(ours(ids), ref) <= 1e-4


def test_state_dict_renaming_round_trip():
    sd = Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=16, d_state=8, headdim=8, chunk_size=8)).state_dict()
    hf_sd = snakes_to_hf_state_dict(sd)
    assert "backbone.embeddings.weight" in hf_sd and "backbone.embedding.weight" not in hf_sd
    assert hf_to_snakes_state_dict(hf_sd).keys() == sd.keys()


def test_hf_config_translation_round_trip(tmp_path):
    cfg = Mamba2Config(d_model=48, n_layer=3, vocab_size=64, d_state=16, headdim=12, ngroups=4, chunk_size=16,
                       pad_vocab_size_multiple=1, tie_embeddings=False)
    hf_cfg = transformers.Mamba2Config(**cfg.to_hf_dict())
    hf_cfg.save_pretrained(tmp_path)
    back = Mamba2Config.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert back == cfg

"""benchmarks/op_overhead.py (chapter 09's claim that a custom op costs host time per eager call): the script runs."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the eager path is snakes_lib.ssd_triton's eager_autograd (needs triton)")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PATHS = {"custom_op", "eager_autograd", "Function with setup_context", "aten"}


def _script():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_op_overhead", BENCH / "op_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "op.json"
    assert _script().main(["--quick", "--calls", "3", "--blocks", "3", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {(r["path"], r["mode"]) for r in doc["rows"]} == {(p, m) for p in PATHS for m in ("forward", "forward+backward")}
    assert all(0 < r["p10_us"] <= r["median_us"] <= r["p90_us"] for r in doc["rows"])
    assert doc["device"] and doc["device_type"] == "cpu" and doc["quick"] and doc["calls_per_block"] == 3
    assert set(doc["custom_op_extra_us"]) == {"forward", "forward+backward"}
    printed = capsys.readouterr().out
    assert "| custom_op |" in printed and "wrote" in printed


def test_the_paths_compute_the_same_norm():
    mod = _script()
    g = torch.Generator().manual_seed(1)
    ins = [torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    ins.append(torch.rand(8, generator=g, dtype=torch.float64) + 0.5)
    paths = mod.make_paths()
    assert set(paths) == PATHS
    mod.check_agree(paths, ins, 1e-10)                    # raises SystemExit on a disagreement
    leaves = [t.clone().requires_grad_() for t in ins]    # the hand-written backward against autograd's
    o, _ = mod.norm_fwd(*leaves)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    o.backward(do)
    rstd = torch.rsqrt((ins[0] * torch.nn.functional.silu(ins[1])).square().mean(-1, keepdim=True) + mod.EPS)
    for got, want in zip(mod.norm_bwd(do, *ins, rstd), leaves):
        assert torch.allclose(got, want.grad, atol=1e-12)
    bad = dict(paths, wrong=lambda y, z, w: mod.norm_aten(y, z, w) * 1.001)
    with pytest.raises(SystemExit, match="wrong disagrees"):
        mod.check_agree(bad, ins, 1e-10)


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        _script().main(["--calls", "0", "--out", "/nonexistent/never-written.json"])
    assert e.value.code == 2 and "--calls" in capsys.readouterr().err


def test_the_real_ops_agree_with_chapter_05s_norm():
    "The CUDA-only paths (chapter 10's kernels), run here in Triton's interpreter when there is no GPU."
    import os
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    mod = _script()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(2)
    ins = [torch.randn(4, 64, generator=g).to(dev) for _ in range(2)] + [(1 + 0.1 * torch.randn(64, generator=g)).to(dev)]
    paths = mod.real_paths()
    mod.check_agree(paths, ins, 1e-4)
    mod.check_agree({"aten": mod.norm_aten, **paths}, ins, 1e-4)

"""Chapter 06 runs headless under papermill with small parameters (what `-p preset cpu -p max_steps 200` does)."""
import json
from pathlib import Path

import pytest

from test_train import make_corpus

pytestmark = [pytest.mark.slow, pytest.mark.notebook]


def test_trainer_notebook_runs_under_papermill(tmp_path):
    pm = pytest.importorskip("papermill")
    corpus = make_corpus(tmp_path / "corpus", n_docs=40)
    out = tmp_path / "out.ipynb"
    nb_path = Path(__file__).resolve().parents[1] / "notebooks" / "06e_trainer.ipynb"
    pm.execute_notebook(str(nb_path), str(out), kernel_name="python3", progress_bar=False,
                        cwd=str(tmp_path),
                        parameters=dict(preset="cpu", data=str(corpus), max_steps=4, seq_len=32, batch_size=2,
                                        eval_every=2, demo_steps=6, out_dir=str(tmp_path / "runs")))
    nb = json.loads(out.read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []))
    assert "4 steps (max_steps)" in text
    assert "6 losses identical, bit for bit" in text
    assert (tmp_path / "runs" / "main" / "loss.png").exists()

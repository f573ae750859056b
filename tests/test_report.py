"""benchmarks/report.py: the README's benchmark block is generated from benchmarks/results/*.json, never typed."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def test_readme_block_equals_what_report_generates_from_the_stored_results():
    text = (ROOT / "README.md").read_text()
    assert report.BEGIN in text and report.END in text
    block = text.split(report.BEGIN, 1)[1].split(report.END, 1)[0].strip()
    assert block == "\n\n".join(report.sections()).strip(), \
        "README's benchmark tables are stale: run `python benchmarks/report.py --write-readme`"


def test_distributed_table_computes_speedups_and_shows_failures():
    doc = {"devices": ["GPU X"], "torch": "2.x", "rows": [
        dict(size="medium", params_m=150.0, seq_len=1024, gpus=1, parallel="none", per_rank_batch=8, accumulation=2,
             global_batch=16, tokens_per_s=1000.0, peak_gib_per_gpu=[4.0]),
        dict(size="medium", params_m=150.0, seq_len=1024, gpus=2, parallel="ddp", per_rank_batch=8, accumulation=1,
             global_batch=16, tokens_per_s=1900.0, peak_gib_per_gpu=[4.0, 4.1]),
        dict(size="medium", gpus=2, parallel="fsdp", error=["RuntimeError: boom"])]}
    table = report.distributed_table(doc)
    assert "| 1.90x |" in table and "4.10" in table and "failed" in table and "boom" in table


def test_write_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.BEGIN}\nold tables\n{report.END}\nafter\n")
    report.write_readme(readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith(f"{report.END}\nafter\n") and "old tables" not in text

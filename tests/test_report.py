"""benchmarks/report.py --update-readme: the README's performance tables are generated from the
committed JSON they cite, and regenerating them touches nothing else."""

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CURRENT_CPU_RUN = "cpu-xeon-2core-2026-11-26-direct-gemm.json"


def _load_report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


report = _load_report()


def test_readme_tables_are_generated_from_the_json_they_cite():
    text = (ROOT / "README.md").read_text()
    assert report.TABLE_START.search(text), "the README has no bench-table section"
    assert report.readme_with_tables(text, ROOT) == text, "run: python benchmarks/report.py --update-readme"


def test_update_replaces_only_the_marked_section(tmp_path):
    shutil.copy(RESULTS / CURRENT_CPU_RUN, tmp_path / "run.json")
    stale = "before\n\n<!-- bench-table: run.json -->\n| an old table |\n<!-- /bench-table -->\n\nafter\n"
    updated = report.readme_with_tables(stale, tmp_path)
    assert updated.startswith("before\n\n<!-- bench-table: run.json -->\nMeasured with:\n")
    assert updated.endswith("\n<!-- /bench-table -->\n\nafter\n")
    assert "| an old table |" not in updated
    assert "`python -m fastgpt bench --device cpu --json-name " + CURRENT_CPU_RUN + "`" in updated
    assert "Table by `python benchmarks/report.py --compact run.json`" in updated
    assert "| attention | fwd+bwd | 4×8×1024×64 causal | fp32 | native |" in updated
    assert "Page faults per call" not in updated
    assert report.readme_with_tables(updated, tmp_path) == updated


def test_an_unclosed_section_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no closing"):
        report.readme_with_tables("<!-- bench-table: run.json -->\n| a table |\n", tmp_path)


def test_recorded_commands_read_as_typed():
    assert report.shell_command("/repo/fastgpt/__main__.py bench --op model ") == "python -m fastgpt bench --op model"
    assert report.shell_command("fastgpt bench --quick") == "fastgpt bench --quick"
    assert report.shell_command("/repo/fastgpt/bench/__main__.py --quick") == "python -m fastgpt.bench --quick"

"""The replication table of the theory page (`docs/hooks/replication.py`), generated from
small fixture results (`tests/fixtures/replication/`): a resolved claim, an unresolved one,
a refuted one and claims no run measures. Default tier: no site build."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "replication"


@pytest.fixture
def hook(monkeypatch):
    path = ROOT / "docs" / "hooks" / "replication.py"
    spec = importlib.util.spec_from_file_location("replication_hook", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _rows(table: str) -> dict[str, list[str]]:
    """Claim text -> the cells of its rows (several when a claim has several entries)."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| A |") or line.startswith("| B |"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[1], []).append(cells)
    return rows


def test_table_from_fixture_results(hook):
    table = hook.render(FIXTURES, "theory/papers.md")
    rows = _rows(table)
    assert len(rows) == len(hook.CLAIMS)
    a1 = rows[hook.CLAIMS["A1"][1]][0]
    # Resolved: the measured value with its interval, the verdict, a link to the run.
    assert a1[2] == "+4.1 points (LRA average)"
    assert "+3.0 points [+1.2, +4.8]" in a1[3] and "image, listops; 8 paired seeds" in a1[3]
    assert a1[4] == "**holds**" and a1[5] == "[placement](../results/placement/index.md)"
    a2 = rows[hook.CLAIMS["A2"][1]][0]
    assert a2[4] == "**not resolved**" and "[-1.9, +1.1]" in a2[3]
    assert rows[hook.CLAIMS["B2"][1]][0][4] == "**does not hold**"
    # Claims no committed run measures: not resolved, no link.
    for claim in ("A3", "A4", "B1"):
        (row,) = rows[hook.CLAIMS[claim][1]]
        assert row[3] == "not measured by a committed run" and row[4] == "**not resolved**"
        assert row[5] == ""
    assert "**The LRA-scale runs have not been made.**" in table


def test_table_marks_lra_scale_and_skips_bad_entries(hook, tmp_path, caplog):
    run = tmp_path / "lra"
    run.mkdir()
    entries = [
        {"id": "A1", "measured": "+1.0", "verdict": "holds", "basis": "LRA", "scale": "lra"},
        {"id": "Z9", "measured": "?", "verdict": "holds"},
        {"id": "A2", "measured": "?", "verdict": "maybe"},
    ]
    (run / "results.json").write_text(json.dumps({"replication": entries}))
    table = hook.render(tmp_path)
    assert "have not been made" not in table and "LRA-scale runs" in table
    assert "unknown claim id 'Z9'" in caplog.text and "verdict 'maybe'" in caplog.text
    assert _rows(table)[hook.CLAIMS["A2"][1]][0][4] == "**not resolved**"
    # No results at all: every claim unresolved.
    empty = _rows(hook.render(tmp_path / "missing"))
    assert all(r[0][4] == "**not resolved**" for r in empty.values())


def test_marker_is_replaced(hook, tmp_path):
    class _File:
        src_uri = "theory/papers.md"

    class _Page:
        file = _File()

    md = "Intro\n\n<!-- replication -->\n\nEnd\n"
    out = hook.on_page_markdown(md, _Page(), {"docs_dir": str(tmp_path)}, None)
    assert "<!-- replication -->" not in out and "| paper | claim |" in out
    assert out.startswith("Intro") and out.rstrip().endswith("End")

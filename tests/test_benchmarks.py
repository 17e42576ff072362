"""benchmarks/run.py's plumbing: a table's rows come back from its own process, a failing
benchmark becomes a failed row (the others still run), targets are judged the right way
round. The benchmarks themselves are not run here (minutes; benchmarks/README.md)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run as bench_run  # noqa: E402
from _common import Row, format_table  # noqa: E402

GOOD = """
import json, sys
rows = [{"table": "t", "workload": "w", "contender": "nnrun", "peer": "hooks",
         "value": 1.05, "peer_value": 1.0, "target": 1.10}]
json.dump(rows, open(sys.argv[sys.argv.index("--json") + 1], "w"))
"""
BAD = """
import sys
print("working ...")
raise ValueError("the outputs differ: engine saved other values")
"""


@pytest.fixture
def scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    monkeypatch.setattr(bench_run, "HERE", tmp_path)
    return tmp_path


def test_rows_come_back_and_a_failure_is_a_failed_row(scripts: Path, tmp_path: Path) -> None:
    good = bench_run.Table("good", "good.py", (), ())
    bad = bench_run.Table("bad", "bad.py", (), ())
    rows, _ = bench_run.run_table(good, False, tmp_path, timeout=60)
    assert [(r.contender, r.ratio, r.met()) for r in rows] == [("nnrun", 1.05, True)]
    (row,), _ = bench_run.run_table(bad, False, tmp_path, timeout=60)
    assert row.error == "ValueError: the outputs differ: engine saved other values"
    assert row.met() is False
    assert "**failed**: ValueError: the outputs differ" in format_table([row])
    (missing,), _ = bench_run.run_table(
        bench_run.Table("x", "good.py", (), (), ("no_such_module_here",)), False, tmp_path, 60
    )
    assert missing.error.startswith("needs no_such_module_here")


def test_targets_are_judged_the_right_way_round() -> None:
    slow = Row("t", "w", "nnrun", "hooks", 1.2, 1.0, cpu=1.05, peer_cpu=1.0, target=1.10)
    assert slow.met() is True  # judged on CPU seconds where measured
    assert Row("t", "w", "a", "b", 0.8, 1.0, "MB/s", target=0.9).met() is False
    assert Row("t", "w", "a", "b", 0.95, 1.0, "MB/s", target=0.9).met() is True
    assert Row("t", "w", "validate", "floor", 0.31, 0.2, limit=0.3).met() is False
    assert Row("t", "w", "validate", "floor", 0.29, 0.2, limit=0.3).met() is True
    assert Row("t", "w", "a", "b", 5.0, 1.0).met() is None  # no target: shown, not judged
    table = format_table([Row("t", "w", "validate", "floor", 0.29, 0.2, limit=0.3)])
    assert "| < 300.0 ms | yes |" in table


def test_every_table_has_a_script_with_a_json_option() -> None:
    here = Path(bench_run.__file__).parent
    for table in bench_run.TABLES:
        text = (here / table.script).read_text()
        assert '"--json"' in text, table.script
        assert table.quick is not None or table.why_skipped, table.name
    assert json.loads(json.dumps(asdict(Row("t", "w", "a", "b", 1.0, 1.0))))["unit"] == "s"

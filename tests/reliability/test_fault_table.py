"""docs/reliability.md's fault table stays true: every test it names exists (and every named
parametrized case is one of that test's ids), every reliability test is in the table, and the
table lists at least 20 distinct faults, each with an exit code."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?")


def _table_rows() -> list[dict]:
    """Rows of the table whose header is ``| # | fault | what bertopt does | exit | test |``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*#\s*\|\s*fault\s*\|", line))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # a message in the middle column may itself contain "|": number, fault and test are fixed
        number, fault, tests, exit_code = cells[0], cells[1], cells[-1], cells[-2]
        rows.append({"number": number, "fault": fault, "exit": exit_code, "tests": TEST_REF.findall(tests),
                     "raw_tests": tests})
    return rows


def _test_functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def _parametrize_ids(function: ast.FunctionDef) -> set[str]:
    """Every string constant in the function's decorators: explicit ids and plain string params."""
    return {node.value for decorator in function.decorator_list for node in ast.walk(decorator)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_table_has_at_least_20_distinct_faults_each_with_an_exit_code_and_a_test():
    rows = _table_rows()
    assert len(rows) >= 20
    assert [r["number"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert len({r["fault"] for r in rows}) == len(rows)  # distinct faults
    for row in rows:
        assert row["exit"], row
        assert row["tests"], f"row {row['number']} names no test: {row['raw_tests']!r}"


def test_every_test_named_in_the_table_exists():
    missing = []
    for row in _table_rows():
        for path, name, case in row["tests"]:
            file = ROOT / path
            functions = _test_functions(file) if file.is_file() else {}
            if name not in functions:
                missing.append(f"row {row['number']}: {path}::{name}")
            elif case and case not in _parametrize_ids(functions[name]):
                missing.append(f"row {row['number']}: {path}::{name}[{case}] (no such case)")
    assert missing == []


def test_every_reliability_test_is_in_the_table():
    named = {(path, name) for row in _table_rows() for path, name, _ in row["tests"]}
    here = Path(__file__).resolve().parent
    unlisted = [f"{file.relative_to(ROOT)}::{name}"
                for file in sorted(here.glob("test_*.py")) if file.name != Path(__file__).name
                for name in _test_functions(file)
                if (str(file.relative_to(ROOT)), name) not in named]
    assert unlisted == [], "add these to the fault table in docs/reliability.md"


@pytest.mark.parametrize("bad_ref", ["tests/reliability/test_cli_faults.py::test_no_such_test",
                                     "tests/reliability/test_cli_faults.py::test_read_only_directory[--nope]"])
def test_the_checker_notices_a_wrong_reference(bad_ref, monkeypatch, tmp_path):
    """The checks above can fail: a table naming a test or case that does not exist is caught."""
    text = DOC.read_text(encoding="utf-8")
    first = "tests/reliability/test_cli_faults.py::test_missing_corpus_file |"
    assert first in text
    fake = tmp_path / "reliability.md"
    fake.write_text(text.replace(first, f"{bad_ref} |", 1), encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "DOC", fake)
    with pytest.raises(AssertionError):
        test_every_test_named_in_the_table_exists()

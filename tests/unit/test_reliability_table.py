"""docs/reliability.md's fault tables are those the fault tests' docstrings generate
(tests/faults/reliability_table.py), and the generator refuses a fault test it cannot describe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "reliability_table", ROOT / "tests" / "faults" / "reliability_table.py"
)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)

_GOOD = '''
def test_a(tmp_path):
    """Fault: the disk fills.
    Happens: one line | exit 3.
    Do: free space."""

def helper():
    pass
'''


def test_docs_reliability_tables_equal_the_fault_tests_docstrings():
    doc = table.DOC.read_text(encoding="utf-8")
    assert table.render(doc) == doc, "run: python tests/faults/reliability_table.py --write"


def test_a_row_holds_the_three_fields_and_the_test_name():
    rows = table.rows_of(_GOOD, "tests/faults/test_x.py")
    assert rows == [
        "| the disk fills. | one line \\| exit 3. | free space. | `tests/faults/test_x.py::test_a` |\n"
    ]


@pytest.mark.parametrize(
    "doc, says",
    [
        ('"""Checks the disk."""', "opens with Fault:"),
        ('"""Fault: x.\n    Do: y.\n    Happens: z."""', "in order"),
        ('"""Fault: x.\n    Happens:\n    Do: y."""', "Happens: field is empty"),
    ],
)
def test_a_fault_test_without_the_three_fields_is_named(doc, says):
    source = f"def test_b():\n    {doc}\n"
    with pytest.raises(table.TableError, match=says) as err:
        table.rows_of(source, "tests/faults/test_x.py")
    assert "tests/faults/test_x.py::test_b" in str(err.value)
    # outside tests/faults/ a test without the fields is simply not a row
    if "opens with" in says:
        assert table.rows_of(source, "tests/slurm/test_y.py") == []


def test_a_faults_module_that_no_block_names_is_refused(tmp_path):
    faults = tmp_path / "tests" / "faults"
    faults.mkdir(parents=True)
    (faults / "test_x.py").write_text(_GOOD)
    (faults / "test_new.py").write_text(_GOOD)
    doc = "<!-- table: tests/faults/test_x.py -->\n<!-- end table -->\n"
    with pytest.raises(table.TableError, match="tests/faults/test_new.py"):
        table.render(doc, tmp_path)
    both = doc + "<!-- table: tests/faults/test_new.py -->\n<!-- end table -->\n"
    out = table.render(both, tmp_path)
    assert out.count("| the disk fills.") == 2 and table.render(out, tmp_path) == out

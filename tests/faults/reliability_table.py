"""Builds the fault tables of docs/reliability.md from the fault tests' docstrings.

Every test function in tests/faults/ opens its docstring with three fields, one sentence or two
each, in this order:

    Fault: the fault as the user meets it.
    Happens: what the tool does (the guarantee the test asserts).
    Do: what the user does afterwards.

The document holds one block per table, between `<!-- table: MODULE [MODULE ...] -->` and
`<!-- end table -->`; this script rewrites each block as a table with one row per test of those
modules (in file order): fault, what happens, what you do, the test's name. A module outside
tests/faults/ (the SLURM tests) contributes its tests that carry the three fields.

    python tests/faults/reliability_table.py          # exit 1 and a diff when the doc is stale
    python tests/faults/reliability_table.py --write  # rewrite the tables in place

tests/unit/test_reliability_table.py runs the check in the default suite. Reads the test files as
text (ast): nothing is imported or run.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
from pathlib import Path

from megatron_nvembed.utils.fileio import write_atomic

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
FAULTS = ROOT / "tests" / "faults"
FIELDS = ("Fault", "Happens", "Do")
_BLOCK = re.compile(r"(<!-- table: ([^>]*?) -->\n)(.*?)(<!-- end table -->)", re.S)
_HEADER = "| fault | what happens | what you do | test |\n|---|---|---|---|\n"


class TableError(ValueError):
    """A fault test without the three fields, or a document block naming no module."""


def fields_of(docstring: str | None, where: str) -> dict[str, str] | None:
    """The Fault / Happens / Do fields of a docstring, each joined into one line; None when the
    docstring does not open with `Fault:`.

    Raises:
        TableError: naming `where`, when it opens with `Fault:` but lacks a field, has them out
            of order, or leaves one empty.
    """
    text = (docstring or "").strip()
    if not text.startswith("Fault:"):
        return None
    found = list(re.finditer(r"^(Fault|Happens|Do):", text, re.M))
    names = [m.group(1) for m in found]
    if names != list(FIELDS):
        raise TableError(
            f"{where}: the docstring needs Fault:, Happens:, Do: in order, has {names}"
        )
    out = {}
    for i, m in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        out[m.group(1)] = " ".join(text[m.end() : end].split()).replace("|", "\\|")
        if not out[m.group(1)]:
            raise TableError(f"{where}: the docstring's {m.group(1)}: field is empty")
    return out


def rows_of(source: str, module: str) -> list[str]:
    """The table rows of one test module's source. In tests/faults/ every test must carry the
    fields; elsewhere only the tests that carry them are rows.

    Raises:
        TableError: a tests/faults/ test without the fields (named `module::test`).
    """
    required = module.startswith("tests/faults/")
    rows = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if not node.name.startswith("test_"):
            continue
        where = f"{module}::{node.name}"
        fields = fields_of(ast.get_docstring(node), where)
        if fields is None:
            if required:
                raise TableError(f"{where}: a fault test's docstring opens with Fault:")
            continue
        rows.append(f"| {fields['Fault']} | {fields['Happens']} | {fields['Do']} | `{where}` |\n")
    return rows


def render(doc: str, root: Path = ROOT) -> str:
    """`doc` with every table block rebuilt from the modules it names.

    Raises:
        TableError: a block naming a missing module or holding no row; a tests/faults/ module that
            no block names.
    """
    named: set[str] = set()

    def table(match: re.Match) -> str:
        rows = []
        for module in match.group(2).split():
            path = root / module
            if not path.is_file():
                raise TableError(f"{DOC.name}: the table block names {module}, which is missing")
            named.add(module)
            rows += rows_of(path.read_text(encoding="utf-8"), module)
        if not rows:
            raise TableError(f"{DOC.name}: the table of {match.group(2)} has no fault test")
        return match.group(1) + _HEADER + "".join(rows) + match.group(4)

    out = _BLOCK.sub(table, doc)
    for path in sorted((root / "tests" / "faults").glob("test_*.py")):
        module = path.relative_to(root).as_posix()
        if module not in named:
            raise TableError(f"{DOC.name}: no `<!-- table: ... -->` block names {module}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/reliability.md")
    args = parser.parse_args(argv)
    doc = DOC.read_text(encoding="utf-8")
    try:
        new = render(doc)
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if new == doc:
        return 0
    if args.write:
        write_atomic(DOC, new)  # the whole new text, or the old file untouched
        print(f"rewrote the tables of {DOC.relative_to(ROOT)}")
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(doc.splitlines(True), new.splitlines(True), "doc", "generated")
    )
    print(f"{DOC.relative_to(ROOT)} is stale: run python tests/faults/reliability_table.py --write")
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""The code stays readable in one sitting: no function of the package or of `tools/` over 100
lines, no module of the package over 450 lines.

Parses every source file with `ast` (nothing is imported); a function's length is its first to
last line, decorators excluded, nested functions counted in their parent too.

Run alone: pytest tests/unit/test_code_shape.py (well under 2 s).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 450


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(name, first line, length in lines) of every function of `path`, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [
        (node.name, node.lineno, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def test_no_function_of_the_package_or_tools_is_over_100_lines():
    long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({n})"
        for path in _sources("megatron_nvembed", "tools")
        for name, line, n in _function_lengths(path)
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, "split into named steps:\n" + "\n".join(long)


def test_no_module_of_the_package_is_over_450_lines():
    big = [
        f"{p.relative_to(ROOT)} ({n})"
        for p in _sources("megatron_nvembed")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, "split by job:\n" + "\n".join(big)


def test_function_length_is_first_to_last_line(tmp_path):
    """The measure itself: a 100-line function and a 101-line one, as written."""
    body = "\n".join(f"    x{i} = {i}" for i in range(99))
    (tmp_path / "a.py").write_text(f"def ok():\n{body}\n\n\ndef long():\n{body}\n    x = 0\n")
    lengths = {name: n for name, _, n in _function_lengths(tmp_path / "a.py")}
    assert lengths == {"ok": 100, "long": 101}

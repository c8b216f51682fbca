"""The package's imports follow its layer table (docs/architecture.md): no import runs up.

Every module of `megatron_nvembed` is parsed with `ast` (nothing is imported or executed), and
every import it holds is checked: module level, inside functions (lazy imports), under
`TYPE_CHECKING`, relative ones resolved. Proves:
- every module has a place in `LAYERS`, and no module imports one of a higher layer;
- the bottom layer (`utils/` and `hf_model/`, each importing only its own files) imports
  nothing else of the package;
- nothing of the runtime package imports the test helpers (`testing/`);
- the peer rules: model/ imports none of conversion/, training/, evaluation/, ablation/,
  curation/; data/ none of loss/, model/, training/, evaluation/; loss/ none of model/, data/,
  training/, evaluation/; training/checkpointing.py nothing of loss/;
- no import cycle, even within a layer (each layer is ordered too, just not written down);
- the HF model files that ship inside exports (`hf_model/`) import only each other;
- no module touches `sys.path`.

Run alone: pytest tests/unit/test_layering.py (well under 2 s).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = "megatron_nvembed"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

# The layer table, bottom first. A module may import modules of its own layer and of the layers
# below, never of a layer above. Entries are module paths below `megatron_nvembed`; a module takes
# the layer of its longest matching entry (so `conversion.import_hf` sits above `conversion`).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # utils/: helpers; hf_model/: the HF model files that ship inside exports (standalone)
    ("bottom", ("utils", "hf_model")),
    # core/ (configs, process groups, CPU support, launcher, logging, FLOPs, LossInputs) and the
    # checks a checkpoint folder passes before anything is loaded
    ("base", ("core", "checkpoint.safety", "checkpoint.manifest", "checkpoint.unpickling")),
    ("components", ("model", "loss", "data", "curation", "conversion", "retrieval")),
    # Built on components: checkpoints merge LoRA adapters on load (model.lora), the conversion
    # jobs and the checkpoint merge build models and write checkpoints.
    (
        "assembly",
        (
            "checkpoint",
            "conversion.import_hf",
            "conversion.export_hf",
            "conversion.merge_lora",
            "conversion.merge",
        ),
    ),
    ("entry points", ("training", "evaluation", "ablation")),
    # tests, examples and benchmarks only: nothing of the runtime package imports it
    ("test helpers", ("testing",)),
)
BOTTOM = LAYERS[0][1]

# Peers that must not import each other's way, whatever their layers.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "model": ("conversion", "training", "evaluation", "ablation", "curation"),
    "data": ("loss", "model", "training", "evaluation"),
    "loss": ("model", "data", "training", "evaluation"),
    "training.checkpointing": ("loss",),
}

# Copied next to exported weights and imported by transformers on its own: only each other.
STANDALONE = "hf_model"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package: dotted name -> (path, parsed tree)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


def _imported(name: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules that module `name` imports anywhere in its body (relative ones resolved;
    `from pkg import sub` counts as importing `pkg.sub` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


@functools.cache
def _graph() -> dict[str, set[str]]:
    known = set(_modules())
    return {n: _imported(n, p, t, known) for n, (p, t) in _modules().items()}


def _local(module: str) -> str:
    return module[len(PACKAGE) + 1 :] if module != PACKAGE else ""


def _under(module: str, prefix: str) -> bool:
    local = _local(module)
    return local == prefix or local.startswith(prefix + ".")


def _layer(module: str) -> int | None:
    if module == PACKAGE:
        return 0  # the package's own __init__ (a version string)
    best, best_len = None, -1
    for rank, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if _under(module, entry) and len(entry) > best_len:
                best, best_len = rank, len(entry)
    return best


def test_the_parser_sees_lazy_relative_and_submodule_imports():
    source = (
        "import megatron_nvembed.core.config\n"
        "from . import sibling\n"
        "from ..data import records\n"
        "def f():\n"
        "    from megatron_nvembed.model.lora import apply_lora\n"
        "    import torch\n"
    )
    known = {"megatron_nvembed.loss.sibling", "megatron_nvembed.data.records"}
    got = _imported("megatron_nvembed.loss.mod", Path("mod.py"), ast.parse(source), known)
    assert got == {
        "megatron_nvembed.core.config",
        "megatron_nvembed.loss.sibling",
        "megatron_nvembed.data.records",
        "megatron_nvembed.model.lora",
    }


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _modules() if _layer(m) is None)
    assert not unplaced, f"modules missing from LAYERS (give each a layer): {unplaced}"


def test_no_import_runs_up():
    names = [name for name, _ in LAYERS]
    upward = [
        f"{m} ({names[_layer(m)]}) imports {t} ({names[_layer(t)]})"
        for m, targets in sorted(_graph().items())
        for t in sorted(targets)
        if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)
    ]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_bottom_layer_imports_nothing_of_the_package():
    bottom = sorted(m for m in _modules() if any(_under(m, b) for b in BOTTOM))
    assert {f"{PACKAGE}.{b}" for b in BOTTOM} <= set(bottom), "bottom-layer packages missing"
    # the HF model files import each other (checked below), the utils modules each other
    # (fileio writes folders under utils.locking's locks); nothing else of the package
    allowed = {m: next((b for b in BOTTOM if _under(m, b)), None) for m in bottom}
    offending = {
        m: bad
        for m in bottom
        if (bad := sorted(t for t in _graph()[m] if not (allowed[m] and _under(t, allowed[m]))))
    }
    assert not offending, f"bottom-layer modules import the package: {offending}"


def test_the_runtime_package_never_imports_the_test_helpers():
    offending = [
        f"{m} imports {t}"
        for m, targets in sorted(_graph().items())
        if not _under(m, "testing")
        for t in sorted(targets)
        if _under(t, "testing")
    ]
    assert not offending, offending


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path that returns to its start), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        path, on_path = [start], {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:  # every import of path[-1] explored: no cycle through it
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                continue
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt in done or nxt not in graph:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_cycle_finder_finds_a_cycle_through_lazy_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "modules that import each other: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("importer", sorted(FORBIDDEN))
def test_peer_rules(importer):
    offending = [
        f"{m} imports {t}"
        for m, targets in sorted(_graph().items())
        if _under(m, importer)
        for t in sorted(targets)
        if any(_under(t, banned) for banned in FORBIDDEN[importer])
    ]
    assert not offending, f"{importer} must not import {FORBIDDEN[importer]}: {offending}"


def test_exported_hf_files_import_only_each_other():
    offending = [
        f"{m} imports {t}"
        for m, targets in sorted(_graph().items())
        if _under(m, STANDALONE)
        for t in sorted(targets)
        if not _under(t, STANDALONE)
    ]
    assert not offending, offending


def _touches_sys_path(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path":
            if isinstance(node.value, ast.Name) and node.value.id == "sys":
                return True
        if isinstance(node, ast.ImportFrom) and node.module == "sys":
            if any(alias.name == "path" for alias in node.names):
                return True
    return False


def test_no_module_touches_sys_path():
    offending = sorted(str(p) for p, tree in _modules().values() if _touches_sys_path(tree))
    assert not offending, f"modules that touch sys.path (import the package instead): {offending}"

"""One home for each fact: the supported rope types are defined once (transmla_vllm's
checkpoint_format) and the standalone remote code's copy must equal it; the source adapters and
their registry form no import circle; the docs quote the held-out shares as defined."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

from converter.calibration.chunks import HELD_OUT_SHARE
from converter.heal.options import HELD_OUT_SLICE_SHARE
from converter.sources.registry import ADAPTERS
from transmla_vllm import config_checks
from transmla_vllm.checkpoint_format import SUPPORTED_ROPE_TYPES

REPO = Path(__file__).resolve().parents[2]
REMOTE_CODE = REPO / "converter" / "remote_code" / "modeling_transmla.py"
SOURCES = REPO / "converter" / "sources"
HOME = REPO / "transmla_vllm" / "checkpoint_format.py"


def _module_constant(path: Path, name: str) -> object:
    """The literal value bound to ``name`` at module level, read without importing the file."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path.name} binds no {name}")


def test_remote_code_rope_types_equal_the_one_definition() -> None:
    # the remote code is copied into checkpoints and cannot import our packages, so it keeps a
    # copy; parsed rather than imported so the test needs no transformers
    assert _module_constant(REMOTE_CODE, "_SUPPORTED_ROPE") == SUPPORTED_ROPE_TYPES


def test_plugin_rope_keys_cover_exactly_the_supported_types() -> None:
    assert tuple(config_checks._ROPE_KEYS) == SUPPORTED_ROPE_TYPES


def test_no_other_literal_lists_the_supported_rope_types() -> None:
    wanted = set(SUPPORTED_ROPE_TYPES)
    allowed = {HOME, REMOTE_CODE}
    found = []
    for root in (REPO / "converter", REPO / "transmla_vllm"):
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Tuple | ast.List | ast.Set) or not node.elts:
                    continue
                if (
                    all(isinstance(e, ast.Constant) for e in node.elts)
                    and {e.value for e in node.elts} == wanted
                ):
                    found.append((path, node.lineno))
    strays = [f"{p.relative_to(REPO)}:{line}" for p, line in found if p not in allowed]
    assert not strays, f"rope types listed outside checkpoint_format: {strays}"
    assert {p for p, _ in found} == allowed  # the scan does see the two known definitions


def _sources_import_graph() -> dict[str, set[str]]:
    """converter.sources module -> the converter.sources modules it imports anywhere in its
    body (function-level imports count: they close a circle as surely, only later). What the
    package __init__ pulls in is checked by running the imports (test below)."""
    package = "converter.sources"
    names = {p.stem for p in SOURCES.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in SOURCES.glob("*.py"):
        module = package if path.stem == "__init__" else f"{package}.{path.stem}"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
                if node.module == package:  # from converter.sources import llama
                    targets += [f"{package}.{a.name}" for a in node.names if a.name in names]
            edges |= {t for t in targets if t == package or t.startswith(package + ".")}
        graph[module] = edges - {module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_sources_have_no_import_circle() -> None:
    graph = _sources_import_graph()
    assert "converter.sources.registry" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_importing_the_adapters_does_not_load_the_registry() -> None:
    modules = sorted({type(a).__module__ for a in ADAPTERS} | {"converter.sources.adapter"})
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith('converter.sources')))\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = ast.literal_eval(done.stdout.strip())
    assert "converter.sources.registry" not in loaded, loaded


def test_docs_quote_the_held_out_shares_as_defined() -> None:
    """README and docs name each held-out share by its constant and quote its value beside it;
    a changed constant fails here instead of leaving the prose behind."""
    shares = {"HELD_OUT_SHARE": HELD_OUT_SHARE, "HELD_OUT_SLICE_SHARE": HELD_OUT_SLICE_SHARE}
    quoted = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for name, value in shares.items():
            for m in re.finditer(rf"`{name}`\W[^`]{{0,20}}?(\d+/\d+)", text):
                quoted.append((path.name, name, m.group(1)))
                assert Fraction(m.group(1)) == value, (path.name, name, m.group(1), value)
    assert {(p, n) for p, n, _ in quoted} >= {
        ("README.md", "HELD_OUT_SHARE"),
        ("method.md", "HELD_OUT_SHARE"),
        ("heal.md", "HELD_OUT_SLICE_SHARE"),
    }

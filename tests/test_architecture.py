"""The shape of the code: the core knows no modality, packages import each other without cycles,
the library never imports a recipe or a toy world."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["diffdpo.config", "diffdpo.task", "diffdpo.train", "diffdpo.losses", "diffdpo.adapters"]
MODALITIES = ["diffdpo.diffusion", "diffdpo.lm", "diffdpo.dso", "diffdpo.data", "diffdpo.toy", "diffdpo.recipes"]
LIBRARY = ["diffdpo.diffusion", "diffdpo.lm", "diffdpo.dso", "diffdpo.data", "diffdpo.eval", "diffdpo.rewards", *CORE]


def _unit(module: str) -> str:
    """The package (or top-level module) of ``diffdpo`` that ``module`` belongs to."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    """Every ``diffdpo`` import (lazy ones inside functions included), as edges between units."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in (ROOT / "diffdpo").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffdpo"):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("diffdpo")]
            else:
                continue
            for target in targets:
                if _unit(target) != _unit(module):
                    edges[_unit(module)].add(_unit(target))
    return edges


def test_the_graph_reader_sees_a_known_edge():
    assert "diffdpo.task" in import_graph()["diffdpo.train"]  # guards against a reader that finds nothing


def test_no_import_cycle_between_packages():
    edges = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_no_modality(core):
    bad = sorted(edges_to for edges_to in import_graph().get(core, set()) if edges_to in MODALITIES)
    assert not bad, f"{core} imports {bad}"


@pytest.mark.parametrize("library", LIBRARY)
def test_the_library_imports_no_recipe_and_no_toy_world(library):
    bad = sorted(t for t in import_graph().get(library, set()) if t in ("diffdpo.recipes", "diffdpo.toy"))
    assert not bad, f"{library} imports {bad}"


def test_loading_the_core_and_training_a_config_loads_no_modality_module():
    """At run time too: the loop, the registry and a config load touch no modality until a task is built."""
    code = ("import sys, diffdpo.train, diffdpo.task\n"
            "from diffdpo.task import task_names\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('diffdpo.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(",")
    assert not [m for m in loaded if m.strip().startswith(tuple(f"{p}." for p in ("diffdpo.recipes", "diffdpo.dso")))]
    assert not [m for m in loaded if m.strip() in ("diffdpo.diffusion.task", "diffdpo.lm.task", "diffdpo.toy.tiny_lm")]


def test_finding_one_task_imports_no_other_modality():
    code = ("import sys\nfrom diffdpo.task import get_task\nget_task('diffusion')\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('diffdpo.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert "diffdpo.diffusion.config" in loaded.split(",")
    assert not [m for m in loaded.split(",") if m.startswith(("diffdpo.lm", "diffdpo.toy", "diffdpo.dso"))], loaded

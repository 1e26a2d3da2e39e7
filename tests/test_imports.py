"""Every module of both import packages imports, and `import diffdpo` / `import sim` stay light."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import diffdpo
import sim


def _modules():
    for pkg in (diffdpo, sim):
        yield pkg.__name__
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_imports(name):
    importlib.import_module(name)


def test_top_level_imports_are_light():
    """Heavy or optional libraries load lazily, inside the functions that need them."""
    heavy = [
        "diffusers",
        "transformers",
        "peft",
        "pybullet",
        "open_clip",
        "trimesh",
        "mujoco",
        "accelerate",
        "trl",
    ]
    code = (
        "import sys, diffdpo, sim, diffdpo.losses, diffdpo.cli\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"imported eagerly: {out}"

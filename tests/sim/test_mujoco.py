"""The optional MuJoCo backend (DSO's protocol): model construction and behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

import sim
from sim import StabilityConfig
from sim.mesh import prepare_mesh
from tests.sim.meshes import box, leaning_tower

mujoco = pytest.importorskip("mujoco")

from sim.mujoco_backend import dso_mjcf, msh_bytes  # noqa: E402


def _model(mesh, inertia="exact"):
    prep = prepare_mesh(mesh.vertices, mesh.faces, StabilityConfig(normalize_scale=None))
    model = mujoco.MjModel.from_xml_string(
        dso_mjcf(1000.0, inertia), {"obj.msh": msh_bytes(prep.vertices, prep.faces)}
    )
    return prep, model


def test_model_matches_our_mass_properties():
    prep, model = _model(leaning_tower())
    assert model.opt.timestep == pytest.approx(0.001)  # DSO: 1 ms steps
    assert model.body_mass[1] == pytest.approx(prep.mass, rel=1e-5)
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    np.testing.assert_allclose(data.xipos[1], prep.com, atol=1e-5)
    np.testing.assert_allclose(np.sort(model.body_inertia[1]), np.sort(prep.inertia_diag), rtol=1e-4)


def test_legacy_inertia_overcounts_concave_volume():
    """MuJoCo's default ('legacy', so DSO's) overcounts the volume of a concave mesh."""
    prep, legacy = _model(leaning_tower(), inertia="legacy")
    assert legacy.body_mass[1] > 1.2 * prep.mass
    _, legacy_box = _model(box(), inertia="legacy")  # exact for a convex mesh
    assert legacy_box.body_mass[1] == pytest.approx(1000 * 0.16, rel=1e-5)


def test_dso_protocol_labels():
    config = StabilityConfig(backend="mujoco")
    standing, falling, missing = sim.score_meshes([box(), leaning_tower(), "nope.obj"], config, workers=0)
    assert standing.stable and standing.angle_deg < 1 and standing.backend == "mujoco"
    assert not falling.stable and falling.angle_deg > 45
    assert missing.reason == "missing_file"


def test_uncompilable_mesh_is_a_labelled_result():
    """A box glued to an inside-out copy of itself: zero volume, faces of both orientations.
    MuJoCo's exact inertia refuses it (a labelled sim_error); its legacy algorithm does not."""
    inside_out = box()
    inside_out.invert()
    mesh = trimesh.util.concatenate([box(), inside_out])
    exact, legacy = (
        sim.score_meshes([mesh], StabilityConfig(backend="mujoco", mujoco_inertia=inertia), workers=0)[0]
        for inertia in ("exact", "legacy")
    )
    assert exact.reason == "sim_error" and "MuJoCo could not compile" in exact.error
    assert legacy.valid

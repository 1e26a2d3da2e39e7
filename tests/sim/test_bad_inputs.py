"""Every kind of bad input gives a labelled result, never an exception (one test per case)."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

import sim
from sim import StabilityConfig
from tests.sim.meshes import box, torus_arrays


def _score_one(item, **config):
    (result,) = sim.score_meshes([item], StabilityConfig(**config), workers=0)
    assert result.index == 0
    return result


def _invalid(result, reason):
    assert not result.valid
    assert result.reason == reason
    assert result.stable is None and result.angle_deg is None and result.displacement is None
    assert result.error and isinstance(result.error, str)
    assert reason in sim.INVALID_REASONS


def test_empty_mesh():
    _invalid(_score_one(trimesh.Trimesh()), "empty")
    _invalid(_score_one((np.zeros((0, 3)), np.zeros((0, 3), dtype=int))), "empty")


def test_nan_and_inf_vertices():
    mesh = box()
    vertices = np.array(mesh.vertices)
    vertices[3] = [np.nan, 0.0, 1.0]
    result = _score_one((vertices, mesh.faces))
    _invalid(result, "non_finite")
    assert "NaN or infinite" in result.error
    vertices[3] = [np.inf, 0.0, 1.0]
    _invalid(_score_one((vertices, mesh.faces)), "non_finite")


def test_zero_volume_flat_mesh():
    plane = trimesh.creation.box((1.0, 1.0, 1.0))
    plane.vertices[:, 2] = 0.0  # squashed flat: a closed but zero-volume surface
    result = _score_one(plane)
    _invalid(result, "flat")
    assert "zero volume" in result.error
    square = (np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0.0]]), np.array([[0, 1, 2], [0, 2, 3]]))
    _invalid(_score_one(square), "flat")


def test_non_watertight_mesh_is_simulated_and_reported():
    tube = trimesh.creation.cylinder(radius=0.3, height=1.0, sections=32)
    open_tube = trimesh.Trimesh(tube.vertices, tube.faces[np.abs(tube.face_normals[:, 2]) < 0.5])
    result = _score_one(open_tube)
    assert result.valid and result.stable
    assert result.mass_source == "convex_hull"
    assert any("not watertight" in w for w in result.warnings)


def test_inverted_normals_are_flipped_and_reported():
    mesh = box()
    mesh.invert()
    result = _score_one(mesh)
    assert result.valid and result.stable
    assert result.mass_source == "mesh" and result.volume > 0
    assert any("inverted normals" in w for w in result.warnings)


def test_many_disconnected_pieces():
    rng = np.random.default_rng(0)
    pieces = [box((0.05, 0.05, 0.05), rng.uniform(-1, 1, 3) + [0, 0, 1.2]) for _ in range(60)]
    result = _score_one(trimesh.util.concatenate(pieces))
    assert result.valid
    assert result.n_components == 60
    assert any("60 disconnected pieces" in w for w in result.warnings)


def test_million_faces_uses_a_reduced_hull():
    vertices, faces = torus_arrays(710, 710)
    assert len(faces) > 1_000_000
    result = _score_one((vertices, faces), max_hull_vertices=256)
    assert result.valid and result.stable  # a torus lying flat
    assert result.n_faces == len(faces)
    assert result.mass_source == "mesh"
    assert any("large mesh" in w for w in result.warnings)
    assert result.volume == pytest.approx(2 * np.pi**2 * 1.0 * 0.3**2 * (1 / 2.6) ** 3, rel=1e-3)


def test_unreadable_file(tmp_path):
    path = tmp_path / "corrupt.glb"
    path.write_bytes(b"\x00\x01 definitely not a glTF binary")
    result = _score_one(str(path))
    _invalid(result, "read_error")
    assert str(path) in result.error
    result = _score_one(tmp_path / "garbage.obj")  # missing file, given as a Path
    _invalid(result, "missing_file")


def test_file_without_triangles(tmp_path):
    path = tmp_path / "words.obj"
    path.write_text("this is not an obj file\n")
    result = _score_one(str(path))
    _invalid(result, "empty")
    assert "no triangles" in result.error


def test_missing_file(tmp_path):
    result = _score_one(str(tmp_path / "nowhere.obj"))
    _invalid(result, "missing_file")
    assert "does not exist" in result.error
    _invalid(_score_one(str(tmp_path)), "missing_file")  # a directory is not a mesh file


def test_wrong_file_type(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    result = _score_one(str(path))
    _invalid(result, "unsupported_type")
    assert ".obj" in result.error  # tells the user what would work


def test_wrong_python_object():
    _invalid(_score_one(42), "bad_input")
    _invalid(_score_one((np.eye(3), np.array([[0, 1, 7]]))), "bad_faces")


def test_every_bad_input_in_one_batch_keeps_order(tmp_path):
    """The pool gives one result per input, in input order, whatever happens to each."""
    missing = str(tmp_path / "missing.obj")
    good = box()
    nan = (np.array(good.vertices) * np.nan, good.faces)
    items = [good, missing, trimesh.Trimesh(), nan, 3.5, good]
    results = sim.score_meshes(items, workers=2)
    assert [r.index for r in results] == list(range(len(items)))
    assert [r.reason for r in results] == [None, "missing_file", "empty", "non_finite", "bad_input", None]
    assert results[0].stable and results[5].stable

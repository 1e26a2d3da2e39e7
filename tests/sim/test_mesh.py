"""Mesh preparation: cleaning, orientation, scaling, placement, mass properties, hull."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from sim import StabilityConfig
from sim.mesh import MeshError, fibonacci_directions, prepare_mesh, support_points
from tests.sim.meshes import box, leaning_tower


def _prep(mesh, **kwargs):
    return prepare_mesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), StabilityConfig(**kwargs))


def test_box_mass_properties_hand_worked():
    """0.5 x 0.5 x 1 box at density 1000, no rescaling: m = 250 kg; principal moments
    m (a^2 + b^2) / 12 = 250 * 0.5 / 12 and 250 * 1.25 / 12 (twice)."""
    prep = _prep(box((0.5, 0.5, 1.0), (3.0, -2.0, 7.0)), normalize_scale=None)
    assert prep.mass == pytest.approx(250.0)
    assert prep.volume == pytest.approx(0.25)
    np.testing.assert_allclose(prep.com, [0.0, 0.0, 0.5], atol=1e-12)  # centred, resting on z = 0
    np.testing.assert_allclose(
        np.sort(prep.inertia_diag), np.sort([250 * 0.5 / 12, 250 * 1.25 / 12, 250 * 1.25 / 12])
    )
    assert np.linalg.det(prep.rotation) == pytest.approx(1.0)
    assert prep.vertices[:, 2].min() == pytest.approx(0.0)
    assert prep.mass_source == "mesh" and prep.warnings == []


def test_scale_normalisation_and_up_axis():
    mesh = box((0.2, 4.0, 1.0), (0.0, 2.0, 0.5))  # long along y: y-up input means "4 m tall"
    prep = _prep(mesh, up_axis="y", normalize_scale=1.0)
    extents = np.ptp(prep.vertices, axis=0)
    np.testing.assert_allclose(extents, [0.05, 0.25, 1.0])  # y became z, scaled by 1/4
    assert prep.scale == pytest.approx(0.25)
    assert prep.com[2] == pytest.approx(0.5)


def test_tiny_units_are_scaled_before_cleaning():
    """A 5 micrometre box: merge and degeneracy tolerances apply after scaling to 1 m."""
    prep = _prep(box((2e-6, 2e-6, 5e-6), (0.0, 0.0, 2.5e-6)))
    assert prep.n_faces == 12
    np.testing.assert_allclose(np.ptp(prep.vertices, axis=0), [0.4, 0.4, 1.0])


def test_inertia_in_principal_frame_matches_trimesh():
    mesh = leaning_tower()
    prep = _prep(mesh, normalize_scale=None)
    expected = trimesh.Trimesh(mesh.vertices, mesh.faces).moment_inertia * 1000.0
    rebuilt = prep.rotation @ np.diag(prep.inertia_diag) @ prep.rotation.T
    np.testing.assert_allclose(rebuilt, expected, rtol=1e-9, atol=1e-9)


def test_touching_pieces_are_closed_and_exact():
    """Boxes sharing edges make non-manifold edges, yet the surface is closed: exact mass."""
    a = box((0.2, 0.2, 1.0), (0.0, 0.0, 0.5))
    b = box((0.8, 0.2, 0.1), (0.5, 0.0, 0.95))  # same y-width: corners coincide with a's
    mesh = trimesh.util.concatenate([a, b])
    prep = _prep(mesh, normalize_scale=None)
    assert prep.mass_source == "mesh"
    assert prep.volume == pytest.approx(0.2 * 0.2 * 1.0 + 0.8 * 0.2 * 0.1)
    assert any("non-manifold" in w for w in prep.warnings)


def test_open_box_is_repaired_and_open_cylinder_falls_back():
    closed = box()
    open_box = trimesh.Trimesh(closed.vertices, closed.faces[:-2])  # one quad missing
    prep = _prep(open_box, normalize_scale=None)
    assert prep.mass_source == "mesh_repaired"
    assert prep.volume == pytest.approx(0.16)

    tube = trimesh.creation.cylinder(radius=0.3, height=1.0, sections=32)
    side_only = tube.faces[np.abs(tube.face_normals[:, 2]) < 0.5]  # no caps: two 32-gon holes
    prep = _prep(trimesh.Trimesh(tube.vertices, side_only), normalize_scale=None)
    assert prep.mass_source == "convex_hull"
    assert any("not watertight" in w for w in prep.warnings)
    np.testing.assert_allclose(prep.com[:2], 0.0, atol=1e-9)


def test_voxel_fallback_beats_the_hull_on_a_concave_open_mesh():
    """A concave object with a 5-edge hole (trimesh cannot fill it): the hull puts the centre of
    mass far off, the closed voxelisation close to the exact one."""
    tower = leaning_tower().subdivide().subdivide().subdivide()
    exact = _prep(tower, normalize_scale=None)
    vertex = int(np.argmax(tower.vertices[:, 0]))
    holed = trimesh.Trimesh(tower.vertices, tower.faces[~(tower.faces == vertex).any(axis=1)])
    hull = _prep(holed, normalize_scale=None)
    voxel = _prep(holed, normalize_scale=None, mass_fallback="voxel", voxel_pitch=0.01)
    assert (hull.mass_source, voxel.mass_source) == ("convex_hull", "voxel")
    hull_error = np.linalg.norm(hull.com - exact.com)
    voxel_error = np.linalg.norm(voxel.com - exact.com)
    assert hull_error > 0.05
    assert voxel_error < 0.02 < hull_error
    assert voxel.volume == pytest.approx(exact.volume, rel=0.25)


def test_inverted_pieces_are_flipped_per_piece():
    left, right = box(center=(-1.0, 0.0, 0.5)), box(center=(1.0, 0.0, 0.5))
    right.invert()
    prep = _prep(trimesh.util.concatenate([left, right]), normalize_scale=None)
    assert prep.volume == pytest.approx(2 * 0.16)
    assert prep.n_components == 2
    assert any("inverted normals" in w and "1 of 2" in w for w in prep.warnings)


def test_degenerate_faces_are_dropped():
    mesh = box()
    faces = np.concatenate([mesh.faces, [[0, 0, 1], [2, 2, 2]]])
    prep = prepare_mesh(mesh.vertices, faces, StabilityConfig())
    assert prep.n_faces == 12
    assert any("degenerate" in w for w in prep.warnings)


@pytest.mark.parametrize(
    "vertices, faces, reason",
    [
        (np.zeros((0, 3)), np.zeros((0, 3), int), "empty"),
        (np.zeros((3, 2)), np.array([[0, 1, 2]]), "bad_faces"),
        (np.eye(3), np.array([[0, 1, 5]]), "bad_faces"),
        (np.eye(3), np.array([[0, 1, 2, 0]]), "bad_faces"),
        (np.eye(3), np.array([[0.0, 1.0, 2.0]]), "bad_faces"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.0]]), np.array([[0, 1, 2]]), "flat"),
        (np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2.0]]), np.array([[0, 1, 2]]), "empty"),  # zero area
        (np.ones((3, 3)), np.array([[0, 1, 2]]), "flat"),  # all vertices coincide
    ],
)
def test_bad_arrays_raise_mesh_error(vertices, faces, reason):
    with pytest.raises(MeshError) as info:
        prepare_mesh(vertices, faces, StabilityConfig(), name="thing")
    assert info.value.reason == reason
    assert "thing" in str(info.value) or reason == "bad_faces"


def test_unused_non_finite_vertices_are_ignored_used_ones_rejected():
    mesh = box()
    vertices = np.concatenate([mesh.vertices, [[np.nan, 0, 0]]])
    prep = prepare_mesh(vertices, mesh.faces, StabilityConfig())
    assert any("non-finite" in w for w in prep.warnings)
    vertices = np.array(mesh.vertices)
    vertices[0] = np.inf
    with pytest.raises(MeshError) as info:
        prepare_mesh(vertices, mesh.faces, StabilityConfig())
    assert info.value.reason == "non_finite"


def test_support_points_keep_the_lowest_point_and_bound_the_count():
    sphere = trimesh.creation.icosphere(subdivisions=4)  # 2562 vertices, all on the hull
    points = support_points(np.asarray(sphere.vertices), 64)
    assert len(points) <= 64
    assert points[:, 2].min() == pytest.approx(sphere.vertices[:, 2].min())
    dirs = fibonacci_directions(100)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    prep = prepare_mesh(sphere.vertices, sphere.faces, StabilityConfig(max_hull_vertices=64))
    assert len(prep.hull_points) <= 64
    assert any("reduced" in w for w in prep.warnings)

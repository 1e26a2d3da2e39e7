"""The procedural objects and their analytic ground truth (no physics engine involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from sim import shapes


@pytest.mark.parametrize("kind", shapes.KINDS)
def test_analytic_centre_of_mass_matches_the_mesh(kind):
    """The parts touch but do not overlap, so the exact mesh integral equals the part formula."""
    rng = np.random.default_rng(7)
    for _ in range(10):
        sample = shapes.GENERATORS[kind](rng)
        mesh = trimesh.Trimesh(sample.vertices, sample.faces, process=False)
        props = trimesh.triangles.mass_properties(mesh.triangles)
        assert props.volume > 0  # outward-facing
        np.testing.assert_allclose(props.center_mass, sample.com, atol=1e-9)
        assert sample.vertices[:, 2].min() == pytest.approx(0.0, abs=1e-12)


def test_frustum_centroid_fractions():
    """Cone on its base: centroid at 1/4 of the height; on its apex: at 3/4 (classic results)."""
    base = shapes._frustum(0.5, 0.0, (0.0, 0.0), 1.0)
    tip = shapes._frustum(0.0, 0.5, (0.0, 0.0), 1.0)
    assert base.centroid[2] == pytest.approx(0.25)
    assert tip.centroid[2] == pytest.approx(0.75)
    # volume of a 24-gon pyramid: (1/3) * area * h, area = 0.5 * n * sin(2 pi / n) * r^2
    assert base.volume == pytest.approx(0.5 * 24 * math.sin(2 * math.pi / 24) * 0.25 / 3)


def test_support_distance_hand_worked():
    """Unit square footprint [0, 1]^2."""
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float)
    assert shapes.support_distance([0.5, 0.5], square)[0] == pytest.approx(0.5)
    assert shapes.support_distance([0.9, 0.5], square)[0] == pytest.approx(0.1)
    assert shapes.support_distance([1.3, 0.5], square)[0] == pytest.approx(-0.3)
    assert shapes.support_distance([1.3, 1.4], square)[0] == pytest.approx(-0.5)  # 3-4-5 to the corner
    # degenerate footprints: a point (cone apex) and a segment (two thin legs in line)
    assert shapes.support_distance([0.0, 0.4], np.array([[0.0, 0.0]]))[0] == pytest.approx(-0.4)
    segment = np.array([[0.0, 0.0], [2.0, 0.0]])
    assert shapes.support_distance([1.0, 0.3], segment)[0] == pytest.approx(-0.3)


def test_margin_and_fall_angle_hand_worked():
    """A 1 x 1 x 2 box with its centre of mass put at (0.8, 0, 1), outside the base x in
    [-0.5, 0.5]: lean = atan2(-0.3, 1). No vertex lies beyond the tipping edge x = 0.5, so it
    falls a full 90 degrees. A post with a slab overhanging the edge by 1 at height 0.5 touches the
    ground again after atan2(0.5, 1) = 26.6 degrees."""
    box = trimesh.creation.box((1, 1, 2))
    box.apply_translation((0, 0, 1))
    stable, margin, fall = shapes.analyse(box.vertices, np.array([0.8, 0.0, 1.0]))
    assert not stable
    assert margin == pytest.approx(math.degrees(math.atan2(-0.3, 1.0)))
    assert fall == pytest.approx(90.0)
    slab = trimesh.creation.box((1, 1, 0.5))
    slab.apply_translation((1.0, 0, 0.75))
    post = trimesh.creation.box((1, 1, 0.5))
    post.apply_translation((0, 0, 0.25))
    verts = np.concatenate([post.vertices, slab.vertices])
    stable, _, fall = shapes.analyse(verts, np.array([0.6, 0.0, 0.5]))
    assert not stable
    assert fall == pytest.approx(math.degrees(math.atan2(0.5, 1.0)))


def test_random_shapes_filters_and_balance():
    samples = shapes.random_shapes(120, seed=3, min_margin_deg=3.0, min_fall_deg=30.0)
    assert len(samples) == 120
    assert all(abs(s.margin_deg) >= 3.0 for s in samples)
    assert all(s.stable or s.fall_angle_deg >= 30.0 for s in samples)
    assert {s.kind for s in samples} == set(shapes.KINDS)
    n_stable = sum(s.stable for s in samples)
    assert 0.3 < n_stable / len(samples) < 0.85  # both classes well represented
    again = shapes.random_shapes(120, seed=3, min_margin_deg=3.0, min_fall_deg=30.0)
    assert all(np.array_equal(a.vertices, b.vertices) for a, b in zip(samples, again))


def test_random_shapes_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown shape kinds"):
        shapes.random_shapes(3, kinds=("sofa",))


def test_voxel_remesh_is_a_closed_generator_like_mesh():
    sample = shapes.random_shapes(1, seed=11, kinds=("table",))[0]
    remeshed = shapes.voxel_remesh(sample, resolution=32)
    mesh = trimesh.Trimesh(remeshed.vertices, remeshed.faces)
    assert mesh.is_watertight and mesh.volume > 0
    assert 500 < len(mesh.faces) < 20_000
    assert remeshed.vertices[:, 2].min() == pytest.approx(0.0, abs=1e-9)

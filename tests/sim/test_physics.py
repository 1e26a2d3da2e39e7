"""The drop test itself: score formula, poses, and physical behaviour of simple objects."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import sim
from sim import StabilityConfig
from sim.pybullet_backend import matrix_to_quat_xyzw, rotation_angle_deg
from tests.sim.meshes import box, leaning_tower


def test_rotation_angle_hand_worked():
    """A 30 degree turn about x is the quaternion (sin 15, 0, 0, cos 15): 2 acos(cos 15) = 30.
    q and -q are the same rotation, hence the |q_w|."""
    identity = np.array([0.0, 0.0, 0.0, 1.0])
    turned = np.array([math.sin(math.radians(15)), 0.0, 0.0, math.cos(math.radians(15))])
    assert rotation_angle_deg(identity, turned) == pytest.approx(30.0)
    assert rotation_angle_deg(identity, -turned) == pytest.approx(30.0)
    assert rotation_angle_deg(turned, turned) == pytest.approx(0.0, abs=1e-6)
    # relative to a non-identity start: 30 then a further 45 about the same axis -> 45
    more = Rotation.from_euler("x", 75, degrees=True).as_quat()
    assert rotation_angle_deg(turned, more) == pytest.approx(45.0)


def test_matrix_to_quaternion_matches_scipy():
    for rotation in Rotation.random(50, random_state=0):
        q = matrix_to_quat_xyzw(rotation.as_matrix())
        assert rotation_angle_deg(q, rotation.as_quat()) == pytest.approx(0.0, abs=1e-5)
    for angle in (0.0, 180.0):  # the branches of Shepperd's method near trace -1
        for axis in "xyz":
            rotation = Rotation.from_euler(axis, angle, degrees=True)
            q = matrix_to_quat_xyzw(rotation.as_matrix())
            assert rotation_angle_deg(q, rotation.as_quat()) == pytest.approx(0.0, abs=1e-5)


def test_box_stands_and_leaning_tower_falls():
    standing, falling = sim.score_meshes([box(), leaning_tower()], workers=0)
    assert standing.valid and standing.stable
    assert standing.angle_deg < 0.5 and standing.displacement < 1e-3
    assert falling.valid and not falling.stable
    assert falling.angle_deg > 45 and falling.displacement > 0.05
    assert falling.backend == "pybullet" and falling.collision == "hull"


def test_short_simulation_has_not_fallen_yet():
    """The label depends on the duration: 0.05 s is too short for the tower to turn 20 degrees."""
    (result,) = sim.score_meshes([leaning_tower()], StabilityConfig(duration_s=0.05), workers=0)
    assert result.valid and result.stable and 0 < result.angle_deg < 20


def test_drop_height_lands_upright():
    config = StabilityConfig(drop_height=0.5, duration_s=2.0)
    (result,) = sim.score_meshes([box((1.0, 1.0, 0.5), (0, 0, 0.25))], config, workers=0)
    assert result.stable and result.angle_deg < 1.0


def test_perturbation_is_measured_from_upright():
    """A squat box tilted by 10 degrees rocks back (its tipping margin is 45 degrees); a slender
    one (margin atan(0.05 / 0.5) = 5.7 degrees) tilted by 10 degrees falls."""
    config = StabilityConfig(perturb_deg=10.0, seed=1)
    squat, slender = sim.score_meshes(
        [box((1.0, 1.0, 1.0), (0, 0, 0.5)), box((0.1, 0.1, 1.0), (0, 0, 0.5))], config, workers=0
    )
    assert squat.stable and squat.angle_deg < 2.0
    assert not slender.stable and slender.angle_deg > 45


def test_results_do_not_depend_on_order_or_process():
    from sim import shapes

    samples = shapes.random_shapes(8, seed=4)
    items = [(s.vertices, s.faces) for s in samples]
    forward = sim.score_meshes(items, workers=0)
    backward = sim.score_meshes(items[::-1], workers=0)[::-1]
    pooled = sim.score_meshes(items, workers=2)
    for a, b, c in zip(forward, backward, pooled):
        assert a.angle_deg == pytest.approx(b.angle_deg, abs=1e-9)
        assert a.angle_deg == pytest.approx(c.angle_deg, abs=1e-9)
        assert a.stable == b.stable == c.stable

"""StabilityConfig: DSO defaults, validation, YAML + key=value loading."""

from __future__ import annotations

import dataclasses

import pytest

from diffdpo.config import ConfigError, load_config, save_config
from sim import StabilityConfig


def test_defaults_follow_dso_where_the_protocol_fixes_them():
    cfg = StabilityConfig()
    assert cfg.angle_threshold_deg == 20.0  # DSO: stable if rotation < 20 degrees
    assert cfg.density == 1000.0  # DSO / MuJoCo default density
    assert cfg.collision == "hull"  # DSO: mesh collision is the convex hull
    assert cfg.drop_height == 0.0 and cfg.perturb_deg == 0.0  # upright, touching the ground
    assert (cfg.duration_s, cfg.hz, cfg.n_steps) == (2.0, 240, 480)
    assert cfg.backend == "pybullet"


def test_every_field_has_help():
    for f in dataclasses.fields(StabilityConfig):
        assert f.metadata.get("help"), f"StabilityConfig.{f.name} has no help text"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"duration_s": 0}, "duration_s"),
        ({"hz": 0}, "hz"),
        ({"angle_threshold_deg": 0}, "angle_threshold_deg"),
        ({"density": -1}, "density"),
        ({"friction": -0.1}, "friction"),
        ({"restitution": 1.5}, "restitution"),
        ({"perturb_deg": 95}, "perturb_deg"),
        ({"collision": "mesh"}, "collision"),
        ({"backend": "bullet"}, "backend"),
        ({"up_axis": "x"}, "up_axis"),
        ({"normalize_scale": 0}, "normalize_scale"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"max_hull_vertices": 4}, "max_hull_vertices"),
        ({"solver_iterations": 0}, "solver_iterations"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StabilityConfig(**kwargs)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "sim.yaml"
    save_config(StabilityConfig(collision="vhacd", duration_s=3.0), path)
    cfg = load_config(StabilityConfig, path, ["duration_s=4", "normalize_scale=null", "up_axis=y"])
    assert cfg.collision == "vhacd" and cfg.duration_s == 4.0
    assert cfg.normalize_scale is None and cfg.up_axis == "y"
    with pytest.raises(ConfigError):
        load_config(StabilityConfig, None, ["colision=hull"])  # a typo is an error
    with pytest.raises(ConfigError):
        load_config(StabilityConfig, None, ["collision=mesh"])

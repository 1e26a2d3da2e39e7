"""Every shipped DSO config loads and validates; overrides select the loss variants."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffdpo.config import ConfigError, load_config
from diffdpo.recipes.dso import DSOConfig

REPO = Path(__file__).resolve().parents[2]
DSO_CONFIGS = sorted((REPO / "configs").glob("dso_*.yaml"))


def test_the_toy_config_is_shipped():
    assert REPO / "configs" / "dso_toy.yaml" in DSO_CONFIGS


@pytest.mark.parametrize("path", DSO_CONFIGS, ids=lambda p: p.name)
def test_every_dso_config_builds_its_generator(path, monkeypatch):
    """Loading is not enough: the config's generator must resolve and fit the protocol, and its sim
    section must be a full sim.StabilityConfig."""
    import sim
    from diffdpo.dso.generator import Generator3D, load_generator

    monkeypatch.chdir(REPO)  # generator paths in shipped configs are relative to the repository
    cfg = load_config(DSOConfig, path)
    assert isinstance(load_generator(cfg.generator, cfg.generator_args), Generator3D)
    assert isinstance(cfg.sim, sim.StabilityConfig)


def test_the_whole_sim_config_is_reachable_from_the_command_line():
    cfg = load_config(DSOConfig, REPO / "configs" / "dso_toy.yaml",
                      ["sim.backend=mujoco", "sim.density=500", "sim.friction=0.3", "sim_workers=2"])
    assert (cfg.sim.backend, cfg.sim.density, cfg.sim.friction, cfg.sim_workers) == ("mujoco", 500.0, 0.3, 2)


def test_a_generator_that_is_not_a_generator_is_refused():
    from diffdpo.dso.generator import load_generator

    with pytest.raises(ValueError, match="package.module:Name"):
        load_generator("diffdpo.toy.voxel_model")
    with pytest.raises(TypeError, match="Generator3D"):
        load_generator("collections:OrderedDict")


def test_overrides_select_dro_variants_and_bad_values_are_refused():
    cfg = load_config(DSOConfig, REPO / "configs" / "dso_toy.yaml", ["loss.type=dso_dro", "loss.dro_anchored=true"])
    assert cfg.loss.type == "dso_dro" and cfg.loss.dro_anchored
    with pytest.raises(ConfigError, match="rounds must be <= 998"):
        load_config(DSOConfig, None, ["rounds=999"])
    with pytest.raises(ConfigError, match="aux_source"):
        load_config(DSOConfig, None, ["aux_source=nowhere"])

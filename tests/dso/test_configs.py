"""Every shipped DSO config loads and validates; overrides select the loss variants."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffdpo.config import ConfigError, load_config
from diffdpo.dso.loop import DSOConfig

REPO = Path(__file__).resolve().parents[2]
DSO_CONFIGS = sorted((REPO / "configs").glob("dso_*.yaml"))


def test_the_toy_config_is_shipped():
    assert REPO / "configs" / "dso_toy.yaml" in DSO_CONFIGS


@pytest.mark.parametrize("path", DSO_CONFIGS, ids=lambda p: p.name)
def test_every_dso_config_loads(path):
    cfg = load_config(DSOConfig, path)
    assert cfg.rounds >= 1 and cfg.loss.type in ("sigmoid", "dso_dro", "kto")


def test_overrides_select_dro_variants_and_bad_values_are_refused():
    cfg = load_config(DSOConfig, REPO / "configs" / "dso_toy.yaml", ["loss.type=dso_dro", "dro_anchored=true"])
    assert cfg.loss.type == "dso_dro" and cfg.dro_anchored
    with pytest.raises(ConfigError, match="aux_source"):
        load_config(DSOConfig, None, ["aux_source=nowhere"])

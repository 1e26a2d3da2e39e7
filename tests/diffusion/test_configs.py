"""Every shipped training config loads and validates; the real ones carry the official Diffusion-DPO settings."""

from __future__ import annotations

import pytest
import yaml

from diffdpo.train import load_train_config
from tests.diffusion.conftest import REPO

TRAIN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if "task" in (yaml.safe_load(p.read_text()) or {}))


def test_the_diffusion_configs_are_shipped():
    names = {p.name for p in TRAIN_CONFIGS}
    assert {"sd15_pickapic_dpo.yaml", "sdxl_pickapic_dpo.yaml", "tiny_sd15_dpo.yaml", "tiny_sdxl_dpo.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_training_config_holds_exactly_its_tasks_section(path):
    """Beyond what validation guarantees: the loaded config carries the section of the task it names
    and no other task's, every key of the file survives the load, and beta is resolved."""
    from diffdpo.config import to_dict
    from diffdpo.task import task_names

    raw = yaml.safe_load(path.read_text())
    cfg = load_train_config(path)
    loaded = to_dict(cfg)
    assert raw["task"] in loaded and not (set(task_names()) - {raw["task"]}) & set(loaded)
    assert cfg.loss.beta is not None and cfg.loss.beta > 0

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")}

    assert keys(raw) <= keys(loaded)


@pytest.mark.parametrize("name,kind,warmup,optim,res", [
    ("sd15_pickapic_dpo.yaml", "sd15", 500, "adamw", 512),
    ("sdxl_pickapic_dpo.yaml", "sdxl", 200, "adafactor", 1024),
])
def test_official_settings(name, kind, warmup, optim, res):
    cfg = load_train_config(REPO / "configs" / name)
    assert cfg.loss.type == "sigmoid" and cfg.loss.beta == 5000.0
    assert cfg.optim.scale_lr and cfg.optim.lr * cfg.effective_batch_size == pytest.approx(2.048e-5)
    assert cfg.optim.lr_scheduler == "constant_with_warmup" and cfg.optim.warmup_steps == warmup
    assert cfg.optim.name == optim and cfg.max_steps == 2000 and cfg.gradient_checkpointing
    assert cfg.diffusion.model.kind == kind and cfg.diffusion.data.resolution == res
    assert cfg.diffusion.model.vae_dtype == "float32"
    if kind == "sd15":
        assert cfg.diffusion.data.prompt_dropout == 0.2 and cfg.optim.weight_decay == 1e-2


def test_bad_values_are_rejected():
    from diffdpo.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="beta"):
        load_train_config(REPO / "configs" / "tiny_sd15_dpo.yaml", ["loss.beta=0"])
    with pytest.raises((ConfigError, ValueError)):
        load_train_config(REPO / "configs" / "tiny_sd15_dpo.yaml", ["diffusion.noise.weighting=snr"])
    with pytest.raises((ConfigError, ValueError), match="resolution"):
        load_train_config(REPO / "configs" / "tiny_sd15_dpo.yaml", ["diffusion.data.resolution=20"])

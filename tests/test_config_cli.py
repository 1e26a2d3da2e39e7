"""The config loader and the `diffdpo` command."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from diffdpo.cli import build_parser, main
from diffdpo.config import ConfigError, load_config, save_config


@dataclass
class Optim:
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    name: str = "adamw"


@dataclass
class Exp:
    beta: float = 0.1
    steps: int = 10
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


def test_defaults_file_and_overrides(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("beta: 5000\noptim:\n  lr: 2.0e-5\n")
    cfg = load_config(Exp, path, ["steps=3", "optim.name=adafactor"])
    assert (cfg.beta, cfg.steps, cfg.optim.lr, cfg.optim.name) == (5000.0, 3, 2e-5, "adafactor")
    assert isinstance(cfg, Exp) and isinstance(cfg.optim, Optim)
    # round trip
    save_config(cfg, tmp_path / "back.yaml")
    assert load_config(Exp, tmp_path / "back.yaml") == cfg


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["nope=1"], "nope"),
        (["steps=abc"], "steps"),
        (["beta=-1"], "beta must be > 0"),
        (["beta"], "key=value"),
    ],
)
def test_bad_overrides_are_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Exp, None, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Exp, tmp_path / "missing.yaml")


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "diffdpo.cli", "--help"], capture_output=True, text=True, check=True
    )
    for name in ("demo", "losses"):
        assert name in out.stdout
    assert "losses" in build_parser().format_help()


def test_losses_command_prints_every_loss(capsys):
    from diffdpo.losses import POINTWISE_LOSS_TYPES, PREFERENCE_LOSS_TYPES

    assert main(["losses", "batch_size=16"]) == 0
    out = capsys.readouterr().out
    for t in PREFERENCE_LOSS_TYPES + POINTWISE_LOSS_TYPES:
        assert f"\n{t} " in out
    assert "NO" not in out  # every loss finite at the Diffusion-DPO scale


def test_cli_config_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["losses", "batch_size=1"])
    assert exc.value.code == 2
    assert "batch_size must be >= 2" in capsys.readouterr().err

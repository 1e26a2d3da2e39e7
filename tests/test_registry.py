"""A modality is added through the public registry alone and trained by `diffdpo train`."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from diffdpo.config import ConfigError
from diffdpo.task import TaskContext, TaskSpec, get_task, register_task, task_names
from diffdpo.train import load_train_config


def _write(tmp_path, data):
    path = tmp_path / "scalar.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_task_registered_by_its_module_trains_through_diffdpo_train(tmp_path):
    """`task: tests.registry_task:scalar` imports the module, which registers the task; the loop trains it
    with the task's default beta (2.0) and its own config section, and nothing else."""
    from diffdpo.cli import main

    sys.modules.pop("tests.registry_task", None)
    out = tmp_path / "run"
    config = _write(tmp_path, {"task": "tests.registry_task:scalar", "output_dir": str(out), "max_steps": 6,
                               "per_device_batch_size": 4, "tensorboard": False, "progress_bar": False,
                               "checkpoint_every": 3, "optim": {"lr": 0.5, "weight_decay": 0.0},
                               "scalar": {"pairs": 8, "gap": 1.0}})
    assert main(["train", "--config", str(config), "scalar.gap=0.5"]) == 0
    w = json.loads((out / "final" / "w.json").read_text())["w"]
    assert w > 0.1  # DPO raised the chosen sequences' log-likelihood
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # step 1: w = 0, so loss = ln 2; the implicit reward margin is beta * w * gap with beta = the task default
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    saved = yaml.safe_load((out / "checkpoints" / "step-0000006" / "config.yaml").read_text())
    assert saved["loss"]["beta"] == 2.0 and saved["scalar"] == {"pairs": 8, "gap": 0.5}
    assert "diffusion" not in saved and "lm" not in saved  # a config holds only its task's section
    assert "scalar" in task_names()


def test_a_config_with_another_tasks_section_is_refused(tmp_path):
    import tests.registry_task  # noqa: F401  (registers "scalar")

    path = _write(tmp_path, {"task": "scalar", "diffusion": {"model": {"kind": "sd15"}}})
    with pytest.raises(ConfigError, match="diffusion"):
        load_train_config(path)
    cfg = load_train_config(_write(tmp_path, {"task": "scalar", "loss": {"beta": 0.3}}))
    assert cfg.loss.beta == 0.3 and cfg.scalar.pairs == 16  # an explicit beta wins over the default


def test_default_beta_comes_from_the_task_and_names_are_checked(tmp_path):
    assert load_train_config(None, ["task=lm", "lm.model.pretrained=x", "lm.data.source=y"]).loss.beta == 0.1
    assert load_train_config(None, ["task=diffusion"]).loss.beta == 5000.0
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        load_train_config(None, ["task=nope"])
    spec = get_task("lm")
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskSpec("lm", spec.config_class, lambda c, x: None, default_beta=1.0))
    assert isinstance(TaskContext(accelerator=None), TaskContext)

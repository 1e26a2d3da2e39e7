"""scripts/pretrain_toy_t2i.py end to end at a few steps: it writes a loadable pipeline and its report."""

from __future__ import annotations

import importlib.util
import json

import pytest

from diffdpo.recipes.demo import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_toy_t2i", REPO_ROOT / "scripts" / "pretrain_toy_t2i.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pretrain_script_writes_a_loadable_pipeline_and_report(tmp_path):
    from diffdpo.toy.t2i import load_pipeline, sample_images

    out = tmp_path / "base"
    assert _script().main([f"out={out}", "vae_steps=2", "unet_steps=2", "batch_size=4", "eval_samples=3"]) == 0
    report = json.loads((out / "base_report.json").read_text())
    assert report["config"]["coord_channels"] is False and report["base_accuracy"]["n"] == 3
    assert set(report["base_accuracy"]) >= {"colour", "shape", "position", "aesthetic"}
    pipe = load_pipeline(out)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert pipe.vae.config.scaling_factor != 1.0  # set from the latent std after VAE training
    assert sample_images(pipe, ["a red circle on the left"], [0], steps=2).shape == (1, 16, 16, 3)

"""Diffusion-DPO through the shared training loop, on tiny seeded SD1.5/SDXL pipelines (CPU)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from diffdpo.train import TrainConfig, load_train_config, setup, train, train_step
from tests.diffusion.conftest import REPO, tiny_overrides

TINY = {"sd15": REPO / "configs" / "tiny_sd15_dpo.yaml", "sdxl": REPO / "configs" / "tiny_sdxl_dpo.yaml"}


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state fixed by its first Accelerator; reset it around a test that
    picks another precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _cfg(kind: str, model_dir: Path, data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_train_config(TINY[kind], tiny_overrides(model_dir, data, out, *extra))


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


def test_step0_loss_is_ln2_when_policy_equals_reference(sd15_dir, pairs_parquet, tmp_path):
    """Policy == reference gives zero log-ratios: loss = -log sigmoid(0) = ln 2, margins 0, exactly (LoRA:
    the reference is the same UNet with adapters off and B = 0)."""
    first = train(_cfg("sd15", sd15_dir, pairs_parquet, tmp_path, "max_steps=1")).history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert first["mse/policy_chosen"] == first["mse/ref_chosen"]


def test_step0_loss_is_ln2_with_a_frozen_reference_copy(sd15_dir, pairs_parquet, tmp_path):
    """Full fine-tuning: a separate copy's CPU kernels may differ in the last float bit (~6e-8 in mse), which
    beta = 5000 turns into a logit of 0.5 * 5000 * 6e-8 = 1.5e-4; so ln 2 up to 1e-3 here."""
    cfg = _cfg("sd15", sd15_dir, pairs_parquet, tmp_path, "max_steps=1", "diffusion.lora.enabled=false")
    first = train(cfg).history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert first["mse/policy_chosen"] == pytest.approx(first["mse/ref_chosen"], rel=1e-6)


def test_one_step_changes_only_the_trainable_parameters(sd15_dir, pairs_parquet, tmp_path):
    tr = setup(_cfg("sd15", sd15_dir, pairs_parquet, tmp_path))
    trainable = {n: p.detach().clone() for n, p in tr.task.unet.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in tr.task.unet.named_parameters() if not p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    from diffdpo.train import micro_batches

    train_step(tr, micro_batches(tr.task, tr.cfg, tr.accelerator, tr.state))
    after = dict(tr.task.unet.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in trainable.items())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())


def test_batch4_accum1_equals_batch1_accum4(sd15_dir, pairs_parquet, tmp_path):
    """Same pairs, same per-pair noise: the accumulated gradient equals the big-batch gradient (up to float
    summation order). Adam's first step (~ lr * sign(g)) and beta = 5000 amplify last-bit differences, so
    later losses agree to 1e-3 only."""
    from diffdpo.train import run

    runs = {}
    for bs, acc in ((4, 1), (1, 4)):
        cfg = _cfg("sd15", sd15_dir, pairs_parquet, tmp_path / f"b{bs}", "max_steps=2",
                   f"per_device_batch_size={bs}", f"gradient_accumulation_steps={acc}")
        tr = setup(cfg)
        grads: list[dict[str, torch.Tensor]] = []
        step = tr.optimizer.step

        def recording_step(*args, _step=step, _grads=grads, _tr=tr, **kwargs):
            _grads.append({n: p.grad.clone() for n, p in _tr.task.unet.named_parameters() if p.requires_grad})
            return _step(*args, **kwargs)

        tr.optimizer.step = recording_step
        runs[bs] = (run(tr), grads)
    (res4, g4), (res1, g1) = runs[4], runs[1]
    assert res4.history[0]["loss"] == res1.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert res4.history[0]["grad_norm"] == pytest.approx(res1.history[0]["grad_norm"], rel=1e-5)
    flat4 = torch.cat([g.flatten() for g in g4[0].values()])
    flat1 = torch.cat([g1[0][name].flatten() for name in g4[0]])
    # gradients are of differences of nearly equal errors (m_w - m_l), so float32 noise shows at ~1e-5
    assert ((flat4 - flat1).norm() / flat4.norm()).item() < 1e-4
    assert res4.history[1]["loss"] == pytest.approx(res1.history[1]["loss"], abs=1e-3)


def test_resume_reproduces_the_uninterrupted_losses_exactly(sd15_dir, pairs_parquet, tmp_path):
    """6 steps of 2 pairs over 8 pairs crosses an epoch; resuming at step 3 gives bit-identical losses."""
    extra = ("max_steps=6", "checkpoint_every=3", "diffusion.data.prompt_dropout=0.5",
             "diffusion.data.random_flip=true", "optim.lr_scheduler=constant_with_warmup", "optim.warmup_steps=2")
    full = train(_cfg("sd15", sd15_dir, pairs_parquet, tmp_path / "full", *extra))
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000003"
    assert (ckpt / "weights" / "pytorch_lora_weights.safetensors").is_file()
    assert not list((tmp_path / "full" / "checkpoints").glob(".tmp-*"))
    resumed = train(_cfg("sd15", sd15_dir, pairs_parquet, tmp_path / "resumed", *extra, f"resume_from={ckpt}"))
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert _losses(resumed) == _losses(full)[3:]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history][3:]


def test_cached_training_gives_the_uncached_losses(sd15_dir, pairs_parquet, tmp_path):
    extra = ("max_steps=3", "diffusion.data.prompt_dropout=0.3")
    uncached = train(_cfg("sd15", sd15_dir, pairs_parquet, tmp_path / "raw", *extra))
    cached = train(_cfg("sd15", sd15_dir, pairs_parquet, tmp_path / "cached", *extra,
                        f"diffusion.data.cache_dir={tmp_path / 'cache'}"))
    assert list((tmp_path / "cache").iterdir())  # the cache was built
    # step 1: same pairs, same noise and dropout; the VAE's output differs only in the last bits (batching)
    for name in ("loss", "mse/policy_chosen", "mse/policy_rejected", "mse/ref_chosen", "rewards/margins"):
        assert cached.history[0][name] == pytest.approx(uncached.history[0][name], rel=1e-5, abs=1e-6), name
    # later steps: Adam's first update (~ lr * sign(g)) amplifies those bits a little
    assert _losses(cached) == pytest.approx(_losses(uncached), abs=1e-3)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_trained_lora_loads_into_a_diffusers_pipeline_and_changes_its_output(
    kind, sd15_dir, sdxl_dir, pairs_parquet, tmp_path
):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model_dir = sd15_dir if kind == "sd15" else sdxl_dir
    result = train(_cfg(kind, model_dir, pairs_parquet, tmp_path, "max_steps=3", "optim.lr=1e-2"))
    cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = sample()
    pipe.load_lora_weights(str(result.final_dir))
    after = sample()
    assert after.shape == before.shape and abs(after - before).max() > 1e-4


def test_full_finetune_saves_a_loadable_unet(sd15_dir, pairs_parquet, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = _cfg("sd15", sd15_dir, pairs_parquet, tmp_path, "max_steps=1", "diffusion.lora.enabled=false",
               "optim.lr=1e-4", "gradient_checkpointing=true")
    result = train(cfg)
    trained = UNet2DConditionModel.from_pretrained(str(result.final_dir / "unet"))
    base = UNet2DConditionModel.from_pretrained(str(sd15_dir), subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))


def test_hand_built_pickapic_parquet_with_ties_and_a_corrupt_image_trains_via_the_cli(
    sd15_dir, messy_parquet, tmp_path, caplog, capsys
):
    """8 decided pairs + 2 ties (dropped) + 1 corrupt image (skipped, counted, named): 3 steps x 3 pairs."""
    from diffdpo.cli import main

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="diffdpo"):
        rc = main(["train", "--config", str(TINY["sd15"]), *tiny_overrides(sd15_dir, messy_parquet, out),
                   "max_steps=3", "per_device_batch_size=3", "tensorboard=true"])
    assert rc == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert sum(r["pairs"] for r in logs) == 8  # 9 kept rows, the corrupt one skipped
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert "corrupt" in caplog.text and "train-00000.parquet" in caplog.text
    assert "ties" in capsys.readouterr().out  # the data summary at the end of the run
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "tensorboard").glob("events.*"))


def test_sdxl_tiny_config_trains(sdxl_dir, pairs_parquet, tmp_path):
    result = train(_cfg("sdxl", sdxl_dir, pairs_parquet, tmp_path, "max_steps=2"))
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert math.isfinite(result.history[1]["loss"])


@pytest.mark.parametrize("extra", [
    ("mixed_precision=bf16", "diffusion.model.text_encoder_dtype=auto"),  # bf16 UNet base + text, fp32 VAE, fp32 LoRA
    ("diffusion.model.prediction_type=flow", "diffusion.noise.logit_mean=1.0"),  # DSO-style flow matching
    ("diffusion.model.prediction_type=v_prediction", "diffusion.noise.weighting=min_snr",
     "diffusion.noise.share_noise=false"),
], ids=["bf16", "flow", "v_minsnr_decoupled"])
def test_variants_train(sdxl_dir, pairs_parquet, tmp_path, extra, fresh_accelerate_state):
    result = train(_cfg("sdxl", sdxl_dir, pairs_parquet, tmp_path, "max_steps=2", *extra))
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(h["loss"]) and not h["skipped"] for h in result.history)

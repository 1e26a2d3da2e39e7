"""The Generator3D protocol with the toy voxel model and with a second, unrelated implementation."""

from __future__ import annotations

import math

import pytest
import torch

import sim
from diffdpo.adapters import add_lora
from diffdpo.dso.generator import Generator3D, generator_logps, noise_samples
from diffdpo.dso.task import DSOTask
from diffdpo.toy.voxel_model import VoxelGenerator, build_unet
from diffdpo.train import TrainConfig, train
from tests.dso.box_generator import BoxGenerator


def _voxel(objective="sample"):
    return VoxelGenerator(build_unet(0, (8, 16)), objective, sample_steps=2)


def prepare_network(gen, lora_rank: int) -> list[torch.nn.Parameter]:
    """LoRA on the generator's own target modules (rank > 0), or every weight trainable."""
    if lora_rank <= 0:
        return list(gen.network.requires_grad_(True).parameters())
    return add_lora(gen.network, lora_rank, None, gen.lora_target_modules)



@pytest.mark.parametrize("make", [_voxel, BoxGenerator], ids=["voxels", "boxes"])
def test_generators_fit_the_protocol_sample_by_seed_and_decode_to_scoreable_meshes(make):
    gen = make()
    assert isinstance(gen, Generator3D)
    a = gen.sample([0, 1], [5, 6])
    assert a.shape == (2, *gen.latent_shape)
    assert torch.allclose(a[1:], gen.sample([1], [6]), atol=1e-4)  # a sample depends on its own seed only
    results = sim.score_meshes([m for m in gen.decode(a)], workers=0)
    assert len(results) == 2 and all(r.valid or r.reason for r in results)


@pytest.mark.parametrize("make", [_voxel, BoxGenerator], ids=["voxels", "boxes"])
def test_lora_reference_equals_policy_at_start_so_dpo_starts_at_ln2(make, tmp_path):
    gen = make()
    trainable = prepare_network(gen, lora_rank=4)
    assert trainable and all(p.requires_grad for p in trainable)
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in gen.network.parameters())
    lat = gen.sample([0, 0, 1, 1], [1, 2, 3, 4])
    items = [{"latents": torch.stack([lat[0], lat[1]]), "cond": 0}, {"latents": torch.stack([lat[2], lat[3]]), "cond": 1}]
    task = DSOTask(gen, items, pointwise=False, trainable=trainable, seed=3)
    before = [p.detach().clone() for p in trainable]
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, per_device_batch_size=2, tensorboard=False,
                      progress_bar=False, checkpoint_every=0)
    cfg.loss.beta, cfg.optim.lr = 50.0, 1e-2
    history = train(cfg, task).history
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    assert (tmp_path / "final" / "dso_weights.safetensors").is_file()


def test_flow_matching_objective_trains_pointwise_and_with_the_denoising_regulariser(tmp_path):
    gen = _voxel("flow")
    assert gen.schedule.prediction_type == "flow"
    trainable = prepare_network(gen, lora_rank=4)
    lat = gen.sample([0, 1, 2, 3], [1, 2, 3, 4])
    aux = gen.training_latents([0, 1, 2, 3], seed=0)
    items = [{"latents": lat[i][None], "cond": i, "label": i % 2 == 0, "aux": aux[i], "aux_cond": i} for i in range(4)]
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=3, per_device_batch_size=2, tensorboard=False,
                      progress_bar=False, checkpoint_every=0)
    cfg.loss.type, cfg.loss.beta, cfg.optim.lr, cfg.loss.dro_anchored = "dso_dro", 1.0, 1e-2, True
    task = DSOTask(gen, items, pointwise=True, trainable=trainable, aux_weight=0.5)
    history = train(cfg, task).history
    assert all(math.isfinite(h["loss"]) and h["loss/aux"] > 0 for h in history)
    noised = noise_samples(gen.schedule, lat, [torch.Generator().manual_seed(i) for i in range(4)])
    logp, mse = generator_logps(gen, gen.network, noised, torch.arange(4))
    assert logp.shape == (4,) and torch.allclose(logp, -0.5 * mse)


def test_full_fine_tune_uses_a_frozen_copy_as_reference():
    gen = BoxGenerator()
    trainable = prepare_network(gen, lora_rank=0)
    lat = gen.sample([0, 1], [1, 2])
    task = DSOTask(gen, [{"latents": lat, "cond": 0}], pointwise=False, trainable=trainable)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.1)
    out = task.compute(gen.network, task.collate(task.items), torch.tensor([0]))
    assert not torch.allclose(out.policy_chosen, out.ref_chosen)

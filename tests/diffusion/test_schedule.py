"""Schedules: targets per prediction type, noise sharing, weights and the logp proxy, by hand and vs diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from diffdpo.diffusion.schedule import (
    DDPMSchedule,
    FlowMatchingSchedule,
    build_schedule,
    mse_to_logp,
    noise_pairs,
    pair_generators,
    per_sample_mse,
)
from diffdpo.diffusion.tiny import tiny_scheduler
from diffdpo.losses import preference_loss


def _hand_schedule(prediction_type: str) -> DDPMSchedule:
    """alphas_cumprod = [0.64, 0.8, 0.5]: at t=0 sqrt(a)=0.8, sqrt(1-a)=0.6."""
    return DDPMSchedule(torch.tensor([0.64, 0.8, 0.5], dtype=torch.float64), prediction_type)


def test_ddpm_noising_and_targets_by_hand():
    """x0 = 1, eps = 2, t = 0: x_t = 0.8*1 + 0.6*2 = 2.0; v = 0.8*2 - 0.6*1 = 1.0; eps -> 2; sample -> 1."""
    x0, eps, t = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([0])
    expected = {"epsilon": 2.0, "v_prediction": 1.0, "sample": 1.0}
    for ptype, target in expected.items():
        s = _hand_schedule(ptype)
        assert s.add_noise(x0, eps, t).item() == pytest.approx(2.0, abs=1e-6)
        assert s.target(x0, eps, t).item() == pytest.approx(target, abs=1e-6)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_ddpm_matches_diffusers_add_noise_and_get_velocity(ptype):
    sched = tiny_scheduler(ptype)
    s = build_schedule(sched)
    assert isinstance(s, DDPMSchedule) and s.prediction_type == ptype
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    torch.testing.assert_close(s.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), rtol=0, atol=0)
    want = {"epsilon": eps, "sample": x0, "v_prediction": sched.get_velocity(x0, eps, t)}[ptype]
    torch.testing.assert_close(s.target(x0, eps, t), want, rtol=0, atol=0)


def test_flow_matching_by_hand():
    """t = 0.25, x0 = 1, eps = 3: x_t = 0.75 + 0.75 = 1.5; velocity eps - x0 = 2; network sees 250."""
    s = FlowMatchingSchedule(logit_mean=1.0, logit_std=1.0)
    x0, eps, t = torch.ones(1, 2), torch.full((1, 2), 3.0), torch.tensor([0.25])
    assert torch.allclose(s.add_noise(x0, eps, t), torch.full((1, 2), 1.5))
    assert torch.allclose(s.target(x0, eps, t), torch.full((1, 2), 2.0))
    assert s.model_timesteps(t).item() == pytest.approx(250.0)


def test_flow_timesteps_are_logit_normal():
    """DSO's t ~ sigmoid(N(1, 1)): logit(t) has mean 1 and std 1 (2000 draws, 4-sigma tolerance)."""
    s = FlowMatchingSchedule(logit_mean=1.0, logit_std=1.0)
    t = torch.cat([s.sample_t(g) for g in pair_generators(0, range(2000))])
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 1.0) < 4 / math.sqrt(2000)
    assert abs(logit.std().item() - 1.0) < 0.1
    assert build_schedule(None, "flow").prediction_type == "flow"


def test_min_snr_weights_by_hand():
    """t=1: a = 0.8, SNR = 0.8/0.2 = 4. gamma=2: eps 2/4 = 0.5, v 2/(4+1) = 0.4, sample 2. gamma=5: eps 1."""
    t = torch.tensor([1])
    assert _hand_schedule("epsilon").loss_weights(t, "min_snr", 2.0).item() == pytest.approx(0.5)
    assert _hand_schedule("v_prediction").loss_weights(t, "min_snr", 2.0).item() == pytest.approx(0.4)
    assert _hand_schedule("sample").loss_weights(t, "min_snr", 2.0).item() == pytest.approx(2.0)
    assert _hand_schedule("epsilon").loss_weights(t, "min_snr", 5.0).item() == pytest.approx(1.0)
    assert _hand_schedule("epsilon").loss_weights(t, "uniform", 5.0).item() == 1.0
    with pytest.raises(ValueError, match="DDPM-family"):
        FlowMatchingSchedule().loss_weights(t, "min_snr", 5.0)


def test_winner_and_loser_share_t_and_noise():
    s = build_schedule(tiny_scheduler())
    latents = torch.randn(3, 2, 4, 8, 8)  # (B, 2, C, H, W)
    out = noise_pairs(s, latents, pair_generators(0, [5, 6, 7]))
    b = 3
    assert torch.equal(out.timesteps[:b], out.timesteps[b:])
    assert torch.equal(out.target[:b], out.target[b:])  # epsilon target = the shared noise
    # with shared eps, x_t(w) - x_t(l) = sqrt(a_t) * (x0_w - x0_l)
    sa = s.alphas_cumprod[out.timesteps[:b]].sqrt().float().reshape(b, 1, 1, 1)
    torch.testing.assert_close(out.x_t[:b] - out.x_t[b:], sa * (latents[:, 0] - latents[:, 1]))
    apart = noise_pairs(s, latents, pair_generators(0, [5, 6, 7]), share_noise=False)
    assert not torch.equal(apart.target[:b], apart.target[b:])


def test_pair_randomness_does_not_depend_on_batching():
    """A pair's t and noise depend on (seed, key) only: one batch of 4 equals 4 batches of 1."""
    s = build_schedule(tiny_scheduler())
    latents = torch.randn(4, 2, 4, 8, 8)
    keys = [11, 3, 7, 42]
    whole = noise_pairs(s, latents, pair_generators(0, keys))
    parts = [noise_pairs(s, latents[i : i + 1], pair_generators(0, [k])) for i, k in enumerate(keys)]
    torch.testing.assert_close(whole.x_t[:4], torch.cat([p.x_t[:1] for p in parts]), rtol=0, atol=0)
    torch.testing.assert_close(whole.x_t[4:], torch.cat([p.x_t[1:] for p in parts]), rtol=0, atol=0)
    assert pair_generators(1, [3])[0].initial_seed() != pair_generators(0, [3])[0].initial_seed()


def test_mse_and_logp_by_hand():
    """pred - target = [[1, 1], [2, 0]] -> mse [1, 2] -> logp [-0.5, -1]; weight 2 -> [-1, -2]."""
    pred, target = torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.zeros(2, 2)
    mse = per_sample_mse(pred, target)
    assert mse.tolist() == [1.0, 2.0]
    assert mse_to_logp(mse).tolist() == [-0.5, -1.0]
    assert mse_to_logp(mse, torch.tensor([2.0, 2.0])).tolist() == [-1.0, -2.0]


def test_logp_proxy_gives_the_official_diffusion_dpo_loss():
    """-logsigmoid(-0.5 * 5000 * ((m_w - m_l) - (r_w - r_l))) with the generic loss at the same beta."""
    m_w, m_l = torch.tensor([0.1002, 0.2]), torch.tensor([0.1, 0.2001])
    r_w, r_l = torch.tensor([0.1001, 0.2]), torch.tensor([0.1, 0.2])
    official = -torch.nn.functional.logsigmoid(-0.5 * 5000 * ((m_w - m_l) - (r_w - r_l)))
    ours = preference_loss(mse_to_logp(m_w), mse_to_logp(m_l), mse_to_logp(r_w), mse_to_logp(r_l), beta=5000.0)
    torch.testing.assert_close(ours.losses, official)

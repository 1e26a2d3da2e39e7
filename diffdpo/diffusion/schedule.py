"""Noise schedules, targets per prediction type, and the per-sample log-likelihood proxy.

Schedules are kept apart from networks: nothing here calls a model. A network is any callable
``model(x_t, t, cond) -> prediction``; this module supplies ``x_t``, ``t``, the regression target and a
per-sample weight, and turns the prediction error into a log-likelihood proxy.

Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, eq. 14) replaces the intractable
``log p_theta(x_0 | c)`` with a single-sample estimate of the ELBO's denoising term::

    mse_theta(x) = || eps - eps_theta(x_t, t) ||^2 / (C H W)        (per sample, shared t and eps)
    logp_theta(x) ~ -0.5 * mse_theta(x)

so that ``beta * (logp_w - logp_l - (ref_w - ref_l)) = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))``: the
generic DPO loss of :mod:`diffdpo.losses` with ``beta = 5000`` is the official Diffusion-DPO loss.
Winner and loser share one timestep and one noise draw per pair (official behaviour), which makes
the difference ``m_w - m_l`` a low-variance estimate; ``share_noise=False`` decouples them.

Randomness is drawn per pair from a generator seeded by ``(seed, pair key)`` (see
:func:`pair_generators`), so a pair gets the same ``t`` and noise whatever the batch size, gradient
accumulation, process count, or whether the run was resumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
Weighting = Literal["uniform", "min_snr"]

_MASK63 = (1 << 63) - 1


def pair_generators(seed: int, keys: Sequence[int] | torch.Tensor, stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per pair, seeded by ``(seed, key, stream)`` only (a stable integer mix).

    Separate ``stream`` ids keep independent uses apart (noise vs prompt dropout), so turning one on
    does not shift the other's draws.
    """
    keys = keys.tolist() if isinstance(keys, torch.Tensor) else list(keys)
    gens = []
    for key in keys:
        mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(key) * 0xBF58476D1CE4E5B9
                 + (int(stream) + 1) * 0x94D049BB133111EB) & _MASK63
        gens.append(torch.Generator().manual_seed(mixed))
    return gens


class Schedule(Protocol):
    """What :func:`noise_pairs` needs from a schedule (DDPM-family or flow matching)."""

    prediction_type: PredictionType

    def sample_t(self, generator: torch.Generator) -> torch.Tensor: ...
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor: ...
    def loss_weights(self, t: torch.Tensor, weighting: Weighting, snr_gamma: float) -> torch.Tensor: ...


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) broadcastable against ``like``."""
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


@dataclass
class DDPMSchedule:
    """Discrete variance-preserving schedule read from a diffusers scheduler's ``alphas_cumprod``.

    ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (Ho et al. 2020, eq. 4), with ``t`` uniform over
    ``[0, T)``. Targets: ``epsilon`` -> eps; ``v_prediction`` -> ``sqrt(a_t) eps - sqrt(1 - a_t) x_0``
    (Salimans & Ho 2022); ``sample`` -> x_0.
    """

    alphas_cumprod: torch.Tensor  # (T,) float64 on CPU
    prediction_type: PredictionType = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"DDPMSchedule does not support prediction_type={self.prediction_type!r}")

    @classmethod
    def from_scheduler(cls, scheduler: Any, prediction_type: str | None = None) -> DDPMSchedule:
        """Build from a diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``, ...) instance."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"{type(scheduler).__name__} has no alphas_cumprod; for flow-matching models use "
                "prediction_type='flow' (FlowMatchingSchedule)"
            )
        ptype = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        return cls(torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).cpu(), ptype)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def sample_t(self, generator: torch.Generator) -> torch.Tensor:
        """One integer timestep, uniform over ``[0, T)``: shape (1,) int64."""
        return torch.randint(0, self.num_train_timesteps, (1,), generator=generator)

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]  # (N,) float64
        # computed in float32 then cast, like diffusers' add_noise (which indexes alphas in x's dtype)
        a = a.to(torch.float32).to(like.dtype)
        return _expand(a.sqrt(), like), _expand((1 - a).sqrt(), like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sa, s1a = self._coefs(t, x0)
        return sa * x0 + s1a * noise  # (N, C, H, W)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        sa, s1a = self._coefs(t, x0)
        return sa * noise - s1a * x0  # v-prediction

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t.long()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``a_t / (1 - a_t)`` per timestep: (N,) float32."""
        a = self.alphas_cumprod[t.cpu().long()]
        return (a / (1 - a)).to(torch.float32).to(t.device)

    def loss_weights(self, t: torch.Tensor, weighting: Weighting, snr_gamma: float) -> torch.Tensor:
        """Per-sample weights: 1 (``uniform``) or Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556).

        Min-SNR weights the x_0-space loss by ``min(SNR, gamma)``; expressed in each target's space:
        epsilon ``min(SNR, gamma) / SNR``, v ``min(SNR, gamma) / (SNR + 1)``, sample ``min(SNR, gamma)``.
        """
        if weighting == "uniform":
            return torch.ones(t.shape[0], device=t.device)
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped


@dataclass
class FlowMatchingSchedule:
    """Rectified flow: ``x_t = (1 - t) x_0 + t eps``, target velocity ``eps - x_0``, ``t`` in (0, 1).

    ``t`` is logit-normal, ``t = sigmoid(mu + sigma * n)`` with ``n ~ N(0, 1)`` (Esser et al. 2024, SD3,
    eq. 19); DSO (Li et al. 2025, arXiv 2503.22677) uses ``mu = 1, sigma = 1`` and no ELBO weighting.
    The network sees ``t * timestep_scale`` (1000 for SD3/TRELLIS-style models).
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_scale: float = 1000.0
    prediction_type: PredictionType = "flow"

    def sample_t(self, generator: torch.Generator) -> torch.Tensor:
        """One continuous timestep in (0, 1): shape (1,) float32."""
        n = torch.randn((1,), generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * n)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = _expand(t.to(x0.device, x0.dtype), x0)
        return (1 - tt) * x0 + tt * noise  # (N, C, H, W)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.timestep_scale

    def loss_weights(self, t: torch.Tensor, weighting: Weighting, snr_gamma: float) -> torch.Tensor:
        if weighting != "uniform":
            raise ValueError("min_snr weighting is defined for DDPM-family schedules only; use 'uniform'")
        return torch.ones(t.shape[0], device=t.device)


def build_schedule(
    scheduler: Any | None,
    prediction_type: str | None = None,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    timestep_scale: float = 1000.0,
) -> DDPMSchedule | FlowMatchingSchedule:
    """The schedule for a model: flow matching when asked (or the scheduler is a flow-match one), else DDPM."""
    is_flow = prediction_type == "flow" or (
        prediction_type is None and scheduler is not None and "FlowMatch" in type(scheduler).__name__
    )
    if is_flow:
        return FlowMatchingSchedule(logit_mean, logit_std, timestep_scale)
    if scheduler is None:
        raise ValueError("a DDPM-family schedule needs the model's diffusers scheduler")
    return DDPMSchedule.from_scheduler(scheduler, prediction_type)


@dataclass
class NoisedPairs:
    """Noised inputs for a batch of B pairs, stacked winners first: rows ``[:B]`` chosen, ``[B:]`` rejected."""

    x_t: torch.Tensor  # (2B, C, H, W)
    timesteps: torch.Tensor  # (2B,) what the network is given
    target: torch.Tensor  # (2B, C, H, W)
    weights: torch.Tensor  # (2B,)


def noise_pairs(
    schedule: Schedule,
    latents: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    share_noise: bool = True,
    weighting: Weighting = "uniform",
    snr_gamma: float = 5.0,
) -> NoisedPairs:
    """Sample t and noise per pair and build network inputs and targets.

    ``latents`` is (B, 2, C, H, W) with the winner at index 0. With ``share_noise`` (default, as in
    Wallace et al. 2023, Alg. 1) winner and loser get the same ``t`` and ``eps``; otherwise each image
    draws its own (both from the pair's generator, so results stay batch-size independent).
    """
    b = latents.shape[0]
    if len(generators) != b:
        raise ValueError(f"need one generator per pair: got {len(generators)} for {b} pairs")
    shape = tuple(latents.shape[2:])
    ts, noises = [], []
    for g in generators:
        t_w, n_w = schedule.sample_t(g), torch.randn(shape, generator=g)
        t_l, n_l = (t_w, n_w) if share_noise else (schedule.sample_t(g), torch.randn(shape, generator=g))
        ts.append(torch.cat([t_w, t_l]))  # (2,)
        noises.append(torch.stack([n_w, n_l]))  # (2, C, H, W)
    t = torch.stack(ts).T.reshape(-1).to(latents.device)  # (2B,) winners first
    noise = torch.stack(noises).transpose(0, 1).reshape(2 * b, *shape)  # (2B, C, H, W)
    noise = noise.to(latents.device, latents.dtype)
    x0 = latents.transpose(0, 1).reshape(2 * b, *shape)  # (2B, C, H, W) winners first
    return NoisedPairs(
        x_t=schedule.add_noise(x0, noise, t),
        timesteps=schedule.model_timesteps(t),
        target=schedule.target(x0, noise, t),
        weights=schedule.loss_weights(t, weighting, snr_gamma).to(latents.device),
    )


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all non-batch dims, in float32: (N, ...) -> (N,)."""
    err = (pred.float() - target.float()) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


def mse_to_logp(mse: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Log-likelihood proxy ``logp = -0.5 * w * mse`` (Wallace et al. 2023, eq. 14, see module docstring)."""
    return -0.5 * (mse if weights is None else weights * mse)

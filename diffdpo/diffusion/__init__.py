"""Diffusion models as preference-trainable policies (Diffusion-DPO, Wallace et al. 2023, arXiv 2311.12908).

* :mod:`~diffdpo.diffusion.schedule`: timesteps, noise, targets per prediction type, weights, and the
  per-sample log-likelihood proxy ``logp = -0.5 * mse`` (no networks in there).
* :mod:`~diffdpo.diffusion.conditioning`: SD1.5/SDXL text conditioning, SDXL micro-conditioning,
  VAE latents, prompt dropout, and the ``model(x_t, t, cond)`` contract for diffusers UNets.
* :mod:`~diffdpo.diffusion.models`: ``from_pretrained`` loading, LoRA, the reference model, saving.
* :mod:`~diffdpo.diffusion.task`: the :class:`~diffdpo.train.PreferenceTask` the training loop runs.
* :mod:`~diffdpo.diffusion.tiny`: tiny seeded SD/SDXL pipelines for CPU tests and benchmarks.
"""

from diffdpo.diffusion.schedule import (
    DDPMSchedule,
    FlowMatchingSchedule,
    NoisedPairs,
    build_schedule,
    mse_to_logp,
    noise_pairs,
    pair_generators,
    per_sample_mse,
)

__all__ = [
    "DDPMSchedule",
    "FlowMatchingSchedule",
    "NoisedPairs",
    "build_schedule",
    "mse_to_logp",
    "noise_pairs",
    "pair_generators",
    "per_sample_mse",
]

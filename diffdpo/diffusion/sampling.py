"""Seeded text-to-image sampling with any diffusers pipeline: one image per (prompt, seed).

Every image's initial latent is drawn from its own CPU ``torch.Generator`` seeded with that image's seed and
handed to the pipeline with that generator (for any noise the scheduler adds while sampling), so an image
depends only on its prompt and seed, never on its batch or device. The draw
is the one diffusers' ``randn_tensor`` makes for a list of CPU generators (``latent_channels x h/f x
w/f`` values per image), so passing the latents changes nothing for a stock pipeline, and it also
serves UNets whose ``in_channels`` is not the latent width (the toy's coordinate channels). The demo,
the online rounds and ``diffdpo eval`` all sample through :func:`sample_images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def default_resolution(pipe: Any) -> int:
    """The pipeline's native resolution: ``unet.config.sample_size x vae_scale_factor`` (what diffusers uses)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def initial_latents(pipe: Any, seeds: Sequence[int], resolution: int) -> tuple[Any, list[Any]]:
    """(n, C, r/f, r/f) standard-normal latents, row ``i`` drawn from ``torch.Generator().manual_seed(seeds[i])``,
    and those generators, which the pipeline then uses for any noise its scheduler adds during sampling
    (DDPM, ancestral samplers): diffusers' own order of draws for a list of generators."""
    import torch

    f = int(pipe.vae_scale_factor)
    shape = (int(pipe.vae.config.latent_channels), resolution // f, resolution // f)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def sample_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    resolution: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "sampling",
) -> np.ndarray:
    """(N, H, W, 3) uint8 images, image ``i`` from ``prompts[i]`` with initial noise from ``seeds[i]``."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    size = resolution or default_resolution(pipe)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        latents, generators = initial_latents(pipe, seeds[i : i + batch_size], size)
        images = pipe(list(prompts[i : i + batch_size]), height=size, width=size, num_inference_steps=steps,
                      guidance_scale=guidance_scale, latents=latents.to(device=device, dtype=dtype),
                      generator=generators, output_type="np").images  # (n, H, W, 3) in [0, 1]
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)

"""The 3D-generator protocol of the DSO loop, and the ELBO proxy on a generator's latents.

DSO (Li, Zheng, Rupprecht, Vedaldi 2025, arXiv 2503.22677) fine-tunes a 3D generator with
simulation feedback. The loop needs four things from a generator, whatever its architecture:

* **sample** latents for conditions, one seed per sample (fixed seeds -> a fixed held-out set);
* **decode** latents to meshes the simulator can score (``None`` where nothing can be decoded);
* **predict** the network output at ``(x_t, t, condition)``, so that the shared schedules of
  :mod:`diffdpo.diffusion.schedule` give the per-sample denoising (DDPM family) or velocity (flow
  matching) error, and ``logp = -0.5 * mse`` feeds :mod:`diffdpo.losses` unchanged;
* the trainable **network** (an ``nn.Module``) and the names of the modules LoRA should adapt.

Conditions are integer ids into the generator's ``condition_names``: class labels for the toy voxel
model, prompt or image ids for a large model (the generator keeps the embeddings).

How TRELLIS (Xiang et al. 2024) plugs in, as DSO did: its first stage, the sparse-structure flow
transformer, generates a dense ``(8, 16, 16, 16)`` latent that a frozen decoder turns into a 64^3
occupancy grid; the second stage (structured latents -> mesh) stays frozen. A wrapper implements

* ``latent_shape = (8, 16, 16, 16)``, ``schedule = FlowMatchingSchedule(logit_mean=1.0, logit_std=1.0)``
  (DSO's t distribution, target ``eps - x0``, no ELBO weighting);
* ``predict(net, x_t, timesteps, conditions)`` -> ``net(x_t, timesteps, cond=image_embeddings[conditions])``
  (DINOv2 tokens of each condition image, computed once; classifier-free guidance is not used in the
  training forward);
* ``sample`` -> the pipeline's first-stage Euler sampler from seeded noise; ``decode`` -> the frozen
  sparse-structure decoder, the second stage and mesh extraction (the slow part: cache meshes);
* ``network`` = the flow transformer, ``lora_target_modules = ("to_q", "to_k", "to_v", "to_out")``
  with rank 64 / alpha 128 as in DSO.

Everything else (scoring, pairs, LoRA, reference = adapters disabled, the losses, the training loop)
is shared; :class:`diffdpo.toy.voxel_model.VoxelGenerator` is the CPU implementation.

Optional capabilities are protocols of their own, checked with ``isinstance``:

* :class:`MeasuresShapes`: ``occupancy(latents)`` and ``reference_bank()`` (fidelity, recognisability,
  size and diversity against training objects; without it a run reports stability only);
* :class:`DrawsTrainingData`: ``training_latents(conditions, seed)``, fresh objects of the training
  distribution (the denoising regulariser's data and the rescue pairs' winners).

:func:`load_generator` builds any generator from ``"package.module:Name"`` plus keyword arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from diffdpo.diffusion.schedule import NoisedPairs, Schedule, mse_to_logp, per_sample_mse


@runtime_checkable
class Generator3D(Protocol):
    """What the DSO loop needs from a 3D generator (see the module docstring)."""

    condition_names: Sequence[str]
    latent_shape: tuple[int, ...]
    schedule: Schedule
    network: torch.nn.Module
    lora_target_modules: Sequence[str]

    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditions: torch.Tensor) -> torch.Tensor:
        """Network output for ``x_t`` (N, *latent_shape) at ``timesteps`` (N,) and ``conditions`` (N,)."""
        ...

    def sample(self, conditions: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """Latents (N, *latent_shape) from the current network, one seed per sample (no grad)."""
        ...

    def decode(self, latents: torch.Tensor) -> list[Any]:
        """One mesh (``trimesh.Trimesh``, or anything ``sim.score_meshes`` takes) or ``None`` per latent."""
        ...


@runtime_checkable
class ShapeReference(Protocol):
    """Training objects to measure generated ones against (e.g. :class:`diffdpo.toy.voxels.ShapeBank`)."""

    def measure(self, occupancies: Any, labels: Sequence[int]) -> dict[str, Any]:
        """Per sample ``fidelity``, ``recognised`` and ``volume_ratio`` arrays."""
        ...

    def diversity(self, occupancies: Any) -> float:
        """Mean pairwise dissimilarity among samples of one condition."""
        ...


@runtime_checkable
class MeasuresShapes(Protocol):
    """A generator whose samples can be compared with its training objects."""

    def occupancy(self, latents: torch.Tensor) -> Any:
        """The decoded objects as occupancy grids (N, ...), what the simulator scores."""
        ...

    def reference_bank(self) -> ShapeReference:
        """Training objects to compare with."""
        ...


@runtime_checkable
class DrawsTrainingData(Protocol):
    """A generator that can draw fresh latents from its training distribution."""

    def training_latents(self, conditions: Sequence[int], seed: int) -> torch.Tensor:
        """One latent (N, *latent_shape) per condition, a deterministic function of ``seed``."""
        ...


def load_generator(target: str, args: dict[str, Any] | None = None) -> Generator3D:
    """``"package.module:Name"`` (``Name`` may be dotted, e.g. ``Class.load``) called with ``args``."""
    import importlib

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"generator={target!r} must look like 'package.module:Name' (e.g. "
                         "'diffdpo.toy.voxel_model:VoxelGenerator.load')")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"generator={target!r}: cannot import {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"generator={target!r}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    generator = obj(**(args or {}))
    if not isinstance(generator, Generator3D):
        raise TypeError(f"generator={target!r} returned a {type(generator).__name__}, which lacks part of the "
                        "Generator3D protocol (condition_names, latent_shape, schedule, network, "
                        "lora_target_modules, predict, sample, decode)")
    return generator


def noise_samples(schedule: Schedule, latents: torch.Tensor, generators: Sequence[torch.Generator]) -> NoisedPairs:
    """Per-sample ``t`` and noise (one generator per sample) for unpaired latents (N, *shape).

    The pointwise counterpart of :func:`diffdpo.diffusion.schedule.noise_pairs` (which shares t and
    noise within a pair); rows keep the input order.
    """
    if len(generators) != latents.shape[0]:
        raise ValueError(f"need one generator per sample: got {len(generators)} for {latents.shape[0]}")
    shape = tuple(latents.shape[1:])
    t = torch.cat([schedule.sample_t(g) for g in generators]).to(latents.device)  # (N,)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(latents.device, latents.dtype)
    return NoisedPairs(
        x_t=schedule.add_noise(latents, noise, t),
        timesteps=schedule.model_timesteps(t),
        target=schedule.target(latents, noise, t),
        weights=schedule.loss_weights(t, "uniform", 5.0).to(latents.device),
    )


def generator_logps(generator: Generator3D, network: torch.nn.Module, noised: NoisedPairs,
                    conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, mse)`` per row of ``noised``: the ELBO proxy ``-0.5 * w * mse`` (Wallace et al. 2023, eq. 14)."""
    pred = generator.predict(network, noised.x_t, noised.timesteps, conditions)  # (N, *latent_shape)
    mse = per_sample_mse(pred, noised.target)  # (N,)
    return mse_to_logp(mse, noised.weights), mse

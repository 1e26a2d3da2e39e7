"""DSO fine-tuning as a :class:`diffdpo.task.PreferenceTask` on a :class:`Generator3D`'s latents.

Per batch (Li et al. 2025, arXiv 2503.22677; Diffusion-DPO's ELBO proxy, Wallace et al. 2023, eq. 14):

* pairs: winner and loser latents (B, 2, *latent_shape) of one condition share one ``t`` and one
  noise draw (:func:`diffdpo.diffusion.schedule.noise_pairs`); one policy forward over 2B rows and
  one reference forward (LoRA adapters disabled) give ``logp = -0.5 * mse`` -> :class:`~diffdpo.task.LogpsOut`;
* pointwise (DRO in DSO's form, KTO): one latent per row with a stable/unstable label ->
  :class:`PointwiseLogpsOut`;
* optional denoising regulariser (``aux_weight > 0``): each row carries one latent from a
  regularisation pool (fresh objects from the training distribution, or this round's stable
  samples); its SFT loss ``-logp`` (:func:`diffdpo.losses.pointwise_loss` ``sft``) times
  ``aux_weight`` is returned as ``aux_losses`` and added by the loop. It keeps the generator on its
  data manifold while the preference term pushes stability (the "grow a slab" cheat drifts off it).

Per-row randomness comes from :func:`diffdpo.diffusion.schedule.pair_generators` keyed by the loop's
stable sample keys, so results do not depend on batch size.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from diffdpo.adapters import adapters_disabled, tuner_layers
from diffdpo.diffusion.schedule import noise_pairs, pair_generators
from diffdpo.dso.generator import Generator3D, generator_logps, noise_samples
from diffdpo.losses import pointwise_loss
from diffdpo.task import LogpsOut, PointwiseLogpsOut

NOISE_STREAM, AUX_STREAM = 0, 2


class DSOTask:
    """One round's scored samples as a preference (pairs) or pointwise (labels) dataset."""

    def __init__(self, generator: Generator3D, items: list[dict[str, Any]], *, pointwise: bool,
                 trainable: list[torch.nn.Parameter], seed: int = 0, aux_weight: float = 0.0,
                 frozen_reference: torch.nn.Module | None = None) -> None:
        if not items:
            raise ValueError("the DSO dataset is empty: no group had both stable and unstable samples "
                             "(sample more per condition or use larger groups)")
        self.generator, self.items, self.pointwise = generator, items, pointwise
        self.trainable, self.seed, self.aux_weight = trainable, seed, aux_weight
        self._layers = tuner_layers(generator.network)
        if not self._layers and frozen_reference is None:
            frozen_reference = copy.deepcopy(generator.network).requires_grad_(False).eval()
        self.frozen_reference = frozen_reference

    # ---- PreferenceTask ---------------------------------------------------------------------------

    def trainable_module(self) -> torch.nn.Module:
        return self.generator.network

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.trainable

    def dataset(self) -> list[dict[str, Any]]:
        return self.items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"latents": torch.stack([it["latents"] for it in items]),  # (B, K, *latent_shape)
                 "cond": torch.tensor([it["cond"] for it in items], dtype=torch.long)}  # (B,)
        if self.pointwise:
            batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.bool)
        if self.aux_weight > 0:
            batch["aux"] = torch.stack([it["aux"] for it in items])  # (B, *latent_shape)
            batch["aux_cond"] = torch.tensor([it["aux_cond"] for it in items], dtype=torch.long)
        return batch

    def compute(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], keys: torch.Tensor
                ) -> LogpsOut | PointwiseLogpsOut:
        gens = pair_generators(self.seed, keys, NOISE_STREAM)
        latents, cond = batch["latents"], batch["cond"]
        if self.pointwise:
            noised = noise_samples(self.generator.schedule, latents[:, 0], gens)  # (B, ...)
            rows_cond = cond
        else:
            noised = noise_pairs(self.generator.schedule, latents, gens)  # (2B, ...) winners first
            rows_cond = torch.cat([cond, cond])  # (2B,)
        logp, mse = generator_logps(self.generator, model, noised, rows_cond)
        with torch.no_grad():
            ref_logp, ref_mse = self._reference_logps(noised, rows_cond)
        aux = self._aux_losses(model, batch, keys)
        if self.pointwise:
            metrics = {"mse/policy": mse.mean().detach(), "mse/ref": ref_mse.mean()}
            return PointwiseLogpsOut(logp, ref_logp, batch["label"], metrics, aux_losses=aux)
        b = latents.shape[0]
        metrics = {"mse/policy_chosen": mse[:b].mean().detach(), "mse/policy_rejected": mse[b:].mean().detach(),
                   "mse/ref_chosen": ref_mse[:b].mean(), "mse/ref_rejected": ref_mse[b:].mean()}
        return LogpsOut(logp[:b], logp[b:], ref_logp[:b], ref_logp[b:], metrics, aux_losses=aux)

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.generator.network.named_parameters()}
        return {names[id(p)]: p.detach() for p in self.trainable}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.generator.network.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def export(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(out_dir / "dso_weights.safetensors"))

    # ---- helpers ---------------------------------------------------------------------------------

    def _reference_logps(self, noised: Any, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen_reference is not None:
            return generator_logps(self.generator, self.frozen_reference, noised, cond)
        with adapters_disabled(self.generator.network, self._layers):
            return generator_logps(self.generator, self.generator.network, noised, cond)

    def _aux_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], keys: torch.Tensor
                    ) -> torch.Tensor | None:
        if self.aux_weight <= 0:
            return None
        aux = batch["aux"]
        noised = noise_samples(self.generator.schedule, aux, pair_generators(self.seed, keys, AUX_STREAM))
        logp, _ = generator_logps(self.generator, model, noised, batch["aux_cond"])
        labels = torch.ones(len(aux), dtype=torch.bool)
        return self.aux_weight * pointwise_loss(logp, None, labels, loss_type="sft", beta=1.0).losses  # (B,)

"""Diffusion-DPO as a :class:`diffdpo.task.PreferenceTask`: per-pair ELBO log-likelihood proxies.

For a batch of B pairs (Wallace et al. 2023, arXiv 2311.12908, Alg. 1 / eq. 14):

1. latents of winner and loser (VAE now, or from the latent cache), text conditioning with prompt
   dropout, SDXL ``time_ids`` from each image's real size and crop;
2. one ``t`` and one noise draw per pair, shared by winner and loser; ``x_t`` of shape (2B, C, h, w);
3. one policy forward over all 2B inputs, one reference forward under ``no_grad`` (adapters disabled
   for LoRA, a frozen copy otherwise);
4. ``logp = -0.5 * w(t) * mse`` per image -> :class:`diffdpo.task.LogpsOut`. The loss itself comes
   from :mod:`diffdpo.losses` in the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffdpo.adapters import add_lora_from, has_lora, mixed_precision_dtype, resolve_dtype
from diffdpo.config import UserError, check_data_source
from diffdpo.diffusion.conditioning import (
    TEXT_KEYS,
    Conditioner,
    apply_prompt_dropout,
    dropout_mask,
    unet_forward,
)
from diffdpo.diffusion.config import DiffusionConfig
from diffdpo.diffusion.models import (
    DiffusionComponents,
    Reference,
    conditioner_from,
    load_components,
    save_lora,
    save_unet,
)
from diffdpo.diffusion.schedule import (
    build_schedule,
    mse_to_logp,
    noise_pairs,
    pair_generators,
    per_sample_mse,
)
from diffdpo.task import LogpsOut, load_trainable_state_dict, trainable_state_dict

NOISE_STREAM, DROPOUT_STREAM = 0, 1


class DiffusionPreferenceTask:
    """SD1.5/SDXL Diffusion-DPO on Pick-a-Pic-style pairs, from raw images or a latent cache."""

    def __init__(self, cfg: DiffusionConfig, *, accelerator: Any, seed: int = 0,
                 gradient_checkpointing: bool = False, components: DiffusionComponents | None = None) -> None:
        self.cfg, self.seed = cfg, seed
        self.device = accelerator.device
        weight_dtype = mixed_precision_dtype(accelerator.mixed_precision)
        check_data_source(cfg.data.source, "diffusion.data.source")
        pairs = self._read_pairs()  # before loading the model: bad or empty data costs no model load
        self.components = components if components is not None else self._load(weight_dtype)
        self.kind = self.components.kind
        self.unet = self.components.unet
        self._prepare_unet(weight_dtype, gradient_checkpointing)
        self.reference = Reference.for_policy(self.unet, offload=cfg.lora.offload_reference, device=self.device,
                                              dtype=weight_dtype)
        self.schedule = build_schedule(self.components.scheduler, cfg.model.prediction_type,
                                       logit_mean=cfg.noise.logit_mean, logit_std=cfg.noise.logit_std,
                                       timestep_scale=cfg.noise.timestep_scale)
        self.conditioner: Conditioner = conditioner_from(self.components, cfg.data.latent_mode)
        self._move_encoders()
        self._dataset, self.cached = self._build_dataset(pairs, accelerator)
        self.empty_cond = self._empty_cond()
        if self.cached:  # training from the cache never runs the VAE or the text encoders: free them
            self.conditioner.vae, self.conditioner.text_encoders = None, []
            self.components.vae, self.components.text_encoders = None, []

    # ---- setup -------------------------------------------------------------------------------------

    def _load(self, weight_dtype: torch.dtype) -> DiffusionComponents:
        m = self.cfg.model
        try:
            return self._load_components(weight_dtype)
        except OSError as exc:  # diffusers/transformers: missing files, no network, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"diffusion.model.pretrained={m.pretrained!r} could not be loaded: {first}") from exc

    def _load_components(self, weight_dtype: torch.dtype) -> DiffusionComponents:
        m = self.cfg.model
        return load_components(
            m.pretrained, m.kind, revision=m.revision, variant=m.variant, vae_path=m.vae,
            unet_dtype=torch.float32, text_encoder_dtype=resolve_dtype(m.text_encoder_dtype, weight_dtype),
            vae_dtype=resolve_dtype(m.vae_dtype, weight_dtype),
        )

    def _prepare_unet(self, weight_dtype: torch.dtype, gradient_checkpointing: bool) -> None:
        lora = self.cfg.lora
        # LoRA: frozen base in the compute dtype, adapters in fp32; full fine-tune: fp32 master weights
        dtype = weight_dtype if lora.enabled else torch.float32
        self.unet.to(self.device)
        if self.unet.dtype != dtype:
            self.unet.to(dtype)
        if lora.enabled:
            self._trainable = add_lora_from(self.unet, lora)
        else:
            self._trainable = list(self.unet.requires_grad_(True).parameters())
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()

    def _move_encoders(self) -> None:
        for module in [self.conditioner.vae, *self.conditioner.text_encoders]:
            if module is not None:
                module.to(self.device)

    def _read_pairs(self) -> Any:
        """The Pick-a-Pic pairs of ``diffusion.data``; none left after dropping is an error with the counts."""
        from diffdpo.data import PickAPicPairs

        d = self.cfg.data
        allowed = set(d.model_filter) if d.model_filter else None
        pairs = PickAPicPairs(
            d.source, d.resolution, random_crop=d.random_crop, random_flip=d.random_flip, seed=self.seed,
            drop_ties=d.drop_ties, max_rows=d.max_rows, validate_images=d.validate_images,
            model_filter=(lambda m0, m1: m0 in allowed and m1 in allowed) if allowed else None,
        )
        if len(pairs) == 0:
            raise UserError(f"diffusion.data.source={d.source!r}: no usable pair ({' '.join(pairs.stats.summary().split())})")
        return pairs

    def _build_dataset(self, pairs: Any, accelerator: Any) -> tuple[Any, bool]:
        d = self.cfg.data
        if not d.cache_dir:
            return pairs, False
        return self._cached(pairs, accelerator), True

    def _cached(self, pairs: Any, accelerator: Any) -> Any:
        from diffdpo.data import CachedPairs, build_cache, cache_key

        d, m = self.cfg.data, self.cfg.model
        key = cache_key(m.pretrained, d.resolution, extra=f"{m.kind}:{m.vae or ''}:{d.latent_mode}")
        path = None
        if accelerator.is_main_process:  # one process encodes, the others wait and read
            path = build_cache(pairs, d.cache_dir, encode_images=self.conditioner.encode_images,
                               encode_prompts=self.conditioner.encode_prompts, key=key,
                               batch_size=d.cache_batch_size)
        accelerator.wait_for_everyone()
        if path is None:
            path = build_cache(pairs, d.cache_dir, encode_images=self.conditioner.encode_images,
                               encode_prompts=self.conditioner.encode_prompts, key=key,
                               batch_size=d.cache_batch_size, progress=False)
        return CachedPairs(path)

    def _empty_cond(self) -> dict[str, torch.Tensor]:
        if self.cached and getattr(self._dataset, "empty_cond", None) is not None:
            return self._dataset.empty_cond
        return {k: v[0] for k, v in self.conditioner.encode_prompts([""]).items()}

    # ---- the PreferenceTask protocol ---------------------------------------------------------------

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._trainable

    def dataset(self) -> Any:
        return self._dataset

    def collate(self, items: list[Any]) -> Any:
        from diffdpo.data import collate_cached, collate_pairs

        return collate_cached(items) if self.cached else collate_pairs(items)

    def compute(self, model: torch.nn.Module, batch: Any, keys: torch.Tensor) -> LogpsOut:
        """Policy and reference ``logp = -0.5 * w * mse`` for B pairs (see module docstring)."""
        latents, cond = self.inputs(batch, keys)  # (B, 2, C, h, w), {k: (2B, ...)}
        b = latents.shape[0]
        noised = noise_pairs(self.schedule, latents, pair_generators(self.seed, keys, NOISE_STREAM),
                             share_noise=self.cfg.noise.share_noise, weighting=self.cfg.noise.weighting,
                             snr_gamma=self.cfg.noise.snr_gamma)
        pred = unet_forward(model, noised.x_t, noised.timesteps, cond)  # (2B, C, h, w)
        ref_pred = self.reference(noised.x_t, noised.timesteps, cond)  # (2B, C, h, w), no grad
        mse, ref_mse = per_sample_mse(pred, noised.target), per_sample_mse(ref_pred, noised.target)  # (2B,)
        logp, ref_logp = mse_to_logp(mse, noised.weights), mse_to_logp(ref_mse, noised.weights)
        metrics = {"mse/policy_chosen": mse[:b].mean().detach(), "mse/policy_rejected": mse[b:].mean().detach(),
                   "mse/ref_chosen": ref_mse[:b].mean(), "mse/ref_rejected": ref_mse[b:].mean()}
        return LogpsOut(logp[:b], logp[b:], ref_logp[:b], ref_logp[b:], metrics)

    def inputs(self, batch: dict[str, Any], keys: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents (B, 2, C, h, w) and UNet conditioning for the 2B images (winners first)."""
        if self.cached:
            latents = batch["latents"].to(self.device, torch.float32)
            cond = {k: v.to(self.device) for k, v in batch["cond"].items() if k in TEXT_KEYS}
        else:
            px = batch["pixel_values"]  # (B, 2, 3, R, R)
            b = px.shape[0]
            flat = self.conditioner.encode_images(px.transpose(0, 1).reshape(2 * b, *px.shape[2:]))  # (2B, C, h, w)
            latents = flat.reshape(2, b, *flat.shape[1:]).transpose(0, 1)
            cond = self.conditioner.encode_prompts(batch["captions"])  # {k: (B, ...)}
        drop = dropout_mask(pair_generators(self.seed, keys, DROPOUT_STREAM), self.cfg.data.prompt_dropout)
        cond = apply_prompt_dropout(cond, self.empty_cond, drop)
        cond = {k: torch.cat([v, v]) for k, v in cond.items()}  # (2B, ...): same prompt for winner and loser
        res = self.cfg.data.resolution
        time_ids = self.conditioner.time_ids(batch["original_sizes"], batch["crop_top_lefts"], (res, res))
        if time_ids is not None:
            cond["time_ids"] = time_ids.to(self.device)  # (2B, 6)
        return latents, cond

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights by name (LoRA adapters, or the whole UNet)."""
        return trainable_state_dict(self.unet)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state_dict(self.unet, state)

    def export(self, out_dir: Path) -> None:
        """LoRA -> ``pytorch_lora_weights.safetensors`` (diffusers format); full -> ``unet/`` folder."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if has_lora(self.unet):
            save_lora(self.unet, out_dir, self.kind)
        else:
            save_unet(self.unet, out_dir)

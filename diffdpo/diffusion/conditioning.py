"""Conditioning for SD1.5- and SDXL-style UNets: text embeddings, SDXL micro-conditioning, VAE latents.

* SD1.5: the CLIP text encoder's last hidden state is the cross-attention context.
* SDXL (Podell et al. 2023, arXiv 2307.01952, sec. 2.2): two text encoders; their penultimate hidden
  states are concatenated on the feature axis, the pooled (projected) embedding of the second is
  ``text_embeds``, and ``time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` per
  sample. The official Diffusion-DPO script hard-codes the original size and crop; here they come from
  each image's real size and the crop the data pipeline applied.
* Prompt dropout (empty caption with probability p, 0.2 in the official SD1.5 Diffusion-DPO run) is
  applied to *encodings*, by swapping a row for the encoding of ``""``, so the cached and uncached
  paths drop the same prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

ModelKind = Literal["sd15", "sdxl"]
LatentMode = Literal["mode", "sample"]
TEXT_KEYS = ("encoder_hidden_states", "text_embeds")


def _tokenize(tokenizer: Any, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)  # (B, L)


@torch.no_grad()
def encode_prompts_sd15(tokenizer: Any, text_encoder: Any, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """SD1.5 context: CLIP last hidden state, ``{"encoder_hidden_states": (B, L, D)}``."""
    ids = _tokenize(tokenizer, captions, text_encoder.device)
    return {"encoder_hidden_states": text_encoder(ids)[0]}


@torch.no_grad()
def encode_prompts_sdxl(
    tokenizers: Sequence[Any], text_encoders: Sequence[Any], captions: Sequence[str]
) -> dict[str, torch.Tensor]:
    """SDXL context: penultimate hidden states of both encoders concatenated (B, L, D1 + D2) and the
    second encoder's pooled projection as ``text_embeds`` (B, P)."""
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        out = enc(_tokenize(tok, captions, enc.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (B, L, D_i)
        pooled = out[0]  # projected pooled embedding of CLIPTextModelWithProjection: (B, P)
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}


def sdxl_time_ids(
    original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning per sample: (N, 2) (h, w) and (N, 2) (top, left) -> (N, 6) float32."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.float().cpu(), crop_top_lefts.float().cpu(), target], dim=1)


def dropout_mask(generators: Sequence[torch.Generator], p: float) -> torch.Tensor:
    """Which prompts to drop, one draw per pair from that pair's generator: (B,) bool."""
    if p <= 0:
        return torch.zeros(len(generators), dtype=torch.bool)
    return torch.tensor([bool(torch.rand((1,), generator=g).item() < p) for g in generators])


def apply_prompt_dropout(
    cond: dict[str, torch.Tensor], empty_cond: dict[str, torch.Tensor], drop: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Replace rows of each text tensor where ``drop`` is True by the encoding of ``""``.

    ``cond[k]`` is (B, ...); ``empty_cond[k]`` is (...) or (1, ...). Non-text keys pass through.
    """
    if not bool(drop.any()):
        return cond
    out = dict(cond)
    for key, value in cond.items():
        if key not in empty_cond:
            continue
        empty = empty_cond[key].to(value.device, value.dtype).reshape(1, *value.shape[1:])
        mask = drop.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
        out[key] = torch.where(mask, empty, value)  # (B, ...)
    return out


@dataclass
class Conditioner:
    """Frozen encoders of one model family: ``encode_prompts(captions)`` and ``encode_images(pixels)``.

    ``latent_mode="mode"`` (default) takes the mean of the VAE posterior, deterministic and therefore
    cacheable; ``"sample"`` draws from it as the official Diffusion-DPO script does (then a cache fixes
    one draw per image).
    """

    kind: ModelKind
    vae: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    latent_mode: LatentMode = "mode"

    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a list of captions: dict of (B, ...) tensors (see module docstring)."""
        if self.kind == "sd15":
            return encode_prompts_sd15(self.tokenizers[0], self.text_encoders[0], captions)
        return encode_prompts_sdxl(self.tokenizers, self.text_encoders, captions)

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1] -> scaled latents (N, C, R/f, R/f) in float32.

        ``latents = (z - shift_factor) * scaling_factor`` (shift is 0 unless the VAE config sets one,
        as SD3/Flux-style VAEs do).
        """
        vae = self.vae
        with torch.autocast(vae.device.type, enabled=False):  # keep vae_dtype (fp32) under mixed precision
            dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        z = dist.mode() if self.latent_mode == "mode" else dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z.float() - shift) * vae.config.scaling_factor).float()

    def time_ids(
        self, original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_size: tuple[int, int]
    ) -> torch.Tensor | None:
        """SDXL ``time_ids`` for (B, 2, 2) sizes and crops -> (2B, 6), winners first; None for SD1.5."""
        if self.kind != "sdxl":
            return None
        sizes = original_sizes.transpose(0, 1).reshape(-1, 2)  # (2B, 2)
        crops = crop_top_lefts.transpose(0, 1).reshape(-1, 2)  # (2B, 2)
        return sdxl_time_ids(sizes, crops, target_size)


def unet_forward(unet: Any, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model contract ``model(x_t, t, cond) -> prediction`` for a diffusers ``UNet2DConditionModel``."""
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    out = unet(
        x_t,
        t,
        encoder_hidden_states=cond["encoder_hidden_states"],
        added_cond_kwargs=added or None,
        return_dict=False,
    )
    return out[0]  # (N, C, H, W)

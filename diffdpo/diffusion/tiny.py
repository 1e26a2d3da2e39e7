"""Tiny, seeded SD1.5- and SDXL-style pipelines for CPU tests, demos and benchmarks (no downloads).

Same classes and folder layout as the real models (``UNet2DConditionModel``, ``AutoencoderKL``, CLIP text
encoders, ``DDPMScheduler``), so everything that loads a real checkpoint through ``from_pretrained`` is
exercised unchanged. Cross-attention sits only in the low-resolution block: attention at full
resolution dominates CPU time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffdpo.diffusion.conditioning import ModelKind
from diffdpo.diffusion.models import DiffusionComponents

TEXT_HIDDEN = 32
TOKEN_LENGTH = 16


def tiny_tokenizer(max_length: int = TOKEN_LENGTH) -> Any:
    """A character-level CLIP BPE tokenizer (letters, digits, a little punctuation; no merges)."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?-'")
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_config(tokenizer: Any, projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )


def tiny_unet(kind: ModelKind, sample_size: int = 8) -> Any:
    """UNet2DConditionModel with block_out_channels (32, 64), one layer per block, SD- or SDXL-style."""
    from diffusers import UNet2DConditionModel

    common: dict[str, Any] = dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=32,
    )
    if kind == "sd15":
        return UNet2DConditionModel(cross_attention_dim=TEXT_HIDDEN, **common)
    time_dim = 8
    return UNet2DConditionModel(
        cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * time_dim, use_linear_projection=True, **common,
    )


def tiny_vae() -> Any:
    """AutoencoderKL with a downsampling factor of 2 (16x16 images -> 4 x 8 x 8 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16,
    )


def tiny_scheduler(prediction_type: str = "epsilon") -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
                         steps_offset=1)


def tiny_components(kind: ModelKind = "sd15", seed: int = 0, prediction_type: str = "epsilon") -> DiffusionComponents:
    """Seeded tiny components; frozen parts in eval mode with ``requires_grad`` off."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet, vae = tiny_unet(kind), tiny_vae()
    tokenizers = [tiny_tokenizer()]
    encoders = [CLIPTextModel(_text_config(tokenizers[0]))]
    if kind == "sdxl":
        tokenizers.append(tiny_tokenizer())
        encoders.append(CLIPTextModelWithProjection(_text_config(tokenizers[1], projection_dim=TEXT_HIDDEN)))
    for module in [vae, *encoders]:
        module.requires_grad_(False).eval()
    return DiffusionComponents(kind, unet, vae, tokenizers, encoders, tiny_scheduler(prediction_type))


def tiny_pipeline(components: DiffusionComponents) -> Any:
    """A diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` from the components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    c = components
    if c.kind == "sd15":
        return StableDiffusionPipeline(
            vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=c.unet,
            scheduler=c.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
        tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.unet, scheduler=c.scheduler,
    )


def save_tiny_pipeline(path: str | Path, kind: ModelKind = "sd15", seed: int = 0,
                       prediction_type: str = "epsilon") -> Path:
    """Write a tiny pipeline folder that :func:`diffdpo.diffusion.models.load_components` reads."""
    path = Path(path)
    tiny_pipeline(tiny_components(kind, seed, prediction_type)).save_pretrained(str(path))
    return path

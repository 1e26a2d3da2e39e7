"""A tiny Stable-Diffusion-style text-to-image model for the shapes world, built from real parts.

Components are the real diffusers/transformers classes a full SD1.5 pipeline uses, only tiny:
``AutoencoderKL`` (16x16 RGB <-> 4x8x8 latents), ``UNet2DConditionModel`` (cross-attention at every
level: at 8x8 latents it is cheap on CPU), ``CLIPTextModel`` with a word-level tokenizer
(offline, built from the world's vocabulary), and a ``DDPMScheduler``. Sampling goes through the real
``StableDiffusionPipeline`` (DDIM, classifier-free guidance), and the saved folder is an ordinary
diffusers pipeline folder that :func:`diffdpo.diffusion.models.load_components` reads like a hub model.

Why a latent model and not pixel space: it keeps the exact SD data flow (VAE -> cached latents ->
UNet) that real runs use, so the demo exercises the same training code, and the 8x8 latent makes
UNet steps cheaper than 16x16 pixels. The VAE is trained first, then frozen; it needs about 1000
steps: after 250 its reconstructions of ground-truth renders were judged the right shape only 52% of
the time (99.7% after 1000), which capped the whole model's shape accuracy.

Measured with the shipped settings and ``unet_steps`` of 1000 / 1800 / 3000 (three runs): the plain
``UNet2DConditionModel`` learns position first (100% in all three), shape next (93% / 97% / 99%)
and colour last (58% / 64% / 97%). A coordinate-channel variant (``coord_channels=True``) exists for
worlds where position is the slow attribute; here it is not needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdpo.toy.shapes import random_scene, render_batch, vocabulary

RESOLUTION = 16
TEXT_HIDDEN = 64
MAX_TOKENS = 8  # <bos> + at most 6 words + <eos>


@dataclass
class ToyT2IConfig:
    """Settings of ``scripts/pretrain_toy_t2i.py`` (the shipped checkpoint uses these defaults)."""

    seed: int = field(default=0, metadata={"help": "seed of initialisation and data"})
    vae_steps: int = field(default=1000, metadata={"help": "VAE reconstruction steps (250 lost the shape: 52% judged on reconstructions)"})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE learning rate"})
    unet_steps: int = field(default=3000, metadata={"help": "UNet + text encoder denoising steps"})
    unet_lr: float = field(default=1e-3, metadata={"help": "peak learning rate (cosine decay, 100 warmup)"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    prompt_dropout: float = field(default=0.1, metadata={"help": "empty-caption rate (enables guidance)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    out: str = field(default="data/toy_t2i", metadata={"help": "output pipeline folder"})
    eval_samples: int = field(default=240, metadata={"help": "samples for the base accuracy report"})
    coord_channels: bool = field(default=False, metadata={
        "help": "append x/y coordinate channels to the UNet input (CoordConv; not needed here, see the module doc)"})

    def __post_init__(self) -> None:
        if min(self.vae_steps, self.unet_steps, self.batch_size) < 1:
            raise ValueError("vae_steps, unet_steps and batch_size must be >= 1")


# --------------------------------------------------------------------------------------------
# components


def build_tokenizer() -> Any:
    """A word-level tokenizer over the world's vocabulary, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|startoftext|>", "<|unk|>"]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        model_max_length=MAX_TOKENS,
    )


def _coord_unet_class() -> type:
    from diffusers import UNet2DConditionModel

    class CoordUNet2DConditionModel(UNet2DConditionModel):
        """``UNet2DConditionModel`` that appends two fixed coordinate channels (x, y in [-1, 1]) to its input.

        Convolutions are translation-equivariant, so a plain UNet learns *where* a caption puts a shape
        only slowly (from zero-padding effects); coordinate channels (Liu et al. 2018, CoordConv) make
        "on the left" a direct function of the input. The latents stay 4-channel: ``in_channels`` is 6
        for ``conv_in`` only, and pipelines must be given their initial latents (``sample_images`` does).
        """

        def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args, **kwargs):
            b, _, h, w = sample.shape
            ys, xs = torch.meshgrid(
                torch.linspace(-1.0, 1.0, h, device=sample.device),
                torch.linspace(-1.0, 1.0, w, device=sample.device),
                indexing="ij",
            )
            coords = torch.stack([xs, ys]).to(sample.dtype).expand(b, 2, h, w)  # (B, 2, H, W)
            return super().forward(torch.cat([sample, coords], dim=1), timestep, encoder_hidden_states, *args, **kwargs)

    CoordUNet2DConditionModel.__module__ = __name__
    CoordUNet2DConditionModel.__qualname__ = "CoordUNet2DConditionModel"
    return CoordUNet2DConditionModel


def __getattr__(name: str) -> Any:
    # built lazily so that importing this module does not import diffusers; diffusers' loader resolves
    # the class recorded in model_index.json ("diffdpo.toy.t2i", "CoordUNet2DConditionModel") here
    if name == "CoordUNet2DConditionModel":
        cls = _coord_unet_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def build_components(seed: int = 0, coord_channels: bool = False) -> Any:
    """Freshly initialised tiny SD1.5-style components (the untrained base)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffdpo.diffusion.models import DiffusionComponents

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    # CLIP initialises token embeddings with std 0.02, so "left" and "right" start out nearly equal and
    # joint training barely separates them (measured: position stayed at chance after 5000 steps).
    # Unit-variance embeddings make every caption word distinct from the first step.
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16, sample_size=RESOLUTION,
    )
    if coord_channels:
        unet_cls, in_channels = __getattr__("CoordUNet2DConditionModel"), 6
    else:
        from diffusers import UNet2DConditionModel as unet_cls

        in_channels = 4
    unet = unet_cls(
        sample_size=RESOLUTION // 2, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        # cross-attention at every level: at 8x8 latents it is cheap, and placing a shape where the
        # caption says needs text at the full latent resolution
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False
    )
    return DiffusionComponents("sd15", unet, vae, [tokenizer], [text_encoder], scheduler)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_training_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [random_scene(rng) for _ in range(n)]
    return to_pixels(render_batch(scenes, RESOLUTION)), [s.caption for s in scenes]


# --------------------------------------------------------------------------------------------
# pretraining


def _cosine(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vae(vae: Any, cfg: ToyT2IConfig, rng: np.random.Generator, log: Any = print) -> float:
    """Train the VAE to reconstruct renders (MSE + a small KL), then set its latent scaling factor."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine(step, cfg.vae_steps, warmup=20)
        x, _ = render_training_batch(rng, cfg.batch_size)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = torch.mean((recon - x) ** 2) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step:5d} recon mse {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x, _ = render_training_batch(rng, 512)
        std = float(vae.encode(x).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return std


def pretrain_unet(components: Any, cfg: ToyT2IConfig, rng: np.random.Generator, log: Any = print) -> None:
    """Denoising pretraining of UNet + text encoder on rendered scenes (epsilon loss, prompt dropout)."""
    from diffdpo.diffusion.schedule import DDPMSchedule, per_sample_mse

    c = components
    tokenizer, text_encoder = c.tokenizers[0], c.text_encoders[0]
    schedule = DDPMSchedule.from_scheduler(c.scheduler)
    params = list(c.unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    c.unet.train()
    text_encoder.train().requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.seed)
    scale = c.vae.config.scaling_factor
    t0 = time.time()
    for step in range(cfg.unet_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * _cosine(step, cfg.unet_steps)
        x, captions = render_training_batch(rng, cfg.batch_size)
        captions = ["" if rng.random() < cfg.prompt_dropout else cap for cap in captions]
        with torch.no_grad():
            latents = c.vae.encode(x).latent_dist.sample(generator=gen) * scale  # (B, 4, 8, 8)
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids)[0]  # (B, L, D)
        t = torch.randint(0, schedule.num_train_timesteps, (x.shape[0],), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        pred = c.unet(schedule.add_noise(latents, noise, t), t, context).sample
        loss = per_sample_mse(pred, schedule.target(latents, noise, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    c.unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# sampling


def make_pipeline(components: Any) -> Any:
    """A ``StableDiffusionPipeline`` over the components, with a DDIM sampler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    c = components
    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=c.unet,
        scheduler=DDIMScheduler.from_config(c.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(
    pipe: Any,
    captions: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "sampling",
) -> np.ndarray:
    """(N, 16, 16, 3) uint8 images, one per (caption, seed): :func:`diffdpo.diffusion.sampling.sample_images`
    with the toy's resolution and defaults (image i depends only on its caption and seed)."""
    from diffdpo.diffusion.sampling import sample_images as sample

    return sample(pipe, captions, seeds, steps=steps, guidance_scale=guidance_scale, resolution=RESOLUTION,
                  batch_size=batch_size, progress=progress, desc=desc)


def save_pipeline(pipe: Any, path: str | Path) -> Path:
    """``save_pretrained`` (safetensors), recording the UNet as a diffusers ``UNet2DConditionModel`` in
    ``model_index.json`` so stock loaders accept the folder; ``unet/config.json`` keeps the subclass name,
    which :func:`load_pipeline` and :func:`diffdpo.diffusion.models.load_components` read."""
    import json

    path = Path(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    index = json.loads((path / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_pipeline(path: str | Path) -> Any:
    """Load a saved toy pipeline folder (``StableDiffusionPipeline.from_pretrained``) with a DDIM sampler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); "
            "run `python scripts/pretrain_toy_t2i.py` to create the toy checkpoint"
        )
    from diffdpo.diffusion.models import unet_class

    unet = unet_class(str(path)).from_pretrained(str(path), subfolder="unet")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), unet=unet, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe

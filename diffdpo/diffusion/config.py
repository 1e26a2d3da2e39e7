"""Config dataclasses of the diffusion task (the ``diffusion:`` section of a training config), and the
task's registry entry (:data:`TASK`, declared as a ``diffdpo.tasks`` entry point)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from diffdpo.adapters import LoraConfig
from diffdpo.config import help_meta
from diffdpo.task import TaskContext, TaskSpec


@dataclass
class DiffusionModelConfig:
    pretrained: str = field(
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        metadata=help_meta("hub id or local folder of a diffusers SD1.5/SDXL pipeline (unet, vae, text encoders, ...)"),
    )
    kind: Literal["sd15", "sdxl"] = field(default="sd15", metadata=help_meta("model family: conditioning layout"))
    revision: str | None = field(default=None, metadata=help_meta("hub revision"))
    variant: str | None = field(default=None, metadata=help_meta("weight variant, e.g. fp16"))
    vae: str | None = field(
        default=None, metadata=help_meta("replacement VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix")
    )
    vae_dtype: str = field(
        default="float32",
        metadata=help_meta("VAE dtype: float32 (default; the SDXL VAE overflows to NaN in fp16), or 'auto' = mixed precision"),
    )
    text_encoder_dtype: str = field(default="auto", metadata=help_meta("text encoder dtype; 'auto' = mixed precision"))
    prediction_type: str | None = field(
        default=None,
        metadata=help_meta("epsilon | v_prediction | sample | flow; None = the scheduler's config"),
    )

    def __post_init__(self) -> None:
        if self.prediction_type not in (None, "epsilon", "v_prediction", "sample", "flow"):
            raise ValueError(f"diffusion.model.prediction_type={self.prediction_type!r} is not supported")


@dataclass
class DiffusionLoraConfig(LoraConfig):
    target_modules: list[str] = field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"], metadata=help_meta("UNet modules to adapt")
    )
    offload_reference: bool = field(
        default=False, metadata=help_meta("full fine-tune only: keep the frozen reference UNet on CPU (streamed per layer)")
    )


@dataclass
class NoiseConfig:
    share_noise: bool = field(
        default=True, metadata=help_meta("winner and loser share t and noise (official Diffusion-DPO); false decouples")
    )
    weighting: Literal["uniform", "min_snr"] = field(default="uniform", metadata=help_meta("per-timestep weight"))
    snr_gamma: float = field(default=5.0, metadata=help_meta("gamma of Min-SNR-gamma weighting"))
    logit_mean: float = field(default=0.0, metadata=help_meta("flow matching: logit-normal t mean (DSO: 1.0)"))
    logit_std: float = field(default=1.0, metadata=help_meta("flow matching: logit-normal t std (DSO: 1.0)"))
    timestep_scale: float = field(default=1000.0, metadata=help_meta("flow matching: the network sees t * scale"))

    def __post_init__(self) -> None:
        if self.snr_gamma <= 0 or self.logit_std <= 0:
            raise ValueError("diffusion.noise.snr_gamma and logit_std must be > 0")


@dataclass
class PickAPicConfig:
    source: str = field(
        default="data/pickapic_v2/train",
        metadata=help_meta("Pick-a-Pic v2 parquet file or folder of shards (caption, jpg_0, jpg_1, label_0, label_1, ...)"),
    )
    resolution: int = field(default=512, metadata=help_meta("square training resolution in pixels"))
    random_crop: bool = field(default=False, metadata=help_meta("random crop (else center crop), same for both images"))
    random_flip: bool = field(default=True, metadata=help_meta("horizontal flip with p=0.5, same for both images"))
    drop_ties: bool = field(default=True, metadata=help_meta("drop pairs labelled 0.5/0.5"))
    model_filter: list[str] | None = field(default=None, metadata=help_meta("keep pairs whose model_0/model_1 are in this list"))
    max_rows: int | None = field(default=None, metadata=help_meta("keep at most this many pairs (rows read until then)"))
    validate_images: bool = field(default=False, metadata=help_meta("decode every image once at start-up"))
    prompt_dropout: float = field(default=0.0, metadata=help_meta("probability of replacing a caption by '' (official SD1.5: 0.2)"))
    cache_dir: str | None = field(
        default=None, metadata=help_meta("encode latents + text embeddings once into this folder and train from it")
    )
    cache_batch_size: int = field(default=16, metadata=help_meta("batch size while building the cache"))
    latent_mode: Literal["mode", "sample"] = field(
        default="mode", metadata=help_meta("VAE posterior mean (deterministic, cacheable) or a sample (official script)")
    )

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"diffusion.data.resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"diffusion.data.prompt_dropout must be in [0, 1), got {self.prompt_dropout}")


@dataclass
class DiffusionConfig:
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    lora: DiffusionLoraConfig = field(default_factory=DiffusionLoraConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: PickAPicConfig = field(default_factory=PickAPicConfig)


def _build_task(cfg: DiffusionConfig, context: TaskContext) -> Any:
    from diffdpo.diffusion.task import DiffusionPreferenceTask

    return DiffusionPreferenceTask(cfg, accelerator=context.accelerator, seed=context.seed,
                                   gradient_checkpointing=context.gradient_checkpointing)


TASK = TaskSpec("diffusion", DiffusionConfig, _build_task, default_beta=5000.0,
                description="Diffusion-DPO on SD1.5/SDXL UNets from Pick-a-Pic-style pairs (beta 5000 as the paper)")

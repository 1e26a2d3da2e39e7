"""Loading SD1.5/SDXL components, LoRA adapters, the reference model, and saving trained weights.

Reference model (Wallace et al. 2023, arXiv 2311.12908, eq. 14 needs ``eps_ref``):
* LoRA: the reference is the *same* UNet with its adapters disabled; no second copy in memory.
* Full fine-tuning: a frozen deep copy, optionally CPU-offloaded (weights stream to the GPU per layer).

Saved LoRA weights use the diffusers format read by ``StableDiffusionPipeline.load_lora_weights`` and
``StableDiffusionXLPipeline.load_lora_weights``; full UNets use ``save_pretrained``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffdpo.adapters import adapters_disabled, has_lora, tuner_layers
from diffdpo.config import check_model_source
from diffdpo.diffusion.conditioning import Conditioner, ModelKind, unet_forward


@dataclass
class DiffusionComponents:
    """Everything one SD-family model needs for training (the UNet is the trainable part)."""

    kind: ModelKind
    unet: Any
    vae: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    scheduler: Any


def load_components(
    pretrained: str,
    kind: ModelKind,
    *,
    revision: str | None = None,
    variant: str | None = None,
    vae_path: str | None = None,
    unet_dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    load_unet: bool = True,
    load_encoders: bool = True,
) -> DiffusionComponents:
    """``from_pretrained`` each component from a hub id or local pipeline dir (subfolders ``unet``,
    ``vae``, ``text_encoder[_2]``, ``tokenizer[_2]``, ``scheduler``). ``vae_path`` replaces the VAE
    (e.g. ``madebyollin/sdxl-vae-fp16-fix``, loaded from its root). Frozen parts are set to eval and
    ``requires_grad_(False)``; the UNet is returned trainable in ``unet_dtype``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler

    local = check_pipeline(pretrained, kind)
    common: dict[str, Any] = {"revision": revision}
    # a local folder with safetensors never falls back to pickled weights
    weights = {"use_safetensors": True} if local and any(Path(pretrained).rglob("*.safetensors")) else {}
    scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)
    unet = vae = None
    tokenizers: list[Any] = []
    encoders: list[Any] = []
    if load_unet:
        unet = unet_class(pretrained).from_pretrained(
            pretrained, subfolder="unet", variant=variant, torch_dtype=unet_dtype, **common, **weights
        )
    if load_encoders:
        if vae_path:
            check_model_source(vae_path, "diffusion.model.vae")
            vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=vae_dtype)
        else:
            vae = AutoencoderKL.from_pretrained(
                pretrained, subfolder="vae", variant=variant, torch_dtype=vae_dtype, **common, **weights
            )
        tokenizers, encoders = _load_text_stack(pretrained, kind, variant, text_encoder_dtype, common, weights)
        for module in [vae, *encoders]:
            module.requires_grad_(False).eval()
    return DiffusionComponents(kind, unet, vae, tokenizers, encoders, scheduler)


def check_pipeline(pretrained: str, kind: ModelKind) -> bool:
    """Check a pipeline source before loading; a local folder's ``model_index.json`` must match ``kind``.

    Returns whether the source is a local folder. An SDXL folder loaded as ``sd15`` (or the reverse) is
    an error naming the pipeline class and the setting to use, not a failure deep inside diffusers.
    """
    import json

    from diffdpo.config import UserError

    if not check_model_source(pretrained, "diffusion.model.pretrained"):
        return False
    index = Path(pretrained) / "model_index.json"
    if not index.is_file():
        if not (Path(pretrained) / "unet").is_dir():
            raise UserError(f"diffusion.model.pretrained={pretrained!r} is not a diffusers pipeline folder "
                            "(no model_index.json, no unet/)")
        return True
    name = str(json.loads(index.read_text()).get("_class_name", ""))
    is_xl = "XL" in name
    if is_xl != (kind == "sdxl"):
        want = "sdxl" if is_xl else "sd15"
        raise UserError(f"diffusion.model.pretrained={pretrained!r} holds a {name} but diffusion.model.kind={kind}: "
                        f"set diffusion.model.kind={want}")
    return True


#: UNet subclasses of this package, by the ``_class_name`` their saved ``unet/config.json`` records.
OWN_UNET_CLASSES = {"CoordUNet2DConditionModel": "diffdpo.toy.t2i"}


def unet_class(pretrained: str) -> type:
    """``UNet2DConditionModel``, or this package's subclass that a local folder's ``unet/config.json`` names.

    Only this package's own classes are honoured (e.g. the shapes world's coordinate-channel UNet); a
    folder never makes us import other code.
    """
    import importlib
    import json

    from diffusers import UNet2DConditionModel

    config = Path(pretrained) / "unet" / "config.json"
    name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    if name not in OWN_UNET_CLASSES:
        return UNet2DConditionModel
    return getattr(importlib.import_module(OWN_UNET_CLASSES[name]), name)


def _load_text_stack(
    pretrained: str, kind: ModelKind, variant: str | None, dtype: torch.dtype, common: dict[str, Any],
    weights: dict[str, Any] | None = None,
) -> tuple[list[Any], list[Any]]:
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    # AutoTokenizer: CLIP's BPE for SD repos, or whatever tokenizer a (toy) pipeline folder saved
    tokenizers = [AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common)]
    encoders = [CLIPTextModel.from_pretrained(
        pretrained, subfolder="text_encoder", variant=variant, dtype=dtype, **common, **(weights or {})
    )]
    if kind == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **common))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(
            pretrained, subfolder="text_encoder_2", variant=variant, dtype=dtype, **common, **(weights or {})
        ))
    return tokenizers, encoders


def conditioner_from(components: DiffusionComponents, latent_mode: str = "mode") -> Conditioner:
    """The :class:`Conditioner` for loaded components."""
    return Conditioner(components.kind, components.vae, components.tokenizers, components.text_encoders,
                       latent_mode)  # type: ignore[arg-type]




class Reference:
    """The frozen reference denoiser ``ref(x_t, t, cond)``, always evaluated under ``no_grad``.

    With LoRA it borrows the policy UNet with adapters disabled; otherwise it owns a frozen copy.
    """

    def __init__(self, unet: Any, *, frozen_copy: Any | None = None) -> None:
        self.policy_unet = unet
        self.frozen = frozen_copy
        self._layers = tuner_layers(unet) if frozen_copy is None else []

    @classmethod
    def for_policy(cls, unet: Any, *, offload: bool = False, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> Reference:
        """Adapter-disabled reference if ``unet`` has LoRA, else a frozen deep copy (CPU-offloaded if asked)."""
        if has_lora(unet):
            return cls(unet)
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        if dtype is not None:
            frozen.to(dtype)
        if offload and device is not None and device.type != "cpu":
            from accelerate import cpu_offload

            cpu_offload(frozen.to("cpu"), execution_device=device)
        elif device is not None:
            frozen.to(device)
        return cls(unet, frozen_copy=frozen)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.frozen is not None:
            return unet_forward(self.frozen, x_t, t, cond)
        with adapters_disabled(self.policy_unet, self._layers):
            return unet_forward(self.policy_unet, x_t, t, cond)


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' key format (what ``save_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet: Any, out_dir: str | Path, kind: ModelKind) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable by the SD/SDXL pipelines' ``load_lora_weights``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    weights = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    pipeline_cls.save_lora_weights(save_directory=str(out_dir), unet_lora_layers=weights,
                                   safe_serialization=True)
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


def save_unet(unet: Any, out_dir: str | Path) -> Path:
    """Full fine-tune: ``save_pretrained`` to ``out_dir/unet`` (drop-in for a pipeline's ``unet`` folder)."""
    path = Path(out_dir) / "unet"
    unet.save_pretrained(str(path), safe_serialization=True)
    return path

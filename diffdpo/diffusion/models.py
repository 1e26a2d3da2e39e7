"""Loading SD1.5/SDXL components, LoRA adapters, the reference model, and saving trained weights.

Reference model (Wallace et al. 2023, arXiv 2311.12908, eq. 14 needs ``eps_ref``):
* LoRA: the reference is the *same* UNet with its adapters disabled; no second copy in memory.
* Full fine-tuning: a frozen deep copy, optionally CPU-offloaded (weights stream to the GPU per layer).

Saved LoRA weights use the diffusers format read by ``StableDiffusionPipeline.load_lora_weights`` and
``StableDiffusionXLPipeline.load_lora_weights``; full UNets use ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffdpo.diffusion.conditioning import Conditioner, ModelKind, unet_forward

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, default: torch.dtype = torch.float32) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or fp32/fp16/bf16); ``"auto"`` -> ``default``."""
    if name == "auto":
        return default
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


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

    common = {"revision": revision}
    scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)
    unet = vae = None
    tokenizers: list[Any] = []
    encoders: list[Any] = []
    if load_unet:
        unet = unet_class(pretrained).from_pretrained(
            pretrained, subfolder="unet", variant=variant, torch_dtype=unet_dtype, **common
        )
    if load_encoders:
        if vae_path:
            vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=vae_dtype)
        else:
            vae = AutoencoderKL.from_pretrained(
                pretrained, subfolder="vae", variant=variant, torch_dtype=vae_dtype, **common
            )
        tokenizers, encoders = _load_text_stack(pretrained, kind, variant, text_encoder_dtype, common)
        for module in [vae, *encoders]:
            module.requires_grad_(False).eval()
    return DiffusionComponents(kind, unet, vae, tokenizers, encoders, scheduler)


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
    pretrained: str, kind: ModelKind, variant: str | None, dtype: torch.dtype, common: dict[str, Any]
) -> tuple[list[Any], list[Any]]:
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    # AutoTokenizer: CLIP's BPE for SD repos, or whatever tokenizer a (toy) pipeline folder saved
    tokenizers = [AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common)]
    encoders = [CLIPTextModel.from_pretrained(
        pretrained, subfolder="text_encoder", variant=variant, dtype=dtype, **common
    )]
    if kind == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **common))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(
            pretrained, subfolder="text_encoder_2", variant=variant, dtype=dtype, **common
        ))
    return tokenizers, encoders


def conditioner_from(components: DiffusionComponents, latent_mode: str = "mode") -> Conditioner:
    """The :class:`Conditioner` for loaded components."""
    return Conditioner(components.kind, components.vae, components.tokenizers, components.text_encoders,
                       latent_mode)  # type: ignore[arg-type]


DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def add_lora(unet: Any, rank: int = 8, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_LORA_TARGETS, dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Attach a trainable LoRA adapter (Hu et al. 2021) to ``unet`` via diffusers/peft and freeze the rest.

    Gaussian init of A and zero B, so the adapted UNet starts exactly equal to the base (step-0 loss is
    ln 2). Trainable parameters are kept in float32 whatever the base dtype. Returns them.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        init_lora_weights="gaussian", target_modules=list(target_modules))
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def has_lora(unet: Any) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def tuner_layers(unet: Any) -> list[Any]:
    """The peft adapter layers of ``unet`` (found once; toggling them directly skips a module walk per step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@torch.no_grad()
def fold_adapters(model: Any) -> int:
    """Add every LoRA adapter's update into its base layer's weight and zero the adapter's B matrix.

    The model computes the same function before and after (adapters on); afterwards the adapter-
    disabled model *is* that function, so a reference "with adapters disabled" becomes the current
    policy (iterative DPO, where each round's reference is the previous round's model). A is kept,
    so the next round starts from the usual LoRA state (B = 0). Returns the number of folded adapters.
    """
    folded = 0
    for layer in tuner_layers(model):
        for name in list(getattr(layer, "lora_A", {}).keys()):
            base = layer.get_base_layer()
            base.weight.add_(layer.get_delta_weight(name).to(base.weight.dtype))
            layer.lora_B[name].weight.zero_()
            folded += 1
    return folded


@contextlib.contextmanager
def adapters_disabled(unet: Any, layers: Sequence[Any] | None = None) -> Iterator[Any]:
    """Within the block ``unet`` computes the base model (LoRA adapters off); restored on exit.

    Same effect as diffusers' ``unet.disable_adapters()`` / ``enable_adapters()``, on ``layers`` if given.
    """
    layers = tuner_layers(unet) if layers is None else layers
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)


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

"""LoRA adapters and dtypes, one implementation for every modality (diffusion, LM, 3D generators).

* :func:`add_lora` attaches a LoRA adapter (Hu et al. 2021, arXiv 2106.09685) to any ``nn.Module`` and
  returns the trainable parameters: diffusers models through their own ``add_adapter`` (so the
  diffusers LoRA format keeps working), any other module (transformers models included) through
  ``peft.inject_adapter_in_model``; :func:`save_lora_adapter` writes the PEFT adapter folder
  (``PeftModel.from_pretrained(base, folder)`` reads it). A is Gaussian, B is zero, so the adapted model starts equal
  to its base (a DPO loss of ln 2 at step 0). Adapters are float32 whatever the base dtype.
* The reference of an adapted policy is the same module with its adapters off
  (:func:`adapters_disabled`); :func:`fold_adapters` moves the adapters' update into the base weights
  (iterative DPO: the next round's reference is this round's policy).
* :func:`resolve_dtype` maps a config string to a ``torch.dtype``, ``"auto"`` to the mixed-precision dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffdpo.config import help_meta

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def mixed_precision_dtype(mixed_precision: str) -> torch.dtype:
    """accelerate's ``mixed_precision`` (``no`` | ``fp16`` | ``bf16``) as the compute dtype."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(mixed_precision), torch.float32)


def resolve_dtype(name: str, auto: torch.dtype | str = torch.float32) -> torch.dtype:
    """``float32 | float16 | bfloat16`` (or fp32/fp16/bf16) as a dtype; ``auto`` -> ``auto``, which is a
    dtype or a mixed-precision name (``no`` | ``fp16`` | ``bf16``)."""
    if name == "auto":
        return auto if isinstance(auto, torch.dtype) else mixed_precision_dtype(auto)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))} or 'auto'")
    return DTYPES[name]


@dataclass
class LoraConfig:
    """A LoRA adapter; each modality subclasses it only to change the default ``target_modules``."""

    enabled: bool = field(default=False, metadata=help_meta("train LoRA adapters (reference = adapters disabled)"))
    rank: int = field(default=8, metadata=help_meta("LoRA rank r"))
    alpha: float | None = field(default=None, metadata=help_meta("LoRA alpha; None = rank (scale alpha / r = 1)"))
    dropout: float = field(default=0.0, metadata=help_meta("LoRA dropout"))
    target_modules: list[str] = field(default_factory=list, metadata=help_meta("module names to adapt"))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0 (or None = rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def add_lora(module: torch.nn.Module, rank: int, alpha: float | None = None,
             target_modules: Sequence[str] = (), dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Freeze ``module`` and attach one LoRA adapter (alpha None = rank); returns its (float32) parameters.

    A module that already carries adapters (a later DSO round) is returned as is: its adapter parameters.
    """
    if tuner_layers(module):
        return [p for n, p in module.named_parameters() if "lora_" in n]
    from peft import LoraConfig as PeftLoraConfig

    config = PeftLoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            init_lora_weights="gaussian", target_modules=list(target_modules))
    module.requires_grad_(False)
    try:
        if _is_diffusers(module):
            module.add_adapter(config)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, module)
            module.peft_config = {"default": config}  # what save_lora_adapter (peft's state-dict helper) reads
    except ValueError as exc:
        raise ValueError(f"LoRA could not be added with target_modules={list(target_modules)}: {exc}") from exc
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    return params


def _is_diffusers(module: Any) -> bool:
    return hasattr(module, "add_adapter") and any(c.__module__.startswith("diffusers.") for c in type(module).__mro__)


def save_lora_adapter(module: Any, out_dir: Any) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` (the PEFT adapter format) of ``module``'s adapter."""
    from pathlib import Path

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(module, adapter_name="default")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"))
    module.peft_config["default"].save_pretrained(str(out_dir))


def add_lora_from(module: torch.nn.Module, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """:func:`add_lora` with the settings of a :class:`LoraConfig`."""
    return add_lora(module, cfg.rank, cfg.alpha, cfg.target_modules, cfg.dropout)


def tuner_layers(module: Any) -> list[Any]:
    """The peft adapter layers of ``module`` (found once; toggling them directly skips a module walk per step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: Any) -> bool:
    """Whether ``module`` carries LoRA adapters."""
    return bool(tuner_layers(module))


@contextlib.contextmanager
def adapters_disabled(module: Any, layers: Sequence[Any] | None = None) -> Iterator[Any]:
    """Within the block ``module`` computes its base (LoRA adapters off, on ``layers`` if given); restored on exit."""
    layers = tuner_layers(module) if layers is None else layers
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Dropout off (LoRA dropout included) for sampling or scoring; each model's training flag is restored
    after. ``None`` entries are skipped."""
    models = tuple(m for m in models if m is not None)
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


@torch.no_grad()
def fold_adapters(module: Any) -> int:
    """Add every LoRA adapter's update into its base layer's weight and zero the adapter's B matrix.

    The module computes the same function before and after (adapters on); afterwards the adapter-
    disabled module *is* that function, so a reference "with adapters disabled" becomes the current
    policy. A is kept, so the next round starts from the usual LoRA state (B = 0). Returns the number
    of folded adapters.
    """
    folded = 0
    for layer in tuner_layers(module):
        for name in list(getattr(layer, "lora_A", {}).keys()):
            base = layer.get_base_layer()
            base.weight.add_(layer.get_delta_weight(name).to(base.weight.dtype))
            layer.lora_B[name].weight.zero_()
            folded += 1
    return folded

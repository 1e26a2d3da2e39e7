"""Loading causal LMs and tokenizers, LoRA via peft, and the reference model choices."""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from diffdpo.lm.config import LMLoraConfig, LMModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, mixed_precision: str) -> torch.dtype:
    """``auto`` -> the mixed-precision dtype (fp16/bf16) or float32."""
    if name == "auto":
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    return _DTYPES[name]


def load_tokenizer(cfg: LMModelConfig) -> Any:
    """The tokenizer, with a pad token (EOS if it has none, as TRL does)."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.pretrained
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise FileNotFoundError(f"could not load a tokenizer from {name!r} (lm.model.tokenizer / lm.model.pretrained): "
                                f"{exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: LMModelConfig, dtype: torch.dtype) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with the configured attention implementation and dtype."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.pretrained, revision=cfg.revision, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as exc:
        raise FileNotFoundError(f"could not load a causal LM from lm.model.pretrained={cfg.pretrained!r}: {exc}") from exc
    if cfg.disable_dropout:
        disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout p = 0 everywhere (modules and the attention-dropout config field)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0
    for module in model.modules():
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0


def add_lora(model: Any, cfg: LMLoraConfig) -> Any:
    """Wrap ``model`` in a peft ``PeftModel`` with fresh LoRA adapters (B = 0, so policy == base at start)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
                        lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"LoRA could not be added with lm.lora.target_modules={cfg.target_modules}: {exc}") from exc


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """An independent, gradient-free copy in eval mode (the full-fine-tuning reference)."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref.to(dtype)
    ref.requires_grad_(False)
    return ref.eval()


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run a PEFT model as its base model (the LoRA reference)."""
    with model.disable_adapter():
        yield


def model_fingerprint(model: torch.nn.Module, *extra: str) -> str:
    """A cheap, content-based id of a model's weights for cache keys.

    Hashes every tensor's name, shape, dtype, sum and its first and last 512 values (not all bytes: a
    7B model would take tens of seconds); any training step or different checkpoint changes it.
    """
    h = hashlib.sha256("|".join(extra).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{float(flat.sum(dtype=torch.float64)):.10e}".encode())
            for part in (flat[:512], flat[-512:]):
                h.update(part.to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()

"""Loading causal LMs and tokenizers, frozen reference copies and weight fingerprints (LoRA: :mod:`diffdpo.adapters`)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch

from diffdpo.config import check_model_source
from diffdpo.lm.config import LMModelConfig


def load_tokenizer(cfg: LMModelConfig) -> Any:
    """The tokenizer, with a pad token (EOS if it has none, as TRL does)."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.pretrained
    check_model_source(name, "lm.model.tokenizer" if cfg.tokenizer else "lm.model.pretrained")
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
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    local = check_model_source(cfg.pretrained, "lm.model.pretrained")
    # a local folder with safetensors never falls back to pickled weights
    weights = {"use_safetensors": True} if local and any(Path(cfg.pretrained).glob("*.safetensors")) else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.pretrained, revision=cfg.revision, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code, **weights,
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


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """An independent, gradient-free copy in eval mode (the full-fine-tuning reference)."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref.to(dtype)
    ref.requires_grad_(False)
    return ref.eval()


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

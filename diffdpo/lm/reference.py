"""Precomputed reference log-probs, cached on disk so the reference model need not stay in memory.

The reference is fixed during DPO, so its sequence log-probs can be computed once, before training,
with the very model that becomes the policy (adapters disabled for LoRA; the untrained weights for a
full fine-tune) and then looked up by example index. The cache file is keyed by

* the model fingerprint (:func:`diffdpo.lm.models.model_fingerprint` of the base weights, name and
  revision),
* the data fingerprint (every token id, dense weight and label of the tokenised dataset, so any change
  of data, tokenizer or truncation gives a new key),
* the settings that change the numbers (length averaging, KTO's mismatched sequences: their
  chunking and cuts),

so a changed model or dataset can never silently reuse stale values. Files are written to a temporary
name and renamed into place; one process computes while the others wait and then read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffdpo.adapters import adapters_disabled, has_lora
from diffdpo.lm.logps import sequence_logps

if TYPE_CHECKING:
    from diffdpo.lm.task import LMPreferenceTask


@dataclass
class PrecomputedReference:
    """Reference sequence log-probs by dataset index: (N, 2) [chosen, rejected] or (N,) plus KTO's KL values."""

    logps: torch.Tensor
    kl_logps: torch.Tensor | None = None
    path: Path | None = None

    def lookup(self, index: torch.Tensor, *, paired: bool) -> torch.Tensor:
        """(2B,) [chosen..., rejected...] for pairs, (B,) otherwise."""
        rows = self.logps[index.cpu()]
        return torch.cat([rows[:, 0], rows[:, 1]]) if paired else rows

    def lookup_kl(self, index: torch.Tensor) -> torch.Tensor:
        if self.kl_logps is None:
            raise ValueError("these precomputed reference log-probs have no KTO KL values; delete the cache file")
        return self.kl_logps[index.cpu()]


def _kl_pairs_fingerprint(ds: Any) -> str | bool:
    """sha256 of KTO's mismatched sequences (their chunking and cuts), False without them."""
    if "kl_completion_ids" not in ds[0]:
        return False
    h = hashlib.sha256()
    for item in ds.items:
        h.update(json.dumps([item.get("kl_prompt_ids"), item["kl_completion_ids"]], separators=(",", ":")).encode())
    return h.hexdigest()


def cache_key(task: LMPreferenceTask) -> str:
    parts = {
        "model": task.base_fingerprint,
        "data": task.dataset().fingerprint(),
        "average_log_prob": task.cfg.average_log_prob,
        "kl_pairs": _kl_pairs_fingerprint(task.dataset()),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def precompute_reference(task: LMPreferenceTask, accelerator: Any) -> PrecomputedReference:
    """Load the cached reference log-probs of ``task``'s model and data, computing them if absent."""
    from safetensors.torch import load_file

    key = cache_key(task)
    path = Path(task.cfg.reference.cache_dir) / f"ref_logps-{key}.safetensors"
    if not path.is_file():
        if accelerator.is_main_process:
            _compute_and_save(task, path, key)
        accelerator.wait_for_everyone()
    tensors = load_file(str(path))
    n = len(task.dataset())
    if tensors["logps"].shape[0] != n:
        raise ValueError(f"{path} holds {tensors['logps'].shape[0]} rows but the dataset has {n}; delete the file")
    return PrecomputedReference(tensors["logps"], tensors.get("kl_logps"), path)


@torch.no_grad()
def compute_reference_logps(task: LMPreferenceTask, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference sequence log-probs of every example, in dataset order (policy before training)."""
    ds, policy = task.dataset(), task.policy
    avg = task.cfg.average_log_prob
    rows: list[torch.Tensor] = []
    kl_rows: list[torch.Tensor] = []
    was_training = policy.training
    policy.eval()
    ctx = adapters_disabled(policy.model) if has_lora(policy.model) else contextlib.nullcontext()
    with ctx:
        for start in range(0, len(ds), batch_size):
            batch = task.collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
            tokens = batch["tokens"].to(task.device)
            logps = sequence_logps(policy(tokens, with_stats=False).logps, tokens, average=avg).float().cpu()
            if ds.paired:
                b = tokens.num_sequences // 2
                rows.append(torch.stack([logps[:b], logps[b:]], dim=1))  # (B, 2)
            else:
                rows.append(logps)
            if "kl_tokens" in batch:
                kl_tokens = batch["kl_tokens"].to(task.device)
                kl = sequence_logps(policy(kl_tokens, with_stats=False).logps, kl_tokens, average=avg)
                kl_rows.append(kl.float().cpu())
    policy.train(was_training)
    return torch.cat(rows), (torch.cat(kl_rows) if kl_rows else None)


def _compute_and_save(task: LMPreferenceTask, path: Path, key: str) -> None:
    from safetensors.torch import save_file

    ds = task.dataset()
    # KTO's mismatched completion is fixed per example, so its reference value is too (any batch size)
    logps, kl_logps = compute_reference_logps(task, task.cfg.reference.batch_size)
    tensors = {"logps": logps.contiguous()}
    if kl_logps is not None:
        tensors["kl_logps"] = kl_logps.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"key": key, "source": ds.source, "rows": str(len(ds))})
    os.replace(tmp, path)


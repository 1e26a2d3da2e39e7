"""MODPO margin rewards: the other objectives' rewards of every preference pair, computed once and cached on disk.

MODPO (Zhou et al. 2023, "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
Optimization", arXiv 2310.03708, eq. 8) trains on one objective's preferences with the rewards of the other K
objectives as a margin: ``-log sigma((beta * (u_w - u_l) - w[1:] . (r_w - r_l)) / w[0])``
(:func:`diffdpo.losses.preference_loss`, ``loss_type="modpo"``). Each margin reward ``r_k(x, y)`` comes from

* ``implicit``: a DPO model trained on objective k's preferences, ``r_k = beta * (log pi_k(y|x) - log
  pi_ref(y|x))`` with summed completion log-probs (the paper's recipe; the public code's
  ``ImplicitRewardWrapper``, beta 0.1); ``pi_k`` is a full model folder or a peft adapter on ``pi_ref``;
* ``reward_model``: a Bradley-Terry reward model's score of ``prompt + completion``
  (:class:`diffdpo.rewards.lm.HFRewardModel`, trained by ``diffdpo reward-model train``).

The rewards are fixed during training, so, as the precomputed reference (:mod:`diffdpo.lm.reference`), they are
computed once per (pair, chosen/rejected) before training and looked up by the batch's dataset ``index``. The
cache file is keyed by the margin models' files, the reference, the tokenised data, beta and the kinds, so a
change of any of them computes anew.

:func:`split_objectives` reads a multi-objective preference set (one ``objective`` column naming each pair's
objective) into one set per objective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffdpo.adapters import adapters_disabled
from diffdpo.lm.logps import CausalLMLogps, sequence_logps

if TYPE_CHECKING:
    from diffdpo.lm.task import LMPreferenceTask

CACHE_VERSION = 1


@dataclass
class MarginRewards:
    """Margin rewards by dataset index: ``chosen`` and ``rejected`` are (N, K), K margin objectives."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    path: Path | None = None

    def lookup(self, index: torch.Tensor, device: Any = None) -> dict[str, torch.Tensor]:
        """The loss inputs of MODPO for the pairs ``index`` (B,): two (B, K) tensors."""
        rows = index.cpu()
        return {"margin_rewards_chosen": self.chosen[rows].to(device),
                "margin_rewards_rejected": self.rejected[rows].to(device)}


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` of summed sequence log-probs
    (Rafailov et al. 2023, arXiv 2305.18290, eq. 5, without the prompt-only ``beta log Z(x)``, which cancels
    between chosen and rejected in MODPO's margin)."""
    return beta * (policy_logps - ref_logps)


# ------------------------------------------------------------------------------------------------
# multi-objective data


def split_objectives(rows: Sequence[dict], objectives: Sequence[str], source: str = "<rows>",
                     column: str = "objective") -> dict[str, list[dict]]:
    """``{objective: its rows}`` of a preference set whose ``column`` names each pair's objective.

    A row without the column, or naming an objective not in ``objectives``, is a ValueError naming the row;
    an objective without any pair too (each objective needs its own preferences).
    """
    out: dict[str, list[dict]] = {name: [] for name in objectives}
    for n, row in enumerate(rows):
        if column not in row:
            raise ValueError(f"{source}, row {n}: no {column!r} column (columns: {', '.join(sorted(row))}); a "
                             f"multi-objective preference set names each pair's objective ({', '.join(objectives)})")
        if row[column] not in out:
            raise ValueError(f"{source}, row {n}: {column}={row[column]!r} is not one of {', '.join(objectives)}")
        out[row[column]].append({k: v for k, v in row.items() if k != column})
    empty = [name for name, mine in out.items() if not mine]
    if empty:
        raise ValueError(f"{source}: no pair for objective(s) {', '.join(empty)}; each objective needs preferences")
    return out


# ------------------------------------------------------------------------------------------------
# computing


def folder_fingerprint(path: str | Path) -> str:
    """sha256 over the names, sizes and contents of a model folder's files (hub ids: the id itself)."""
    path = Path(path)
    h = hashlib.sha256(str(path.name).encode())
    if not path.is_dir():
        h.update(str(path).encode())
        return h.hexdigest()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _load_lm(task: LMPreferenceTask, path: str) -> Any:
    from diffdpo.lm.models import load_causal_lm
    from diffdpo.lm.packing import prepare_for_packing

    model = load_causal_lm(dataclasses.replace(task.cfg.model, pretrained=path, tokenizer=None), torch.float32)
    prepare_for_packing(model, task.cfg.layout)
    return model.to(task.device).eval()


def _reference_path(task: LMPreferenceTask) -> str:
    return task.cfg.margin.reference or task.cfg.model.pretrained


@torch.no_grad()
def dataset_logps(task: LMPreferenceTask, model: Any, batch_size: int) -> torch.Tensor:
    """Summed completion log-probs (N, 2) [chosen, rejected] of every pair of ``task``'s data under ``model``."""
    ds, logps = task.dataset(), CausalLMLogps(model, chunk_size=task.cfg.logits_chunk_size, topk=0)
    rows: list[torch.Tensor] = []
    for start in range(0, len(ds), batch_size):
        tokens = task.collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])["tokens"]
        tokens = tokens.to(task.device)
        s = sequence_logps(logps(tokens, with_stats=False).logps, tokens, average=False).float().cpu()  # (2B,)
        b = tokens.num_sequences // 2
        rows.append(torch.stack([s[:b], s[b:]], dim=1))  # (B, 2)
    return torch.cat(rows)


def implicit_margin(task: LMPreferenceTask, path: str) -> torch.Tensor:
    """(N, 2) implicit rewards of a DPO model folder (a peft adapter is read on top of the reference)."""
    cfg = task.cfg.margin
    if (Path(path) / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(_load_lm(task, _reference_path(task)), path).eval()
        policy = dataset_logps(task, model, cfg.batch_size)
        with adapters_disabled(model):  # the adapter's base is pi_ref
            ref = dataset_logps(task, model, cfg.batch_size)
    else:
        policy = dataset_logps(task, _load_lm(task, path), cfg.batch_size)
        ref = dataset_logps(task, _load_lm(task, _reference_path(task)), cfg.batch_size)
    return implicit_rewards(policy, ref, cfg.beta)


def reward_model_class(target: str) -> Any:
    """The class ``"package.module:Name"`` names (by default :class:`diffdpo.rewards.lm.HFRewardModel`; named, not
    imported here, because the rewards package builds on this one)."""
    import importlib

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"lm.margin.reward_model_class={target!r} must look like 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"lm.margin.reward_model_class={target!r}: cannot import {module_name!r} ({exc})") from exc
    if not hasattr(module, attr):
        raise ValueError(f"lm.margin.reward_model_class={target!r}: {module_name} has no {attr!r}")
    return getattr(module, attr)


def reward_model_margin(task: LMPreferenceTask, path: str) -> torch.Tensor:
    """(N, 2) scores of a reward model folder on the pairs' raw texts (the rows the items were tokenised from)."""
    from diffdpo.lm.data import load_rows

    d = task.cfg.data
    rows, _ = load_rows(d.source, d.split)
    ds = task.dataset()
    picked = [rows[item["row"]] for item in ds.items]
    cls = reward_model_class(task.cfg.margin.reward_model_class)
    rm = cls(path, device=task.device, batch_size=task.cfg.margin.batch_size)
    prompts = [r["prompt"] for r in picked]
    chosen = rm(prompts, [r["chosen"] for r in picked]).float().cpu()
    rejected = rm(prompts, [r["rejected"] for r in picked]).float().cpu()
    return torch.stack([chosen, rejected], dim=1)


def cache_key(task: LMPreferenceTask) -> str:
    cfg = task.cfg.margin
    parts = {
        "kinds": list(cfg.kinds),
        "reward_model_class": cfg.reward_model_class if "reward_model" in cfg.kinds else None,
        "models": [folder_fingerprint(p) for p in cfg.models],
        "reference": folder_fingerprint(_reference_path(task)) if "implicit" in cfg.kinds else None,
        "beta": cfg.beta if "implicit" in cfg.kinds else None,
        "data": task.dataset().fingerprint(),
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def compute_margin_rewards(task: LMPreferenceTask) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) chosen and rejected margin rewards of every pair, one column per ``lm.margin`` entry."""
    cols = []
    for kind, path in zip(task.cfg.margin.kinds, task.cfg.margin.models):
        cols.append(implicit_margin(task, path) if kind == "implicit" else reward_model_margin(task, path))
    both = torch.stack(cols, dim=2)  # (N, 2, K)
    return both[:, 0].contiguous(), both[:, 1].contiguous()


def precompute_margin_rewards(task: LMPreferenceTask, accelerator: Any) -> MarginRewards:
    """Load the cached margin rewards of ``task``'s margin models and data, computing them if absent."""
    from safetensors.torch import load_file, save_file

    cfg = task.cfg.margin
    for path in cfg.models:
        if not Path(path).exists():
            raise FileNotFoundError(f"lm.margin.models: {path!r} does not exist; train the objective's DPO model "
                                    "(or reward model) first")
    key = cache_key(task)
    path = Path(cfg.cache_dir) / f"margin_rewards-{key}.safetensors"
    if not path.is_file():
        if accelerator.is_main_process:
            chosen, rejected = compute_margin_rewards(task)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            save_file({"chosen": chosen, "rejected": rejected}, str(tmp),
                      metadata={"key": key, "source": task.dataset().source, "models": json.dumps(list(cfg.models))})
            os.replace(tmp, path)
        accelerator.wait_for_everyone()
    tensors = load_file(str(path))
    n, k = len(task.dataset()), len(cfg.models)
    if tuple(tensors["chosen"].shape) != (n, k):
        raise ValueError(f"{path} holds margin rewards of shape {tuple(tensors['chosen'].shape)}, expected {(n, k)}; "
                         "delete the file")
    return MarginRewards(tensors["chosen"], tensors["rejected"], path)

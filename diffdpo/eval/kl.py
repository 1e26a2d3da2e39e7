"""Estimators of the sequence-level KL(pi || pi_ref) from completions sampled from the policy.

The "KL budget" of Rafailov et al. 2024 ("Scaling Laws for Reward Model Overoptimization in Direct
Alignment Algorithms", arXiv 2406.02900) is ``KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)]``
over whole completions. From N completions ``y_i ~ pi(.|x_i)`` and the per-token log-probs of the sampled
tokens under both models, three estimators (each per sequence, then the mean over sequences):

* ``k1``: ``sum_t (log pi - log pi_ref)`` at the sampled tokens. Unbiased; can be negative for a
  sequence; the highest variance.
* ``k3``: ``sum_t [(r_t - 1) - log r_t]`` with ``r_t = pi_ref(y_t|.) / pi(y_t|.)`` (Schulman 2020,
  "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html). At each position
  ``E_{y_t ~ pi}[r_t - 1] = 0``, so it is the k1 term plus a zero-mean control variate: unbiased,
  ``>= 0`` for every token, and of lower variance when pi is near pi_ref (far from it, e.g. a KL of
  ~1 nat on the 3-token toy of the tests, its spread can exceed k1's).
* ``analytic``: ``sum_t KL(pi(.|y_<t) || pi_ref(.|y_<t))``, the exact next-token KL over the whole
  vocabulary at each sampled prefix (needs full logits). By the chain rule of KL its expectation over
  prefixes is the sequence KL: the Rao-Blackwellised k1 (the expectation over the last token taken
  exactly at every position), ``>= 0`` and of the lowest variance of the three.

All three assume the completions were sampled **from pi itself**: temperature 1, no top-k/top-p
filtering, no mixture. Sampled otherwise, they estimate nothing in particular. A completion that ends
with EOS includes the EOS token (its probability is part of the sequence's); one cut at
``max_new_tokens`` measures the KL of the truncated process.

:func:`lm_kl_estimates` runs the models on :class:`diffdpo.lm.generate.Completions` (their token ids,
never re-tokenised text), with the reference a separate model or the policy's LoRA adapters disabled.
This module imports nothing from :mod:`diffdpo.lm` (which imports :mod:`diffdpo.eval`): completions are
read by their ``prompt_ids`` and ``completion_ids`` attributes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

KLEstimator = Literal["k1", "k3", "analytic"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


def _mask_like(values: Tensor, mask: Tensor | None) -> Tensor:
    if values.dim() != 2:
        raise ValueError(f"token values must be (N, T) (sequences x positions), got shape {tuple(values.shape)}")
    if mask is None:
        return torch.ones_like(values, dtype=torch.bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the token values have {tuple(values.shape)}")
    return mask.bool()


def kl_k1(policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence k1 estimate ``sum_t (log pi - log pi_ref)`` [N] from (N, T) sampled-token log-probs.

    ``mask`` (N, T) marks real completion tokens (padding False); ``None`` = all real.
    """
    mask = _mask_like(policy_token_logps, mask)
    if ref_token_logps.shape != policy_token_logps.shape:
        raise ValueError(f"ref_token_logps has shape {tuple(ref_token_logps.shape)} but policy_token_logps has "
                         f"{tuple(policy_token_logps.shape)}")
    diff = (policy_token_logps.double() - ref_token_logps.double()).masked_fill(~mask, 0.0)
    return diff.sum(dim=1)


def kl_k3(policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence k3 estimate ``sum_t [(r - 1) - log r]``, ``r = pi_ref / pi`` at the sampled tokens [N].

    Schulman 2020 ("Approximating KL Divergence"). Each token's term is ``>= 0``; unbiased on samples of pi.
    """
    mask = _mask_like(policy_token_logps, mask)
    if ref_token_logps.shape != policy_token_logps.shape:
        raise ValueError(f"ref_token_logps has shape {tuple(ref_token_logps.shape)} but policy_token_logps has "
                         f"{tuple(policy_token_logps.shape)}")
    log_r = (ref_token_logps.double() - policy_token_logps.double()).masked_fill(~mask, 0.0)  # (N, T)
    return (torch.expm1(log_r) - log_r).sum(dim=1)  # expm1 keeps (r - 1) accurate for r near 1


def kl_analytic(policy_logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence ``sum_t KL(pi(.|y_<t) || pi_ref(.|y_<t))`` [N] from (N, T, V) next-token logits.

    The logits (or log-probs: they are normalised here) at each sampled prefix; the exact next-token KL
    over the vocabulary is summed along the sequence ("analytic KL along samples", Rao-Blackwellised k1).
    """
    if policy_logits.dim() != 3 or ref_logits.shape != policy_logits.shape:
        raise ValueError(f"policy_logits and ref_logits must both be (N, T, V), got {tuple(policy_logits.shape)} "
                         f"and {tuple(ref_logits.shape)}")
    logp = F.log_softmax(policy_logits.double(), dim=-1)
    logq = F.log_softmax(ref_logits.double(), dim=-1)
    token_kl = (logp.exp() * (logp - logq)).sum(dim=-1)  # (N, T)
    mask = _mask_like(token_kl, mask)
    return token_kl.masked_fill(~mask, 0.0).sum(dim=1)


@dataclass
class KLEstimate:
    """Means over sequences of each estimator, their standard errors, and the per-sequence values."""

    n: int
    k1: float
    k3: float
    analytic: float | None  # None without full logits
    k1_stderr: float
    k3_stderr: float
    analytic_stderr: float | None
    per_sequence: dict[str, Tensor]  # name -> [N] float64

    def value(self, estimator: KLEstimator = "analytic") -> float:
        """One estimator's mean (``analytic`` falls back to ``k3`` when no logits were given)."""
        if estimator not in KL_ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is unknown; choose one of {', '.join(KL_ESTIMATORS)}")
        if estimator == "analytic" and self.analytic is None:
            return self.k3
        return float(getattr(self, estimator))

    def to_dict(self) -> dict[str, float | int | None]:
        return {"n": self.n, "k1": self.k1, "k3": self.k3, "analytic": self.analytic, "k1_stderr": self.k1_stderr,
                "k3_stderr": self.k3_stderr, "analytic_stderr": self.analytic_stderr}


def _mean_se(x: Tensor) -> tuple[float, float]:
    n = x.numel()
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan


def kl_estimates(policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor | None = None, *,
                 policy_logits: Tensor | None = None, ref_logits: Tensor | None = None) -> KLEstimate:
    """k1, k3 and (given (N, T, V) logits) the analytic estimate, with standard errors over sequences."""
    per = {"k1": kl_k1(policy_token_logps, ref_token_logps, mask),
           "k3": kl_k3(policy_token_logps, ref_token_logps, mask)}
    if (policy_logits is None) != (ref_logits is None):
        raise ValueError("pass both policy_logits and ref_logits for the analytic estimate, or neither")
    if policy_logits is not None:
        per["analytic"] = kl_analytic(policy_logits, ref_logits, mask)
    if per["k1"].numel() == 0:
        raise ValueError("no sequences: the KL estimate needs at least one sampled completion")
    (k1, k1_se), (k3, k3_se) = _mean_se(per["k1"]), _mean_se(per["k3"])
    an, an_se = _mean_se(per["analytic"]) if "analytic" in per else (None, None)
    return KLEstimate(per["k1"].numel(), k1, k3, an, k1_se, k3_se, an_se, per)


# ------------------------------------------------------------------------------------------------
# a transformers causal LM on sampled completions


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _right_pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ids and attention mask (B, L), and the positions (B, T) that predict the completion tokens with
    their mask (B, T): the logits at position ``len(prompt) - 1 + t`` predict completion token t."""
    lengths = [len(p) + len(c) for p, c in rows]
    width, t_max = max(lengths), max(max(len(c) for _, c in rows), 1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), t_max), dtype=torch.long)
    mask = torch.zeros((len(rows), t_max), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        if not p:
            raise ValueError(f"row {i} has an empty prompt: a causal LM needs at least one token (BOS) to condition on")
        ids[i, : lengths[i]] = torch.tensor(p + c, dtype=torch.long)
        attn[i, : lengths[i]] = 1
        pos[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        mask[i, : len(c)] = True
    return ids.to(device), attn.to(device), pos.to(device), mask.to(device)


def _completion_logits(model: Any, ids: Tensor, attn: Tensor, pos: Tensor) -> Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits  # (B, L, V)
    index = pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, T, V)
    return torch.gather(logits, 1, index).float()  # (B, T, V)


@torch.no_grad()
def lm_kl_estimates(policy: Any, completions: Any, *, ref_model: Any | None = None, batch_size: int = 16,
                    pad_token_id: int = 0) -> KLEstimate:
    """KL(pi || pi_ref) estimates (k1, k3, analytic) on completions sampled from ``policy``.

    Args:
        policy: a transformers causal LM (``model(input_ids=..., attention_mask=...).logits``).
        completions: :class:`diffdpo.lm.generate.Completions` (or anything with ``prompt_ids`` and
            ``completion_ids``, lists of token-id lists), sampled from ``policy`` at temperature 1 without
            filters (:func:`diffdpo.lm.generate.sample_completions`).
        ref_model: the reference; ``None`` = ``policy`` with its LoRA adapters disabled
            (:func:`diffdpo.adapters.adapters_disabled`), which then must carry adapters.
        batch_size: rows per forward pass. pad_token_id: fills the right padding (masked out).

    Returns:
        :class:`KLEstimate`; an empty completion (EOS-less and zero tokens) contributes 0 to every estimator.
    """
    from diffdpo.adapters import adapters_disabled, eval_mode, tuner_layers

    layers = None
    if ref_model is None:
        layers = tuner_layers(policy)
        if not layers:
            raise ValueError("no reference: pass ref_model=... (a frozen copy) or a policy with LoRA adapters "
                             "(its reference is the adapters off)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [(list(p), list(c)) for p, c in zip(completions.prompt_ids, completions.completion_ids)]
    if not rows:
        raise ValueError("no completions to estimate the KL on")
    device = _device(policy)
    per: dict[str, list[Tensor]] = {"k1": [], "k3": [], "analytic": []}
    with eval_mode(policy, ref_model):
        for start in range(0, len(rows), batch_size):
            ids, attn, pos, mask = _right_pad(rows[start : start + batch_size], pad_token_id, device)
            policy_logits = _completion_logits(policy, ids, attn, pos)  # (B, T, V)
            if ref_model is not None:
                ref_logits = _completion_logits(ref_model, ids, attn, pos)
            else:
                with adapters_disabled(policy, layers):
                    ref_logits = _completion_logits(policy, ids, attn, pos)
            targets = torch.gather(ids, 1, (pos + 1).clamp(max=ids.shape[1] - 1)).unsqueeze(-1)  # (B, T, 1)
            policy_logps = F.log_softmax(policy_logits, dim=-1).gather(-1, targets).squeeze(-1)  # (B, T)
            ref_logps = F.log_softmax(ref_logits, dim=-1).gather(-1, targets).squeeze(-1)
            per["k1"].append(kl_k1(policy_logps, ref_logps, mask).cpu())
            per["k3"].append(kl_k3(policy_logps, ref_logps, mask).cpu())
            per["analytic"].append(kl_analytic(policy_logits, ref_logits, mask).cpu())
    values = {k: torch.cat(v) for k, v in per.items()}
    (k1, k1_se), (k3, k3_se), (an, an_se) = (_mean_se(values[k]) for k in ("k1", "k3", "analytic"))
    return KLEstimate(len(rows), k1, k3, an, k1_se, k3_se, an_se, values)

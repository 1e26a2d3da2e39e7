"""Evaluate every loss in :mod:`diffdpo.losses` on one seeded batch: value, gradient norm, stability.

A quick, honest look at the whole loss library (``diffdpo losses``): for each loss type (and each
f-divergence where it applies) it reports the mean loss on a seeded batch of log-likelihoods, the
norm of its gradient with respect to the policy log-likelihoods, the implicit-reward accuracy and
margin, the loss when the policy equals the reference, and whether value and gradient stay finite
at the Diffusion-DPO scale (log-ratios of +-1e4, beta 5000) in float32 and bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffdpo.losses import (
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    POINTWISE_LOSS_TYPES,
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    pointwise_loss,
    preference_loss,
)


@dataclass
class LossTableConfig:
    batch_size: int = field(
        default=64, metadata={"help": "pairs (and pointwise samples) in the seeded batch"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the batch"})
    beta: float = field(default=0.1, metadata={"help": "beta used for the value/gradient columns"})
    logp_scale: float = field(default=2.0, metadata={"help": "std of the random log-likelihoods"})
    extreme_logratio: float = field(
        default=1e4, metadata={"help": "log-ratio magnitude of the stability check"}
    )
    extreme_beta: float = field(
        default=5000.0, metadata={"help": "beta of the stability check (Diffusion-DPO)"}
    )

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.beta <= 0 or self.extreme_beta <= 0:
            raise ValueError("beta and extreme_beta must be > 0")


@dataclass
class LossRow:
    name: str
    loss: float
    grad_norm: float
    accuracy: float | None
    margin: float | None
    loss_at_ref: float
    finite_fp32: bool
    finite_bf16: bool


def _extra_for(loss_type: str, batch_size: int, gen: torch.Generator, dtype: torch.dtype) -> dict:
    if loss_type == "modpo":
        return {
            "margin_rewards_chosen": torch.randn(batch_size, 1, generator=gen).to(dtype),
            "margin_rewards_rejected": torch.randn(batch_size, 1, generator=gen).to(dtype),
            "weights": [0.7, 0.3],
        }
    if loss_type == "dro":
        return {"values": torch.zeros(batch_size, dtype=dtype)}
    if loss_type == "length_dpo":  # completion lengths in tokens
        return {
            "chosen_lengths": torch.randint(1, 64, (batch_size,), generator=gen),
            "rejected_lengths": torch.randint(1, 64, (batch_size,), generator=gen),
        }
    return {}


def _paired_inputs(cfg: LossTableConfig, loss_type: str, gen: torch.Generator) -> list[torch.Tensor]:
    b = cfg.batch_size
    logps = [torch.randn(b, generator=gen) * cfg.logp_scale for _ in range(4)]
    if loss_type in REFERENCE_FREE_LOSS_TYPES:  # length-averaged log-probs: negative
        logps[0], logps[1] = -logps[0].abs() - 0.1, -logps[1].abs() - 0.1
    return logps


def _paired_eval(inputs: list[torch.Tensor], dtype: torch.dtype, kw: dict):
    """Loss and gradient norm w.r.t. the two policy inputs."""
    leaves = [x.to(dtype).detach().requires_grad_(i < 2) for i, x in enumerate(inputs)]
    if kw["loss_type"] in REFERENCE_FREE_LOSS_TYPES:
        leaves[2] = leaves[3] = None
    out = preference_loss(*leaves, **kw)
    loss = out.losses.float().mean()
    loss.backward()
    loss = loss.detach()
    gnorm = torch.sqrt(leaves[0].grad.float().pow(2).sum() + leaves[1].grad.float().pow(2).sum())
    return out, loss, gnorm


def _paired_row(cfg: LossTableConfig, loss_type: str, f_divergence: str) -> LossRow:
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs = _paired_inputs(cfg, loss_type, gen)
    extra = _extra_for(loss_type, cfg.batch_size, gen, torch.float32)
    kw = dict(loss_type=loss_type, beta=cfg.beta, f_divergence=f_divergence, **extra)
    out, loss, gnorm = _paired_eval(inputs, torch.float32, kw)
    # policy == reference (for reference-free types: chosen == rejected)
    same = [inputs[2], inputs[3], inputs[2], inputs[3]]
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        same = [inputs[0], inputs[0], None, None]
    at_ref = preference_loss(*same, **kw).losses.mean()
    # stability at the Diffusion-DPO scale: log-ratios of +-extreme, beta = extreme_beta
    big = cfg.extreme_logratio
    sign = torch.where(torch.arange(cfg.batch_size) % 2 == 0, 1.0, -1.0)
    extreme = [sign * big, -sign * big, torch.zeros(cfg.batch_size), torch.zeros(cfg.batch_size)]
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        extreme = [
            -(sign + 2) * big / 3,
            -(2 - sign) * big / 3,
            torch.zeros(cfg.batch_size),
            torch.zeros(cfg.batch_size),
        ]
    ekw = dict(kw, beta=cfg.extreme_beta)
    finite = {}
    for dtype in (torch.float32, torch.bfloat16):
        ekw_d = dict(
            ekw, **_extra_for(loss_type, cfg.batch_size, torch.Generator().manual_seed(cfg.seed), dtype)
        )
        _, eloss, egnorm = _paired_eval(extreme, dtype, ekw_d)
        finite[dtype] = bool(torch.isfinite(eloss) and torch.isfinite(egnorm))
    name = loss_type if f_divergence == "reverse_kl" else f"{loss_type}/{f_divergence}"
    return LossRow(
        name,
        float(loss),
        float(gnorm),
        float(out.accuracies.mean()),
        float(out.margins.mean()),
        float(at_ref),
        finite[torch.float32],
        finite[torch.bfloat16],
    )


def _pointwise_row(cfg: LossTableConfig, loss_type: str) -> LossRow:
    gen = torch.Generator().manual_seed(cfg.seed)
    b = cfg.batch_size
    policy, ref = (
        torch.randn(b, generator=gen) * cfg.logp_scale,
        torch.randn(b, generator=gen) * cfg.logp_scale,
    )
    labels = torch.rand(b, generator=gen) > 0.5
    if loss_type == "dro":
        labels = torch.randn(b, generator=gen)

    kw = dict(loss_type=loss_type, beta=cfg.beta, **_extra_for(loss_type, b, gen, torch.float32))
    out, loss, gnorm = _pointwise_eval(policy, ref, labels, torch.float32, kw)
    at_ref = pointwise_loss(ref, ref, labels, **kw).losses.mean()
    sign = torch.where(torch.arange(b) % 2 == 0, 1.0, -1.0)
    finite = {}
    for dtype in (torch.float32, torch.bfloat16):
        ekw = dict(
            kw, beta=cfg.extreme_beta, **_extra_for(loss_type, b, torch.Generator().manual_seed(0), dtype)
        )
        _, eloss, egnorm = _pointwise_eval(sign * cfg.extreme_logratio, torch.zeros(b), labels, dtype, ekw)
        finite[dtype] = bool(torch.isfinite(eloss) and torch.isfinite(egnorm))
    return LossRow(
        loss_type,
        float(loss),
        float(gnorm),
        None,
        None,
        float(at_ref),
        finite[torch.float32],
        finite[torch.bfloat16],
    )


def _pointwise_eval(policy, ref, labels, dtype, kw):
    p = policy.to(dtype).detach().requires_grad_(True)
    lab = labels if labels.dtype == torch.bool else labels.to(dtype)
    out = pointwise_loss(p, ref.to(dtype), lab, **kw)
    loss = out.losses.float().mean()
    loss.backward()
    return out, loss.detach(), p.grad.float().norm()


def loss_table(cfg: LossTableConfig | None = None) -> list[LossRow]:
    """One :class:`LossRow` per loss type (and f-divergence variant) of the library."""
    cfg = cfg or LossTableConfig()
    rows = []
    for loss_type in PREFERENCE_LOSS_TYPES:
        divergences = F_DIVERGENCES if loss_type in F_DIVERGENCE_LOSS_TYPES else ("reverse_kl",)
        rows.extend(_paired_row(cfg, loss_type, f) for f in divergences)
    rows.extend(_pointwise_row(cfg, t) for t in POINTWISE_LOSS_TYPES)
    return rows


def format_table(rows: list[LossRow], cfg: LossTableConfig) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    header = f"{'loss':<22}{'loss':>10}{'|grad|':>10}{'acc':>8}{'margin':>10}{'at ref':>10}  finite fp32/bf16"
    lines = [
        f"Loss library on a seeded batch (B={cfg.batch_size}, seed={cfg.seed}, beta={cfg.beta}); "
        f"stability at log-ratios +-{cfg.extreme_logratio:g}, beta={cfg.extreme_beta:g}",
        f"'at ref': loss with policy == reference (DPO: ln 2 = {math.log(2):.4f})",
        header,
        "-" * len(header),
    ]
    for r in rows:
        lines.append(
            f"{r.name:<22}{fmt(r.loss):>10}{fmt(r.grad_norm):>10}{fmt(r.accuracy):>8}{fmt(r.margin):>10}"
            f"{fmt(r.loss_at_ref):>10}  {'yes' if r.finite_fp32 else 'NO'}/{'yes' if r.finite_bf16 else 'NO'}"
        )
    return "\n".join(lines)

"""Run TRL's own loss code on given log-likelihoods: the independent reference for parity tests.

TRL (1.x) computes DPO and KTO losses inside ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss``
from a model's per-token log-probs. To feed it arbitrary per-sequence log-likelihoods we call those
methods unbound on a minimal trainer state and a stand-in "model" whose per-token log-probs sum to
the requested values. TRL's code below the log-prob computation (f-divergence scores, every loss
branch, reductions) runs unchanged. The CPO (SimPO) and ORPO loss methods are called the same way.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def unwrap_model(m):
        return m


class _LogpModel:
    """Returns per-token log-probs whose rows sum to ``logps`` (the rest of the row is zero)."""

    training = True

    def __init__(self, logps: torch.Tensor, seq_len: int):
        self.logps = logps
        self.seq_len = seq_len

    def __call__(self, **kwargs):
        n = self.logps.shape[0]
        per_token = torch.zeros(n, self.seq_len, dtype=self.logps.dtype)
        per_token = torch.cat([self.logps[:, None], per_token[:, 1:]], dim=1)
        zeros = torch.zeros(n, self.seq_len, dtype=self.logps.dtype)
        return SimpleNamespace(
            log_probs=per_token,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros(n, self.seq_len, dtype=torch.bool),
        )


def _state(**kw) -> SimpleNamespace:
    base = dict(
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05),
    )
    base.update(kw)
    return SimpleNamespace(**base)


def trl_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL ``DPOTrainer``'s batch loss (mean over pairs) for these per-sequence log-likelihoods."""
    from trl import DPOTrainer

    b = policy_chosen_logps.shape[0]
    lengths = torch.ones(2 * b, dtype=torch.long)
    if chosen_lengths is not None:
        lengths = torch.cat([chosen_lengths, rejected_lengths]).long()
    width = int(lengths.max()) + 1
    # completion_mask: first (width - length) tokens are prompt; IPO divides by completion_mask.sum()
    completion_mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
    logps = torch.cat([policy_chosen_logps, policy_rejected_logps])
    model = _LogpModel(logps, seq_len=width - 1)
    state = _state(
        model=model,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    return DPOTrainer._compute_loss(state, model, inputs, return_outputs=False)


def trl_kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """TRL ``KTOTrainer``'s batch loss for these per-sequence log-likelihoods."""
    from trl.trainer.kto_trainer import KTOTrainer

    n = policy_logps.shape[0]
    model = _LogpModel(policy_logps, seq_len=1)
    state = _state(
        model=model,
        loss_type="kto",
        beta=beta,
        calculate_KL=True,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    # The mismatched-completion forward pass is log-prob plumbing, not loss code: supply its result.
    state._compute_kl_logps = lambda model, batch: kl_policy_logps
    batch = {
        "input_ids": torch.zeros(n, 2, dtype=torch.long),
        "attention_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_mask": torch.ones(n, 2, dtype=torch.long),
        "label": labels.long(),
        "ref_logps": ref_logps,
        "ref_KL_logps": kl_ref_logps,
    }
    return KTOTrainer._compute_loss(state, model, batch, return_outputs=False)


def trl_cpo_losses(
    policy_chosen_logps, policy_rejected_logps, *, loss_type, beta, simpo_gamma=0.5, label_smoothing=0.0
):
    """TRL ``CPOTrainer.cpo_loss`` per-pair losses (SimPO when loss_type='simpo')."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    state = _state(
        alpha=0.0, loss_type=loss_type, beta=beta, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing
    )
    return CPOTrainer.cpo_loss(state, policy_chosen_logps, policy_rejected_logps)[0]


def trl_orpo_or_terms(policy_chosen_logps, policy_rejected_logps, *, beta):
    """TRL ``ORPOTrainer.odds_ratio_loss`` per-pair terms: ``beta * logsigmoid(log_odds)``."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    state = _state(beta=beta)
    return ORPOTrainer.odds_ratio_loss(state, policy_chosen_logps, policy_rejected_logps)[0]

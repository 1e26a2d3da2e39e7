"""The direct-alignment (DAA) loss library shared by every modality.

A modality only supplies a per-sample log-likelihood, or a proxy of it:

* diffusion: ``logp = -0.5 * mse`` of the denoising error at a sampled (t, noise) (ELBO proxy),
* 3D generators: the same on the generator's latent,
* language models: summed (or length-averaged) completion-token log-probs.

Everything here is a pure function of those numbers. Losses come back **unreduced** (shape [B]);
the caller reduces. Diagnostics (implicit rewards ``beta * log(pi / pi_ref)``, margins, accuracies)
come back detached with the loss.

Conventions (one convention, so beta never silently doubles):

* ``u_w = policy_chosen_logps - ref_chosen_logps`` and ``u_l`` likewise are the log-ratios;
  ``delta = u_w - u_l``.
* With the diffusion proxy ``logp = -0.5 * mse``, ``preference_loss(loss_type="sigmoid", beta=b)``
  equals the official Diffusion-DPO loss ``-logsigmoid(-0.5 * b * ((m_w - m_l) - (r_w - r_l)))``
  (Wallace et al. 2023, arXiv 2311.12908, eq. 14) with the *same* ``b`` (5000 for SD1.5 and SDXL).

Validation only inspects shapes and Python scalars, so it never forces a device sync. Detecting
non-finite values (and skipping such a step) is the training loop's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

PreferenceLossType = Literal[
    "sigmoid",
    "cdpo",
    "robust",
    "hinge",
    "ipo",
    "bco_pair",
    "nca_pair",
    "sppo_hard",
    "exo_pair",
    "apo_zero",
    "apo_down",
    "simpo",
    "orpo",
    "modpo",
    "length_dpo",
]
PointwiseLossType = Literal["kto", "dro", "dso_dro", "sft"]
GroupLossType = Literal["grao"]
FDivergence = Literal["reverse_kl", "forward_kl", "js", "alpha"]

PREFERENCE_LOSS_TYPES: tuple[str, ...] = get_args(PreferenceLossType)
POINTWISE_LOSS_TYPES: tuple[str, ...] = get_args(PointwiseLossType)
#: Losses over G sampled completions per query (and a reference answer): :func:`grao_loss`.
GROUP_LOSS_TYPES: tuple[str, ...] = get_args(GroupLossType)
F_DIVERGENCES: tuple[str, ...] = get_args(FDivergence)

#: Loss types whose objective is a function of ``delta`` only; the f-divergence generalisation
#: (Wang et al. 2023) replaces each log-ratio ``u`` by ``f'(exp(u))`` inside ``delta``.
F_DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset({"sigmoid", "cdpo", "robust", "hinge", "ipo", "exo_pair"})
#: Loss types that use no reference model (reference inputs may be ``None``).
REFERENCE_FREE_LOSS_TYPES: frozenset[str] = frozenset({"simpo", "orpo"})

# exp() arguments are clamped here so that f-divergence scores stay finite even when multiplied by
# the Diffusion-DPO beta (5000) or squared by IPO: exp(30)**2 ~ 1e26 and exp(30) * 5000 ~ 5e16 are far
# from the fp32/bf16 max (3.4e38).
_MAX_EXP_ARG = 30.0


@dataclass
class PreferenceLossOutput:
    """Per-pair losses and detached diagnostics of :func:`preference_loss`.

    ``chosen_rewards``/``rejected_rewards`` are the implicit rewards ``beta * (policy - ref)``
    (``beta * policy`` for reference-free losses), as TRL logs them.
    """

    losses: Tensor  # [B], differentiable, unreduced
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor  # [B], detached

    @property
    def margins(self) -> Tensor:
        """``chosen_rewards - rejected_rewards`` per pair."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> Tensor:
        """1.0 where the implicit reward ranks the chosen sample above the rejected one, else 0.0."""
        return (self.chosen_rewards > self.rejected_rewards).to(self.chosen_rewards.dtype)

    def metrics(self) -> dict[str, Tensor]:
        """Batch means of the standard diagnostics (still tensors: no device sync here)."""
        return {
            "loss": self.losses.detach().mean(),
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            "rewards/margins": self.margins.mean(),
            "rewards/accuracies": self.accuracies.mean(),
        }


@dataclass
class PointwiseLossOutput:
    """Per-sample losses and detached diagnostics of :func:`pointwise_loss`."""

    losses: Tensor  # [B], differentiable, unreduced
    rewards: Tensor  # [B], detached implicit rewards beta * (policy - ref)
    labels: Tensor  # [B], the labels as given (bool for kto/sft/dso_dro, float scores for dro)
    kl: Tensor | None = None  # scalar reference point z0 (KTO), detached

    def metrics(self) -> dict[str, Tensor]:
        """Batch means of the diagnostics, split by label where labels are binary."""
        out = {"loss": self.losses.detach().mean(), "rewards/all": self.rewards.mean()}
        if self.labels.dtype == torch.bool:
            good = self.labels.to(self.rewards.dtype)
            bad = 1.0 - good
            # Means over possibly empty groups; the clamp keeps them finite (0) without a sync.
            out["rewards/desirable"] = (self.rewards * good).sum() / good.sum().clamp(min=1.0)
            out["rewards/undesirable"] = (self.rewards * bad).sum() / bad.sum().clamp(min=1.0)
        if self.kl is not None:
            out["kl"] = self.kl
        return out


# ----------------------------------------------------------------------------------------------
# validation (shapes and Python scalars only: no .item(), no device sync)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(choices)}")


def _check_beta(beta: float) -> None:
    if isinstance(beta, Tensor):
        raise ValueError("beta must be a Python float, not a tensor (reading a tensor would force a sync)")
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta!r}")


def _check_extra(loss_type: str, extra: dict, allowed: frozenset[str]) -> None:
    unknown = set(extra) - allowed
    if unknown:
        raise ValueError(
            f"unexpected argument(s) {', '.join(sorted(unknown))} for loss_type={loss_type!r}"
            + (f"; it accepts {', '.join(sorted(allowed))}" if allowed else "")
        )


def _check_same_shape(**tensors: Tensor | None) -> torch.Size:
    shape = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D per-sample tensor of shape [B], got shape {tuple(t.shape)}"
            )
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(
                f"shape mismatch: {name} has shape {tuple(t.shape)} but {first} has shape {tuple(shape)}"
            )
    assert shape is not None
    return shape


# ----------------------------------------------------------------------------------------------
# f-divergences (Wang et al. 2023, "Beyond Reverse KL", arXiv 2309.16240, Table 1 / Theorem 1)


def f_divergence_score(
    logratios: Tensor, f_divergence: FDivergence = "reverse_kl", f_alpha: float = 0.5
) -> Tensor:
    """``f'(exp(u))`` for a log-ratio ``u = log(pi / pi_ref)``, up to an additive constant.

    * ``reverse_kl``: ``f(x) = x log x`` -> ``u`` (standard DPO).
    * ``forward_kl``: ``f(x) = -log x`` -> ``-exp(-u)``.
    * ``js``: Jensen-Shannon -> ``log(2 x / (1 + x)) = log 2 + logsigmoid(u)``.
    * ``alpha``: ``f'(x) = (1 - x**(-alpha)) / alpha`` (paper convention, alpha in (0, 1)) ->
      ``(1 - exp(-alpha * u)) / alpha``. TRL's ``f_alpha_divergence_coef`` is ``1 - alpha`` of
      this convention: TRL's ``(t**(c - 1) - 1) / (c - 1)`` with ``c = 1 - alpha`` is the same
      function. ``alpha -> 0`` recovers reverse KL, ``alpha = 1`` forward KL.

    Additive constants cancel in ``delta = score_w - score_l``; those here match TRL's.
    """
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1.0 - torch.exp((-logratios).clamp(max=_MAX_EXP_ARG))
    if f_divergence == "js":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence == "alpha":
        return (1.0 - torch.exp((-f_alpha * logratios).clamp(max=_MAX_EXP_ARG))) / f_alpha
    raise ValueError(
        f"f_divergence={f_divergence!r} is not supported; choose one of {', '.join(F_DIVERGENCES)}"
    )


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-6)  # a log-prob of 0 (probability 1) would give log(0); keep it finite
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ----------------------------------------------------------------------------------------------
# paired losses


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: PreferenceLossType = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha: float = 0.5,
    **extra,
) -> PreferenceLossOutput:
    """Per-pair loss of a direct alignment algorithm on (chosen, rejected) log-likelihoods.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] policy log-likelihoods (or proxies).
        ref_chosen_logps, ref_rejected_logps: [B] reference log-likelihoods; ``None`` only for the
            reference-free types ``simpo`` and ``orpo``.
        loss_type: which objective; each branch below names its paper and equation.
        beta: inverse temperature (DPO's beta, IPO's tau, SimPO's beta, ORPO's lambda). Must be > 0.
        label_smoothing: assumed label-flip rate eps in [0, 0.5) for ``cdpo``/``sigmoid``,
            ``robust``, ``exo_pair`` (0 means 1e-3 there, as in EXO's code) and ``simpo``.
        f_divergence, f_alpha: the f-divergence generalisation (Wang et al. 2023); applies to the
            types in :data:`F_DIVERGENCE_LOSS_TYPES`.
        **extra: per-type options:
            ``chosen_lengths``/``rejected_lengths`` ([B], ``ipo`` only): divide each f-score by its
            completion length before the IPO loss (TRL's length normalisation).
            ``preference_probs`` ([B], ``ipo`` only): soft labels p = P(the ``chosen`` completion beats
            the ``rejected`` one), e.g. a preference model's output in online IPO / IPO-MD, where the
            two completions are just the two samples y, y'; p = 1 is plain IPO. Values are not checked
            (that would read the tensor); keep them in [0, 1].
            ``bco_delta`` (float or scalar tensor, ``bco_pair``): reward shift, a running mean of
            rewards in BCO (Jung et al. 2024); default 0 as in TRL.
            ``simpo_gamma`` (float, ``simpo``): target reward margin gamma, default 0.5.
            ``margin_rewards_chosen``/``margin_rewards_rejected`` ([B, K]) and ``weights``
            ([K + 1] sequence or tensor, ``modpo``): other objectives' rewards and the weight vector.
            ``chosen_lengths``/``rejected_lengths`` ([B] completion lengths in tokens, required) and
            ``length_alpha`` (float, default 0.05) for ``length_dpo``.

    Returns:
        :class:`PreferenceLossOutput` with unreduced ``losses`` of shape [B].
    """
    _check_choice("loss_type", loss_type, PREFERENCE_LOSS_TYPES)
    _check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing!r}")
    if f_divergence == "alpha" and not 0.0 < f_alpha < 1.0:
        raise ValueError(f"f_alpha must be in (0, 1) for the alpha-divergence, got f_alpha={f_alpha!r}")
    if f_divergence != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence={f_divergence!r} is only defined for loss types "
            f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))}; loss_type={loss_type!r} needs f_divergence='reverse_kl'"
        )
    reference_free = loss_type in REFERENCE_FREE_LOSS_TYPES
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps (got None)")
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=None if reference_free else ref_chosen_logps,
        ref_rejected_logps=None if reference_free else ref_rejected_logps,
    )
    _check_extra(loss_type, extra, _EXTRA_KEYS[loss_type])

    if reference_free:
        return _reference_free_loss(
            policy_chosen_logps, policy_rejected_logps, loss_type, beta, label_smoothing, **extra
        )

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # u_w, [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # u_l, [B]
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()

    if loss_type in F_DIVERGENCE_LOSS_TYPES:
        chosen_scores = f_divergence_score(chosen_logratios, f_divergence, f_alpha)
        rejected_scores = f_divergence_score(rejected_logratios, f_divergence, f_alpha)
        losses = _delta_loss(loss_type, chosen_scores, rejected_scores, beta, label_smoothing, **extra)
    else:
        losses = _logratio_loss(loss_type, chosen_logratios, rejected_logratios, beta, **extra)
    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards)


_EXTRA_KEYS: dict[str, frozenset[str]] = {t: frozenset() for t in PREFERENCE_LOSS_TYPES}
_EXTRA_KEYS["ipo"] = frozenset({"chosen_lengths", "rejected_lengths", "preference_probs"})
_EXTRA_KEYS["bco_pair"] = frozenset({"bco_delta"})
_EXTRA_KEYS["simpo"] = frozenset({"simpo_gamma"})
_EXTRA_KEYS["modpo"] = frozenset({"margin_rewards_chosen", "margin_rewards_rejected", "weights"})
_EXTRA_KEYS["length_dpo"] = frozenset({"chosen_lengths", "rejected_lengths", "length_alpha"})


def _delta_loss(
    loss_type: str,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    beta: float,
    label_smoothing: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    preference_probs: Tensor | None = None,
) -> Tensor:
    """Losses that depend on the pair only through ``delta = score_w - score_l``."""
    if loss_type == "ipo":
        # IPO, Azar et al. 2023 (arXiv 2310.12036) eq. 17: (h - 1/(2 tau))^2 with h = delta.
        # Optional length normalisation of each score, as TRL does (confirmed with the IPO authors).
        # Soft labels p (online IPO / IPO-MD, Calandriello et al. 2024, arXiv 2403.08635; this form is
        # from a secondary summary of the paper, not yet checked against its equations):
        # p (h - 1/(2 tau))^2 + (1 - p) (-h - 1/(2 tau))^2 = (h - (2p - 1)/(2 tau))^2 + p (1 - p) / tau^2,
        # i.e. h regressed towards (2p - 1)/(2 tau); p = 1 is the hard-label loss above.
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError(
                "pass both chosen_lengths and rejected_lengths for IPO length normalisation, or neither"
            )
        if chosen_lengths is not None:
            _check_same_shape(
                chosen_scores=chosen_scores, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths
            )
            chosen_scores = chosen_scores / chosen_lengths.clamp(min=1)
            rejected_scores = rejected_scores / rejected_lengths.clamp(min=1)
        delta = chosen_scores - rejected_scores
        if preference_probs is None:
            return (delta - 1.0 / (2.0 * beta)) ** 2
        _check_same_shape(chosen_scores=chosen_scores, preference_probs=preference_probs)
        p = preference_probs.to(delta.dtype)
        return p * (delta - 1.0 / (2.0 * beta)) ** 2 + (1.0 - p) * (-delta - 1.0 / (2.0 * beta)) ** 2

    logits = beta * (chosen_scores - rejected_scores)  # beta * delta, [B]
    eps = label_smoothing
    if loss_type in ("sigmoid", "cdpo"):
        # DPO, Rafailov et al. 2023 (arXiv 2305.18290) eq. 7: -log sigma(beta * delta).
        # cDPO (Mitchell 2023, "A note on DPO with noisy preferences"): labels flipped with
        # probability eps -> -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta).
        # With eps = 0 both are plain DPO.
        return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    if loss_type == "robust":
        # rDPO, Chowdhury et al. 2024 (arXiv 2403.00409) eq. 8: unbiased under flip rate eps.
        return ((1.0 - eps) * -F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    if loss_type == "hinge":
        # SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425) eq. 2 calibration loss, margin 1/beta.
        return torch.relu(1.0 - logits)
    if loss_type == "exo_pair":
        # EXO, Ji et al. 2024 (arXiv 2402.00856) eq. 16 for K = 2: KL(p_f || p_rh) with
        # p_f = softmax over {w, l} of beta * score and p_rh = (1 - eps, eps).
        eps = eps if eps > 0 else 1e-3
        return torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps)) + torch.sigmoid(-logits) * (
            F.logsigmoid(-logits) - math.log(eps)
        )
    raise AssertionError(loss_type)  # pragma: no cover - guarded by _check_choice


def _logratio_loss(
    loss_type: str,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    bco_delta: float | Tensor = 0.0,
    margin_rewards_chosen: Tensor | None = None,
    margin_rewards_rejected: Tensor | None = None,
    weights: Sequence[float] | Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    length_alpha: float = 0.05,
) -> Tensor:
    """Losses that use the chosen and rejected log-ratios separately."""
    r_w = beta * chosen_logratios  # [B]
    r_l = beta * rejected_logratios  # [B]
    if loss_type == "bco_pair":
        # BCO, Jung et al. 2024 (arXiv 2404.04656) eq. 6, paired form: a binary classifier with
        # logit r - delta; delta is a running mean of rewards (0 in TRL's pair variant).
        return -F.logsigmoid(r_w - bco_delta) - F.logsigmoid(-(r_l - bco_delta))
    if loss_type == "nca_pair":
        # NCA, Chen et al. 2024 (arXiv 2402.05369) eq. 12 for K = 2.
        return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    if loss_type == "sppo_hard":
        # SPPO, Wu et al. 2024 (arXiv 2405.00675) eq. 4.7 with hard win probability P = 1 / 0:
        # (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2, eta = beta^{-1}.
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        # APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266) eq. 7: raise the chosen
        # likelihood, lower the rejected one.
        return (1.0 - torch.sigmoid(r_w)) + torch.sigmoid(r_l)
    if loss_type == "apo_down":
        # APO-down, same paper eq. 8: lower both, the rejected one more.
        return torch.sigmoid(r_w) + (1.0 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "length_dpo":
        return _length_dpo_loss(chosen_logratios, rejected_logratios, beta, chosen_lengths, rejected_lengths,
                                length_alpha)
    if loss_type == "modpo":
        return _modpo_loss(
            chosen_logratios,
            rejected_logratios,
            beta,
            margin_rewards_chosen,
            margin_rewards_rejected,
            weights,
        )
    raise AssertionError(loss_type)  # pragma: no cover - guarded by _check_choice


def _length_dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
    length_alpha: float,
) -> Tensor:
    """Length-regularised DPO: ``-log sigma(beta * h + alpha * (|y_w| - |y_l|))``, h = u_w - u_l.

    R-DPO, Park et al. 2024 ("Disentangling Length from Quality in Direct Preference Optimization",
    arXiv 2403.19159) eq. 9, in the form and with the setting of CheXalign, Hein et al. 2024 (arXiv
    2410.07025): lengths in tokens, alpha = 0.05 (beta 0.1). The length term is *added*: a pair whose
    chosen completion is longer already has a head start in the logit, so the loss pushes h less for it
    and the policy gains less by lengthening; a pair whose chosen is shorter is pushed harder. ``alpha
    = 0`` is plain DPO (``sigmoid``). Lengths are data (detached, any numeric dtype); the implicit
    rewards reported stay ``beta * u``.
    """
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(
            "loss_type='length_dpo' needs chosen_lengths and rejected_lengths ([B] completion lengths in tokens); "
            "a task supplies them with summed log-probs (the LM task does unless average_log_prob is set)"
        )
    if isinstance(length_alpha, Tensor) or not math.isfinite(length_alpha) or length_alpha < 0:
        raise ValueError(f"length_alpha must be a finite Python float >= 0, got length_alpha={length_alpha!r}")
    _check_same_shape(chosen_logratios=chosen_logratios, chosen_lengths=chosen_lengths,
                      rejected_lengths=rejected_lengths)
    length_gap = (chosen_lengths - rejected_lengths).to(chosen_logratios.dtype).detach()  # [B], tokens
    logits = beta * (chosen_logratios - rejected_logratios) + length_alpha * length_gap  # [B]
    return -F.logsigmoid(logits)


def _modpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    margin_rewards_chosen: Tensor | None,
    margin_rewards_rejected: Tensor | None,
    weights: Sequence[float] | Tensor | None,
) -> Tensor:
    """MODPO, Zhou et al. 2023 (arXiv 2310.03708) eq. 8.

    The policy's reward for the objective being trained is ``(beta * u - w[1:] @ r_margin) / w[0]``
    for chosen and rejected alike, where ``r_margin`` are the rewards of the other K objectives;
    the loss is the DPO sigmoid on the difference.
    """
    if margin_rewards_chosen is None or margin_rewards_rejected is None or weights is None:
        raise ValueError("loss_type='modpo' needs margin_rewards_chosen, margin_rewards_rejected and weights")
    w = torch.as_tensor(weights, dtype=chosen_logratios.dtype, device=chosen_logratios.device)
    if w.dim() != 1 or w.shape[0] < 2:
        raise ValueError(
            f"weights must be a vector [w_0, w_1, ..., w_K] with K >= 1, got shape {tuple(w.shape)}"
        )
    if isinstance(weights, Sequence) and not weights[0] > 0:
        raise ValueError(f"weights[0] (the trained objective's weight) must be > 0, got {weights[0]!r}")
    expected = (chosen_logratios.shape[0], w.shape[0] - 1)
    for name, m in (
        ("margin_rewards_chosen", margin_rewards_chosen),
        ("margin_rewards_rejected", margin_rewards_rejected),
    ):
        if tuple(m.shape) == (chosen_logratios.shape[0],) and expected[1] == 1:
            continue
        if tuple(m.shape) != expected:
            raise ValueError(f"{name} must have shape [B, K] = {expected}, got {tuple(m.shape)}")
    m_w = margin_rewards_chosen.reshape(expected).to(w.dtype)  # [B, K]
    m_l = margin_rewards_rejected.reshape(expected).to(w.dtype)  # [B, K]
    logits = (beta * (chosen_logratios - rejected_logratios) - (m_w - m_l) @ w[1:]) / w[0]
    return -F.logsigmoid(logits)


def _reference_free_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float = 0.5,
) -> PreferenceLossOutput:
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    if loss_type == "simpo":
        # SimPO, Meng et al. 2024 (arXiv 2405.14734) eq. 6: -log sigma(beta/|y_w| log pi(y_w)
        # - beta/|y_l| log pi(y_l) - gamma). Inputs must be length-averaged log-probs.
        logits = beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma
        eps = label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    else:  # orpo
        # ORPO, Hong et al. 2024 (arXiv 2403.07691) eqs. 4-7: L = L_SFT + lambda * L_OR with
        # L_OR = -log sigma(log odds(y_w) - log odds(y_l)), odds(y) = p / (1 - p). Inputs are
        # length-averaged log-probs; L_SFT here is the chosen sample's mean token NLL
        # (-policy_chosen_logps), so each pair's loss is complete. beta plays lambda.
        log_odds = (policy_chosen_logps - policy_rejected_logps) - (
            _log1mexp(policy_chosen_logps) - _log1mexp(policy_rejected_logps)
        )
        losses = -policy_chosen_logps - beta * F.logsigmoid(log_odds)
    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards)


# ----------------------------------------------------------------------------------------------
# pointwise losses (unpaired good/bad labels or scalar rewards)


def pointwise_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    labels: Tensor,
    *,
    loss_type: PointwiseLossType = "kto",
    beta: float = 0.1,
    **extra,
) -> PointwiseLossOutput:
    """Per-sample loss for unpaired data: desirable/undesirable labels or scalar rewards.

    Args:
        policy_logps: [B] policy log-likelihoods (or proxies such as ``-0.5 * mse``).
        ref_logps: [B] reference log-likelihoods; may be ``None`` for ``sft`` and for the
            unanchored ``dso_dro``.
        labels: [B] bool (True = desirable/stable) for ``kto``, ``dso_dro``, ``sft``; float rewards
            for ``dro``.
        loss_type: ``kto``, ``dro``, ``dso_dro`` or ``sft`` (each documented at its branch).
        beta: KTO's beta, DRO's tau, the anchored DSO-DRO temperature. Must be > 0.
        **extra:
            ``kto``: ``kl_policy_logps``/``kl_ref_logps`` ([N], log-likelihoods of mismatched
            samples used for the reference point z0, as in KTO and TRL) or ``z0`` (float/scalar
            tensor); if neither is given, z0 is estimated from this batch's own log-ratios (the
            Diffusion-KTO choice). ``desirable_weight``/``undesirable_weight`` (default 1.0).
            ``dro``: ``values`` ([B], the learned value estimate V(x), required).
            ``dso_dro``: ``anchored`` (bool, default False).

    Returns:
        :class:`PointwiseLossOutput` with unreduced ``losses`` of shape [B], in input order.
    """
    _check_choice("loss_type", loss_type, POINTWISE_LOSS_TYPES)
    _check_beta(beta)
    _check_extra(loss_type, extra, _POINTWISE_EXTRA_KEYS[loss_type])
    needs_ref = loss_type in ("kto", "dro") or (loss_type == "dso_dro" and extra.get("anchored", False))
    if needs_ref and ref_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs ref_logps (got None)")
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if loss_type == "dro":
        if labels.dtype == torch.bool:
            raise ValueError("loss_type='dro' needs float rewards as labels, got a bool tensor")
    elif labels.dtype != torch.bool:
        raise ValueError(
            f"loss_type={loss_type!r} needs bool labels (True = desirable), got dtype {labels.dtype}"
        )

    logratios = policy_logps - ref_logps if ref_logps is not None else policy_logps  # [B]
    rewards = beta * logratios.detach()

    if loss_type == "kto":
        losses, z0 = _kto_loss(logratios, labels, beta, **extra)
        return PointwiseLossOutput(losses, rewards, labels, kl=z0)
    if loss_type == "dro":
        # DRO, Richemond et al. 2024 (arXiv 2405.19107) eq. 7:
        # L = 1/2 (r - V(x) - tau log(pi/pi_ref))^2, trained jointly in the policy and in V.
        values = extra.get("values")
        if values is None:
            raise ValueError("loss_type='dro' needs values=[B] (the learned value estimate V(x))")
        _check_same_shape(policy_logps=policy_logps, values=values)
        losses = 0.5 * (labels.to(logratios.dtype) - values - beta * logratios) ** 2
        return PointwiseLossOutput(losses, rewards, labels)
    sign = labels.to(policy_logps.dtype) * 2.0 - 1.0  # +1 desirable/stable, -1 undesirable
    if loss_type == "dso_dro":
        if extra.get("anchored", False):
            # Bounded, reference-anchored variant (ours): -log sigma(beta * s * log(pi/pi_ref)).
            # The push on each sample fades once the policy has moved ~1/beta from the reference,
            # unlike the unbounded DSO form, which can drift forever (the "flat base" cheat).
            losses = -F.logsigmoid(beta * sign * logratios)
        else:
            # DSO "DRO", Li et al. 2025 (arXiv 2503.22677), public code: (2o - 1) * m with m the
            # denoising error. With logp = -0.5 * m this is -2 * s * logp: lower the error of
            # stable samples, raise it for unstable ones. No reference, no beta; unbounded.
            losses = -2.0 * sign * policy_logps
        return PointwiseLossOutput(losses, rewards, labels)
    # sft: negative log-likelihood of desirable samples only (Diffusion-DPO's SFT baseline on
    # winners: -logp = 0.5 * mse); undesirable samples contribute 0.
    losses = -policy_logps * labels.to(policy_logps.dtype)
    return PointwiseLossOutput(losses, rewards, labels)


_POINTWISE_EXTRA_KEYS: dict[str, frozenset[str]] = {
    "kto": frozenset({"kl_policy_logps", "kl_ref_logps", "z0", "desirable_weight", "undesirable_weight"}),
    "dro": frozenset({"values"}),
    "dso_dro": frozenset({"anchored"}),
    "sft": frozenset(),
}


def _kto_loss(
    logratios: Tensor,
    labels: Tensor,
    beta: float,
    kl_policy_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    z0: float | Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306) eq. 8.

    ``v = 1 - sigmoid(beta * (u - z0))`` for desirable and ``1 - sigmoid(beta * (z0 - u))`` for
    undesirable samples, weighted by lambda_D / lambda_U. ``z0`` is a detached batch estimate of
    KL(pi || pi_ref), clamped at 0 (it is a KL, so never negative). Diffusion-KTO (Li et al. 2024,
    arXiv 2404.04465) uses the same form on the ELBO proxy.
    """
    if (kl_policy_logps is None) != (kl_ref_logps is None):
        raise ValueError("pass both kl_policy_logps and kl_ref_logps, or neither")
    if kl_policy_logps is not None and z0 is not None:
        raise ValueError("pass either z0 or kl_policy_logps/kl_ref_logps, not both")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError("desirable_weight and undesirable_weight must be > 0")
    if kl_policy_logps is not None:
        _check_same_shape(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
        z = (kl_policy_logps - kl_ref_logps).detach().mean().clamp(min=0)
    elif z0 is not None:
        z = torch.as_tensor(z0, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0)
    else:
        z = logratios.detach().mean().clamp(min=0)
    desirable = 1.0 - torch.sigmoid(beta * (logratios - z))
    undesirable = 1.0 - torch.sigmoid(beta * (z - logratios))
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    return losses, z


# ----------------------------------------------------------------------------------------------
# group losses (G sampled completions per query)


@dataclass
class GroupLossOutput:
    """Per-query losses and detached diagnostics of :func:`grao_loss`."""

    losses: Tensor  # [B], differentiable, unreduced
    advantages: Tensor  # [B, G], detached A_i of the sampled completions
    ref_answer_advantages: Tensor  # [B], detached A_y of the reference answers
    reward_std: Tensor  # [B], detached std of the G sample rewards (0: the group carries no signal)

    def metrics(self) -> dict[str, Tensor]:
        """Batch means of the diagnostics (still tensors: no device sync here)."""
        return {
            "loss": self.losses.detach().mean(),
            "advantages/ref_answer": self.ref_answer_advantages.mean(),
            "advantages/std": self.advantages.std(dim=1).mean(),
            "rewards/std": self.reward_std.mean(),
            "groups/zero_std": (self.reward_std == 0).to(self.reward_std.dtype).mean(),
        }


def group_advantages(rewards: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``((R - mean) / (std + eps), std)`` over the last dim of ``rewards`` [..., G], detached.

    ``std`` has Bessel's correction, as TRL's GRPOTrainer normalises. A group whose rewards are all
    equal gets advantages of exactly 0 (never NaN, whatever ``eps``): it carries no preference signal.
    """
    rewards = rewards.detach()
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)
    flat = rewards.amax(dim=-1, keepdim=True) == rewards.amin(dim=-1, keepdim=True)
    advantages = torch.where(flat, torch.zeros_like(rewards), (rewards - mean) / (std + eps))
    return advantages, std.squeeze(-1)


def grao_loss(
    policy_sample_logps_avg: Tensor,
    policy_ref_answer_logps_avg: Tensor,
    rewards: Tensor,
    ref_answer_reward: Tensor,
    *,
    beta: float = 0.5,
    lam: float = 0.6,
    eps: float = 1e-6,
) -> GroupLossOutput:
    """GRAO's group direct alignment loss per query (Wang et al. 2025, "Learning to Align, Aligning to
    Learn: A Unified Approach for Self-Optimized Alignment", arXiv 2508.07750).

    For a query q with a reference answer y and G completions o_i sampled from the policy, with
    J_exp(o) and J_imit(y) the length-averaged log pi(. | q):

        loss = -(1/G) sum_i [A_i J_exp(o_i) + beta A_y J_imit(y) + lam A_i (J_exp(o_i) - J_imit(y))]

    the negated objective (exploration, imitation of the reference answer, and the "reference-aware"
    alignment term; the reference is the answer y, not a reference model: there is no KL term). A_i =
    (R_i - mean) / std over the G sample rewards. A_y, the reference answer's advantage, is normalised
    over the G + 1 rewards {R_1..R_G, R_y}: **our guess**, as the equations are reassembled from a
    garbled text of the paper (see ``REFERENCES.md``); the G sample advantages do not include y. The
    paper's settings: G 8, beta 0.5, lam 0.6. Since sum_i A_i = 0, the lam term reduces to
    lam mean_i A_i J_exp(o_i) unless the group is flat.

    Args:
        policy_sample_logps_avg: [B, G] length-averaged log-probs of the sampled completions (policy).
        policy_ref_answer_logps_avg: [B] length-averaged log-probs of the reference answers (policy).
        rewards: [B, G] rewards of the samples (GRAO: a judge's +1 / 0 / -1 against the reference).
        ref_answer_reward: [B] reward of each reference answer.
        beta: weight of the imitation term (>= 0). lam: weight of the alignment term (>= 0).
        eps: added to the std before dividing (>= 0); flat groups give A = 0 regardless.

    Returns:
        :class:`GroupLossOutput` with unreduced ``losses`` of shape [B]. G must be >= 2.
    """
    for name, value in (("beta", beta), ("lam", lam), ("eps", eps)):
        if isinstance(value, Tensor) or not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite Python float >= 0, got {name}={value!r}")
    for name, t in (("policy_sample_logps_avg", policy_sample_logps_avg), ("rewards", rewards)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a [B, G] tensor (G completions per query), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if rewards.shape != policy_sample_logps_avg.shape:
        raise ValueError(f"shape mismatch: rewards has shape {tuple(rewards.shape)} but policy_sample_logps_avg "
                         f"has shape {tuple(policy_sample_logps_avg.shape)}")
    batch, group = policy_sample_logps_avg.shape
    if group < 2:
        raise ValueError(f"GRAO needs G >= 2 completions per query to compare them, got G={group}")
    shape = _check_same_shape(policy_ref_answer_logps_avg=policy_ref_answer_logps_avg,
                              ref_answer_reward=ref_answer_reward)
    if shape[0] != batch:
        raise ValueError(f"policy_ref_answer_logps_avg has {shape[0]} queries but the samples have B={batch}")

    dtype = policy_sample_logps_avg.dtype
    advantages, reward_std = group_advantages(rewards.to(dtype), eps)  # [B, G], [B]
    with_answer = torch.cat([rewards, ref_answer_reward.unsqueeze(1)], dim=1).to(dtype)  # [B, G + 1]
    ref_answer_advantages = group_advantages(with_answer, eps)[0][:, -1]  # [B]
    j_exp = policy_sample_logps_avg  # [B, G]
    j_imit = policy_ref_answer_logps_avg.unsqueeze(1)  # [B, 1]
    objective = (advantages * j_exp + beta * ref_answer_advantages.unsqueeze(1) * j_imit
                 + lam * advantages * (j_exp - j_imit))  # [B, G]
    return GroupLossOutput(-objective.mean(dim=1), advantages, ref_answer_advantages, reward_std)


# ----------------------------------------------------------------------------------------------
# AlignDistil: token-level alignment as adaptive policy distillation
# (Zhang et al. 2025, arXiv 2503.02832; public code songmzhang/AlignDistil, OpenRLHF/openrlhf/trainer/
# aligndistil_offpolicy_trainer.py lines 189-243 and aligndistil_trainer.py lines 266-325)

AlignDistilMode = Literal["aligndistil", "contrastive", "rlhf", "rlhf_adaptive"]
ALIGNDISTIL_MODES: tuple[str, ...] = get_args(AlignDistilMode)
#: Modes whose teacher contrasts the DPO model with the reverse DPO model (the others use the reference).
ALIGNDISTIL_CONTRASTIVE_MODES: frozenset[str] = frozenset({"aligndistil", "contrastive"})
#: Modes whose weight is set per token from the total variation distance (the others use beta / beta2).
ALIGNDISTIL_ADAPTIVE_MODES: frozenset[str] = frozenset({"aligndistil", "rlhf_adaptive"})


@dataclass
class AlignDistilTeacher:
    """Teacher logits of :func:`aligndistil_teacher` and the per-token weight w (both detached)."""

    logits: Tensor  # (..., V) teacher logits z*
    weights: Tensor  # (...,) w per token (a constant broadcast for the fixed modes)
    tvd: Tensor | None  # (...,) sum_v |p_dpo - p_other| in [0, 2]; None for the fixed modes


def aligndistil_teacher(
    dpo_logits: Tensor,
    *,
    rev_logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    mode: AlignDistilMode = "aligndistil",
    beta: float = 0.1,
    beta2: float = 10.0,
    eps: float = 1e-3,
) -> AlignDistilTeacher:
    """The token-level teacher distribution of AlignDistil, as logits over the full vocabulary.

    Inputs are logits ``(..., V)`` of the same next-token positions from the DPO model (``dpo_logits``),
    the reverse DPO model trained on swapped pairs (``rev_logits``, contrastive modes) or the reference
    (``ref_logits``, RLHF modes). With ``p = softmax(z)`` and ``TVD = sum_v |p_dpo - p_other|`` (no 1/2:
    TVD in [0, 2], as the code computes it):

    * ``aligndistil`` (the paper's method, code ``reward_boost_type="aligndistil"``): the contrastive DPO
      reward ``beta log(p_dpo / p_rev)`` with token-adaptive logit extrapolation,
      ``w = beta2 * TVD(p_dpo, p_rev) + eps`` and ``z* = z_dpo + w (z_dpo - z_rev)``. So
      ``w`` lies in ``[eps, 2 beta2 + eps]``.
    * ``contrastive`` (code ``theorem1_contrast``): the same teacher with a fixed ``w = beta / beta2``.
    * ``rlhf`` (code ``theorem1``, the paper's Theorem 1: token-level RLHF with the DPO reward
      ``beta log(p_dpo / p_ref)`` and KL coefficient beta2 is distillation into
      ``softmax(w z_dpo + (1 - w) z_ref)``), ``w = beta / beta2``: w = 0 is the reference, w = 1 the DPO model.
    * ``rlhf_adaptive`` (code ``theorem1_adaptive``): that form with ``w = beta2 * TVD(p_dpo, p_ref) + eps``.

    The distillation loss weighs each token by ``beta / w`` (:func:`aligndistil_token_losses`), which for
    the fixed modes is the RLHF KL coefficient beta2. Teachers carry no gradient: the output is detached.
    Defaults are the paper's off-policy settings (beta 0.1, beta2 10; on-policy beta2 15); ``eps`` is the
    code's 1e-3. ``beta2 = 0`` and ``eps = 0`` in ``aligndistil`` give ``w = 0``: the teacher is the DPO model.
    """
    _check_choice("mode", mode, ALIGNDISTIL_MODES)
    _check_beta(beta)
    contrastive = mode in ALIGNDISTIL_CONTRASTIVE_MODES
    other, other_name = (rev_logits, "rev_logits") if contrastive else (ref_logits, "ref_logits")
    if other is None:
        raise ValueError(f"mode={mode!r} needs {other_name} (the {'reverse DPO' if contrastive else 'reference'} "
                         "model's logits)")
    if not isinstance(dpo_logits, Tensor) or dpo_logits.dim() < 1 or dpo_logits.shape != other.shape:
        raise ValueError(f"dpo_logits and {other_name} must be tensors of the same shape (..., V), got "
                         f"{tuple(getattr(dpo_logits, 'shape', ()))} and {tuple(other.shape)}")
    adaptive = mode in ALIGNDISTIL_ADAPTIVE_MODES
    if isinstance(beta2, Tensor) or not math.isfinite(beta2) or not (beta2 >= 0 if adaptive else beta2 > 0):
        raise ValueError(f"beta2 must be a finite Python float {'>= 0' if adaptive else '> 0'}, got beta2={beta2!r}")
    if isinstance(eps, Tensor) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite Python float >= 0, got eps={eps!r}")

    dtype = torch.promote_types(dpo_logits.dtype, torch.float32)  # at least float32 (bf16 logits are upcast)
    z_dpo, z_other = dpo_logits.detach().to(dtype), other.detach().to(dtype)  # (..., V)
    tvd = None
    if adaptive:
        tvd = (z_dpo.softmax(-1) - z_other.softmax(-1)).abs().sum(-1)  # (...,)
        w = beta2 * tvd + eps  # (...,)
    else:
        w = torch.full(z_dpo.shape[:-1], beta / beta2, dtype=z_dpo.dtype, device=z_dpo.device)
    wv = w.unsqueeze(-1)  # (..., 1)
    if contrastive:
        logits = z_dpo + wv * (z_dpo - z_other)
    else:
        logits = wv * z_dpo + (1.0 - wv) * z_other
    return AlignDistilTeacher(logits, w, tvd)


def aligndistil_token_losses(policy_logits: Tensor, teacher_logits: Tensor, weights: Tensor, *,
                             beta: float = 0.1) -> Tensor:
    """Per-token AlignDistil loss ``(beta / w) * KL(pi_theta || pi*)`` over the full vocabulary, shape (...,).

    The reverse KL ``sum_v pi(v) (log pi(v) - log pi*(v))`` with pi = softmax(policy_logits) and
    pi* = softmax(teacher_logits), as the code's ``kd_divergence=rkl`` (both shipped scripts); pi* and w
    are detached. Differentiable in ``policy_logits`` only. ``w`` must be > 0 (AlignDistil's eps keeps it so).
    """
    _check_beta(beta)
    if policy_logits.shape != teacher_logits.shape or weights.shape != policy_logits.shape[:-1]:
        raise ValueError(f"policy_logits and teacher_logits must have one shape (..., V) and weights (...,), got "
                         f"{tuple(policy_logits.shape)}, {tuple(teacher_logits.shape)}, {tuple(weights.shape)}")
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)  # at least float32 (bf16 logits are upcast)
    logp = policy_logits.to(dtype).log_softmax(-1)  # (..., V)
    teacher_logp = teacher_logits.detach().to(dtype).log_softmax(-1)  # (..., V)
    kl = (logp.exp() * (logp - teacher_logp)).sum(-1)  # (...,)
    return (beta / weights.detach().to(dtype)) * kl


def aligndistil_sequence_losses(token_losses: Tensor, sequence_index: Tensor, num_sequences: int, *,
                                length_normalize: bool = True) -> Tensor:
    """Per-sequence losses [S] from per-token losses (M,) of flattened response tokens.

    Summed over each response's tokens and divided by their count (the code's ``--reward_len_norm``, set in
    both shipped scripts; ``length_normalize=False`` keeps the sum); the caller takes the batch mean.
    A sequence with no token gets 0.
    """
    if token_losses.dim() != 1 or sequence_index.shape != token_losses.shape:
        raise ValueError(f"token_losses and sequence_index must be (M,), got {tuple(token_losses.shape)} and "
                         f"{tuple(sequence_index.shape)}")
    sums = token_losses.new_zeros(num_sequences).index_add(0, sequence_index, token_losses)  # [S]
    if not length_normalize:
        return sums
    counts = token_losses.new_zeros(num_sequences).index_add(0, sequence_index, torch.ones_like(token_losses))
    return sums / counts.clamp(min=1.0)

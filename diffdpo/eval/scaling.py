"""Over-optimisation scaling laws: gold quality as a function of d = sqrt(KL(pi || pi_ref)).

Rafailov et al. 2024 ("Scaling Laws for Reward Model Overoptimization in Direct Alignment Algorithms",
arXiv 2406.02900) fit, per objective, the hump-shaped law of Gao et al. 2023 for best-of-n / RL:

* ``form="log"``: ``R(d) = d * (alpha - b * log d)``, which they found fits DAAs better, and
* ``form="quadratic"``: ``R(d) = d * (alpha - b * d)``, for comparison,

with ``d = sqrt(KL)`` and ``R`` the gold-quality gain over the base policy. Both are linear in
``(alpha, b)``: the least-squares fit is solved exactly (``numpy.linalg.lstsq``), no iterative optimiser.

**The offset R0.** The law says ``R(0) = 0``: R is a *gain*. The paper fits the gold reward gain, so the
default ``offset=0.0``. For a win rate against the base, the base itself sits at ``R(0) = 0.5`` when
ties count half: pass ``offset=0.5`` and the law is fitted to ``R - 0.5``. ``offset=None`` fits R0 as
a third free coefficient (e.g. ties counted as non-wins, where the base's rate against itself is below
0.5). A fixed offset is our recommendation whenever it is known: a free R0 trades off against alpha on
the few points near d = 0.

Peaks (``b > 0``; with ``b <= 0`` the law has no interior maximum and the peak is ``inf``):

* log form: ``R'(d) = alpha - b (log d + 1) = 0`` -> ``d* = exp(alpha / b - 1)``, ``R(d*) = b d*``;
* quadratic: ``d* = alpha / (2 b)``, ``R(d*) = alpha**2 / (4 b)`` (``d* = 0`` if ``alpha <= 0``);

and the KL at the peak is ``d*^2``. :func:`fit_scaling_law` can add a percentile bootstrap over points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

ScalingForm = Literal["log", "quadratic"]
SCALING_FORMS: tuple[str, ...] = get_args(ScalingForm)


def _xlogx(d: np.ndarray) -> np.ndarray:
    """``d * log d`` with its limit 0 at d = 0."""
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * np.log(safe), 0.0)


def _design(d: np.ndarray, form: str, free_offset: bool) -> np.ndarray:
    """Columns multiplying (alpha, b[, R0]): R = alpha d - b g(d) (+ R0), g = d log d or d^2."""
    g = _xlogx(d) if form == "log" else d * d
    cols = [d, -g] + ([np.ones_like(d)] if free_offset else [])
    return np.stack(cols, axis=1)


def scaling_law(d: float | np.ndarray, alpha: float, b: float, *, form: ScalingForm = "log",
                offset: float = 0.0) -> np.ndarray:
    """``offset + d * (alpha - b * log d)`` (log form) or ``offset + d * (alpha - b * d)`` at ``d >= 0``."""
    d = np.asarray(d, dtype=np.float64)
    if form not in SCALING_FORMS:
        raise ValueError(f"form={form!r} is unknown; choose one of {', '.join(SCALING_FORMS)}")
    values = offset + _design(d.reshape(-1), form, False) @ np.array([alpha, b], dtype=np.float64)
    return values.reshape(d.shape)


def peak(alpha: float, b: float, form: ScalingForm = "log") -> tuple[float, float]:
    """``(d*, R(d*) - offset)``, the maximiser of the law and its gain; ``(inf, inf)`` when ``b <= 0``."""
    if form not in SCALING_FORMS:
        raise ValueError(f"form={form!r} is unknown; choose one of {', '.join(SCALING_FORMS)}")
    if not b > 0:
        return math.inf, math.inf
    if form == "log":
        ratio = alpha / b - 1.0
        d_star = math.exp(ratio) if ratio < 700 else math.inf  # beyond float range: no peak in reach
        return d_star, b * d_star
    if alpha <= 0:  # the quadratic then falls from d = 0 on
        return 0.0, 0.0
    return alpha / (2.0 * b), alpha * alpha / (4.0 * b)


@dataclass
class ScalingFit:
    """A least-squares fit of the scaling law to (KL, R) points."""

    form: str
    alpha: float
    b: float
    offset: float  # R0: the fixed offset given, or the fitted one (offset=None)
    offset_fitted: bool
    r2: float  # 1 - SS_res / SS_tot on R
    residuals: np.ndarray  # R - fit, per point, in input order
    d_peak: float  # argmax of the law in d = sqrt(KL); inf when b <= 0
    kl_peak: float  # d_peak ** 2
    r_peak: float  # R(d_peak), offset included
    n: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap percentile intervals

    def predict(self, kl: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """R at the given KL values."""
        return scaling_law(np.sqrt(np.asarray(kl, dtype=np.float64)), self.alpha, self.b, form=self.form,
                           offset=self.offset)

    def to_dict(self) -> dict:
        return {"form": self.form, "alpha": self.alpha, "b": self.b, "offset": self.offset,
                "offset_fitted": self.offset_fitted, "r2": self.r2, "d_peak": self.d_peak,
                "kl_peak": self.kl_peak, "r_peak": self.r_peak, "n": self.n,
                "rmse": float(np.sqrt(np.mean(self.residuals**2))),
                **{f"{k}_ci": list(v) for k, v in self.ci.items()}}


def _solve(d: np.ndarray, r: np.ndarray, form: str, offset: float | None) -> tuple[float, float, float]:
    a = _design(d, form, offset is None)
    target = r if offset is None else r - offset
    coef, *_ = np.linalg.lstsq(a, target, rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2]) if offset is None else float(offset)


def fit_scaling_law(kl: Sequence[float] | np.ndarray, reward: Sequence[float] | np.ndarray, *,
                    form: ScalingForm = "log", offset: float | None = 0.0, bootstrap: int = 0, seed: int = 0,
                    level: float = 0.95) -> ScalingFit:
    """Least-squares fit of ``R = offset + d (alpha - b log d)`` (or the quadratic form), ``d = sqrt(KL)``.

    Args:
        kl: KL(pi || pi_ref) per point (nats, >= 0; e.g. :func:`diffdpo.eval.kl.lm_kl_estimates`), one per
            checkpoint; tiny negative estimates (a noisy k1) are clipped to 0.
        reward: gold quality per point: a reward gain (offset 0) or a win rate against the base (offset 0.5).
        form: ``"log"`` (Rafailov et al. 2024) or ``"quadratic"``.
        offset: R0, fixed; ``None`` fits it (a third least-squares coefficient).
        bootstrap: resamples of the points (with replacement) for percentile intervals of alpha, b, d_peak
            and kl_peak (0 = none). seed, level: its seed and coverage.

    Returns:
        :class:`ScalingFit`; needs at least as many points as coefficients (2, or 3 with a free offset).
    """
    if form not in SCALING_FORMS:
        raise ValueError(f"form={form!r} is unknown; choose one of {', '.join(SCALING_FORMS)}")
    kl_arr = np.asarray(kl, dtype=np.float64).reshape(-1)
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    if kl_arr.shape != r.shape:
        raise ValueError(f"kl has {kl_arr.size} points but reward has {r.size}")
    if not (np.isfinite(kl_arr).all() and np.isfinite(r).all()):
        raise ValueError("kl and reward must be finite (drop the checkpoints whose evaluation failed)")
    if (kl_arr < -1e-3).any():
        raise ValueError(f"kl must be >= 0, got min {kl_arr.min():.4g}: a KL estimate that negative is an error")
    needed = 2 if offset is not None else 3
    if kl_arr.size < needed:
        raise ValueError(f"need at least {needed} points to fit {needed} coefficients, got {kl_arr.size}")
    d = np.sqrt(np.clip(kl_arr, 0.0, None))
    alpha, b, r0 = _solve(d, r, form, offset)
    fitted = scaling_law(d, alpha, b, form=form, offset=r0)
    residuals = r - fitted
    ss_tot = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float((residuals**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    d_star, gain = peak(alpha, b, form)
    ci = _bootstrap(d, r, form, offset, bootstrap, seed, level) if bootstrap else {}
    return ScalingFit(form, alpha, b, r0, offset is None, r2, residuals, d_star, d_star**2, r0 + gain,
                      int(kl_arr.size), ci)


def _bootstrap(d: np.ndarray, r: np.ndarray, form: str, offset: float | None, n_boot: int, seed: int,
               level: float) -> dict[str, tuple[float, float]]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"alpha": [], "b": [], "d_peak": [], "kl_peak": []}
    for _ in range(n_boot):
        idx = rng.integers(0, d.size, d.size)
        alpha, b, _ = _solve(d[idx], r[idx], form, offset)
        d_star, _ = peak(alpha, b, form)
        for k, v in zip(draws, (alpha, b, d_star, d_star**2)):
            draws[k].append(v)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in draws.items()}

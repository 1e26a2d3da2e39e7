"""Scaling-law fits (Rafailov et al. 2024, arXiv 2406.02900): exact recovery, noise, peaks, offsets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffdpo.eval.scaling import fit_scaling_law, peak, scaling_law

KL = np.array([0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0])


@pytest.mark.parametrize("form,alpha,b", [("log", 0.3, 0.12), ("quadratic", 0.4, 0.08), ("log", -0.1, 0.05)])
def test_noiseless_points_give_the_coefficients_exactly(form, alpha, b):
    r = scaling_law(np.sqrt(KL), alpha, b, form=form)
    fit = fit_scaling_law(KL, r, form=form)
    assert fit.alpha == pytest.approx(alpha, abs=1e-8) and fit.b == pytest.approx(b, abs=1e-8)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10) and np.abs(fit.residuals).max() < 1e-10
    np.testing.assert_allclose(fit.predict(KL), r, atol=1e-10)
    assert fit.n == KL.size and fit.offset == 0.0 and not fit.offset_fitted


def test_win_rate_offset_fixed_and_free():
    """A win rate against the base is 0.5 + gain: offset=0.5 recovers the gain's law; offset=None fits R0."""
    r = 0.5 + scaling_law(np.sqrt(KL), 0.3, 0.12)
    fixed = fit_scaling_law(KL, r, offset=0.5)
    free = fit_scaling_law(KL, r, offset=None)
    for fit in (fixed, free):
        assert (fit.alpha, fit.b, fit.offset) == pytest.approx((0.3, 0.12, 0.5), abs=1e-8)
    assert free.offset_fitted and not fixed.offset_fitted
    assert fixed.r_peak == pytest.approx(0.5 + 0.12 * math.exp(0.3 / 0.12 - 1), abs=1e-8)


def test_noisy_points_give_the_coefficients_approximately():
    """60 points, Gaussian noise sd 0.01 on R (peak gain ~0.54): alpha, b within 0.02, peak KL within 25%,
    and the 95% bootstrap intervals cover the truth."""
    rng = np.random.default_rng(0)
    kl = np.sort(rng.uniform(0.01, 40.0, 60))
    alpha, b = 0.3, 0.12
    r = scaling_law(np.sqrt(kl), alpha, b) + rng.normal(0, 0.01, kl.size)
    fit = fit_scaling_law(kl, r, bootstrap=300, seed=1)
    assert fit.alpha == pytest.approx(alpha, abs=0.02) and fit.b == pytest.approx(b, abs=0.02)
    true_kl_peak = math.exp(alpha / b - 1) ** 2
    assert fit.kl_peak == pytest.approx(true_kl_peak, rel=0.25)
    assert fit.r2 > 0.95
    assert fit.ci["alpha"][0] <= alpha <= fit.ci["alpha"][1] and fit.ci["b"][0] <= b <= fit.ci["b"][1]
    assert fit.ci["kl_peak"][0] <= true_kl_peak <= fit.ci["kl_peak"][1]
    assert set(fit.to_dict()) >= {"alpha", "b", "r2", "kl_peak", "d_peak", "rmse", "alpha_ci"}


def test_log_form_fits_log_data_better_than_the_quadratic():
    r = scaling_law(np.sqrt(KL), 0.3, 0.12)
    assert fit_scaling_law(KL, r, form="log").r2 > fit_scaling_law(KL, r, form="quadratic").r2


@pytest.mark.parametrize("form,alpha,b", [("log", 0.3, 0.12), ("log", 0.05, 0.2), ("quadratic", 0.4, 0.08)])
def test_peak_formulas_match_a_dense_grid_argmax(form, alpha, b):
    """log: d* = exp(alpha/b - 1), R* = b d*; quadratic: d* = alpha/(2b), R* = alpha^2/(4b)."""
    d_star, gain = peak(alpha, b, form)
    grid = np.linspace(1e-6, 4 * d_star, 400_001)
    values = scaling_law(grid, alpha, b, form=form)
    i = int(np.argmax(values))
    assert grid[i] == pytest.approx(d_star, rel=1e-4)
    assert values[i] == pytest.approx(gain, rel=1e-8)
    fit = fit_scaling_law(KL, scaling_law(np.sqrt(KL), alpha, b, form=form), form=form)
    assert fit.d_peak == pytest.approx(d_star, rel=1e-8) and fit.kl_peak == pytest.approx(d_star**2, rel=1e-8)


def test_by_hand():
    """alpha = 1, b = 0.5 (log): d* = exp(1/0.5 - 1) = e, KL* = e^2 = 7.389056, R* = 0.5 e = 1.359141;
    R(1) = 1 * (1 - 0.5 * 0) = 1. Quadratic alpha = 1, b = 0.5: d* = 1, R* = 0.5, R(2) = 2 (1 - 1) = 0."""
    assert peak(1.0, 0.5, "log") == pytest.approx((math.e, 0.5 * math.e))
    assert float(scaling_law(1.0, 1.0, 0.5)) == 1.0
    assert peak(1.0, 0.5, "quadratic") == (1.0, 0.5)
    assert float(scaling_law(2.0, 1.0, 0.5, form="quadratic")) == 0.0
    assert float(scaling_law(0.0, 1.0, 0.5)) == 0.0  # d log d -> 0 at d = 0


def test_no_peak_and_bad_inputs():
    assert peak(0.3, -0.1, "log") == (math.inf, math.inf)
    assert peak(-0.3, 0.1, "quadratic") == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_scaling_law([0.1, 0.2], [0.1, 0.2], offset=None)
    with pytest.raises(ValueError, match="kl has 3 points but reward has 2"):
        fit_scaling_law([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="kl must be >= 0"):
        fit_scaling_law([-1.0, 0.2, 0.3], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="form="):
        fit_scaling_law(KL, KL, form="cubic")
    with pytest.raises(ValueError, match="finite"):
        fit_scaling_law([0.1, math.nan], [0.1, 0.2])

"""Win-rate arithmetic on hand-worked counts."""

from __future__ import annotations

import math

import pytest

from diffdpo.eval.winrate import (
    bootstrap_interval,
    save_grid,
    save_training_curves,
    wilson_interval,
    win_rate,
)


def test_wilson_hand_worked():
    """14 wins of 20, z = 1.96: z^2 = 3.8415, denominator 1 + 3.8415/20 = 1.19207,
    centre (0.7 + 3.8415/40) / 1.19207 = 0.66777, half 1.96 * sqrt(0.21/20 + 3.8415/1600) / 1.19207 = 0.18675
    -> [0.48103, 0.85452] (the textbook Wilson interval for 14/20)."""
    lo, hi = wilson_interval(14, 20)
    assert lo == pytest.approx(0.48103, abs=1e-5)
    assert hi == pytest.approx(0.85452, abs=1e-5)


def test_wilson_edges():
    """0 of 10: lower bound 0, upper z^2/(n + z^2) = 3.8415/13.8415 = 0.27753; n of n mirrors it."""
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8414588 / 13.8414588, abs=1e-6)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 3.8414588 / 13.8414588, abs=1e-6)
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_win_rate_counts_ties_as_non_wins():
    """diffs (tuned - base) = [1, 0.05, -1, 0.5, -0.05, 0]: margin 0.1 -> W 2, T 3, L 1; rate 2/6."""
    tuned = [2.0, 1.05, 0.0, 1.5, 0.95, 1.0]
    base = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    wr = win_rate(tuned, base, tie_margin=0.1)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (2, 3, 1, 6)
    assert wr.rate == pytest.approx(2 / 6) and wr.tie_rate == pytest.approx(0.5)
    assert (wr.ci_low, wr.ci_high) == pytest.approx(wilson_interval(2, 6))
    assert "W/T/L 2/3/1" in str(wr)
    with pytest.raises(ValueError, match="5 base"):
        win_rate([1.0] * 6, [1.0] * 5)


def test_bootstrap_close_to_wilson_for_large_n():
    outcomes = [1.0] * 140 + [0.0] * 60
    lo, hi = bootstrap_interval(outcomes, n_boot=4000)
    wlo, whi = wilson_interval(140, 200)
    assert abs(lo - wlo) < 0.02 and abs(hi - whi) < 0.02
    assert lo < 0.7 < hi


def test_the_grid_shows_each_image_set_in_its_own_row(tmp_path):
    """Base row black, tuned row mid grey: read back, the top half holds the black pixels and the
    bottom half the grey ones (a swapped, missing or blank row fails)."""
    import numpy as np
    from PIL import Image

    imgs = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    p = save_grid(tmp_path / "grid.png", [imgs, imgs + 128], ["base", "tuned"], ["a", "b", "c"])
    px = np.asarray(Image.open(p).convert("L")).astype(int)
    top, bottom = px[: len(px) // 2], px[len(px) // 2 :]
    black, grey = (px < 20), (abs(px - 128) < 10)
    assert black[: len(px) // 2].sum() > 3 * 40 * 40 and black[len(px) // 2 :].sum() < black.sum() * 0.05
    assert grey[len(px) // 2 :].sum() > 3 * 40 * 40 and (abs(top - 128) < 10).sum() < grey.sum() * 0.05
    assert bottom.shape[1] > 2 * bottom.shape[0] // 2  # three columns side by side


def test_training_curves_draw_one_panel_per_metric(tmp_path):
    """Each key gets a panel with a drawn line; a key absent from the rows leaves its panel empty."""
    import numpy as np
    from PIL import Image

    rows = [{"step": i, "loss": math.log(2) - 0.01 * i, "rewards/accuracies": 0.5} for i in range(30)]
    q = save_training_curves(tmp_path / "curves.png", rows, ["loss", "rewards/accuracies", "absent"])
    px = np.asarray(Image.open(q).convert("RGB")).astype(int)
    coloured = (px.max(axis=2) - px.min(axis=2)) > 60  # line pixels (blue/orange), not black text or white
    thirds = np.array_split(coloured, 3, axis=1)
    assert thirds[0].sum() > 200 and thirds[1].sum() > 200 and thirds[2].sum() == 0

"""Win rates with confidence intervals, and the plots an evaluation writes.

A comparison scores a tuned and a base image made from the same prompt and seed; it is a win, a
tie (scores within ``tie_margin``) or a loss. Ties count as non-wins. The 95% interval is the
Wilson score interval (Wilson 1927), which behaves at rates near 0 or 1 where the normal
approximation does not; :func:`bootstrap_interval` gives a percentile bootstrap for comparison.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int
    rate: float  # wins / n, ties count as non-wins
    ci_low: float
    ci_high: float
    tie_rate: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def __str__(self) -> str:
        return (
            f"{100 * self.rate:.1f}% [95% CI {100 * self.ci_low:.1f}-{100 * self.ci_high:.1f}] "
            f"(W/T/L {self.wins}/{self.ties}/{self.losses}, ties {100 * self.tie_rate:.1f}%)"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "n": self.n}


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (default 95%)."""
    if n <= 0:
        raise ValueError(f"need at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(outcomes: Sequence[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``outcomes`` (e.g. 1 = win, 0 = non-win)."""
    x = np.asarray(outcomes, dtype=np.float64)
    if x.size == 0:
        raise ValueError("need at least one outcome")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def win_rate(tuned_scores: Sequence[float], base_scores: Sequence[float], *, tie_margin: float = 0.0) -> WinRate:
    """Win rate of tuned over base on paired comparisons (same prompt and seed)."""
    if len(tuned_scores) != len(base_scores):
        raise ValueError(f"got {len(tuned_scores)} tuned scores but {len(base_scores)} base scores")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    diff = np.asarray(tuned_scores, dtype=np.float64) - np.asarray(base_scores, dtype=np.float64)
    wins = int((diff > tie_margin).sum())
    losses = int((diff < -tie_margin).sum())
    ties = int(diff.size - wins - losses)
    lo, hi = wilson_interval(wins, diff.size)
    return WinRate(wins, ties, losses, wins / diff.size, lo, hi, ties / diff.size)


# --------------------------------------------------------------------------------------------
# outputs


def save_grid(
    path: str | Path,
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str],
    col_labels: Sequence[str] | None = None,
    *,
    scale: int = 4,
) -> Path:
    """A PNG grid: one row per image set ((N, H, W, 3) uint8, same N), e.g. base vs tuned, same seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(0.9 * n + 1.2, 1.0 * len(rows) + 0.6), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(np.kron(images[c], np.ones((scale, scale, 1), dtype=np.uint8)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and col_labels is not None:
                ax.set_title(col_labels[c], fontsize=5)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """Rows of a training metrics JSONL file (one JSON object per logged step)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_training_curves(path: str | Path, rows: Sequence[dict], keys: Sequence[str], *, smooth: int = 10) -> Path:
    """A PNG with one panel per metric key against ``step`` (raw and moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        if pts:
            steps, vals = map(np.asarray, zip(*pts))
            ax.plot(steps, vals, alpha=0.3, lw=0.8)
            if len(vals) >= smooth:
                kernel = np.ones(smooth) / smooth
                ax.plot(steps[smooth - 1 :], np.convolve(vals, kernel, mode="valid"), lw=1.5)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""What a DSO run writes: score rows, depth renders of samples, the per-round plot and table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def score_rows(round_index: int, split: str, scored: Any) -> list[dict[str, Any]]:
    return [{"round": round_index, "split": split, **r} for r in scored.records]


def depth_render(occ: np.ndarray) -> np.ndarray:
    """Front view (looking along +y) of a ``[z, y, x]`` grid: brightness = nearness, NaN = empty."""
    hit = occ.any(axis=1)  # (z, x)
    first = np.argmax(occ, axis=1).astype(np.float32)  # first occupied y
    img = 1.0 - 0.6 * first / occ.shape[1]
    img[~hit] = np.nan
    return img[::-1]  # z up


def _view_grid(scored: Any, i: int, resolution: int = 24) -> np.ndarray | None:
    """The ``[z, y, x]`` occupancy of sample ``i``: the generator's own, else the voxelised mesh."""
    if scored.occupancy is not None:
        return scored.occupancy[i]
    mesh = scored.meshes[i] if i < len(scored.meshes) else None
    if mesh is None or not hasattr(mesh, "voxelized"):
        return None
    grid = mesh.voxelized(float(np.ptp(mesh.bounds, axis=0).max()) / resolution).fill().matrix  # [x, y, z]
    return np.asarray(grid, dtype=bool).transpose(2, 1, 0)


def render_grid(path: Path, before: Any, after: Any, names: list[str], per_class: int, title: str) -> None:
    """Rows = classes; left block base samples, right block this round's, same seeds. Green = stable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cls = len(names)
    fig, axes = plt.subplots(n_cls, 2 * per_class, figsize=(1.2 * 2 * per_class, 1.3 * n_cls), squeeze=False)
    for block, scored in enumerate((before, after)):
        conds = np.array([r["condition"] for r in scored.records])
        for c in range(n_cls):
            idx = np.nonzero(conds == c)[0][:per_class]
            for j in range(per_class):
                ax = axes[c, block * per_class + j]
                ax.set_xticks([]), ax.set_yticks([])
                if j >= len(idx):
                    continue
                i = idx[j]
                grid = _view_grid(scored, i)
                if grid is not None:
                    ax.imshow(depth_render(grid), cmap="viridis", vmin=0, vmax=1)
                color = "tab:green" if scored.stable[i] else "tab:red"
                for spine in ax.spines.values():
                    spine.set_color(color), spine.set_linewidth(2.5)
                if j == 0:
                    ax.set_ylabel(names[c], fontsize=8)
    axes[0, 0].set_title("base", fontsize=8, loc="left")
    axes[0, per_class].set_title("after", fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_rounds(path: Path, summaries: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = list(range(len(summaries)))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    axes[0].plot(rounds, [s["stable_rate"] for s in summaries], "o-", label="stable rate")
    axes[0].plot(rounds, [s["min_class_stable_rate"] for s in summaries], "s--", label="worst class")
    axes[0].set_ylim(0, 1.02), axes[0].legend(fontsize=7), axes[0].set_title("stable rate")
    axes[1].plot(rounds, [s["mean_angle_deg"] for s in summaries], "o-", color="tab:red")
    axes[1].set_title("mean rotation (deg)")
    if "fidelity" in summaries[0]:
        for key in ("fidelity", "recognisability", "diversity", "volume_ratio"):
            axes[2].plot(rounds, [s[key] for s in summaries], "o-", label=key)
        axes[2].legend(fontsize=7), axes[2].set_title("fidelity / size")
    for ax in axes:
        ax.set_xlabel("round"), ax.set_xticks(rounds)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_table(summaries: list[dict[str, Any]]) -> str:
    # st_min / rc_min: the worst class's stable rate / recognisability (a collapse of one class shows there)
    head = (f"{'round':>5} {'stable':>7} {'st_min':>6} {'angle':>6} {'fidel':>6} {'recog':>6} {'rc_min':>6} "
            f"{'divers':>6} {'size':>5}")
    lines = [head]
    for r, s in enumerate(summaries):
        lines.append(f"{r:>5} {s['stable_rate']:>7.3f} {s['min_class_stable_rate']:>6.2f} {s['mean_angle_deg']:>6.1f} "
                     f"{s.get('fidelity', float('nan')):>6.3f} {s.get('recognisability', float('nan')):>6.2f} "
                     f"{s.get('min_class_recognisability', float('nan')):>6.2f} "
                     f"{s.get('diversity', float('nan')):>6.3f} {s.get('volume_ratio', float('nan')):>5.2f}")
    return "\n".join(lines)



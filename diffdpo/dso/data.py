"""From scored samples to training data: DPO pairs within a group, or pointwise labels.

DSO (Li et al. 2025, arXiv 2503.22677) draws several samples per condition, scores them in
simulation and pairs a stable sample (winner) with an unstable one (loser) of the *same* condition;
conditions whose samples all agree carry no preference and are dropped. Here a group is
``(condition, group id)``: the loop splits each condition's samples into groups of consecutive seeds.
Pairs never cross groups, hence never cross conditions. Invalid samples (nothing decoded, the
simulator refused the mesh) count as unstable: an empty object must never win.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def stable_labels(stable: Sequence[bool | None], valid: Sequence[bool]) -> np.ndarray:
    """Bool labels: stable and valid -> True; unstable, invalid or unknown -> False."""
    return np.array([bool(s) and bool(v) for s, v in zip(stable, valid)], dtype=bool)


def _groups(conditions: Sequence[int], groups: Sequence[int]) -> dict[tuple[int, int], list[int]]:
    if len(conditions) != len(groups):
        raise ValueError(f"got {len(conditions)} conditions but {len(groups)} group ids")
    out: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(conditions, groups)):
        out[(int(key[0]), int(key[1]))].append(i)
    return dict(out)


def build_pairs(conditions: Sequence[int], groups: Sequence[int], labels: Sequence[bool], *,
                max_pairs_per_group: int = 16, seed: int = 0) -> list[tuple[int, int]]:
    """``(winner, loser)`` index pairs: every stable x unstable combination inside each group,
    shuffled and capped at ``max_pairs_per_group``; groups whose labels all agree give none."""
    labels = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    for _key, members in sorted(_groups(conditions, groups).items()):
        winners = [i for i in members if labels[i]]
        losers = [i for i in members if not labels[i]]
        combos = [(w, lo) for w in winners for lo in losers]
        if not combos:
            continue
        order = rng.permutation(len(combos))[:max_pairs_per_group]
        pairs += [combos[j] for j in sorted(order)]
    return pairs


def pointwise_indices(conditions: Sequence[int], groups: Sequence[int], labels: Sequence[bool], *,
                      drop_uniform: bool = True) -> list[int]:
    """Samples for a pointwise loss (DRO/KTO); with ``drop_uniform`` only groups with both labels."""
    labels = np.asarray(labels, dtype=bool)
    keep: list[int] = []
    for _key, members in sorted(_groups(conditions, groups).items()):
        mixed = labels[members].any() and not labels[members].all()
        if mixed or not drop_uniform:
            keep += members
    return keep


def losing_groups(conditions: Sequence[int], groups: Sequence[int], labels: Sequence[bool]) -> dict[tuple[int, int], list[int]]:
    """Groups with no good sample, ``{(condition, group): members}``: DSO drops them (no winner to pair)."""
    labels = np.asarray(labels, dtype=bool)
    return {key: members for key, members in sorted(_groups(conditions, groups).items()) if not labels[members].any()}

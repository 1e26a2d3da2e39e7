"""Pair building and pointwise labels (DSO, Li et al. 2025: uniform groups dropped, pairs within a condition)."""

from __future__ import annotations

from diffdpo.dso.data import build_pairs, pointwise_indices, stable_labels


def test_pairs_drop_uniform_groups_and_never_cross_classes_or_groups():
    # class 0 group 0: mixed; class 0 group 1: all stable; class 1 group 0: all unstable; class 2 group 0: mixed
    conditions = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2]
    groups = [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    labels = [True, False, False, True, True, True, False, False, False, True, True]
    pairs = build_pairs(conditions, groups, labels, max_pairs_per_group=100)
    assert sorted(pairs) == [(0, 1), (0, 2), (9, 8), (10, 8)]
    for w, lo in pairs:
        assert labels[w] and not labels[lo]
        assert (conditions[w], groups[w]) == (conditions[lo], groups[lo])


def test_pairs_are_capped_per_group_and_seeded():
    conditions, groups = [0] * 8, [0] * 8
    labels = [True] * 4 + [False] * 4  # 16 combinations
    a = build_pairs(conditions, groups, labels, max_pairs_per_group=5, seed=1)
    assert len(a) == 5 and a == build_pairs(conditions, groups, labels, max_pairs_per_group=5, seed=1)
    assert len(set(a)) == 5


def test_invalid_samples_are_losers_and_pointwise_keeps_mixed_groups():
    labels = stable_labels([True, None, True, False], [True, False, False, True])
    assert labels.tolist() == [True, False, False, False]  # invalid never counts as stable
    conditions, groups = [0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0]
    labels = [True, False, True, True, False, False]
    assert pointwise_indices(conditions, groups, labels) == [0, 1]
    assert pointwise_indices(conditions, groups, labels, drop_uniform=False) == [0, 1, 2, 3, 4, 5]

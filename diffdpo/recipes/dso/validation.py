"""Validating a round's update on fresh samples: keep it, shorten it (backtracking) or revert it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffdpo.recipes.dso.config import DSOConfig
from diffdpo.recipes.dso.rounds import reward_labels
from diffdpo.recipes.dso.seeds import validation_seed


def validation_samples(cfg: DSOConfig, generator: Any, round_index: int, *, bank: Any = None,
                       sim_config: Any = None, block: int = 0) -> Any:
    """``validate_per_class`` scored and labelled samples per class at the round's validation seeds
    (:func:`diffdpo.recipes.dso.seeds.validation_seed`, try ``block``): never training or held-out seeds."""
    from diffdpo.dso.evaluate import score_samples

    m, n_cond = cfg.validate_per_class, len(generator.condition_names)
    seeds = [validation_seed(cfg.seed, round_index, c, i, block) for c in range(n_cond) for i in range(m)]
    val = score_samples(generator, [c for c in range(n_cond) for _ in range(m)], seeds, sim_config=sim_config,
                        workers=cfg.sim_workers, bank=bank)
    reward_labels(cfg, val)
    return val


def good_rates(records: list[dict[str, Any]], key: str = "label") -> tuple[float, dict[int, float]]:
    """Share of good samples (``rec["label"]`` from :func:`reward_labels`, or another 0/1 ``key``),
    overall and per condition."""
    labels = np.array([float(r[key]) > 0.5 for r in records])
    cond = np.array([r["condition"] for r in records])
    return float(labels.mean()), {int(c): float(labels[cond == c].mean()) for c in np.unique(cond)}


def accept_round(cfg: DSOConfig, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> tuple[bool, dict]:
    """Keep a round's update? Compares the policy before training (the round's own training samples)
    with the policy after it (fresh validation samples): accept iff the good share did not fall
    overall, no class's good share fell by more than ``class_drop_tolerance``, and, where the samples
    carry ``recognised`` (fidelity measurements), no class's recognised share fell by more than that
    either. The last check sees a class losing its identity while its good share was already low
    (measured: lamps recognised 70% -> 19% in one round while their good share fell only 0.19)."""
    def worst_class_change(key: str) -> tuple[float, float, float]:  # (overall before, after, worst class change)
        (mean_0, per_0), (mean_1, per_1) = good_rates(before, key), good_rates(after, key)
        return mean_0, mean_1, min(per_1.get(c, 0.0) - v for c, v in per_0.items())

    mean_0, mean_1, worst = worst_class_change("label")
    ok = mean_1 >= mean_0 and worst >= -cfg.class_drop_tolerance
    info = {"good_before": round(mean_0, 4), "good_after": round(mean_1, 4), "worst_class_change": round(worst, 4)}
    if before and after and "recognised" in before[0] and "recognised" in after[0]:
        worst_rec = worst_class_change("recognised")[2]
        ok = ok and worst_rec >= -cfg.class_drop_tolerance
        info["worst_class_recognised_change"] = round(worst_rec, 4)
    return ok, {"accepted": ok, **info}


def validate_update(cfg: DSOConfig, generator: Any, trainable: list[Any], before: list[Any],
                    train_records: list[dict[str, Any]], round_index: int, *, bank: Any = None,
                    sim_config: Any = None) -> tuple[Any, dict[str, Any]]:
    """Validate the round's update (the trainable parameters now, against ``before``) and, if
    :func:`accept_round` rejects it, try ``cfg.backtrack`` shorter steps along it, each with fresh
    validation seeds: the parameters become ``before + f * (after - before)`` for f = 1/2, 1/4, ...
    The first accepted step is kept; if none is, the parameters are restored to ``before``.
    Returns the last validation samples and the decision (``"step"``: the fraction kept, 0 if reverted;
    ``"tries"``: each try's fraction and decision)."""
    after = [p.detach().clone() for p in trainable]

    def set_step(f: float) -> None:  # parameters = before + f * (after - before); f = 0 reverts
        with torch.no_grad():
            for p, p0, p1 in zip(trainable, before, after):
                p.copy_(p0 + f * (p1 - p0))

    tries: list[dict[str, Any]] = []
    frac, val, decision = 1.0, None, {}
    for k in range(cfg.backtrack + 1):
        if k:
            frac /= 2
            set_step(frac)
        # try 0 uses the round's validation seeds; each retry its own block, so no step is judged on
        # the samples that rejected the previous one
        val = validation_samples(cfg, generator, round_index, bank=bank, sim_config=sim_config, block=k)
        accepted, decision = accept_round(cfg, train_records, val.records)
        tries.append({"step": frac, **decision})
        if accepted:
            break
    else:
        set_step(0.0)
    return val, {**decision, "step": frac if decision["accepted"] else 0.0, "tries": tries}



"""One round's training data: reward labels, DPO pairs or pointwise items, rescue pairs, regulariser latents."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffdpo.dso.generator import DrawsTrainingData
from diffdpo.recipes.dso.config import DSOConfig
from diffdpo.recipes.dso.seeds import round_seed


def reward_labels(cfg: DSOConfig, scored: Any) -> np.ndarray:
    """Good samples: stable (invalid counts as unstable) and, if ``min_fidelity > 0``, faithful to their class.

    Pure stability rewards the cheat the base model already offers (a table whose legs vanished lies
    flat as a slab and never tips); gating on fidelity turns those samples into losers, and
    ``require_recognised`` also those that now look more like another class.
    """
    labels = scored.stable.copy()
    if cfg.min_fidelity > 0 or cfg.require_recognised:
        if not scored.records or "fidelity" not in scored.records[0]:
            raise ValueError("min_fidelity > 0 and require_recognised need fidelity measurements "
                             "(a generator with occupancy() and a bank)")
        labels &= np.array([r["fidelity"] >= cfg.min_fidelity for r in scored.records])
    if cfg.require_recognised:
        labels &= np.array([r["recognised"] > 0.5 for r in scored.records])
    for rec, label in zip(scored.records, labels):
        rec["label"] = bool(label)
    return labels


def build_items(cfg: DSOConfig, scored: Any, round_index: int, pointwise: bool) -> tuple[list[dict[str, Any]], dict]:
    """Training items of one round (pairs or labelled samples), plus counts for the report."""
    from diffdpo.dso.data import build_pairs, pointwise_indices

    conds = [r["condition"] for r in scored.records]
    groups = [r["group"] for r in scored.records]
    labels = reward_labels(cfg, scored)
    lat = scored.latents
    if pointwise:
        idx = pointwise_indices(conds, groups, labels, drop_uniform=cfg.drop_uniform)
        items = [{"latents": lat[i][None], "cond": conds[i], "label": bool(labels[i])} for i in idx]
        counts = {"samples": len(idx), "stable": int(labels[idx].sum()) if idx else 0}
    else:
        pairs = build_pairs(conds, groups, labels, max_pairs_per_group=cfg.max_pairs_per_group,
                            seed=round_seed(cfg.seed, round_index))
        items = [{"latents": torch.stack([lat[w], lat[lo]]), "cond": conds[w]} for w, lo in pairs]
        counts = {"pairs": len(pairs)}
    n_groups = len(set(zip(conds, groups)))
    mixed = {(c, g) for c, g, lab in zip(conds, groups, labels) if lab} & {
        (c, g) for c, g, lab in zip(conds, groups, labels) if not lab}
    counts.update(groups=n_groups, mixed_groups=len(mixed))
    return items, counts


def rescue_items(cfg: DSOConfig, generator: Any, scored: Any, round_index: int, pointwise: bool, *, bank: Any = None,
                 sim_config: Any = None) -> tuple[list[dict[str, Any]], dict, Any]:
    """Training-data winners for the groups with no good sample (``rescue_pairs > 0``).

    Once a class drifts (lamps that no longer look like lamps, tables without legs), every sample of
    it is a loser, its groups are uniform and DSO drops them: nothing pulls the class back. Here each
    such group gets one winner drawn from the training distribution (``generator.training_latents``),
    scored by the same simulator and gated by the same reward (:func:`reward_labels`), and is paired
    with up to ``rescue_pairs`` of its samples (pointwise losses: the winner is added as a desirable
    sample, the group's samples as undesirable ones). Needs ``reward_labels`` to have run on ``scored``.
    Returns ``(items, counts, pool)``; ``pool`` (the scored training draws) is ``None`` when unused.
    """
    from collections import Counter

    from diffdpo.dso.data import losing_groups
    from diffdpo.dso.evaluate import score_latents

    if cfg.rescue_pairs <= 0:
        return [], {}, None
    if not isinstance(generator, DrawsTrainingData):
        raise ValueError(f"rescue_pairs > 0 needs {type(generator).__name__}.training_latents(conditions, seed)")
    conds = [r["condition"] for r in scored.records]
    lost = losing_groups(conds, [r["group"] for r in scored.records], [r["label"] for r in scored.records])
    counts = {"rescued_groups": 0, "rescue_items": 0, "losing_groups": len(lost), "rescue_pool": 0, "rescue_pool_good": 0}
    if not lost:
        return [], counts, None
    need = Counter(c for c, _ in lost)
    pool_conds = [c for c, k in sorted(need.items()) for _ in range(2 * k + 2)]  # a third to half pass the gated reward
    seed = round_seed(cfg.seed, round_index)
    pool = score_latents(generator, generator.training_latents(pool_conds, seed), pool_conds,
                         list(range(len(pool_conds))), groups=[-1] * len(pool_conds), sim_config=sim_config,
                         workers=cfg.sim_workers, bank=bank)
    good = reward_labels(cfg, pool)
    winners = {c: [i for i, (pc, ok) in enumerate(zip(pool_conds, good)) if pc == c and ok] for c in need}
    used: Counter = Counter()
    rng = np.random.default_rng(seed)
    items: list[dict[str, Any]] = []
    for (c, _g), members in lost.items():
        if not winners[c]:
            continue
        w = winners[c][used[c] % len(winners[c])]
        used[c] += 1
        losers = [members[j] for j in sorted(rng.permutation(len(members))[:cfg.rescue_pairs])]
        if pointwise:
            items.append({"latents": pool.latents[w][None], "cond": c, "label": True})
            if cfg.drop_uniform:  # otherwise build_items already kept the group's samples
                items += [{"latents": scored.latents[i][None], "cond": c, "label": False} for i in losers]
        else:
            items += [{"latents": torch.stack([pool.latents[w], scored.latents[i]]), "cond": c} for i in losers]
        counts["rescued_groups"] += 1
    counts.update(rescue_items=len(items), rescue_pool=len(pool_conds), rescue_pool_good=int(good.sum()))
    return items, counts, pool




def attach_aux(cfg: DSOConfig, generator: Any, items: list[dict[str, Any]], scored: Any, round_index: int) -> None:
    """Give every item one regularisation latent (see :mod:`diffdpo.dso.task`).

    ``aux_source="data"`` needs ``generator.training_latents(conditions, seed)`` (fresh objects of the
    training distribution: the toy world draws new procedural objects; a large model would read its
    training set); ``"winners"`` reuses this round's good samples (stable and, with the gates, faithful),
    taken in turn from every class that has one: a self-distillation anchor (rejection-sampling
    fine-tuning) that also covers classes whose groups were all good and so gave no pairs.
    """
    if cfg.aux_weight <= 0 or not items:
        return
    conds = [it["cond"] for it in items]
    if cfg.aux_source == "data":
        if not isinstance(generator, DrawsTrainingData):
            raise ValueError(f"aux_source='data' needs {type(generator).__name__}.training_latents(conditions, seed); "
                             "use aux_source=winners")
        latents = generator.training_latents(conds, round_seed(cfg.seed, round_index))
        for it, lat in zip(items, latents):
            it["aux"], it["aux_cond"] = lat, it["cond"]
        return
    good = [i for i, r in enumerate(scored.records) if r.get("label", scored.stable[i])]
    if not good:
        raise ValueError(f"round {round_index}: aux_source='winners' but no sample was good; use aux_source=data")
    # round-robin over the classes, so that every class with a good sample is anchored, also those
    # whose groups were all good and so gave no pairs (their samples would otherwise drift unwatched)
    by_class: dict[int, list[int]] = {}
    for i in np.random.default_rng(round_seed(cfg.seed, round_index)).permutation(good):
        by_class.setdefault(int(scored.records[i]["condition"]), []).append(int(i))
    classes = sorted(by_class)
    for k, it in enumerate(items):
        members = by_class[classes[k % len(classes)]]
        j = members[(k // len(classes)) % len(members)]
        it["aux"], it["aux_cond"] = scored.latents[j], scored.records[j]["condition"]



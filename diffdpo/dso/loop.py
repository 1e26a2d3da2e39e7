"""The DSO self-improvement loop: sample -> mesh -> simulate -> dataset -> fine-tune -> evaluate, R rounds.

``diffdpo dso --config configs/dso_toy.yaml [key=value ...]`` (Li et al. 2025, arXiv 2503.22677, run
for several rounds). Round 0 evaluates the shipped base on fixed held-out seeds; each round r >= 1

1. samples ``samples_per_class`` objects per class from the current policy at fresh seeds, in groups
   of ``group_size`` consecutive seeds;
2. decodes them to meshes and scores them with :func:`sim.score_meshes` (pybullet, DSO protocol);
3. builds DPO pairs within groups (uniform groups dropped) or pointwise stable/unstable labels;
   with ``rescue_pairs > 0`` groups with no good sample get a training-data winner instead;
4. fine-tunes one LoRA adapter with :func:`diffdpo.train.train` and the configured loss of
   :mod:`diffdpo.losses` (the adapter is kept across rounds; the reference is the base with adapters
   off, or with ``reference=previous`` the policy the round started from: the adapter is folded into
   the weights after each kept round);
5. with ``validate_per_class > 0`` (the default recipe), samples fresh validation seeds and keeps the
   update only if the good share did not fall and no class's good or recognised share fell by more
   than ``class_drop_tolerance``, else tries shorter steps along it (``backtrack``) or undoes it;
6. evaluates on the held-out seeds.

Outputs in ``output_dir``: ``round_XX/scores.parquet`` (train, eval and validation samples of the round),
``round_XX/report.json``, ``report.json`` (all rounds), ``stability.png`` (stable rate, mean angle,
fidelity and size per round), ``grid_round_XX.png`` (depth renders, base vs round r, same seeds).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdpo.config import help_meta
from diffdpo.train import LossConfig, OptimConfig


@dataclass
class SimSettings:
    duration_s: float = field(default=2.0, metadata=help_meta("simulated seconds (pybullet, 240 Hz)"))
    angle_threshold_deg: float = field(default=20.0, metadata=help_meta("stable iff rotation below this (DSO: 20)"))
    workers: int = field(default=0, metadata=help_meta("sim worker processes; 0 = in this process (trusted toy meshes)"))


@dataclass
class DSOConfig:
    """One DSO experiment. Every field has help text; ``configs/dso_toy.yaml`` is the default recipe."""

    generator: str = field(default="data/toy_voxels", metadata=help_meta("toy voxel checkpoint folder"))
    output_dir: str = field(default="runs/dso_toy", metadata=help_meta("reports, scores, plots and adapters"))
    seed: int = field(default=0, metadata=help_meta("seed of sampling seeds, pair subsampling and training noise"))
    rounds: int = field(default=3, metadata=help_meta("self-improvement rounds R"))
    samples_per_class: int = field(default=32, metadata=help_meta("training samples per class and round"))
    group_size: int = field(default=8, metadata=help_meta("consecutive seeds of one class form a group; pairs stay inside"))
    max_pairs_per_group: int = field(default=16, metadata=help_meta("cap on (stable, unstable) pairs per group"))
    drop_uniform: bool = field(default=True, metadata=help_meta("pointwise losses: skip groups whose samples all agree"))
    eval_per_class: int = field(default=24, metadata=help_meta("held-out samples per class (fixed seeds)"))
    steps_per_round: int = field(default=60, metadata=help_meta("optimizer steps per round"))
    epochs_per_round: float = field(default=0.0, metadata=help_meta(
        "if > 0: steps = epochs x items / batch_size, at most steps_per_round (fewer pairs -> fewer steps)"))
    lr_decay_per_round: float = field(default=1.0, metadata=help_meta(
        "round r trains at optim.lr x lr_decay_per_round^(r-1): later rounds start from a moved adapter and a "
        "fresh Adam state, so the same lr moves them further (1.0 = the same lr every round)"))
    batch_size: int = field(default=8, metadata=help_meta("pairs (or samples) per step"))
    lora_rank: int = field(default=8, metadata=help_meta("LoRA rank; 0 = full fine-tune with a frozen copy as reference"))
    lora_alpha: float = field(default=8.0, metadata=help_meta("LoRA alpha"))
    dro_anchored: bool = field(default=False, metadata=help_meta("loss.type=dso_dro: the bounded reference-anchored variant"))
    min_fidelity: float = field(default=0.0, metadata=help_meta(
        "a stable sample counts as good (winner / desirable) only if its fidelity (IoU with the nearest same-class "
        "training object) is at least this; 0 = DSO's pure stability reward"))
    require_recognised: bool = field(default=False, metadata=help_meta(
        "a stable sample counts as good only if its nearest training object is of its own class (per-class "
        "identity: without it a whole class can drift into another, e.g. tables into slabs)"))
    aux_weight: float = field(default=0.0, metadata=help_meta("weight of the denoising (SFT) regulariser; 0 = off"))
    aux_source: str = field(default="data", metadata=help_meta("regulariser latents: 'data' (fresh training objects) or "
                                                           "'winners' (this round's good samples, every class in turn)"))
    rescue_pairs: int = field(default=0, metadata=help_meta(
        "groups with no good sample (DSO drops them): pair up to this many of their samples with a fresh training "
        "object of the class that passes the same reward (needs generator.training_latents), so a class whose "
        "samples all drifted is pulled back instead of ignored; 0 = off"))
    reference: str = field(default="base", metadata=help_meta(
        "reference of the preference loss: 'base' (the shipped model in every round) or 'previous' (each "
        "round's reference is the policy the round started from: iterative DPO; the adapter is folded into "
        "the weights after every kept round)"))
    validate_per_class: int = field(default=0, metadata=help_meta(
        "if > 0: after training, sample this many objects per class at fresh validation seeds (never the "
        "held-out eval seeds) and keep the round's update only if the share of good samples (the training "
        "reward: stable and, with the gates, faithful and recognised) did not fall, overall or by more than "
        "class_drop_tolerance in any class, and no class's recognised share fell by more than that either, "
        "against the round's own training samples; otherwise revert (or, with backtrack, shorten) the "
        "update, so a round that collapses a class or loses stability is discarded; 0 = keep every round"))
    class_drop_tolerance: float = field(default=0.2, metadata=help_meta(
        "validation: the largest fall in one class's good (or recognised) share that still accepts a round (0.2 is about two "
        "standard errors at 96 samples before and 48 after)"))
    backtrack: int = field(default=0, metadata=help_meta(
        "validation: when a round's update is rejected, try up to this many shorter steps along it (half, "
        "a quarter, ... of the update, each validated afresh on new seeds) before reverting it: a line search "
        "over the round's update instead of all or nothing; 0 = revert at once, at most 4"))
    sample_steps: int = field(default=25, metadata=help_meta("sampler steps (DDIM or Euler)"))
    threads: int = field(default=1, metadata=help_meta("torch CPU threads"))
    grid_samples: int = field(default=4, metadata=help_meta("objects per class in the before/after render"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=5))
    loss: LossConfig = field(default_factory=lambda: LossConfig(type="sigmoid", beta=500.0))
    sim: SimSettings = field(default_factory=SimSettings)

    def __post_init__(self) -> None:
        if self.reference not in ("base", "previous"):
            raise ValueError(f"reference must be 'base' or 'previous', got {self.reference!r}")
        if not 0.0 < self.lr_decay_per_round <= 1.0:
            raise ValueError(f"lr_decay_per_round must be in (0, 1], got {self.lr_decay_per_round}")
        if not 0 <= self.backtrack <= 4:
            raise ValueError(f"backtrack must be in [0, 4] (each try has its own block of validation seeds), got {self.backtrack}")
        if self.validate_per_class < 0 or not 0.0 <= self.class_drop_tolerance <= 1.0:
            raise ValueError("validate_per_class must be >= 0 and class_drop_tolerance in [0, 1]")
        if self.rescue_pairs < 0:
            raise ValueError(f"rescue_pairs must be >= 0, got {self.rescue_pairs}")
        if min(self.rounds, self.samples_per_class, self.group_size, self.eval_per_class, self.steps_per_round,
               self.batch_size, self.max_pairs_per_group) < 1:
            raise ValueError("rounds, samples_per_class, group_size, eval_per_class, steps_per_round, batch_size "
                             "and max_pairs_per_group must be >= 1")
        if self.aux_source not in ("data", "winners"):
            raise ValueError(f"aux_source must be 'data' or 'winners', got {self.aux_source!r}")
        if self.epochs_per_round < 0:
            raise ValueError(f"epochs_per_round must be >= 0, got {self.epochs_per_round}")
        if self.aux_weight < 0 or not 0.0 <= self.min_fidelity <= 1.0:
            raise ValueError("aux_weight must be >= 0 and min_fidelity in [0, 1]")


# ------------------------------------------------------------------------------------------------
# datasets


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
                            seed=cfg.seed * 1000 + round_index)
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
    if not hasattr(generator, "training_latents"):
        raise ValueError(f"rescue_pairs > 0 needs {type(generator).__name__}.training_latents(conditions, seed)")
    conds = [r["condition"] for r in scored.records]
    lost = losing_groups(conds, [r["group"] for r in scored.records], [r["label"] for r in scored.records])
    counts = {"rescued_groups": 0, "rescue_items": 0, "losing_groups": len(lost), "rescue_pool": 0, "rescue_pool_good": 0}
    if not lost:
        return [], counts, None
    need = Counter(c for c, _ in lost)
    pool_conds = [c for c, k in sorted(need.items()) for _ in range(2 * k + 2)]  # a third to half pass the gated reward
    seed = cfg.seed * 1000 + round_index
    pool = score_latents(generator, generator.training_latents(pool_conds, seed), pool_conds,
                         list(range(len(pool_conds))), groups=[-1] * len(pool_conds), sim_config=sim_config,
                         workers=cfg.sim.workers, bank=bank)
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


def validation_samples(cfg: DSOConfig, generator: Any, round_index: int, *, bank: Any = None,
                       sim_config: Any = None, block: int = 0) -> Any:
    """``validate_per_class`` scored and labelled samples per class at seeds disjoint from the
    training seeds (offset 500,000 + 100,000 x ``block`` within the round's block) and from the
    held-out eval seeds."""
    from diffdpo.dso.evaluate import score_samples

    m, n_cond = cfg.validate_per_class, len(generator.condition_names)
    if m > 10_000 or n_cond > 10 or not 0 <= block <= 4:
        raise ValueError(f"validation seeds need validate_per_class <= 10000 (got {m}), at most 10 classes (got {n_cond}) "
                         f"and block in [0, 4] (got {block}): otherwise the seed blocks overlap")
    seeds = [cfg.seed * 1_000_000_000 + round_index * 1_000_000 + 500_000 + block * 100_000 + c * 10_000 + i
             for c in range(n_cond) for i in range(m)]
    val = score_samples(generator, [c for c in range(n_cond) for _ in range(m)], seeds, sim_config=sim_config,
                        workers=cfg.sim.workers, bank=bank)
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
        if not hasattr(generator, "training_latents"):
            raise ValueError(f"aux_source='data' needs {type(generator).__name__}.training_latents(conditions, seed); "
                             "use aux_source=winners")
        latents = generator.training_latents(conds, cfg.seed * 1000 + round_index)
        for it, lat in zip(items, latents):
            it["aux"], it["aux_cond"] = lat, it["cond"]
        return
    good = [i for i, r in enumerate(scored.records) if r.get("label", scored.stable[i])]
    if not good:
        raise ValueError(f"round {round_index}: aux_source='winners' but no sample was good; use aux_source=data")
    # round-robin over the classes, so that every class with a good sample is anchored, also those
    # whose groups were all good and so gave no pairs (their samples would otherwise drift unwatched)
    by_class: dict[int, list[int]] = {}
    for i in np.random.default_rng(cfg.seed * 1000 + round_index).permutation(good):
        by_class.setdefault(int(scored.records[i]["condition"]), []).append(int(i))
    classes = sorted(by_class)
    for k, it in enumerate(items):
        members = by_class[classes[k % len(classes)]]
        j = members[(k // len(classes)) % len(members)]
        it["aux"], it["aux_cond"] = scored.latents[j], scored.records[j]["condition"]


# ------------------------------------------------------------------------------------------------
# outputs


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


# ------------------------------------------------------------------------------------------------
# the loop


def round_steps(cfg: DSOConfig, n_items: int) -> int:
    """Optimizer steps of one round: ``steps_per_round``, or fixed epochs over the round's items."""
    if cfg.epochs_per_round <= 0:
        return cfg.steps_per_round
    return max(1, min(cfg.steps_per_round, round(cfg.epochs_per_round * n_items / cfg.batch_size)))


def _train_config(cfg: DSOConfig, out_dir: Path, round_index: int, n_items: int) -> Any:
    from diffdpo.train import TrainConfig

    return TrainConfig(output_dir=str(out_dir), seed=cfg.seed * 1000 + round_index, max_steps=round_steps(cfg, n_items),
                       per_device_batch_size=min(cfg.batch_size, n_items), tensorboard=False, progress_bar=False,
                       checkpoint_every=0, log_every=10, loss=cfg.loss,
                       optim=replace(cfg.optim, lr=cfg.optim.lr * cfg.lr_decay_per_round ** (round_index - 1)))


def _decision(validation: dict[str, Any]) -> str:
    if not validation["accepted"]:
        return f"reverted after {len(validation['tries'])} tries" if len(validation["tries"]) > 1 else "reverted"
    return "kept" if validation["step"] == 1.0 else f"kept {validation['step']:g} of the update"


def run_dso(cfg: DSOConfig, generator: Any = None, bank: Any = None) -> dict[str, Any]:
    """Run the loop; returns the report (also written to ``output_dir/report.json``)."""
    import sim
    from diffdpo.diffusion.models import fold_adapters
    from diffdpo.dso.evaluate import evaluate_generator, reference_bank, score_samples
    from diffdpo.dso.task import DSOTask, prepare_network
    from diffdpo.losses import POINTWISE_LOSS_TYPES
    from diffdpo.train import train

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # LoRA init
    t_start = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if generator is None:
        from diffdpo.toy.voxel_model import VoxelGenerator

        generator = VoxelGenerator.load(cfg.generator, sample_steps=cfg.sample_steps)
    if bank is None and hasattr(generator, "occupancy"):
        bank = reference_bank()
    sim_cfg = sim.StabilityConfig(duration_s=cfg.sim.duration_s, angle_threshold_deg=cfg.sim.angle_threshold_deg)
    pointwise = cfg.loss.type in POINTWISE_LOSS_TYPES
    loss_kwargs = {"anchored": True} if cfg.loss.type == "dso_dro" and cfg.dro_anchored else {}
    names = [str(n) for n in generator.condition_names]

    def evaluate() -> Any:
        return evaluate_generator(generator, bank, cfg.eval_per_class, sim_config=sim_cfg, workers=cfg.sim.workers)

    frozen = None
    if cfg.lora_rank <= 0:
        import copy

        frozen = copy.deepcopy(generator.network).requires_grad_(False).eval()
    trainable = prepare_network(generator, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    base = evaluate()
    evals = [base]
    summaries, rounds_info = [base.summary], [{"round": 0, "seconds": round(time.time() - t_start, 1)}]
    print(f"[dso] base: stable {base.summary['stable_rate']:.3f}, fidelity {base.summary.get('fidelity', float('nan')):.3f}")
    for r in range(1, cfg.rounds + 1):
        t0 = time.time()
        rdir = out / f"round_{r:02d}"
        rdir.mkdir(parents=True, exist_ok=True)
        n = cfg.samples_per_class
        conds = [c for c in range(len(names)) for _ in range(n)]
        seeds = [cfg.seed * 1_000_000_000 + r * 1_000_000 + c * 10_000 + i for c in range(len(names)) for i in range(n)]
        groups = [i // cfg.group_size for c in range(len(names)) for i in range(n)]
        scored = score_samples(generator, conds, seeds, groups=groups, sim_config=sim_cfg, workers=cfg.sim.workers,
                               bank=bank)
        items, counts = build_items(cfg, scored, r, pointwise)
        extra, rescue_counts, pool = rescue_items(cfg, generator, scored, r, pointwise, bank=bank, sim_config=sim_cfg)
        items += extra
        counts.update(rescue_counts)
        attach_aux(cfg, generator, items, scored, r)
        train_s = 0.0
        history: list[dict[str, float]] = []
        validation: dict[str, Any] = {}
        val = None
        if items:
            task = DSOTask(generator, items, pointwise=pointwise, trainable=trainable, seed=cfg.seed * 1000 + r,
                           aux_weight=cfg.aux_weight, loss_kwargs=loss_kwargs, frozen_reference=frozen)
            before = [p.detach().clone() for p in trainable] if cfg.validate_per_class > 0 else []
            t_train = time.time()
            history = train(_train_config(cfg, rdir / "train", r, len(items)), task).history
            train_s = time.time() - t_train
            if cfg.validate_per_class > 0:
                val, validation = validate_update(cfg, generator, trainable, before, scored.records, r, bank=bank,
                                                  sim_config=sim_cfg)
        kept = bool(items) and (not validation or validation["accepted"])
        if kept and cfg.reference == "previous":  # the next round's reference is this round's policy
            if frozen is None:
                fold_adapters(generator.network)
            else:
                frozen.load_state_dict(generator.network.state_dict())
        if validation and not validation["accepted"]:
            ev = evals[-1]  # the weights are back to the previous round's: same samples, same scores
        else:
            ev = evaluate()
        evals.append(ev)
        summaries.append(ev.summary)
        rows = score_rows(r, "train", scored) + score_rows(r, "eval", ev)
        if val is not None:
            rows += score_rows(r, "validation", val)
        if pool is not None:
            rows += score_rows(r, "rescue_pool", pool)
        import pandas as pd

        pd.DataFrame(rows).to_parquet(rdir / "scores.parquet", index=False)
        info = {"round": r, "train_samples": scored.summary, "dataset": counts, "eval": ev.summary,
                "steps": round_steps(cfg, len(items)) if items else 0,
                "train_seconds": round(train_s, 1), "validation": validation or None,
                "seconds": round(time.time() - t0, 1),
                "last_step": history[-1] if history else None}
        rounds_info.append(info)
        (rdir / "report.json").write_text(json.dumps(info, indent=2))
        render_grid(out / f"grid_round_{r:02d}.png", base, ev, names, cfg.grid_samples,
                    f"{cfg.loss.type} round {r}: base vs after (green = stable)")
        if validation:
            print(f"[dso] round {r}: good share {validation['good_before']:.3f} -> {validation['good_after']:.3f} "
                  f"(worst class {validation['worst_class_change']:+.3f}"
                  + (f", worst class recognised {validation['worst_class_recognised_change']:+.3f}"
                     if "worst_class_recognised_change" in validation else "")
                  + f"): {_decision(validation)}")
        print(f"[dso] round {r}: {counts}, train-set stable {scored.summary['stable_rate']:.3f}, eval stable "
              f"{ev.summary['stable_rate']:.3f}, fidelity {ev.summary.get('fidelity', float('nan')):.3f} "
              f"({time.time() - t0:.0f}s)")
    title = f"DSO {cfg.loss.type}{' anchored' if cfg.dro_anchored and cfg.loss.type == 'dso_dro' else ''}"
    plot_rounds(out / "stability.png", summaries, title)
    report = {"config": asdict(cfg), "summaries": summaries, "rounds": rounds_info,
              "total_seconds": round(time.time() - t_start, 1), "table": format_table(summaries)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(report["table"])
    return report


def main(config_path: str | None, overrides: list[str]) -> int:
    from diffdpo.config import load_config

    run_dso(load_config(DSOConfig, config_path, overrides))
    return 0

"""Sample -> decode -> simulate -> measure: per-sample records and the per-round summary.

Summary numbers:

* ``stable_rate``: stable samples over all samples (invalid ones, e.g. empty grids, count as unstable);
* ``mean_angle_deg``: mean rotation over valid samples (DSO's score; lower is better);
* ``fidelity``: mean IoU with the nearest training object of the same class, ``recognisability``:
  share whose nearest training object is of the right class, ``volume_ratio``: filled volume over
  the training mean, ``diversity``: mean pairwise ``1 - IoU`` within a class. They need a generator
  with the :class:`diffdpo.dso.generator.MeasuresShapes` capability and its ``reference_bank()``;
  other generators get the stability numbers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffdpo.dso.generator import MeasuresShapes

EVAL_SEED_OFFSET = 10_000_000


@dataclass
class Scored:
    """Samples of one batch with their scores; ``records`` is one flat dict per sample."""

    latents: torch.Tensor
    records: list[dict[str, Any]]
    occupancy: np.ndarray | None = None
    meshes: list[Any] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def stable(self) -> np.ndarray:
        return np.array([bool(r["stable"]) and bool(r["valid"]) for r in self.records])


def score_samples(generator: Any, conditions: Sequence[int], seeds: Sequence[int], *, groups: Sequence[int] | None = None,
                  sim_config: Any = None, workers: int | None = 0, bank: Any = None) -> Scored:
    """Sample the generator at ``seeds``, decode, score with :func:`sim.score_meshes`, measure shapes."""
    latents = generator.sample(conditions, seeds)  # (N, *latent_shape)
    return score_latents(generator, latents, conditions, seeds, groups=groups, sim_config=sim_config,
                         workers=workers, bank=bank)


def score_latents(generator: Any, latents: torch.Tensor, conditions: Sequence[int], seeds: Sequence[int], *,
                  groups: Sequence[int] | None = None, sim_config: Any = None, workers: int | None = 0,
                  bank: Any = None) -> Scored:
    """Score given latents (samples, or training objects) exactly as :func:`score_samples` scores samples."""
    import sim

    meshes = generator.decode(latents)
    results = sim.score_meshes(meshes, sim_config, workers=workers)
    records = []
    for i, (c, s, r) in enumerate(zip(conditions, seeds, results)):
        records.append({"condition": int(c), "condition_name": str(generator.condition_names[int(c)]),
                        "group": int(groups[i]) if groups is not None else 0, "seed": int(s), "valid": bool(r.valid),
                        "stable": bool(r.stable) if r.valid else False,
                        "angle_deg": float(r.angle_deg) if r.angle_deg is not None else float("nan"),
                        "reason": r.reason or ""})
    scored = Scored(latents, records, meshes=meshes)
    if bank is not None and isinstance(generator, MeasuresShapes):
        scored.occupancy = generator.occupancy(latents)
        measures = bank.measure(scored.occupancy, conditions)
        for i, rec in enumerate(records):
            rec.update({k: float(v[i]) for k, v in measures.items()})
    scored.summary = summarize(scored, len(generator.condition_names), bank)
    return scored


def summarize(scored: Scored, n_conditions: int, bank: Any = None) -> dict[str, Any]:
    recs = scored.records
    cond = np.array([r["condition"] for r in recs])
    stable = scored.stable
    angles = np.array([r["angle_deg"] for r in recs])
    out: dict[str, Any] = {
        "n": len(recs), "stable_rate": float(stable.mean()), "invalid": int(sum(not r["valid"] for r in recs)),
        "mean_angle_deg": float(np.nanmean(angles)) if np.isfinite(angles).any() else float("nan"),
        "stable_rate_per_class": {str(c): float(stable[cond == c].mean()) for c in range(n_conditions) if (cond == c).any()},
    }
    if recs and "fidelity" in recs[0]:
        for key, name in (("fidelity", "fidelity"), ("recognised", "recognisability"), ("volume_ratio", "volume_ratio")):
            out[name] = float(np.mean([r[key] for r in recs]))
        out["diversity"] = float(np.mean([bank.diversity(scored.occupancy[cond == c]) for c in np.unique(cond)]))
        # per class too: an aggregate can hide one class losing its identity (tables turning into pillars)
        for key, name in (("fidelity", "fidelity"), ("recognised", "recognisability"), ("volume_ratio", "volume_ratio")):
            values = np.array([r[key] for r in recs])
            out[f"{name}_per_class"] = {str(c): float(values[cond == c].mean()) for c in np.unique(cond)}
        out["min_class_recognisability"] = min(out["recognisability_per_class"].values())
    out["min_class_stable_rate"] = min(out["stable_rate_per_class"].values()) if recs else 0.0
    return out


def held_out_seed(condition: int, index: int) -> int:
    """Sampling seed of held-out sample ``index`` of ``condition`` (the fixed evaluation set)."""
    if not (0 <= index < 100_000 and 0 <= condition < 10):
        raise ValueError(f"held-out seeds need index < 100000 and condition < 10, got {index}, {condition}")
    return EVAL_SEED_OFFSET + condition * 100_000 + index


def evaluate_generator(generator: Any, bank: Any = None, per_class: int = 24, *,
                       sim_config: Any = None, workers: int | None = 0) -> Scored:
    """Score ``per_class`` samples of every condition at the fixed held-out seeds (:func:`held_out_seed`)."""
    n = len(generator.condition_names)
    conditions = [c for c in range(n) for _ in range(per_class)]
    seeds = [held_out_seed(c, i) for c in range(n) for i in range(per_class)]
    return score_samples(generator, conditions, seeds, sim_config=sim_config, workers=workers, bank=bank)

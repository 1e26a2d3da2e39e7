"""The DSO self-improvement loop: sample -> mesh -> simulate -> dataset -> fine-tune -> evaluate, R rounds.

``diffdpo dso --config configs/dso_toy.yaml [key=value ...]`` (Li et al. 2025, arXiv 2503.22677, run
for several rounds). Round 0 evaluates the base generator on fixed held-out seeds; each round r >= 1

1. samples ``samples_per_class`` objects per class from the current policy at the round's seeds
   (:mod:`diffdpo.recipes.dso.seeds`), in groups of ``group_size`` consecutive seeds;
2. decodes them to meshes and scores them with :func:`sim.score_meshes` (``sim`` config: backend,
   duration, threshold, ...);
3. builds DPO pairs within groups or pointwise labels (:mod:`diffdpo.recipes.dso.rounds`);
4. fine-tunes one adapter with :func:`diffdpo.train.train` on :class:`diffdpo.dso.task.DSOTask`;
5. with ``validate_per_class > 0`` keeps, shortens or reverts the update
   (:mod:`diffdpo.recipes.dso.validation`);
6. evaluates on the held-out seeds and writes the round's outputs (:mod:`diffdpo.recipes.dso.report`).

Outputs in ``output_dir``: ``round_XX/scores.parquet``, ``round_XX/report.json``, ``report.json``,
``stability.png`` and ``grid_round_XX.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from diffdpo.recipes.dso.config import DSOConfig
from diffdpo.recipes.dso.report import format_table, plot_rounds, render_grid, score_rows
from diffdpo.recipes.dso.rounds import attach_aux, build_items, rescue_items
from diffdpo.recipes.dso.seeds import round_seed, train_seed
from diffdpo.recipes.dso.validation import validate_update


def round_steps(cfg: DSOConfig, n_items: int) -> int:
    """Optimizer steps of one round: ``steps_per_round``, or fixed epochs over the round's items."""
    if cfg.epochs_per_round <= 0:
        return cfg.steps_per_round
    return max(1, min(cfg.steps_per_round, round(cfg.epochs_per_round * n_items / cfg.batch_size)))


def _train_config(cfg: DSOConfig, out_dir: Path, round_index: int, n_items: int) -> Any:
    from diffdpo.train import TrainConfig

    return TrainConfig(task="dso", output_dir=str(out_dir), seed=round_seed(cfg.seed, round_index),
                       max_steps=round_steps(cfg, n_items), per_device_batch_size=min(cfg.batch_size, n_items),
                       tensorboard=False, progress_bar=False, checkpoint_every=0, log_every=10, loss=cfg.loss,
                       overwrite=True,  # the round's own folder: a rerun of the recipe replaces it
                       optim=replace(cfg.optim, lr=cfg.optim.lr * cfg.lr_decay_per_round ** (round_index - 1)))


def _decision(validation: dict[str, Any]) -> str:
    if not validation["accepted"]:
        return f"reverted after {len(validation['tries'])} tries" if len(validation["tries"]) > 1 else "reverted"
    return "kept" if validation["step"] == 1.0 else f"kept {validation['step']:g} of the update"


@dataclass
class Run:
    """What every round of one run shares."""

    cfg: DSOConfig
    generator: Any
    bank: Any
    sim_config: Any
    out: Path
    trainable: list[torch.nn.Parameter]
    frozen: torch.nn.Module | None  # full fine-tuning: the frozen reference copy
    names: list[str]
    evals: list[Any] = field(default_factory=list)

    @property
    def pointwise(self) -> bool:
        return self.cfg.loss.pointwise

    def evaluate(self) -> Any:
        from diffdpo.dso.evaluate import evaluate_generator

        return evaluate_generator(self.generator, self.bank, self.cfg.eval_per_class, sim_config=self.sim_config,
                                  workers=self.cfg.sim_workers)


def setup_run(cfg: DSOConfig, generator: Any = None, bank: Any = None) -> Run:
    """Generator (``cfg.generator`` unless given), shape bank, simulator config, adapter, reference."""
    import copy

    from diffdpo.adapters import add_lora
    from diffdpo.dso.generator import MeasuresShapes, load_generator

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # LoRA init
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if generator is None:
        generator = load_generator(cfg.generator, cfg.generator_args)
    if bank is None and isinstance(generator, MeasuresShapes):
        bank = generator.reference_bank()
    frozen = None
    if not cfg.lora.enabled:
        frozen = copy.deepcopy(generator.network).requires_grad_(False).eval()
        trainable = list(generator.network.requires_grad_(True).parameters())
    else:
        targets = cfg.lora.target_modules or list(generator.lora_target_modules)
        trainable = add_lora(generator.network, cfg.lora.rank, cfg.lora.alpha, targets, cfg.lora.dropout)
    return Run(cfg, generator, bank, cfg.sim, out, trainable, frozen, [str(n) for n in generator.condition_names])


def sample_round(run: Run, r: int) -> Any:
    """The round's training samples, scored (groups of ``group_size`` consecutive seeds per class)."""
    from diffdpo.dso.evaluate import score_samples

    cfg, n = run.cfg, run.cfg.samples_per_class
    conds = [c for c in range(len(run.names)) for _ in range(n)]
    seeds = [train_seed(cfg.seed, r, c, i) for c in range(len(run.names)) for i in range(n)]
    groups = [i // cfg.group_size for c in range(len(run.names)) for i in range(n)]
    return score_samples(run.generator, conds, seeds, groups=groups, sim_config=run.sim_config,
                         workers=cfg.sim_workers, bank=run.bank)


def train_round(run: Run, r: int, items: list[dict[str, Any]], scored: Any, rdir: Path) -> dict[str, Any]:
    """Fine-tune on the round's items, then validate the update; returns history, seconds, validation."""
    from diffdpo.dso.task import DSOTask
    from diffdpo.train import train

    cfg = run.cfg
    task = DSOTask(run.generator, items, pointwise=run.pointwise, trainable=run.trainable,
                   seed=round_seed(cfg.seed, r), aux_weight=cfg.aux_weight, frozen_reference=run.frozen)
    before = [p.detach().clone() for p in run.trainable] if cfg.validate_per_class > 0 else []
    t_train = time.time()
    history = train(_train_config(cfg, rdir / "train", r, len(items)), task).history
    result: dict[str, Any] = {"history": history, "seconds": time.time() - t_train, "validation": {}, "val": None}
    if cfg.validate_per_class > 0:
        result["val"], result["validation"] = validate_update(cfg, run.generator, run.trainable, before,
                                                              scored.records, r, bank=run.bank,
                                                              sim_config=run.sim_config)
    return result


def _update_reference(run: Run) -> None:
    """``reference=previous``: the next round's reference is this round's policy."""
    from diffdpo.adapters import fold_adapters

    if run.frozen is None:
        fold_adapters(run.generator.network)
    else:
        run.frozen.load_state_dict(run.generator.network.state_dict())


def run_round(run: Run, r: int, base: Any) -> dict[str, Any]:
    """One round (see the module docstring); returns the round's report."""
    import pandas as pd

    cfg, t0 = run.cfg, time.time()
    rdir = run.out / f"round_{r:02d}"
    rdir.mkdir(parents=True, exist_ok=True)
    scored = sample_round(run, r)
    items, counts = build_items(cfg, scored, r, run.pointwise)
    extra, rescue_counts, pool = rescue_items(cfg, run.generator, scored, r, run.pointwise, bank=run.bank,
                                              sim_config=run.sim_config)
    items += extra
    counts.update(rescue_counts)
    attach_aux(cfg, run.generator, items, scored, r)
    trained = train_round(run, r, items, scored, rdir) if items else {"history": [], "seconds": 0.0,
                                                                       "validation": {}, "val": None}
    validation = trained["validation"]
    if items and (not validation or validation["accepted"]) and cfg.reference == "previous":
        _update_reference(run)
    # a reverted update leaves the previous round's weights: same samples, same scores
    ev = run.evals[-1] if validation and not validation["accepted"] else run.evaluate()
    run.evals.append(ev)
    rows = score_rows(r, "train", scored) + score_rows(r, "eval", ev)
    if trained["val"] is not None:
        rows += score_rows(r, "validation", trained["val"])
    if pool is not None:
        rows += score_rows(r, "rescue_pool", pool)
    pd.DataFrame(rows).to_parquet(rdir / "scores.parquet", index=False)
    info = {"round": r, "train_samples": scored.summary, "dataset": counts, "eval": ev.summary,
            "steps": round_steps(cfg, len(items)) if items else 0, "train_seconds": round(trained["seconds"], 1),
            "validation": validation or None, "seconds": round(time.time() - t0, 1),
            "last_step": trained["history"][-1] if trained["history"] else None}
    (rdir / "report.json").write_text(json.dumps(info, indent=2))
    render_grid(run.out / f"grid_round_{r:02d}.png", base, ev, run.names, cfg.grid_samples,
                f"{cfg.loss.type} round {r}: base vs after (green = stable)")
    _print_round(r, counts, scored, ev, validation, time.time() - t0)
    return info


def _print_round(r: int, counts: dict[str, Any], scored: Any, ev: Any, validation: dict[str, Any], seconds: float) -> None:
    if validation:
        print(f"[dso] round {r}: good share {validation['good_before']:.3f} -> {validation['good_after']:.3f} "
              f"(worst class {validation['worst_class_change']:+.3f}"
              + (f", worst class recognised {validation['worst_class_recognised_change']:+.3f}"
                 if "worst_class_recognised_change" in validation else "")
              + f"): {_decision(validation)}")
    print(f"[dso] round {r}: {counts}, train-set stable {scored.summary['stable_rate']:.3f}, eval stable "
          f"{ev.summary['stable_rate']:.3f}, fidelity {ev.summary.get('fidelity', float('nan')):.3f} ({seconds:.0f}s)")


def run_dso(cfg: DSOConfig, generator: Any = None, bank: Any = None) -> dict[str, Any]:
    """Run the loop; returns the report (also written to ``output_dir/report.json``)."""
    t_start = time.time()
    run = setup_run(cfg, generator, bank)
    base = run.evaluate()
    run.evals.append(base)
    rounds_info: list[dict[str, Any]] = [{"round": 0, "seconds": round(time.time() - t_start, 1)}]
    print(f"[dso] base: stable {base.summary['stable_rate']:.3f}, fidelity {base.summary.get('fidelity', float('nan')):.3f}")
    for r in range(1, cfg.rounds + 1):
        rounds_info.append(run_round(run, r, base))
    summaries = [ev.summary for ev in run.evals]
    anchored = " anchored" if cfg.loss.dro_anchored and cfg.loss.type == "dso_dro" else ""
    plot_rounds(run.out / "stability.png", summaries, f"DSO {cfg.loss.type}{anchored}")
    report = {"config": asdict(cfg), "summaries": summaries, "rounds": rounds_info,
              "total_seconds": round(time.time() - t_start, 1), "table": format_table(summaries)}
    (run.out / "report.json").write_text(json.dumps(report, indent=2))
    print(report["table"])
    return report


def main(config_path: str | None, overrides: list[str]) -> int:
    from diffdpo.config import load_config

    run_dso(load_config(DSOConfig, config_path, overrides))
    return 0

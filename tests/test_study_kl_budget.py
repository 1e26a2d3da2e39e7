"""The KL-budget / likelihood-indicator study recipe (diffdpo.recipes.studies.kl_budget): turns, leads, the
early-stop replay and the fits on hand-made curves, and a fast run that writes every output."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdpo.recipes.studies import kl_budget as study

STEPS = [0, 2, 4, 6, 8, 10, 12]
GOLD = [0.50, 0.60, 0.70, 0.80, 0.75, 0.70, 0.60]  # peak at step 6
ENTROPY = [1.0, 1.2, 1.4, 1.3, 1.1, 1.0, 0.9]  # rises, turns at step 4
MASS = [0.90, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]  # monotone: never turns
CHOSEN = [-10.0, -11.0, -12.0, -12.5, -12.0, -11.0, -13.0]  # falls, turns (a valley) at step 6, back down at 12


def _run_rows(objective="sigmoid", beta=0.1, seed=0, margin=None):
    margin = margin or [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    return [{"objective": objective, "beta": beta, "seed": seed, "step": s, "win_score": g, "topk_entropy_bits": e,
             "topk_mass": m, "chosen_logp": c, "margin": mg, "kl": 0.1 * s}
            for s, g, e, m, c, mg in zip(STEPS, GOLD, ENTROPY, MASS, CHOSEN, margin)]


def test_turns_and_leads_by_hand():
    """Entropy: up from 1.0; best 1.4 at step 4; 1.3 (step 6) and 1.1 (step 8) are 2 evaluations without a new
    best, so with patience 2 the turn is step 4. Gold peaks at step 6: lead 6 - 4 = +2 (turned first).
    Chosen log-lik.: first move down; lowest -12.5 at step 6, then -12.0 (8) and -11.0 (10) -> turn at 6, lead 0.
    Mass rises monotonically and the margin too: no turn."""
    assert study.indicator_turn(STEPS, ENTROPY, 2) == (4, 1)
    assert study.indicator_turn(STEPS, CHOSEN, 2) == (6, -1)
    assert study.indicator_turn(STEPS, MASS, 2) == (None, 1)
    assert study.indicator_turn(STEPS, ENTROPY, 3) == (4, 1)  # 1.3, 1.1, 1.0: three in a row
    # trailing means of 2: 1.0, 1.1, 1.3, 1.35, 1.2, 1.05, 0.95 -> best 1.35 at step 6, turn there
    assert study.indicator_turn(STEPS, ENTROPY, 2, smoothing=2) == (6, 1)
    assert study.gold_peak(STEPS, GOLD) == (6, 0.80)
    assert study.gold_peak([0, 2, 4], [0.5, 0.7, 0.7]) == (2, 0.7)  # the first of equal peaks
    rows = {r["indicator"]: r for r in study.leads(_run_rows(), patience=2)}
    assert set(rows) == set(study.INDICATORS)
    assert (rows["topk_entropy_bits"]["turn_step"], rows["topk_entropy_bits"]["lead_steps"]) == (4, 2)
    assert (rows["chosen_logp"]["turn_step"], rows["chosen_logp"]["lead_steps"]) == (6, 0)
    assert rows["topk_mass"]["turn_step"] == "" and rows["margin"]["lead_steps"] == ""
    assert all(r["gold_peak_step"] == 6 and r["gold_peak_score"] == 0.8 for r in rows.values())


def test_the_early_stop_replay_by_hand():
    """Rule: entropy, turn, patience 2 -> fires at step 8 (best step 4): gold 0.75 at the stop, 0.70 at the
    best step, 0.60 at the end (step 12), 0.80 at the oracle peak. A rule that never fires stops at the end."""
    (out,) = study.early_stop_outcomes(_run_rows(), "topk_entropy_bits", "turn", 2)
    assert (out["stopped_step"], out["best_step"], out["end_step"]) == (8, 4, 12)
    assert (out["score_stopped"], out["score_best"], out["score_end"], out["score_peak"]) == (0.75, 0.70, 0.60, 0.80)
    (never,) = study.early_stop_outcomes(_run_rows(), "topk_mass", "turn", 2)
    assert never["stopped_step"] == never["end_step"] == 12 and never["score_stopped"] == 0.60


def test_the_fit_recovers_known_coefficients_and_the_peak():
    """Points on R = 0.5 + d (0.3 - 0.2 log d) at KL = 0, 2/3, ..., 6 (steps 0, 2, ..., 18): alpha 0.3, b 0.2,
    d* = exp(0.3 / 0.2 - 1) = exp(0.5), KL* = d*^2 = e = 2.71828. With one epoch = 12 steps (KL 4 there) the
    fitted peak comes before one epoch; each run's best point is KL 8/3 (step 8, the grid point nearest e),
    8/12 = 0.667 epochs."""
    rows = []
    for seed in range(3):
        for step, kl in zip(range(0, 20, 2), np.linspace(0.0, 6.0, 10)):
            d = math.sqrt(kl)
            score = 0.5 + (d * (0.3 - 0.2 * math.log(d)) if d > 0 else 0.0)
            rows.append({"objective": "ipo", "beta": 0.1, "seed": seed, "step": step, "kl": kl, "win_score": score})
    log, quad = study.fit_objective(rows, "ipo", steps_per_epoch=12)
    assert log["form"] == "log" and quad["form"] == "quadratic" and log["n"] == 30
    assert (log["alpha"], log["b"]) == pytest.approx((0.3, 0.2), abs=1e-9)
    assert log["r2"] == pytest.approx(1.0) and log["rmse"] == pytest.approx(0.0, abs=1e-9)
    assert log["kl_peak"] == pytest.approx(math.e) and log["kl_at_epoch"] == pytest.approx(4.0)
    assert log["peak_before_epoch_fit"] is True
    assert (log["kl_peak_low"], log["kl_peak_high"]) == pytest.approx((math.e, math.e))  # exact points: no spread
    assert quad["r2"] < 1.0  # the other form does not fit these points exactly
    assert (log["runs"], log["runs_peak_before_epoch"]) == (3, 3)
    assert log["peak_epoch_median"] == pytest.approx(8 / 12)


def test_config_checks():
    with pytest.raises(ValueError, match="unknown"):
        study.KLBudgetStudyConfig(objectives=["ppo"])
    with pytest.raises(ValueError, match="sigmoid_betas"):
        study.KLBudgetStudyConfig(sigmoid_betas=[0.1, -1.0])
    with pytest.raises(ValueError, match="early_stop_metric"):
        study.KLBudgetStudyConfig(early_stop_metric="loss")
    with pytest.raises(ValueError, match="gold"):
        study.KLBudgetStudyConfig(gold="length")
    cfg = study.KLBudgetStudyConfig()
    assert (cfg.steps_per_epoch, cfg.max_steps) == (16, 24)


def test_the_shipped_configs_load_and_the_command_exists():
    from diffdpo.cli import build_parser
    from diffdpo.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    tiny = load_config(study.KLBudgetStudyConfig, root / "study_kl_budget_tiny.yaml")
    assert tiny.seeds == [0, 1, 2] and all(len(tiny.betas(o)) >= 5 for o in study.OBJECTIVES)
    in_epoch = [s for s in range(1, tiny.max_steps + 1) if s % tiny.eval_every == 0 and s < tiny.steps_per_epoch]
    beyond = [s for s in range(1, tiny.max_steps + 1) if s % tiny.eval_every == 0 and s > tiny.steps_per_epoch]
    assert len(in_epoch) >= 6 and len(beyond) >= 2
    real = load_config(study.KLBudgetStudyConfig, root / "study_kl_budget_qwen.yaml")
    assert real.model and real.gold_reward_model and real.train_prompts and real.device == "cuda"
    args = build_parser().parse_args(["study-kl-budget", "--config", str(root / "study_kl_budget_tiny.yaml"), "fast=true"])
    assert args.overrides == ["fast=true"]


def test_the_fast_study_writes_every_output(tmp_path):
    """One seed, one beta per objective, 6 steps of 4 pairs evaluated at steps 0, 2, 4, 6: the CSVs' columns and
    one row per evaluation point, the figures and summary.md with its command."""
    torch.set_num_threads(1)
    cfg = study.KLBudgetStudyConfig(out_dir=str(tmp_path / "study"), world=str(tmp_path / "world"), fast=True)
    assert (cfg.seeds, cfg.steps_per_epoch, cfg.max_steps) == ([0], 4, 6)
    study.run_kl_budget_study(cfg, command="diffdpo study-kl-budget fast=true")
    out = tmp_path / "study"
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == study.RESULT_COLUMNS
        rows = list(reader)
    assert [(r["objective"], int(r["step"])) for r in rows] == [(o, s) for o in study.OBJECTIVES for s in (0, 2, 4, 6)]
    n = 4 * 2  # held-out subjects x comparisons per subject
    for r in rows:
        assert int(r["wins"]) + int(r["ties"]) + int(r["losses"]) == int(r["n"]) == n
        assert float(r["win_score"]) == pytest.approx((int(r["wins"]) + 0.5 * int(r["ties"])) / n)
        assert float(r["kl"]) >= 0.0 and 0.0 < float(r["topk_mass"]) <= 1.0 + 1e-6
        assert 0.0 <= float(r["topk_entropy_bits"]) <= math.log2(10) + 1e-6
    base = [r for r in rows if r["step"] == "0"]  # before training the policy is the base: no KL, all ties
    assert all(float(r["kl"]) == pytest.approx(0.0, abs=1e-6) and r["ties"] == str(n) for r in base)
    assert all(float(r["margin"]) == pytest.approx(0.0, abs=1e-4) for r in base)
    fits = study.read_csv(out / "fits.csv")
    assert [(f["objective"], f["form"]) for f in fits] == [(o, form) for o in study.OBJECTIVES
                                                           for form in ("log", "quadratic")]
    assert list(fits[0]) == study.FIT_COLUMNS
    assert len(study.read_csv(out / "leads.csv")) == 3 * len(study.INDICATORS)
    stops = study.read_csv(out / "early_stop.csv")
    assert list(stops[0]) == study.STOP_COLUMNS
    assert [(s["rule"], s["objective"]) for s in stops] == [(f"{m}/turn", o) for m in study.INDICATORS
                                                             for o in study.OBJECTIVES]
    assert (out / "kl_budget.png").stat().st_size > 1000 and (out / "likelihood_indicators.png").stat().st_size > 1000
    text = (out / "summary.md").read_text()
    assert "diffdpo study-kl-budget fast=true" in text and "| DPO | log |" in text and "| topk_entropy_bits/turn | DPO |" in text
    assert all((out / "data" / "seed0" / name).is_file() for name in ("pairs.jsonl", "eval_pairs.jsonl", "proxy.json"))

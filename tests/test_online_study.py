"""The online study recipe (diffdpo.recipes.studies.online): interval arithmetic by hand, a fast run of every method."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from diffdpo.recipes.studies import online as study
from diffdpo.toy.tiny_lm import EVAL_SUBJECTS


def _rows(method: str, wins: list[int], ties: list[int], losses: list[int], kls: list[float]) -> list[dict]:
    return [{"method": method, "seed": s, "wins": w, "ties": t, "losses": ell, "win_rate": w / (w + t + ell), "kl": kl}
            for s, (w, t, ell, kl) in enumerate(zip(wins, ties, losses, kls))]


def test_the_summary_intervals_by_hand():
    """Three seeds of 20 comparisons: W/T/L 10/5/5, 12/4/4, 14/3/3 -> win rates 0.5, 0.6, 0.7; KL 0.1, 0.2, 0.6.

    Win rate: mean 0.6, sd = sqrt((0.01 + 0 + 0.01) / 2) = 0.1, t_{0.975, 2} = 4.30265, half-width
    4.30265 * 0.1 / sqrt(3) = 0.24841 -> [0.35159, 0.84841].
    KL: mean 0.3, sd = sqrt((0.04 + 0.01 + 0.09) / 2) = sqrt(0.07) = 0.264575, half-width
    4.30265 * 0.264575 / sqrt(3) = 0.65724 -> [-0.35724, 0.95724].
    Pooled: 36 wins of 60 = 0.6; Wilson with z = 1.96: centre (0.6 + 1.96^2 / 120) / (1 + 1.96^2 / 60) = 0.59398,
    half-width 1.96 * sqrt(0.6 * 0.4 / 60 + 1.96^2 / 14400) / 1.06403 = 0.12032 -> [0.47366, 0.71430].
    """
    (s,) = study.summarise(_rows("online_ipo", [10, 12, 14], [5, 4, 3], [5, 4, 3], [0.1, 0.2, 0.6]))
    assert (s["seeds"], s["wins"], s["ties"], s["losses"]) == (3, 36, 12, 12)
    assert s["win_rate_mean"] == pytest.approx(0.6)
    assert (s["win_rate_t_low"], s["win_rate_t_high"]) == pytest.approx((0.35159, 0.84841), abs=1e-4)
    assert s["kl_mean"] == pytest.approx(0.3)
    assert (s["kl_t_low"], s["kl_t_high"]) == pytest.approx((-0.35724, 0.95724), abs=1e-4)
    assert s["pooled_win_rate"] == pytest.approx(0.6)
    assert (s["pooled_wilson_low"], s["pooled_wilson_high"]) == pytest.approx((0.47366, 0.71430), abs=1e-4)


def test_one_seed_has_no_t_interval_and_the_goal_uses_wilson():
    (s,) = study.summarise(_rows("grao", [12], [4], [4], [0.2]))
    assert math.isnan(s["win_rate_t_low"]) and math.isnan(s["kl_t_high"])
    goal = dict(study.check_goal([s]))
    assert goal["grao: lower 95% bound of the win rate vs base above 0.5"] is False  # Wilson(12, 20) low = 0.387
    assert goal["online_ipo beats offline_dpo (higher mean win rate) at equal or lower KL"] is None


def test_the_goal_clauses_on_a_synthetic_table():
    """online_ipo: higher win rate, KL 0.3 <= offline's upper t-bound -> met; ipo_md_0.125: KL 2.0 above it -> not met."""
    rows = (_rows("offline_dpo", [10, 10, 11], [5, 5, 5], [5, 5, 4], [0.2, 0.3, 0.4])
            + _rows("online_ipo", [12, 13, 14], [4, 4, 3], [4, 3, 3], [0.3, 0.3, 0.3])
            + _rows("ipo_md_0.125", [12, 13, 14], [4, 4, 3], [4, 3, 3], [2.0, 2.0, 2.0]))
    goal = dict(study.check_goal(study.summarise(rows)))
    assert goal["online_ipo beats offline_dpo (higher mean win rate) at equal or lower KL"] is True
    assert goal["ipo_md_0.125 beats offline_dpo (higher mean win rate) at equal or lower KL"] is False
    assert goal["ipo_md_0.25 beats offline_dpo (higher mean win rate) at equal or lower KL"] is None


def test_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        study.OnlineStudyConfig(methods=["ppo"])


def test_the_fast_study_runs_every_method_and_writes_its_files(tmp_path):
    """Every method once (seed 0, 2 steps of 4 prompts, 4 comparisons per held-out prompt): the CSVs' rows and
    columns, the PNG and summary.md."""
    torch.set_num_threads(1)
    cfg = study.OnlineStudyConfig(out_dir=str(tmp_path / "study"), world=str(tmp_path / "world"), fast=True)
    assert (cfg.seeds, cfg.steps, cfg.per_device_batch_size) == ([0], 2, 4)
    study.run_online_study(cfg)
    out = tmp_path / "study"
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == study.RESULT_COLUMNS
        results = list(reader)
    assert [r["method"] for r in results] == list(study.METHODS)
    n = len(EVAL_SUBJECTS) * 4  # held-out subjects x comparisons per subject
    for r in results:
        assert r["seed"] == "0" and r["annotated_prompts"] == "8"
        assert int(r["wins"]) + int(r["ties"]) + int(r["losses"]) == int(r["n"]) == n
        assert 0.0 <= float(r["win_rate_low"]) <= float(r["win_rate"]) <= float(r["win_rate_high"]) <= 1.0
        assert math.isfinite(float(r["kl"])) and float(r["kl"]) >= 0.0  # the analytic estimator is >= 0
    summary = study.read_results(out / "summary.csv")
    assert [s["method"] for s in summary] == list(study.METHODS)
    assert list(summary[0]) == study.SUMMARY_COLUMNS
    assert (out / "study.png").stat().st_size > 1000
    text = (out / "summary.md").read_text()
    assert "diffdpo study-online --config configs/study_online_tiny.yaml" in text
    assert text.count("**met**") + text.count("**not met**") == 3 + len(study.METHODS)


def test_the_shipped_config_loads_and_the_command_exists():
    from pathlib import Path

    from diffdpo.cli import build_parser
    from diffdpo.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "study_online_tiny.yaml"
    cfg = load_config(study.OnlineStudyConfig, path, ["seeds=[0,1]"])
    assert cfg.methods == list(study.METHODS) and cfg.seeds == [0, 1] and cfg.steps * cfg.per_device_batch_size == 512
    args = build_parser().parse_args(["study-online", "--config", str(path), "fast=true"])
    assert args.overrides == ["fast=true"]

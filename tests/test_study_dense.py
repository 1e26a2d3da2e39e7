"""The hallucination world and the dense-DPO study recipe: spans, error detection, intervals by hand, a fast run."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from diffdpo.recipes.studies import dense as study
from diffdpo.toy import tiny_lm_hallucination as world
from diffdpo.toy.tiny_lm import EVAL_SUBJECTS


def test_pairs_record_the_spans_of_the_wrong_word_and_its_correction():
    for row in world.preference_rows(32, seed=5):
        (rs, re), (cs, ce) = row["rejected_spans"][0], row["chosen_spans"][0]
        assert row["rejected"][rs:re] in world.WRONG_WORDS  # the inserted wrong word, exactly
        assert row["chosen"][cs:ce] not in world.WRONG_WORDS and row["chosen"][cs:ce].isalpha()
        assert world.has_error(row["rejected"]) and not world.has_error(row["chosen"])
        assert world.well_formed(row["rejected"]) and world.well_formed(row["chosen"])
        bad, good = row["rejected"].split(), row["chosen"].split()
        assert len(bad) == len(good) and 1 <= sum(a != b for a, b in zip(bad, good)) <= 2  # correction (+ a rewrite)
        assert row["rejected"][:rs].count(" ") == row["chosen"][:cs].count(" ")  # same word position


def test_error_and_well_formed_checks():
    assert world.has_error(" good , hotel and warm .") and not world.has_error(" good and warm .<eos>")
    assert world.well_formed(" good , calm and warm .") and world.well_formed(" hotel .")
    assert not world.well_formed(" review review .") and not world.well_formed(" good , warm .")
    assert not world.well_formed(" good and")


def _rows(method: str, rates: list[float], n: int = 100) -> list[dict]:
    return [{"method": method, "seed": s, "errors": round(r * n), "n": n, "error_rate": r, "good_rate": 1 - r,
             "well_formed_rate": 1.0, "kl": 0.5, "positive_rate": 0.5} for s, r in enumerate(rates)]


def test_the_summary_by_hand():
    """dpo error rates 0.2, 0.3, 0.4; dense 0.1, 0.1, 0.25 -> paired differences -0.1, -0.2, -0.15:
    mean -0.15, sd = sqrt((0.0025 + 0.0025 + 0) / 2) = 0.05, half-width 4.30265 * 0.05 / sqrt(3) = 0.12421
    -> [-0.27421, -0.02579] (good rates 1 - error: +0.15 [0.02579, 0.27421]). dpo's own: mean 0.3, sd 0.1,
    half-width 0.24841; pooled 90/300 = 0.3. dense_spans_mean pairs with dpo_mean, absent here: no difference."""
    rows = (_rows("dpo", [0.2, 0.3, 0.4]) + _rows("dense_spans", [0.1, 0.1, 0.25])
            + _rows("dense_spans_mean", [0.1, 0.1, 0.1]))
    dpo, dense, dense_mean = study.summarise(rows)
    assert (dpo["error_rate_t_low"], dpo["error_rate_t_high"]) == pytest.approx((0.05159, 0.54841), abs=1e-4)
    assert dpo["pooled_error_rate"] == pytest.approx(0.3) and dpo["vs_plain_error_mean"] == 0.0
    assert dense["plain"] == "dpo" and dense["vs_plain_error_mean"] == pytest.approx(-0.15)
    assert (dense["vs_plain_error_t_low"], dense["vs_plain_error_t_high"]) == pytest.approx((-0.27421, -0.02579), abs=1e-4)
    assert (dense["vs_plain_good_t_low"], dense["vs_plain_good_t_high"]) == pytest.approx((0.02579, 0.27421), abs=1e-4)
    assert dense_mean["plain"] == "dpo_mean" and math.isnan(dense_mean["vs_plain_error_mean"])
    (alone,) = study.summarise(_rows("dense_spans", [0.1]))
    assert math.isnan(alone["error_rate_t_low"])


def test_method_overrides_and_bad_configs():
    cfg = study.DenseStudyConfig()
    assert study.method_overrides(cfg, "dpo")[0] == "tiny_lm_hallucination.dense_gamma=null"
    assert study.method_overrides(cfg, "dense_diff_mean") == [
        "tiny_lm_hallucination.dense_gamma=5.0", "tiny_lm_hallucination.spans=false",
        "tiny_lm_hallucination.average_log_prob=true", "loss.beta=0.5"]
    with pytest.raises(ValueError, match="unknown"):
        study.DenseStudyConfig(methods=["ppo"])


def test_the_fast_study_trains_through_the_config_and_writes_its_files(tmp_path):
    """Seed 0, base + dpo + dense_spans, 2 steps of 4 pairs on a small world, 4 samples per held-out prompt."""
    torch.set_num_threads(1)
    cfg = study.DenseStudyConfig(out_dir=str(tmp_path / "study"), world=str(tmp_path / "world"), fast=True)
    assert (cfg.seeds, cfg.methods, cfg.steps) == ([0], ["dpo", "dense_spans"], 2)
    study.run_dense_study(cfg)
    out = tmp_path / "study"
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == study.RESULT_COLUMNS
        results = list(reader)
    assert [r["method"] for r in results] == ["base", "dpo", "dense_spans"]
    for r in results:
        assert int(r["n"]) == len(EVAL_SUBJECTS) * 4 and 0 <= float(r["error_rate"]) <= 1
    assert float(results[0]["kl"]) == 0.0 and results[1]["pairs"] == "8"
    assert [r["method"] for r in study.read_results(out / "summary.csv")] == ["base", "dpo", "dense_spans"]
    assert (out / "study.png").stat().st_size > 0
    assert "study-dense" in (out / "summary.md").read_text()
    trained = tmp_path / "study" / "runs" / "dense_spans" / "seed0" / "final" / "eval.json"
    assert trained.is_file()  # trained through the shipped config and the one training loop

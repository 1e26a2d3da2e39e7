"""The separability study (diffdpo.recipes.studies.separability): the adversarial data, the implicit-reward
ranking against an independent computation, a fast run."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdpo.eval.probe import length_features, pair_probe
from diffdpo.recipes.studies import separability as study
from diffdpo.rewards.lm import n_words
from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, build_model, build_tokenizer, judge
from diffdpo.toy.tiny_lm_style import adversarial_pairs, has_style_form, style_review

REPO = Path(__file__).resolve().parents[1]


def test_the_style_form():
    assert has_style_form(" bright , fresh , good and warm .")
    assert has_style_form(" bad , dull , good and kind .")  # the form, whatever the sentiment
    assert not has_style_form(" warm , good , fresh and bright .")  # not alphabetical
    assert not has_style_form(" bright , fresh and good .")  # three adjectives
    rng = random.Random(0)
    for _ in range(20):
        text = style_review(rng)
        assert has_style_form(text) and judge(text) == 4.0


def test_the_adversarial_pairs_put_the_shortcut_and_the_gold_in_disagreement():
    """Every pair: the gold prefers the chosen one, the style's form and length point at the rejected one; a
    length probe fitted on style-vs-policy pairs (chosen always 8 words) ranks the rejected one first."""
    pairs = adversarial_pairs(EVAL_SUBJECTS, 16, seed=100)
    assert len(pairs) == 64 and {p["prompt"] for p in pairs} == {f"review : {s} was" for s in EVAL_SUBJECTS}
    for p in pairs:
        assert judge(p["chosen"]) >= 1 and judge(p["rejected"]) <= 0
        assert has_style_form(p["rejected"]) and not has_style_form(p["chosen"])
        assert n_words(p["rejected"]) > n_words(p["chosen"])
    rng = random.Random(1)
    style = [style_review(rng) for _ in range(200)]
    policy = [" bad ." if i % 2 else " dull , sad and cold ." for i in range(200)]  # 2 or 6 words
    fit = pair_probe(length_features(style), length_features(policy), mode="difference", seed=0)
    assert fit.heldout_accuracy == 1.0 and fit.weights[0] > 0  # longer = chosen, learnt
    gap = length_features([p["rejected"] for p in pairs]) - length_features([p["chosen"] for p in pairs])
    assert (gap[:, 0] * fit.weights[0] > 0).all()  # the shortcut prefers every rejected one


def _independent_logratio(policy, base, tok, prompt: str, completion: str) -> float:
    ids = tok(prompt)["input_ids"]
    comp = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    x = torch.tensor([ids + comp])
    total = 0.0
    for model, sign in ((policy, 1.0), (base, -1.0)):
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)  # (L, V)
        total += sign * sum(float(logp[len(ids) - 1 + t, c]) for t, c in enumerate(comp))
    return total


@torch.no_grad()
def test_implicit_reward_accuracy_matches_an_independent_computation():
    tok = build_tokenizer()
    policy, base = build_model(len(tok), seed=1).eval(), build_model(len(tok), seed=2).eval()
    pairs = adversarial_pairs(EVAL_SUBJECTS[:2], 4, seed=3)
    wins = [_independent_logratio(policy, base, tok, p["prompt"], p["chosen"])
            > _independent_logratio(policy, base, tok, p["prompt"], p["rejected"]) for p in pairs]
    assert study.implicit_reward_accuracy(policy, base, tok, pairs) == pytest.approx(np.mean(wins))
    assert study.implicit_reward_accuracy(base, base, tok, pairs) == 0.5  # every pair a tie


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="strong_model"):
        study.SeparabilityStudyConfig(model="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(ValueError, match="heldout_fraction"):
        study.SeparabilityStudyConfig(heldout_fraction=1.0)


def test_the_fast_study_writes_every_output(tmp_path):
    torch.set_num_threads(1)
    cfg = study.SeparabilityStudyConfig(out_dir=str(tmp_path / "study"), world=str(tmp_path / "world"), fast=True)
    study.run_separability_study(cfg)
    out = tmp_path / "study"
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == study.RESULT_COLUMNS
        results = list(reader)
    assert [r["set"] for r in results] == list(study.SETS)
    for r in results:
        for probe in study.PROBES:
            assert 0.0 <= float(r[probe]) <= 1.0
        assert 0.0 <= float(r["robustness"]) <= 1.0 and r["robustness_n"] == str(len(EVAL_SUBJECTS) * 4)
        assert int(r["wins"]) + int(r["ties"]) + int(r["losses"]) == len(EVAL_SUBJECTS) * 4
    multi = results[1]
    assert float(multi["chosen_gold"]) == 4.0 and float(multi["chosen_words"]) == 8.0  # the stronger generator
    summary = study.read_results(out / "summary.csv")
    assert list(summary[0]) == study.SUMMARY_COLUMNS and [s["set"] for s in summary] == list(study.SETS)
    assert (out / "separability.png").stat().st_size > 1000
    assert study.COMMAND in (out / "summary.md").read_text()


def test_the_shipped_config_loads_and_the_command_exists():
    from diffdpo.cli import build_parser
    from diffdpo.config import load_config
    from diffdpo.train import load_train_config

    path = REPO / "configs" / "study_separability_tiny.yaml"
    cfg = load_config(study.SeparabilityStudyConfig, path)
    assert cfg.seeds == [0, 1, 2] and cfg.steps * cfg.per_device_batch_size == 512
    assert load_train_config(REPO / cfg.train_config).task == "lm"
    args = build_parser().parse_args(["study-separability", "--config", str(path), "fast=true"])
    assert args.overrides == ["fast=true"]


def test_the_model_branch_runs_on_local_folders(tmp_path):
    """The real-model keys on local folders (the tiny world's model as policy and as stronger generator, a
    seeded classifier as gold, an adversarial file): both sets run; no style rate outside the tiny world."""
    import json
    import math

    from diffdpo.toy.tiny_lm import SUBJECTS, build_world, prompt_for
    from tests.test_study_length import _reward_model_folder

    torch.set_num_threads(1)
    world = build_world(tmp_path / "world", seed=0, sft_steps=20)
    (tmp_path / "train.txt").write_text("\n".join(prompt_for(s) for s in SUBJECTS))
    (tmp_path / "eval.txt").write_text("\n".join(prompt_for(s) for s in EVAL_SUBJECTS))
    adversarial = adversarial_pairs(EVAL_SUBJECTS, 2, seed=0)
    (tmp_path / "adv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in adversarial))
    cfg = study.SeparabilityStudyConfig(
        out_dir=str(tmp_path / "study"), model=str(world.model_dir), strong_model=str(world.model_dir),
        gold_model=str(_reward_model_folder(tmp_path / "rm")), prompts=str(tmp_path / "train.txt"),
        eval_prompts=str(tmp_path / "eval.txt"), adversarial=str(tmp_path / "adv.jsonl"), fast=True)
    study.run_separability_study(cfg)
    rows = study.read_results(tmp_path / "study" / "results.csv")
    assert [r["set"] for r in rows] == list(study.SETS)
    assert all(r["robustness_n"] == str(len(adversarial)) and math.isnan(float(r["style_rate"])) for r in rows)

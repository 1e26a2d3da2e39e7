"""The length-exploitation study (diffdpo.recipes.studies.length): the formulas by hand, the data, a fast run."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffdpo.recipes.studies import length as study
from diffdpo.rewards.lm import NoisyJudge, ProgramJudge
from diffdpo.toy.tiny_lm_long import MAX_ADJECTIVES, long_review_rows, mean_sentiment

REPO = Path(__file__).resolve().parents[1]
PROMPT = "review : the soup was"


def test_length_controlled_gold_by_hand():
    """gold / max(words / ref_words, 1): 0.8 at 10 words vs 4 -> 0.8 / 2.5 = 0.32; at 3 words (shorter) 0.8
    stays; at exactly 4 words 0.8 stays; a negative gold -0.5 at 8 words vs 4 -> -0.5 / 2 = -0.25."""
    assert study.lc_gold(0.8, 10, 4) == pytest.approx(0.32)
    assert study.lc_gold(0.8, 3, 4) == 0.8
    assert study.lc_gold(0.8, 4, 4) == 0.8
    assert study.lc_gold(-0.5, 8, 4) == pytest.approx(-0.25)


def test_mean_sentiment_by_hand():
    """(pos - neg) / (pos + neg): ' good , warm and bad .' -> (2 - 1) / 3; ' good .' -> 1; no adjective -> 0."""
    assert mean_sentiment(" good , warm and bad .") == pytest.approx(1 / 3)
    assert mean_sentiment(" good .") == 1.0
    assert mean_sentiment(" good , warm , fresh and calm .") == 1.0  # length does not pay
    assert mean_sentiment(" .") == 0.0


def test_the_length_biased_proxy_prefers_the_longer_review_at_equal_gold():
    """Both reviews have gold 1 (all positive); words 2 and 6: proxy 1 + 0.25 * 2 = 1.5 and 1 + 0.25 * 6 = 2.5."""
    gold = ProgramJudge(lambda p, c: mean_sentiment(c))
    proxy = NoisyJudge(gold, length_bias=0.25)
    short, long = " good .", " good , warm and fresh ."
    assert gold([PROMPT, PROMPT], [short, long]).tolist() == [1.0, 1.0]
    assert proxy([PROMPT, PROMPT], [short, long]).tolist() == [1.5, 2.5]
    assert proxy.prefer([PROMPT], [long], [short]).item() == 1.0
    assert gold.prefer([PROMPT], [long], [short]).item() == 0.5


def test_the_long_world_has_room_to_grow():
    """Review lengths 1..8 adjectives, P(k) ~ 2^-k: mean sum k 2^-k / sum 2^-k = 1.96875 (k <= 8)."""
    rows = long_review_rows(4000, seed=0)
    counts = [len([w for w in r["completion"].split() if w not in {",", "and", "."}]) for r in rows]
    assert min(counts) == 1 and max(counts) == MAX_ADJECTIVES
    expected = sum(k * 2.0 ** -k for k in range(1, 9)) / sum(2.0 ** -k for k in range(1, 9))
    assert sum(counts) / len(counts) == pytest.approx(expected, abs=0.08)


def test_best_worst_pairs_drop_ties():
    """Prompt 0: scores 1, 3, 2 -> chosen b, rejected a; prompt 1: all 5 -> dropped as a tie."""
    comps = SimpleNamespace(prompts=["p0", "p1"], prompt_index=torch.tensor([0, 0, 0, 1, 1, 1]),
                            texts=["a", "b", "c", "d", "e", "f"])
    pairs, ties = study.best_worst_pairs(comps, [1.0, 3.0, 2.0, 5.0, 5.0, 5.0])
    assert pairs == [{"prompt": "p0", "chosen": "b", "rejected": "a"}] and ties == 1


def test_the_summary_intervals_by_hand():
    """Length ratios 1.5, 2.0, 2.5 at step 8: mean 2.0, sd 0.5, half-width 4.30265 * 0.5 / sqrt(3) = 1.24207."""
    rows = [{"method": "dpo", "seed": s, "step": 8, "length_ratio": r, "length_words": 4, "length_tokens": 4,
             "gold": 0.5, "lc_gold": 0.25} for s, r in enumerate([1.5, 2.0, 2.5])]
    (s,) = study.summarise(rows)
    assert (s["method"], s["step"], s["seeds"]) == ("dpo", 8, 3)
    assert s["length_ratio_mean"] == pytest.approx(2.0)
    assert (s["length_ratio_low"], s["length_ratio_high"]) == pytest.approx((0.75793, 3.24207), abs=1e-4)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        study.LengthStudyConfig(methods=["ppo"])
    with pytest.raises(ValueError, match="gold_model"):
        study.LengthStudyConfig(model="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(ValueError, match="length_alphas"):
        study.LengthStudyConfig(length_alphas=[-1.0])


def test_the_fast_study_writes_every_output(tmp_path):
    """Seed 0, 4 steps of 4 pairs, evaluations at 0, 2, 4: every run x 3 rows, the columns, the files."""
    torch.set_num_threads(1)
    cfg = study.LengthStudyConfig(out_dir=str(tmp_path / "study"), world=str(tmp_path / "world"), fast=True)
    study.run_length_study(cfg)
    out = tmp_path / "study"
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == study.RESULT_COLUMNS
        results = list(reader)
    names = [name for name, *_ in study.runs(cfg)]
    assert names == ["dpo", "ipo", "kto", "orpo", "length_dpo_a0.05", "length_dpo_a0.5", "dpo_gold_pairs"]
    assert [(r["method"], r["step"]) for r in results] == [(n, s) for n in names for s in ("0", "2", "4")]
    for r in results:
        assert float(r["length_words"]) > 0 and math.isfinite(float(r["lc_gold"]))
        assert -1.0 <= float(r["lc_gold"]) <= 1.0 and -1.0 <= float(r["gold"]) <= 1.0
        if r["step"] == "0":
            assert float(r["length_ratio"]) == pytest.approx(1.0)
    summary = study.read_results(out / "summary.csv")
    assert list(summary[0]) == study.SUMMARY_COLUMNS and len(summary) == len(results)
    (pairs,) = study.read_results(out / "pairs.csv")
    assert list(pairs) == study.PAIR_COLUMNS and int(pairs["pairs"]) + int(pairs["ties_dropped"]) == 16
    assert (out / "length.png").stat().st_size > 1000
    assert study.COMMAND in (out / "summary.md").read_text()


def test_the_shipped_config_loads_and_the_command_exists():
    from diffdpo.cli import build_parser
    from diffdpo.config import load_config
    from diffdpo.train import load_train_config

    path = REPO / "configs" / "study_length_tiny.yaml"
    cfg = load_config(study.LengthStudyConfig, path)
    assert cfg.methods == list(study.METHODS) and cfg.seeds == [0, 1, 2] and cfg.length_alphas == [0.05, 0.5]
    assert load_train_config(REPO / cfg.train_config).task == "lm"
    args = build_parser().parse_args(["study-length", "--config", str(path), "fast=true"])
    assert args.overrides == ["fast=true"]


def _reward_model_folder(path: Path) -> Path:
    """A seeded one-output Llama sequence classifier with the tiny tokenizer: the gold of a 'real model' run."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from diffdpo.toy.tiny_lm import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_model_branch_runs_on_local_folders(tmp_path):
    """The real-model keys (model, prompts, eval_prompts, gold_model) on local folders: DPO only, fast."""
    from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, SUBJECTS, prompt_for
    from diffdpo.toy.tiny_lm_long import build_long_world

    torch.set_num_threads(1)
    world = build_long_world(tmp_path / "world", seed=0, sft_steps=20)
    (tmp_path / "train.txt").write_text("\n".join(prompt_for(s) for s in SUBJECTS))
    (tmp_path / "eval.txt").write_text("\n".join(prompt_for(s) for s in EVAL_SUBJECTS))
    cfg = study.LengthStudyConfig(out_dir=str(tmp_path / "study"), model=str(world.model_dir), methods=["dpo"],
                                  prompts=str(tmp_path / "train.txt"), eval_prompts=str(tmp_path / "eval.txt"),
                                  gold_model=str(_reward_model_folder(tmp_path / "rm")), fast=True)
    study.run_length_study(cfg)
    rows = study.read_results(tmp_path / "study" / "results.csv")
    assert [(r["method"], r["step"]) for r in rows] == [("dpo", "0"), ("dpo", "2"), ("dpo", "4")]
    assert all(math.isfinite(float(r["gold"])) for r in rows)

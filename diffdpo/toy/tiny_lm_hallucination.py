"""The tiny review world with hallucinations: a wrong word inside otherwise good reviews, with its span recorded.

The setting of RLHF-V (Yu et al. 2023, arXiv 2312.00849): a model's response is mostly right, one segment is
hallucinated, and an annotator corrects that segment. Here:

* **Language, tokenizer, model**: those of :mod:`diffdpo.toy.tiny_lm` (word-level, tiny Llama).
* **Hallucination**: a *wrong word*, a noun of the world (``hotel``, ``soup``, ...: :data:`WRONG_WORDS`),
  inserted among a review's adjectives: `` good , hotel and warm .``. Reviews otherwise follow the tiny world.
* **Base policy**: SFT on reviews of which ``sft_error_rate`` (0.3) carry one inserted wrong word, so the base
  makes the error about that often.
* **Preference pairs** (``pairs.jsonl``): rejected = a good review with one inserted wrong word; chosen = the
  annotator's correction, the wrong word replaced by a fitting adjective (same sentiment, not already in the
  review). ``rejected_spans`` / ``chosen_spans`` hold the ``[start, end)`` character span of the wrong word
  and of its replacement (:mod:`diffdpo.lm.data`'s span format). In ``rewrite_rate`` (0.5) of the pairs the
  chosen review also swaps one other adjective for another of the same sentiment, a benign rewrite that is
  not annotated: a token diff weighs it like a correction, the spans do not. ``pairs_nospans.jsonl`` holds the
  same pairs without the span columns (the token-diff fallback).
* **Error rate** (:func:`evaluate_errors`): the share of sampled reviews (temperature 1, held-out subjects)
  that contain a wrong word.
* **Task** ``tiny_lm_hallucination`` (:data:`TASK`): the LM task on this world, with the error rate before and
  after training in ``eval.json`` (``diffdpo train --config configs/dense_dpo_tiny.yaml``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.config import help_meta
from diffdpo.task import TaskContext, TaskSpec
from diffdpo.toy import tiny_lm as tiny

#: nouns of the world: never part of a good review
WRONG_WORDS = sorted({w for s in tiny.SUBJECTS + tiny.EVAL_SUBJECTS for w in s.split()} - {"the"})
WORLD_VERSION = 1


def review_spans(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """:func:`diffdpo.toy.tiny_lm.review` of ``words`` and each word's ``[start, end)`` character span in it."""
    text, spans = " ", []
    for i, w in enumerate(words):
        if i:
            text += " and " if i == len(words) - 1 else " , "
        spans.append((len(text), len(text) + len(w)))
        text += w
    text += " ."
    assert text == tiny.review(words)
    return text, spans


def has_error(completion: str) -> bool:
    """True when the completion contains a wrong word."""
    return any(t in WRONG_WORDS for t in completion.replace("<eos>", " ").split())


def well_formed(completion: str) -> bool:
    """True for a review of the world's grammar (`` w1 , w2 and w3 .``) whose words are adjectives or wrong
    words: what a policy that has not broken down writes, with or without the error."""
    toks = completion.replace("<eos>", " ").split()
    if len(toks) < 2 or toks[-1] != "." or len(toks) % 2:
        return False
    words, seps = toks[:-1:2], toks[1:-1:2]
    allowed = set(tiny.POSITIVE) | set(tiny.NEGATIVE) | set(WRONG_WORDS)
    return all(w in allowed for w in words) and seps == [","] * (len(words) - 2) + ["and"] * (len(words) > 1)


def _good_words(rng: random.Random) -> list[str]:
    return tiny._adjectives(rng, rng.random() < 0.5, rng.randint(1, 3))


def _insert_wrong(rng: random.Random, words: list[str]) -> tuple[list[str], int]:
    at = rng.randint(0, len(words))
    return words[:at] + [rng.choice(WRONG_WORDS)] + words[at:], at


def sft_rows(n: int, seed: int, error_rate: float) -> list[dict]:
    """Tiny-world reviews, ``error_rate`` of them with one inserted wrong word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = _good_words(rng)
        if rng.random() < error_rate:
            words, _ = _insert_wrong(rng, words)
        rows.append({"prompt": tiny.prompt_for(rng.choice(tiny.SUBJECTS)), "completion": tiny.review(words)})
    return rows


def preference_rows(n: int, seed: int, rewrite_rate: float = 0.5) -> list[dict]:
    """(corrected, corrupted) pairs with the spans of the correction and of the wrong word (module docstring)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = _good_words(rng)
        positive = words[0] in tiny.POSITIVE
        pool = tiny.POSITIVE if positive else tiny.NEGATIVE
        bad, at = _insert_wrong(rng, words)
        good = list(bad)
        good[at] = rng.choice([w for w in pool if w not in bad])
        if rng.random() < rewrite_rate and len(good) > 1:  # a benign, unannotated rewrite elsewhere
            other = rng.choice([i for i in range(len(good)) if i != at])
            good[other] = rng.choice([w for w in pool if w not in good])
        rejected, rejected_spans = review_spans(bad)
        chosen, chosen_spans = review_spans(good)
        rows.append({"prompt": tiny.prompt_for(rng.choice(tiny.SUBJECTS)), "chosen": chosen, "rejected": rejected,
                     "chosen_spans": [list(chosen_spans[at])], "rejected_spans": [list(rejected_spans[at])]})
    return rows


@dataclass
class HallucinationWorld(tiny.TinyWorld):
    """Paths of a built hallucination world: the tiny world's layout plus the pairs without spans."""

    @property
    def pairs_nospans(self) -> Path:
        return self.root / "pairs_nospans.jsonl"


def build_world(root: str | Path, *, seed: int = 0, n_pairs: int = 512, sft_steps: int = 300,
                sft_error_rate: float = 0.3, rewrite_rate: float = 0.5) -> HallucinationWorld:
    """Build (or reuse, if built with the same settings) the world under ``root``: base model and pairs."""
    world = HallucinationWorld(Path(root))
    stamp = {"version": WORLD_VERSION, "seed": seed, "n_pairs": n_pairs, "sft_steps": sft_steps,
             "sft_error_rate": sft_error_rate, "rewrite_rate": rewrite_rate}
    marker = world.root / "world.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return world
    world.root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(len(tokenizer), seed=seed)
    tiny.sft(model, tokenizer, sft_rows(4096, seed, sft_error_rate), steps=sft_steps, seed=seed)
    model.save_pretrained(world.model_dir)
    tokenizer.save_pretrained(world.model_dir)
    pairs = preference_rows(n_pairs, seed + 1, rewrite_rate)
    tiny._write_jsonl(world.pairs, pairs)
    tiny._write_jsonl(world.pairs_nospans, [{k: v for k, v in r.items() if not k.endswith("_spans")} for r in pairs])
    marker.write_text(json.dumps(stamp))
    return world


def evaluate_errors(model: Any, tokenizer: Any, *, samples_per_prompt: int, seed: int, max_new_tokens: int = 16,
                    ref_model: Any | None = None) -> dict[str, float]:
    """Error rate (share of sampled held-out reviews with a wrong word), well-formed rate (:func:`well_formed`),
    good rate (well-formed and without a wrong word), positive rate, mean words, and with
    ``ref_model`` the KL(model || ref_model) per completion (analytic estimator on the same samples)."""
    import torch

    from diffdpo.lm.generate import sample_completions

    prompts = [tiny.prompt_for(s) for s in tiny.EVAL_SUBJECTS]
    with torch.no_grad():
        comps = sample_completions(model, tokenizer, prompts, n=samples_per_prompt, max_new_tokens=max_new_tokens,
                                   temperature=1.0, seed=seed)
    texts = comps.texts
    errors = sum(has_error(t) for t in texts)
    out = {"eval/errors": float(errors), "eval/n": float(len(texts)), "eval/error_rate": errors / len(texts),
           "eval/well_formed_rate": sum(well_formed(t) for t in texts) / len(texts),
           "eval/good_rate": sum(well_formed(t) and not has_error(t) for t in texts) / len(texts),
           "eval/positive_rate": sum(tiny.judge(t) > 0 for t in texts) / len(texts),
           "eval/length_words": sum(len(t.split()) for t in texts) / len(texts)}
    if ref_model is not None:
        from diffdpo.eval.kl import lm_kl_estimates

        out["eval/kl"] = lm_kl_estimates(model, comps, ref_model=ref_model,
                                         pad_token_id=tokenizer.pad_token_id or 0).value("analytic")
    return out


# ------------------------------------------------------------------------------------------------
# the world as a training task


@dataclass
class HallucinationConfig(tiny.TinyLMConfig):
    """The ``tiny_lm_hallucination:`` section: the tiny LM section on this world."""

    world: str = field(default="runs/tiny_lm_hallucination_world",
                       metadata=help_meta("folder of the hallucination world (built if missing)"))
    spans: bool = field(default=True, metadata=help_meta(
        "train on pairs.jsonl (annotated spans); false = pairs_nospans.jsonl (dense weights from a token diff)"))


class HallucinationTask(tiny.TinyLMTask):
    """The tiny LM task with this world's evaluation: error rate (and positive rate) before and after."""

    def evaluate(self) -> dict[str, float]:
        return evaluate_errors(self.policy.model, self.tokenizer, samples_per_prompt=self.cfg.eval_samples_per_prompt,
                               seed=self.seed)

    def export(self, out_dir: Path) -> None:
        super().export(out_dir)
        result = json.loads((Path(out_dir) / "eval.json").read_text())
        print(f"hallucination world: error rate {result['before']['eval/error_rate']:.3f} -> "
              f"{result['after']['eval/error_rate']:.3f}")


def build_task(cfg: HallucinationConfig, context: TaskContext) -> HallucinationTask:
    """Build the world under ``cfg.world`` (once), point the LM section at it, train on it."""
    world = build_world(cfg.world, seed=context.seed)
    cfg.model.pretrained = cfg.model.pretrained or str(world.model_dir)
    cfg.data.source = cfg.data.source or str(world.pairs if cfg.spans else world.pairs_nospans)
    return HallucinationTask(cfg, **context.kwargs())


TASK = TaskSpec("tiny_lm_hallucination", HallucinationConfig, build_task, default_beta=0.1,
                description="the LM task on the tiny review world with hallucinated words (dense DPO)")

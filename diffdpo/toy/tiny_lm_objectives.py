"""Two conflicting objectives on the tiny review world, for multi-objective alignment (MODPO, arXiv 2310.03708).

The world (:mod:`diffdpo.toy.tiny_lm`: its base model writes 1 to 4 adjectives, positive or negative with equal
probability) gets two gold judges and one preference set per objective:

* **positivity** (objective 0): :func:`diffdpo.toy.tiny_lm.judge`, positive minus negative adjectives, so
  ``good , warm , calm and fresh .`` (4) beats ``good .`` (1), which beats ``bad .`` (-1), which beats
  ``bad , dull and sad .`` (-3);
* **conciseness** (objective 1): minus the completion's words (:func:`diffdpo.rewards.lm.n_words`, the
  tiny world's tokens; MODPO's length objective is ``-token_count``), ``good .`` (-2) beats
  ``good , warm , calm and fresh .`` (-8).

They conflict: the most positive review is the longest one. Each pair is two independent reviews drawn as
the base model writes them (sentiment and length at random, different gold scores), labelled by a
Bradley-Terry draw on the objective's gold score (noisy, as human labels are). ``pairs.jsonl`` holds both sets, its ``objective`` column naming
each pair's objective; :func:`diffdpo.lm.margin.split_objectives` separates them.

Task ``tiny_lm_objectives`` (:data:`TASK`): the ``tiny_lm`` task trained on one objective's set
(``objective``), or on a mixture of both in the proportions ``mixture_weights`` (the mixed-data DPO
baseline of MODPO's paper), evaluated by both gold judges (``eval/gold_positivity``, ``eval/gold_conciseness``).
With ``loss.type=modpo`` and ``lm.margin`` pointing at a DPO model of the other objective it is MODPO.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.config import help_meta
from diffdpo.lm.data import load_rows
from diffdpo.lm.margin import split_objectives
from diffdpo.rewards.lm import n_words
from diffdpo.task import TaskContext, TaskSpec
from diffdpo.toy.tiny_lm import (
    EVAL_SUBJECTS,
    SUBJECTS,
    TinyLMConfig,
    TinyLMTask,
    _adjectives,
    build_world,
    judge,
    prompt_for,
    review,
    sample_reviews,
)

OBJECTIVES = ("positivity", "conciseness")
DATA_VERSION = 2


def positivity(completion: str) -> float:
    """Objective 0's gold judge: positive minus negative adjectives."""
    return judge(completion)


def conciseness(completion: str) -> float:
    """Objective 1's gold judge: minus the number of words (punctuation standing apart counts)."""
    return -float(n_words(completion.replace("<eos>", " ")))


GOLD = {"positivity": positivity, "conciseness": conciseness}


def _base_review(rng: random.Random) -> str:
    """A review as the base model writes them: 1-4 adjectives, positive or negative with equal probability."""
    return review(_adjectives(rng, rng.random() < 0.5))


#: Bradley-Terry scale of each gold score: one adjective's difference is one logit (conciseness: 2 words)
LABEL_SCALE = {"positivity": 1.0, "conciseness": 0.5}


def preference_probability(name: str, a: str, b: str) -> float:
    """P(a beats b) for objective ``name``: Bradley-Terry on its gold score, ``sigma(scale * (s(a) - s(b)))``."""
    return 1.0 / (1.0 + math.exp(-LABEL_SCALE[name] * (GOLD[name](a) - GOLD[name](b))))


def objective_rows(n_per_objective: int, seed: int) -> list[dict]:
    """``n_per_objective`` labelled pairs per objective (prompt, chosen, rejected, objective).

    Two independent base-like reviews with different gold scores, labelled by a draw from the objective's
    Bradley-Terry probability (:func:`preference_probability`): labels are noisy, as people's are, so each
    objective has a finite reward and a trade-off between the two exists (with noiseless labels DPO's reward
    gaps grow without bound and any margin is washed out).
    """
    rng = random.Random(seed)
    rows = []
    for name in OBJECTIVES:
        score = GOLD[name]
        for _ in range(n_per_objective):
            prompt = prompt_for(rng.choice(SUBJECTS))
            a, b = _base_review(rng), _base_review(rng)
            while score(a) == score(b):
                b = _base_review(rng)
            chosen, rejected = (a, b) if rng.random() < preference_probability(name, a, b) else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "objective": name})
    return rows


def build_objective_data(world_root: str | Path, *, seed: int = 0, n_per_objective: int = 512) -> Path:
    """``<world>/objectives/pairs.jsonl`` (both objectives' sets, ``objective`` column), built once per stamp."""
    out = Path(world_root) / "objectives"
    path, marker = out / "pairs.jsonl", out / "data.json"
    stamp = {"version": DATA_VERSION, "seed": seed, "n_per_objective": n_per_objective}
    if path.is_file() and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return path
    out.mkdir(parents=True, exist_ok=True)
    rows = objective_rows(n_per_objective, seed + 101)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    marker.write_text(json.dumps(stamp))
    return path


def mixture_rows(sets: dict[str, list[dict]], weights: list[float], seed: int) -> list[dict]:
    """As many pairs as the first set holds, ``round(w_k * N)`` drawn (without replacement) from set k."""
    n = len(next(iter(sets.values())))
    counts = [round(w * n) for w in weights]
    counts[-1] = n - sum(counts[:-1])
    rng = random.Random(seed)
    rows: list[dict] = []
    for (name, mine), k in zip(sets.items(), counts):
        if k > len(mine):
            raise ValueError(f"mixture: {k} pairs of {name!r} wanted, its set has {len(mine)}")
        rows += rng.sample(mine, k)
    rng.shuffle(rows)
    return rows


def gold_scores(texts: list[str]) -> dict[str, float]:
    """Mean gold score of each objective over ``texts``."""
    return {f"gold_{name}": sum(GOLD[name](t) for t in texts) / len(texts) for name in OBJECTIVES}


def evaluate_objectives(model: Any, tokenizer: Any, *, samples_per_prompt: int, seed: int) -> dict[str, float]:
    """Both gold scores (and the positive rate) of sampled reviews for the held-out subjects, temperature 1."""
    texts = sample_reviews(model, tokenizer, EVAL_SUBJECTS, samples_per_prompt=samples_per_prompt, seed=seed)
    return {**gold_scores(texts), "positive_rate": sum(judge(t) > 0 for t in texts) / len(texts)}


# ------------------------------------------------------------------------------------------------
# the task


@dataclass
class TinyObjectivesConfig(TinyLMConfig):
    """The ``tiny_lm_objectives:`` section: a ``tiny_lm`` section trained on one objective's preferences."""

    objective: str = field(default="positivity", metadata=help_meta(
        "preference set trained on: " + ", ".join(OBJECTIVES) + ", or mixture (mixed-data DPO)"))
    mixture_weights: list[float] = field(default_factory=list, metadata=help_meta(
        "mixture: share of each objective's pairs, in the order " + ", ".join(OBJECTIVES) + "; sum 1"))
    objectives_data: str = field(default="", metadata=help_meta(
        "preference pairs with an 'objective' column; empty = the world's objectives/pairs.jsonl (built)"))
    pairs_per_objective: int = field(default=512, metadata=help_meta("pairs per objective in the built set"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in (*OBJECTIVES, "mixture"):
            raise ValueError(f"tiny_lm_objectives.objective={self.objective!r}: use {', '.join(OBJECTIVES)} or mixture")
        w = self.mixture_weights
        if self.objective == "mixture" and (len(w) != len(OBJECTIVES) or min(w) < 0 or abs(sum(w) - 1) > 1e-6):
            raise ValueError(f"tiny_lm_objectives.mixture_weights={w}: give {len(OBJECTIVES)} shares >= 0 summing "
                             f"to 1 ({', '.join(OBJECTIVES)})")


class TinyObjectivesTask(TinyLMTask):
    """The tiny-world task, evaluated by both objectives' gold judges."""

    def evaluate(self) -> dict[str, float]:
        scores = evaluate_objectives(self.policy.model, self.tokenizer,
                                     samples_per_prompt=self.cfg.eval_samples_per_prompt, seed=self.seed)
        return {"eval/positive_rate": scores["positive_rate"], "eval/gold_positivity": scores["gold_positivity"],
                "eval/gold_conciseness": scores["gold_conciseness"]}


def training_data(cfg: TinyObjectivesConfig, world_root: Path, seed: int) -> Path:
    """The file of the chosen objective's pairs (or of the mixture), split from the multi-objective set."""
    source = cfg.objectives_data or str(build_objective_data(world_root, seed=seed,
                                                             n_per_objective=cfg.pairs_per_objective))
    rows, name = load_rows(source)
    sets = split_objectives(rows, OBJECTIVES, name)
    if cfg.objective == "mixture":
        chosen = mixture_rows(sets, cfg.mixture_weights, seed)
        tag = "mixture-" + "-".join(f"{w:g}" for w in cfg.mixture_weights) + f"-seed{seed}"
    else:
        chosen, tag = sets[cfg.objective], cfg.objective
    text = "".join(json.dumps(r) + "\n" for r in chosen)
    out = world_root / "objectives" / f"{tag}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not out.is_file():  # named by its content: an existing file holds these very pairs
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
        tmp.write_text(text)
        os.replace(tmp, out)
    return out


def build_task(cfg: TinyObjectivesConfig, context: TaskContext) -> TinyObjectivesTask:
    """Build the world and the objectives' data (once), point the section at the chosen set, train on it.

    With ``model.pretrained`` and ``objectives_data`` both given, no world is built (their split files go
    under ``world``)."""
    if cfg.model.pretrained and cfg.objectives_data:
        root = Path(cfg.world)
    else:
        root = build_world(cfg.world, seed=context.seed).root
        cfg.model.pretrained = cfg.model.pretrained or str(root / "model")
    cfg.data.source = cfg.data.source or str(training_data(cfg, root, context.seed))
    return TinyObjectivesTask(cfg, **context.kwargs())


TASK = TaskSpec("tiny_lm_objectives", TinyObjectivesConfig, build_task, default_beta=0.1,
                description="the tiny review world with two conflicting objectives (positivity, conciseness)")

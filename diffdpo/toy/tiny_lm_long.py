"""A variant of the tiny review world whose base model can write long reviews: room for length to grow.

The tiny world (:mod:`diffdpo.toy.tiny_lm`) writes 1 to 4 adjectives, so a policy can at most grow its
reviews 1.6x over the base's mean (2.5 adjectives). The length-exploitation study needs more room: this
world's base model is fine-tuned on reviews of 1 to :data:`MAX_ADJECTIVES` adjectives with a geometric length
distribution (``P(k) ~ 2^-k``: mostly short, long ones rare but seen), so its mean is about 2 adjectives
(4 words) and a policy can reach 8 adjectives (16 words), 4x the base. Same tokenizer and model class as the
tiny world (:func:`~diffdpo.toy.tiny_lm.build_tokenizer`, :func:`~diffdpo.toy.tiny_lm.build_model`).

Each review has a polarity (positive or negative, even odds) and each adjective follows it with
probability 0.8, so reviews are mostly but not always one-sided.

**Gold** (:func:`mean_sentiment`): ``(positive - negative) / (positive + negative)`` adjectives, in [-1, 1]:
how positive a review is, whatever its length. The tiny world's own judge (positive minus negative count)
rewards length by itself (four good adjectives score 4, one scores 1); a gold that does not is needed to
tell length exploitation from real gains.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from diffdpo.toy.tiny_lm import (
    NEGATIVE,
    POSITIVE,
    SUBJECTS,
    TinyWorld,
    build_model,
    build_tokenizer,
    prompt_for,
    review,
    sft,
)

MAX_ADJECTIVES = 8
LONG_WORLD_VERSION = 1


def mean_sentiment(completion: str) -> float:
    """``(positive - negative) / (positive + negative)`` adjectives of a review; 0 without adjectives."""
    toks = completion.replace("<eos>", " ").split()
    pos, neg = sum(t in POSITIVE for t in toks), sum(t in NEGATIVE for t in toks)
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def review_length(rng: random.Random, max_adjectives: int = MAX_ADJECTIVES) -> int:
    """Adjectives in a review: ``P(k) ~ 2^-k`` for k = 1..max_adjectives (mean about 2)."""
    weights = [2.0 ** -k for k in range(1, max_adjectives + 1)]
    return rng.choices(range(1, max_adjectives + 1), weights=weights)[0]


def long_review_rows(n: int, seed: int, max_adjectives: int = MAX_ADJECTIVES) -> list[dict]:
    """SFT rows: a polarity per review, each adjective following it with probability 0.8, no repeats."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        pools = {True: rng.sample(POSITIVE, len(POSITIVE)), False: rng.sample(NEGATIVE, len(NEGATIVE))}
        words = [pools[positive if rng.random() < 0.8 else not positive].pop()
                 for _ in range(review_length(rng, max_adjectives))]
        rows.append({"prompt": prompt_for(rng.choice(SUBJECTS)), "completion": review(words)})
    return rows


def build_long_world(root: str | Path, *, seed: int = 0, sft_steps: int = 400) -> TinyWorld:
    """Build (or reuse, if built with the same version, seed and steps) the long-review world under ``root``:
    tokenizer and base model only (the study samples its own pairs)."""
    world = TinyWorld(Path(root))
    stamp = {"version": LONG_WORLD_VERSION, "kind": "long_reviews", "seed": seed, "sft_steps": sft_steps,
             "max_adjectives": MAX_ADJECTIVES}
    marker = world.root / "world.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return world
    world.root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed)
    sft(model, tokenizer, long_review_rows(8192, seed), steps=sft_steps, seed=seed)
    model.save_pretrained(world.model_dir)
    tokenizer.save_pretrained(world.model_dir)
    marker.write_text(json.dumps(stamp))
    return world

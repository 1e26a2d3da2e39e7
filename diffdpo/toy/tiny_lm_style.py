"""A "stronger generator" with a style of its own for the tiny review world, and adversarial pairs against it.

"More is Less" (Wang et al. 2025, arXiv 2504.02193): chosen completions from a stronger model and rejected
ones from the policy itself make preference pairs a linear probe tells apart too easily, and DPO on them
learns the shortcut. In the tiny world (:mod:`diffdpo.toy.tiny_lm`) the stronger generator is a program that
always writes a good review in one recognisable **form**: exactly :data:`STYLE_ADJECTIVES` distinct positive
adjectives in alphabetical order (`` bright , fresh , good and warm .``). The tiny world's policy writes 1-4
adjectives in any order, so length and order are the style's marks.

**Adversarial pairs** (:func:`adversarial_pairs`) put the style and the gold in disagreement: the gold-better
completion is short and positive (1 or 2 positive adjectives, never in the style's form), the gold-worse one
has the style's form (4 adjectives, alphabetical, hence longer) but mixed or negative content (2 positive + 2
negative, gold 0, or 1 positive + 3 negative, gold -2). A model that learnt "the style is good" ranks the
rejected one first; one that learnt the sentiment ranks the chosen one first.
"""

from __future__ import annotations

import random

from diffdpo.toy.tiny_lm import NEGATIVE, POSITIVE, prompt_for, review

STYLE_ADJECTIVES = 4


def adjectives(text: str) -> list[str]:
    """The review's adjectives in order."""
    return [t for t in text.replace("<eos>", " ").split() if t in POSITIVE or t in NEGATIVE]


def has_style_form(text: str) -> bool:
    """The stronger generator's form: exactly 4 distinct adjectives in alphabetical order (any sentiment)."""
    adjs = adjectives(text)
    return len(adjs) == STYLE_ADJECTIVES and adjs == sorted(set(adjs))


def style_review(rng: random.Random) -> str:
    """What the stronger generator writes: 4 distinct positive adjectives, alphabetical (gold 4)."""
    return review(sorted(rng.sample(POSITIVE, STYLE_ADJECTIVES)))


def adversarial_pairs(subjects: list[str], per_subject: int, seed: int) -> list[dict[str, str]]:
    """``per_subject`` pairs per subject: chosen short and positive, rejected in the style's form and worse by
    the gold (see the module docstring)."""
    rng = random.Random(seed)
    rows = []
    for subject in subjects:
        for i in range(per_subject):
            n_good = 1 + i % 2
            good = rng.sample(POSITIVE, n_good)
            if n_good == 2:
                good = sorted(good, reverse=True)  # not alphabetical: no part of the style
            n_pos = 2 if i % 4 < 2 else 1  # gold 0 or -2
            bad = sorted(rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, STYLE_ADJECTIVES - n_pos))
            rows.append({"prompt": prompt_for(subject), "chosen": review(good), "rejected": review(bad)})
    return rows


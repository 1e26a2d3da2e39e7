"""Every seed of a DSO run, from one layout with disjoint blocks (asserted, and tested for 12 rounds).

Sampling seeds (one per generated object) live in blocks of 1,000,000:

* run seed ``S``, round ``r`` (1 <= r <= 998) owns the block starting at ``S * 10**9 + b(S, r) * 10**6``,
  with ``b(S, r) = r``, except that for ``S = 0`` rounds from 10 on move up one block: block 10 of run
  seed 0 holds the held-out evaluation set (:func:`diffdpo.dso.evaluate.held_out_seed`, where it has
  always been, so earlier results reproduce). Inside a round's block:
  training samples ``c * 10_000 + i`` (below 500,000) and validation samples
  ``500_000 + try * 100_000 + c * 10_000 + i`` (one sub-block per backtracking try);
* held-out evaluation: ``10_000_000 + c * 100_000 + i``, the same for every run seed.

Other randomness of a round (pair subsampling, training noise, fresh training objects) is seeded by
:func:`round_seed` ``= S * 1000 + r``, injective because ``r < 1000``; these seed other streams
than the generator's sampling noise.
"""

from __future__ import annotations

from diffdpo.dso.evaluate import held_out_seed

BLOCK = 1_000_000
RUN_BLOCK = 1_000_000_000
MAX_ROUND = 998
MAX_CLASSES = 10
MAX_PER_CLASS = 10_000
VALIDATION_OFFSET = 500_000
MAX_TRIES = 5


def _check(seed: int, round_index: int, condition: int, index: int) -> None:
    if seed < 0 or not 1 <= round_index <= MAX_ROUND:
        raise ValueError(f"DSO seeds need run seed >= 0 and 1 <= round <= {MAX_ROUND}, got {seed}, {round_index}")
    if not (0 <= condition < MAX_CLASSES and 0 <= index < MAX_PER_CLASS):
        raise ValueError(f"DSO seeds need at most {MAX_CLASSES} classes and {MAX_PER_CLASS} samples per class and "
                         f"round, got class {condition}, sample {index}")


def round_block(seed: int, round_index: int) -> int:
    """First sampling seed of round ``round_index``'s block (see the module docstring)."""
    b = round_index + 1 if seed == 0 and round_index >= 10 else round_index
    return seed * RUN_BLOCK + b * BLOCK


def train_seed(seed: int, round_index: int, condition: int, index: int) -> int:
    """Sampling seed of training sample ``index`` of ``condition`` in round ``round_index``."""
    _check(seed, round_index, condition, index)
    return round_block(seed, round_index) + condition * 10_000 + index


def validation_seed(seed: int, round_index: int, condition: int, index: int, attempt: int = 0) -> int:
    """Sampling seed of validation sample ``index`` of ``condition``, backtracking try ``attempt``."""
    _check(seed, round_index, condition, index)
    if not 0 <= attempt < MAX_TRIES:
        raise ValueError(f"validation try must be in [0, {MAX_TRIES - 1}], got {attempt}")
    return round_block(seed, round_index) + VALIDATION_OFFSET + attempt * 100_000 + condition * 10_000 + index


def eval_seed(condition: int, index: int) -> int:
    """Sampling seed of held-out sample ``index`` of ``condition`` (every run seed, every round)."""
    return held_out_seed(condition, index)


def round_seed(seed: int, round_index: int) -> int:
    """Seed of round ``round_index``'s other randomness (pairs, training noise, fresh training objects)."""
    if seed < 0 or not 0 <= round_index <= MAX_ROUND:
        raise ValueError(f"round_seed needs run seed >= 0 and 0 <= round <= {MAX_ROUND}, got {seed}, {round_index}")
    return seed * 1000 + round_index

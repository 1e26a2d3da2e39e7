"""The tiny LM world's exact oracle as an annotator (:mod:`diffdpo.rewards.lm`'s interfaces): it lives
beside its world because the library (``diffdpo.rewards``) imports no toy world."""

from __future__ import annotations

from diffdpo.rewards.lm import ProgramJudge
from diffdpo.toy.tiny_lm import judge


class TinyWorldJudge(ProgramJudge):
    """Reward = :func:`diffdpo.toy.tiny_lm.judge` of the completion (positive minus negative adjectives;
    the prompt plays no part). As a preference model (:meth:`prefer`): 1.0 / 0.5 / 0.0 by comparing rewards."""

    def __init__(self) -> None:
        super().__init__(lambda prompt, completion: judge(completion), name="tiny world judge")

"""Text-to-image reward models with one batched interface, ``scorer(images, prompts) -> scores`` (a float32
tensor ``(N,)``, image ``i`` scored against ``prompts[i]``): what :func:`diffdpo.data.relabel.relabel_pairs`
takes to relabel pairs by AI feedback. Weights load only from local paths or hub ids you pass; open_clip and
transformers are imported only when a scorer is built. See docs/rewards.md.
LM annotators (reward and preference models, judges): :mod:`diffdpo.rewards.lm`; training them: :mod:`.reward_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from diffdpo.rewards.base import Scorer, WeightsError
from diffdpo.rewards.open_clip_scorers import (
    AestheticMLP,
    ClipScore,
    HPSv2,
    LaionAesthetic,
    load_aesthetic_head,
)
from diffdpo.rewards.pickscore import PickScore

ScorerName = Literal["clip", "pickscore", "hpsv2", "aesthetic"]
SCORER_NAMES: tuple[str, ...] = get_args(ScorerName)


def build_scorer(name: ScorerName, path: str | Path, **kw: Any) -> Scorer:
    """The scorer ``name`` with weights at ``path``; ``kw`` goes to its class (``device``, ``dtype``,
    ``batch_size``, ``arch``, ...).

    * ``clip``: :class:`ClipScore`, ``path`` = open_clip weights file, ``arch=`` its architecture.
    * ``pickscore``: :class:`PickScore`, ``path`` = CLIPModel folder or hub id, ``processor_path=``.
    * ``hpsv2``: :class:`HPSv2`, ``path`` = HPS weights file (``arch`` default ``ViT-H-14``).
    * ``aesthetic``: :class:`LaionAesthetic`, ``path`` = MLP head weights, ``clip_path=`` CLIP ViT-L/14 weights.
    """
    if name == "clip":
        return ClipScore(path, **kw)
    if name == "pickscore":
        return PickScore(path, **kw)
    if name == "hpsv2":
        return HPSv2(path, **kw)
    if name == "aesthetic":
        if "clip_path" not in kw:
            raise ValueError("aesthetic: pass clip_path=... (the CLIP ViT-L/14 weights the head reads embeddings of)")
        return LaionAesthetic(path, **kw)
    raise ValueError(f"unknown scorer {name!r}; use one of {', '.join(SCORER_NAMES)}")


__all__ = ["SCORER_NAMES", "AestheticMLP", "ClipScore", "HPSv2", "LaionAesthetic", "PickScore", "Scorer",
           "ScorerName", "WeightsError", "build_scorer", "load_aesthetic_head"]

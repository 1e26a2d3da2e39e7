"""The tiny LM world as an online task (``tiny_lm_online``): online DPO / SLiC / IPO and IPO-MD on CPU.

The policy writes reviews for the world's ``SUBJECTS`` (``review : the soup was``), an annotator judges
pairs of them, and the loop trains on the labels (:class:`diffdpo.online.lm.OnlineLMTask`). Annotators:

* ``exact``: the world's oracle (:class:`diffdpo.toy.tiny_lm_judge.TinyWorldJudge`), as a preference model
  1 / 0.5 / 0 (more positive than negative adjectives wins);
* ``noisy``: :class:`diffdpo.rewards.lm.NoisyJudge` around the oracle (``flip_rate``, ``length_bias``), the
  proxy judge of over-optimisation studies;
* ``reward_model`` / ``preference_model``: an HF sequence classifier by ``path`` (as in ``lm_online``).

The gold judge of the evaluation is always the exact oracle: the win rate of the policy's reviews
against the reference's on ``EVAL_SUBJECTS`` (same prompt and generator), plus the positive rate of
both. ``diffdpo train --config configs/lm_online_ipo_tiny.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffdpo.config import help_meta
from diffdpo.losses import GROUP_LOSS_TYPES
from diffdpo.online.lm import (
    AnnotatorConfig,
    OnlineLMConfig,
    OnlineLMTask,
    Preferences,
    Rewards,
    build_annotator,
    build_reward_model,
)
from diffdpo.task import TaskContext, TaskSpec
from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, SUBJECTS, TinyWorld, build_world, judge, prompt_for


@dataclass
class TinyAnnotatorConfig(AnnotatorConfig):
    kind: Literal["exact", "noisy", "reward_model", "preference_model"] = field(
        default="exact", metadata=help_meta("exact (the oracle) | noisy (NoisyJudge) | reward_model | preference_model"))
    flip_rate: float = field(default=0.0, metadata=help_meta("noisy: share of labels flipped"))
    length_bias: float = field(default=0.0, metadata=help_meta("noisy: reward added per word of the completion"))
    seed: int = field(default=0, metadata=help_meta("noisy: seed of the flips"))


@dataclass
class TinyLMOnlineConfig(OnlineLMConfig):
    """The ``tiny_lm_online:`` section: an ``lm_online`` section on the built tiny world."""

    world: str = field(default="runs/tiny_lm_world", metadata=help_meta("folder of the tiny world (built if missing)"))
    annotator: TinyAnnotatorConfig = field(default_factory=TinyAnnotatorConfig)


def tiny_annotator(cfg: TinyAnnotatorConfig, device: Any = "cpu") -> Preferences:
    from diffdpo.rewards.lm import NoisyJudge
    from diffdpo.toy.tiny_lm_judge import TinyWorldJudge

    if cfg.kind == "exact":
        return TinyWorldJudge().prefer
    if cfg.kind == "noisy":
        return NoisyJudge(TinyWorldJudge(), flip_rate=cfg.flip_rate, length_bias=cfg.length_bias, seed=cfg.seed).prefer
    return build_annotator(cfg, device)


def tiny_reward_model(cfg: TinyAnnotatorConfig, device: Any = "cpu") -> Rewards:
    """The annotator's raw rewards (GRAO's ``online.group_reward=raw``): the oracle's score, NoisyJudge's biased
    score (its flips are a preference-only notion), or an HF reward model."""
    from diffdpo.rewards.lm import NoisyJudge
    from diffdpo.toy.tiny_lm_judge import TinyWorldJudge

    if cfg.kind == "exact":
        return TinyWorldJudge()
    if cfg.kind == "noisy":
        return NoisyJudge(TinyWorldJudge(), flip_rate=cfg.flip_rate, length_bias=cfg.length_bias, seed=cfg.seed)
    return build_reward_model(cfg, device)


def write_prompts(root: Path) -> tuple[Path, Path]:
    """``prompts.jsonl`` (SUBJECTS) and ``eval_prompts.jsonl`` (EVAL_SUBJECTS) in the world folder."""
    paths = root / "prompts.jsonl", root / "eval_prompts.jsonl"
    for path, subjects in zip(paths, (SUBJECTS, EVAL_SUBJECTS)):
        text = "".join(json.dumps({"prompt": prompt_for(s)}) + "\n" for s in subjects)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return paths


class TinyLMOnlineTask(OnlineLMTask):
    """:class:`OnlineLMTask` on the tiny world, with the judged positive rate in the evaluation."""

    def extra_eval(self, prompts: list[str], policy_texts: list[str], ref_texts: list[str]) -> dict[str, float]:
        return {"eval/positive_rate": sum(judge(t) > 0 for t in policy_texts) / len(policy_texts),
                "eval/base_positive_rate": sum(judge(t) > 0 for t in ref_texts) / len(ref_texts)}


def build_task(cfg: TinyLMOnlineConfig, context: TaskContext) -> TinyLMOnlineTask:
    """Build the world under ``cfg.world`` (once), write its prompt files, point the section at them."""
    from diffdpo.rewards.lm import ProgramJudge
    from diffdpo.toy.tiny_lm_judge import TinyWorldJudge

    root = Path(cfg.world)
    # a world already built (with any settings) is used as it is: rebuilding it would also draw from the
    # global RNG before the LoRA adapter is initialised, so a run would depend on whether the world existed
    world = TinyWorld(root) if (root / "world.json").is_file() else build_world(root, seed=context.seed)
    prompts, eval_prompts = write_prompts(world.root)
    cfg.model.pretrained = cfg.model.pretrained or str(world.model_dir)
    group = context.loss_type in GROUP_LOSS_TYPES  # GRAO: prompts with reference answers (the pairs' chosen)
    cfg.data.source = cfg.data.source or str(world.pairs if group else prompts)
    cfg.online.eval_source = cfg.online.eval_source or str(eval_prompts)
    gold: ProgramJudge = TinyWorldJudge()
    return TinyLMOnlineTask(cfg, **context.kwargs(),
                            annotator=tiny_annotator(cfg.annotator, context.accelerator.device), gold=gold.prefer,
                            gold_reward=gold, reward=(tiny_reward_model(cfg.annotator, context.accelerator.device)
                                                      if group and cfg.online.group_reward == "raw" else None))


TASK = TaskSpec("tiny_lm_online", TinyLMOnlineConfig, build_task, default_beta=0.1,
                description="online DPO / SLiC / IPO, IPO-MD and GRAO on the embedded tiny review world")

"""The tiny review world as a controllable-generation task (``tiny_lm_control``): MEET on CPU.

Two controls, ``good`` (write a positive review) and ``bad`` (write a negative one), trained from the world's
preference pairs (chosen -> ``good``, rejected -> ``bad``) or from its reviews rated by the judge
(``ratings.jsonl``: ``rating`` = ``positive`` / ``negative``, mapped to the controls by ``control.levels``).

**Controllability** (:func:`evaluate_controls`): for each control, sampled reviews of the held-out subjects
(``EVAL_SUBJECTS``) with that control before the prompt; the share whose judged attribute matches the control
(``good``: more positive than negative adjectives, ``bad``: more negative than positive), and the control's own
gold score, the judge's score signed toward the control (``good``: positive minus negative adjectives, ``bad``:
negative minus positive). The base model ignores controls and writes about half positive reviews.

``diffdpo train --config configs/meet_tiny_stage1.yaml`` then ``configs/meet_tiny_stage2.yaml``; the comparison
with the baselines over seeds is ``diffdpo meet --config configs/meet_tiny.yaml`` (:mod:`diffdpo.recipes.meet`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffdpo.config import help_meta
from diffdpo.lm.control import ControlLMConfig, ControlLMTask, generate_with_control
from diffdpo.task import TaskContext, TaskSpec
from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, TinyWorld, build_world, judge, prompt_for

#: the judged attribute each control of this world asks for: the sign of the judge's score
CONTROL_SIGNS = {"good": 1, "bad": -1}


def write_ratings(world: TinyWorld) -> Path:
    """``ratings.jsonl`` in the world folder: the unpaired reviews with ``rating`` = positive / negative (judge)."""
    path = world.root / "ratings.jsonl"
    rows = [json.loads(line) for line in world.unpaired.read_text().splitlines() if line.strip()]
    text = "".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"],
                               "rating": "positive" if judge(r["completion"]) > 0 else "negative"}) + "\n"
                   for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def evaluate_controls(model: Any, tokenizer: Any, controls: dict[str, str], *, samples_per_prompt: int,
                      max_new_tokens: int = 16, seed: int = 1234, subjects: Sequence[str] = EVAL_SUBJECTS
                      ) -> dict[str, dict[str, float]]:
    """Per control name: ``controllability`` (share of samples whose judged sign matches the control's),
    ``gold_score`` (mean judge score times the control's sign), ``judge_score`` (mean judge score), ``n``.

    ``controls`` maps a name of :data:`CONTROL_SIGNS` to the text written before the prompt. Samples at
    temperature 1 without filters, the same generator per (prompt, sample) row for every control.
    """
    unknown = sorted(set(controls) - set(CONTROL_SIGNS))
    if unknown:
        raise ValueError(f"the tiny world judges the controls {sorted(CONTROL_SIGNS)}; no attribute for {unknown}")
    prompts = [prompt_for(s) for s in subjects]
    out = {}
    for name, prefix in controls.items():
        sign = CONTROL_SIGNS[name]
        done = generate_with_control(model, tokenizer, prompts, prefix, n=samples_per_prompt,
                                     max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
        scores = [judge(t) for t in done.texts]
        out[name] = {"controllability": sum(s * sign > 0 for s in scores) / len(scores),
                     "gold_score": sum(s * sign for s in scores) / len(scores),
                     "judge_score": sum(scores) / len(scores), "n": float(len(scores))}
    return out


@dataclass
class TinyLMControlConfig(ControlLMConfig):
    """The ``tiny_lm_control:`` section: an ``lm_control`` section on the built tiny world."""

    world: str = field(default="runs/tiny_lm_world", metadata=help_meta("folder of the tiny world (built if missing)"))
    data_kind: Literal["pairs", "ratings"] = field(default="pairs", metadata=help_meta(
        "default data: pairs (chosen -> control.chosen) | ratings (ratings.jsonl; set control.column=rating, levels)"))
    eval_samples_per_prompt: int = field(default=16, metadata=help_meta(
        "sampled reviews per held-out prompt and control for eval.json; 0 = no evaluation"))


class TinyLMControlTask(ControlLMTask):
    """:class:`diffdpo.lm.control.ControlLMTask` on the tiny world; ``evaluate()`` gives the controllability of each
    control, and the export writes it before and after training to ``eval.json``."""

    def __init__(self, cfg: TinyLMControlConfig, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        judged = [n for n in cfg.control.names if n in CONTROL_SIGNS]
        self.judged = {n: p for n, p in self.controls().items() if n in judged}
        self.initial_eval = self.evaluate()

    def evaluate(self) -> dict[str, float]:
        if not self.cfg.eval_samples_per_prompt or not self.judged:
            return {}
        res = evaluate_controls(self.policy.model, self.tokenizer, self.judged,
                                samples_per_prompt=self.cfg.eval_samples_per_prompt, seed=self.seed)
        return {f"eval/{k}/{name}": v for name, r in res.items() for k, v in r.items() if k != "n"}

    def export(self, out_dir: Path) -> None:
        super().export(out_dir)
        if self.initial_eval:
            result = {"before": self.initial_eval, "after": self.evaluate()}
            (Path(out_dir) / "eval.json").write_text(json.dumps(result, indent=1))
            print("tiny-world controllability: " + ", ".join(
                f"{n} {result['before'][f'eval/controllability/{n}']:.3f} -> "
                f"{result['after'][f'eval/controllability/{n}']:.3f}" for n in self.judged))


def build_task(cfg: TinyLMControlConfig, context: TaskContext) -> TinyLMControlTask:
    """Build the world under ``cfg.world`` (once), point the section's model and data at it, train on it."""
    root = Path(cfg.world)
    world = TinyWorld(root) if (root / "world.json").is_file() else build_world(root, seed=context.seed)
    cfg.model.pretrained = cfg.model.pretrained or str(world.model_dir)
    if not cfg.data.source:
        cfg.data.source = str(write_ratings(world) if cfg.data_kind == "ratings" else world.pairs)
    return TinyLMControlTask(cfg, **context.kwargs())


TASK = TaskSpec("tiny_lm_control", TinyLMControlConfig, build_task, default_beta=0.1,
                description="controllable generation (MEET) on the embedded tiny review world: good / bad controls")

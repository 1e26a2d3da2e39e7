"""MEET (Xue et al. 2023, "Parameter-Efficient Tuning Helps Language Model Alignment", arXiv 2310.00819) against
its baselines on the tiny review world, several seeds.

``diffdpo meet --config configs/meet_tiny.yaml`` trains, for every seed of ``seeds``, each method of ``methods``
through the shipped configs and the one training loop (task ``tiny_lm_control``, loss ``sft``):

* ``meet``: stage 1 (``configs/meet_tiny_stage1.yaml``) tunes only the control tokens ``<ctrl:good>`` /
  ``<ctrl:bad>`` (peft Trainable Tokens, model frozen) for ``stage1_steps`` at ``stage1_lr``; stage 2
  (``configs/meet_tiny_stage2.yaml``) fine-tunes the whole model from stage 1's output for ``stage2_steps`` at
  ``model_lr``;
* ``joint``: the prior-work form, control tokens and model trained together from the base for
  ``stage1_steps + stage2_steps`` at ``model_lr`` (the stage-2 config on the base model);
* ``text``: hand-written text controls (``texts``, Chain-of-Hindsight style, e.g. ``good review :``) written
  before the prompt, the model trained the same steps at ``model_lr``.

Each trained ``final/`` folder is loaded back with stock transformers (:func:`diffdpo.lm.control.load_control_model`)
and evaluated on the held-out subjects (:func:`diffdpo.toy.tiny_lm_control.evaluate_controls`): per control, the
controllability (share of samples whose judged sign matches the control) and the control's own gold score.
Every method sees the same data (the world's pairs, or its judged ratings with ``data: ratings``), batch size and
number of optimizer steps; seed ``s`` uses the world built with seed ``s`` (as ``diffdpo study-online``).

Outputs under ``out_dir``: ``results.csv`` (method, seed, control), ``summary.csv`` (per method and control, and
the mean over controls: mean over seeds with a 95% t-interval), ``meet.png`` and ``summary.md`` (the table, the
goal check, the command).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffdpo.config import help_meta
from diffdpo.recipes.studies.common import read_csv, t_interval, write_csv

read_results = read_csv  # the name the notebook and tests use

METHODS = ("meet", "joint", "text")
RESULT_COLUMNS = ["method", "seed", "control", "steps", "controllability", "gold_score", "judge_score", "n"]
SUMMARY_COLUMNS = ["method", "control", "seeds", "controllability_mean", "controllability_t_low",
                   "controllability_t_high", "gold_score_mean", "gold_score_t_low", "gold_score_t_high"]


@dataclass
class MEETConfig:
    """The ``diffdpo meet`` recipe on the tiny world."""

    out_dir: str = field(default="runs/meet_tiny", metadata=help_meta("runs, CSVs, PNG and summary.md go here"))
    world: str = field(default="runs/tiny_lm_world", metadata=help_meta("tiny world of seed 0; seed s uses <world>_seed<s>"))
    configs_dir: str = field(default="", metadata=help_meta("folder of the stage configs; empty = the repository's configs/"))
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata=help_meta(
        "methods: meet (controls first, then the model), joint (together from the start), text (hand-written controls)"))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=help_meta("seeds (world and training)"))
    data: Literal["pairs", "ratings"] = field(default="pairs", metadata=help_meta(
        "pairs (chosen -> good, rejected -> bad) or ratings (pointwise, rating column mapped to the controls)"))
    stage1_steps: int = field(default=24, metadata=help_meta("MEET stage 1 steps (control tokens only)"))
    stage2_steps: int = field(default=24, metadata=help_meta("MEET stage 2 steps (the model); baselines get both sums"))
    stage1_lr: float = field(default=0.1, metadata=help_meta("learning rate of the control tokens in stage 1"))
    model_lr: float = field(default=3e-5, metadata=help_meta("learning rate of the model (stage 2 and the baselines)"))
    per_device_batch_size: int = field(default=16, metadata=help_meta("examples per step, every method"))
    texts: dict[str, str] = field(default_factory=lambda: {"good": "good review :", "bad": "bad review :"},
                                  metadata=help_meta("the text baseline's control texts"))
    eval_samples_per_prompt: int = field(default=32, metadata=help_meta("samples per held-out prompt and control"))
    max_new_tokens: int = field(default=16, metadata=help_meta("sampled tokens per completion"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples"))
    fast: bool = field(default=False, metadata=help_meta("tests: first seed only, 2 + 2 steps of 4 examples, 4 samples"))

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; use some of {', '.join(METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        if self.fast:
            self.seeds, self.stage1_steps, self.stage2_steps, self.per_device_batch_size = self.seeds[:1], 2, 2, 4
            self.eval_samples_per_prompt, self.max_new_tokens = 4, 8
        if min(self.stage1_steps, self.stage2_steps, self.per_device_batch_size, self.eval_samples_per_prompt) < 1:
            raise ValueError("stage1_steps, stage2_steps, per_device_batch_size and eval_samples_per_prompt must be >= 1")
        if not (self.stage1_lr > 0 and self.model_lr > 0):
            raise ValueError("stage1_lr and model_lr must be > 0")


def _configs_dir(cfg: MEETConfig) -> Path:
    return Path(cfg.configs_dir) if cfg.configs_dir else Path(__file__).resolve().parents[2] / "configs"


# ------------------------------------------------------------------------------------------------
# training


def _overrides(cfg: MEETConfig, seed: int, world: Path, run_dir: Path, steps: int, lr: float) -> list[str]:
    out = [f"output_dir={run_dir}", f"seed={seed}", f"max_steps={steps}", f"optim.lr={lr}",
           f"per_device_batch_size={cfg.per_device_batch_size}", "gradient_accumulation_steps=1", "progress_bar=false",
           "tensorboard=false", "checkpoint_every=0", "eval_every=0", "overwrite=true",
           f"tiny_lm_control.world={world}", "tiny_lm_control.eval_samples_per_prompt=0"]
    if cfg.data == "ratings":
        out += ["tiny_lm_control.data_kind=ratings", "tiny_lm_control.control.column=rating",
                "tiny_lm_control.control.levels={positive: good, negative: bad}"]
    return out


def _train(path: Path, overrides: list[str]) -> Path:
    from diffdpo.train import load_train_config, run, setup

    result = run(setup(load_train_config(path, overrides)))
    assert result.final_dir is not None
    return result.final_dir


def train_method(cfg: MEETConfig, method: str, seed: int, world: Path, run_dir: Path) -> Path:
    """Train one method on one seed (see the module docstring); its exported ``final/`` folder."""
    stage1, stage2 = _configs_dir(cfg) / "meet_tiny_stage1.yaml", _configs_dir(cfg) / "meet_tiny_stage2.yaml"
    total = cfg.stage1_steps + cfg.stage2_steps
    base = f"tiny_lm_control.model.pretrained={world / 'model'}"
    if method == "meet":
        controls = _train(stage1, [*_overrides(cfg, seed, world, run_dir / "stage1", cfg.stage1_steps, cfg.stage1_lr),
                                   base])
        return _train(stage2, [*_overrides(cfg, seed, world, run_dir / "stage2", cfg.stage2_steps, cfg.model_lr),
                               f"tiny_lm_control.model.pretrained={controls}"])
    extra = [base]
    if method == "text":
        texts = ", ".join(f"{k}: {json.dumps(v)}" for k, v in cfg.texts.items())
        extra += ["tiny_lm_control.control.mode=text", f"tiny_lm_control.control.texts={{{texts}}}"]
    return _train(stage2, [*_overrides(cfg, seed, world, run_dir, total, cfg.model_lr), *extra])


def run_one(cfg: MEETConfig, method: str, seed: int) -> list[dict[str, Any]]:
    """Build (or reuse) the seed's world, train the method, evaluate its saved model; one row per control."""
    import torch

    from diffdpo.lm.control import load_control_model
    from diffdpo.recipes.studies.online import world_root
    from diffdpo.toy.tiny_lm import build_world
    from diffdpo.toy.tiny_lm_control import evaluate_controls

    world = build_world(world_root(cfg, seed), seed=seed)  # type: ignore[arg-type] (only cfg.world is read)
    final = train_method(cfg, method, seed, world.root, Path(cfg.out_dir) / "runs" / method / f"seed{seed}")
    model, tokenizer, controls = load_control_model(final)
    with torch.no_grad():
        res = evaluate_controls(model, tokenizer, controls, samples_per_prompt=cfg.eval_samples_per_prompt,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed)
    steps = cfg.stage1_steps + cfg.stage2_steps
    return [{"method": method, "seed": seed, "control": name, "steps": steps, **r} for name, r in res.items()]


# ------------------------------------------------------------------------------------------------
# summary


def _with_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` plus, per (method, seed), a ``mean`` row averaging the controls."""
    out = list(rows)
    for method, seed in dict.fromkeys((r["method"], r["seed"]) for r in rows):
        mine = [r for r in rows if r["method"] == method and r["seed"] == seed and r["control"] != "mean"]
        if mine and not any(r["method"] == method and r["seed"] == seed and r["control"] == "mean" for r in rows):
            out.append({"method": method, "seed": seed, "control": "mean",
                        **{k: sum(float(r[k]) for r in mine) / len(mine) for k in ("controllability", "gold_score")}})
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and control (and ``mean`` over controls): mean over seeds with a 95% t-interval."""
    rows = _with_means(rows)
    out = []
    for method, control in dict.fromkeys((r["method"], r["control"]) for r in rows):
        mine = [r for r in rows if r["method"] == method and r["control"] == control]
        c, c_low, c_high = t_interval([float(r["controllability"]) for r in mine])
        g, g_low, g_high = t_interval([float(r["gold_score"]) for r in mine])
        out.append({"method": method, "control": control, "seeds": len(mine), "controllability_mean": c,
                    "controllability_t_low": c_low, "controllability_t_high": c_high, "gold_score_mean": g,
                    "gold_score_t_low": g_low, "gold_score_t_high": g_high})
    return sorted(out, key=lambda s: (METHODS.index(s["method"]) if s["method"] in METHODS else 99, s["control"] == "mean"))


def check_goal(rows: list[dict[str, Any]]) -> tuple[str, bool | None, str]:
    """Issue 16's goal: MEET beats the joint-training baseline on controllability (mean over controls) on every
    seed. Returns (the goal, met or not or None when a method is missing, the per-seed numbers and the mean
    difference with its 95% t-interval)."""
    goal = "MEET beats the joint-training baseline on controllability (mean over controls) on every seed"
    means = {(r["method"], int(r["seed"])): float(r["controllability"]) for r in _with_means(rows)
             if r["control"] == "mean"}
    seeds = sorted({s for m, s in means if m == "meet"} & {s for m, s in means if m == "joint"})
    if not seeds:
        return goal, None, "meet or joint missing"
    diffs = [means[("meet", s)] - means[("joint", s)] for s in seeds]
    d, low, high = t_interval(diffs)
    detail = ("; ".join(f"seed {s}: {means[('meet', s)]:.3f} vs {means[('joint', s)]:.3f}" for s in seeds)
              + f"; difference {d:+.3f} [{low:+.3f}, {high:+.3f}] (95% t)")
    return goal, all(x > 0 for x in diffs), detail


def plot_meet(summary: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Controllability per method and control (bars, 95% t-intervals); saved to ``path`` if given."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left as it is

    controls = list(dict.fromkeys(s["control"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        mine = {s["control"]: s for s in summary if s["method"] == method}
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(controls))]
        ys = [mine[c]["controllability_mean"] if c in mine else math.nan for c in controls]
        err = [[0 if math.isnan(mine[c]["controllability_t_low"]) else y - mine[c]["controllability_t_low"]
                for c, y in zip(controls, ys)],
               [0 if math.isnan(mine[c]["controllability_t_high"]) else mine[c]["controllability_t_high"] - y
                for c, y in zip(controls, ys)]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=method)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(controls)), controls)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("controllability (judged attribute = control)")
    ax.set_title("tiny world, held-out prompts (mean over seeds, 95% t)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def format_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    def f(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.3f}"

    lines = ["| method | control | seeds | controllability (mean, 95% t) | gold score (mean, 95% t) |",
             "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['control']} | {s['seeds']} | {f(s['controllability_mean'])} "
                     f"[{f(s['controllability_t_low'])}, {f(s['controllability_t_high'])}] | "
                     f"{f(s['gold_score_mean'])} [{f(s['gold_score_t_low'])}, {f(s['gold_score_t_high'])}] |")
    return "\n".join(lines)


def _markdown(cfg: MEETConfig, summary: list[dict[str, Any]], goal: tuple[str, bool | None, str]) -> str:
    verdict = {True: "met", False: "not met", None: "not checked"}[goal[1]]
    return "\n".join([
        format_table(summary), "", f"Goal (issue 16): {goal[0]}: **{verdict}** ({goal[2]}).", "",
        f"Steps: MEET {cfg.stage1_steps} (controls, lr {cfg.stage1_lr:g}) + {cfg.stage2_steps} (model, lr "
        f"{cfg.model_lr:g}); joint and text {cfg.stage1_steps + cfg.stage2_steps} (lr {cfg.model_lr:g}); "
        f"{cfg.per_device_batch_size} examples per step, data: {cfg.data}.", "",
        "Command: `diffdpo meet --config configs/meet_tiny.yaml`", "", f"Config: `{json.dumps(asdict(cfg))}`", ""])


def run_meet(cfg: MEETConfig) -> list[dict[str, Any]]:
    """Every method x seed, then results.csv, summary.csv, meet.png and summary.md; the summary rows."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            mine = run_one(cfg, method, seed)
            print(f"meet {method} seed {seed}: " + ", ".join(
                f"{r['control']} {r['controllability']:.3f} (gold {r['gold_score']:.2f})" for r in mine))
            rows += mine
            write_csv(out / "results.csv", rows, RESULT_COLUMNS)  # after every run: a crash keeps the rest
    summary = summarise(rows)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    plot_meet(summary, out / "meet.png")
    goal = check_goal(rows)
    (out / "summary.md").write_text(_markdown(cfg, summary, goal))
    print(format_table(summary))
    print(f"goal: {goal[0]}: {'not checked' if goal[1] is None else 'met' if goal[1] else 'not met'} ({goal[2]})")
    return summary

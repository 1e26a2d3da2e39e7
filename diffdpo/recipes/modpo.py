"""MODPO's Pareto front on the tiny two-objective world, against mixed-data DPO and DPO soups.

MODPO (Zhou et al. 2023, "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
Optimization", arXiv 2310.03708): to align one model to objectives 0 (positivity) and 1 (conciseness) with
weights ``w = (w_0, w_1)``, train a DPO model on objective 1's preferences once, then train on objective 0's
preferences with the MODPO loss and that model's implicit reward ``beta * log(pi_1 / pi_ref)`` as the margin
(:mod:`diffdpo.lm.margin`); one model per ``w`` traces the front. The baselines of the paper that are cheap here:

* ``mixed_dpo``: DPO on a mixture of the two preference sets in the proportions ``w`` (as many pairs as one set);
* ``soup``: "DPO soups" (rewarded soups, Rame et al. 2023, arXiv 2306.04488), the weights of the two
  single-objective DPO models interpolated, ``theta = w_0 theta_0 + w_1 theta_1`` (no training).

``diffdpo modpo-front --config configs/modpo_front_tiny.yaml`` runs, for every seed (seed ``s`` builds its own
world ``<world>_seed<s>``, ``world`` for seed 0: base model and both preference sets), the two single-objective
DPO models (``dpo_positivity`` = w_0 = 1, ``dpo_conciseness`` = w_0 = 0, the margin model) and, for every weight,
MODPO, mixed-data DPO and the soup, each trained through the one loop (``diffdpo train``'s configs
``modpo_tiny.yaml`` / ``modpo_margin_dpo_tiny.yaml``) with the same steps and pairs per step. Each model is
evaluated on held-out subjects by both gold judges (mean score of sampled reviews). Under ``out_dir``:

* ``results.csv``: one row per (method, w_0, seed); ``summary.csv``: per (method, w_0) the mean of each gold
  score over seeds with a 95% t-interval, and per method its hypervolume (:func:`hypervolume`) over seeds;
* ``front.png``: gold positivity vs gold conciseness, one front per method, 95% error bars;
* ``summary.md``: the table, the goal check (:func:`check_goal`) and the command.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.config import help_meta
from diffdpo.recipes.studies.common import read_csv, t_interval, write_csv
from diffdpo.recipes.studies.online import world_root

read_results = read_csv  # the name the notebook and tests use

METHODS = ("modpo", "mixed_dpo", "soup")
EXTREMES = ("dpo_positivity", "dpo_conciseness")
#: the worst gold scores reachable with 12 sampled tokens: 4 negative adjectives, 12 words
HYPERVOLUME_REFERENCE = (-4.0, -12.0)
RESULT_COLUMNS = ["method", "w_positivity", "seed", "gold_positivity", "gold_conciseness", "positive_rate"]
SUMMARY_COLUMNS = ["method", "w_positivity", "seeds", "positivity_mean", "positivity_t_low", "positivity_t_high",
                   "conciseness_mean", "conciseness_t_low", "conciseness_t_high"]


@dataclass
class ModpoFrontConfig:
    """The ``diffdpo modpo-front`` recipe on the tiny two-objective world."""

    out_dir: str = field(default="runs/modpo_front_tiny", metadata=help_meta("runs, CSVs, PNG and summary.md go here"))
    world: str = field(default="runs/modpo_world", metadata=help_meta("tiny world of seed 0; seed s uses <world>_seed<s>"))
    dpo_config: str = field(default="configs/modpo_margin_dpo_tiny.yaml", metadata=help_meta(
        "training config of the DPO runs (single-objective and mixed-data), task tiny_lm_objectives"))
    modpo_config: str = field(default="configs/modpo_tiny.yaml", metadata=help_meta("training config of the MODPO runs"))
    weights: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], metadata=help_meta(
        "w_0 (positivity's weight) of each point; w = (w_0, 1 - w_0), 0 < w_0 < 1"))
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata=help_meta(
        "fronts to trace: " + ", ".join(METHODS)))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=help_meta("seeds (world, data and training)"))
    steps: int = field(default=96, metadata=help_meta("optimizer steps of every trained model"))
    per_device_batch_size: int = field(default=16, metadata=help_meta("pairs per step, every method"))
    eval_samples_per_prompt: int = field(default=128, metadata=help_meta("sampled reviews per held-out subject"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples"))
    fast: bool = field(default=False, metadata=help_meta("tests: first seed only, 2 steps of 4 pairs, 4 samples per subject"))

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods: unknown {bad}; use some of {', '.join(METHODS)}")
        if not self.weights or not all(0.0 < w < 1.0 for w in self.weights) or len(set(self.weights)) != len(self.weights):
            raise ValueError(f"weights={self.weights}: give distinct w_0 strictly between 0 and 1 (w = (w_0, 1 - w_0); "
                             "the extremes 1 and 0 are the single-objective DPO models, always run)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        if self.fast:
            self.seeds, self.steps, self.per_device_batch_size, self.eval_samples_per_prompt = self.seeds[:1], 2, 4, 4
        if min(self.steps, self.per_device_batch_size, self.eval_samples_per_prompt) < 1:
            raise ValueError("steps, per_device_batch_size and eval_samples_per_prompt must be >= 1")


# ------------------------------------------------------------------------------------------------
# training and evaluation


def _overrides(cfg: ModpoFrontConfig, seed: int, run_dir: Path, world: Path) -> list[str]:
    return [f"output_dir={run_dir}", f"seed={seed}", f"max_steps={cfg.steps}",
            f"per_device_batch_size={cfg.per_device_batch_size}", "gradient_accumulation_steps=1",
            "progress_bar=false", "tensorboard=false", "checkpoint_every=0", "eval_every=0", "overwrite=true",
            f"tiny_lm_objectives.world={world}", "tiny_lm_objectives.eval_samples_per_prompt=1"]


def train(config: str, overrides: list[str]) -> Any:
    """One run of the loop; its trained policy model (in memory) and its final folder."""
    from diffdpo.train import load_train_config, run, setup

    tr = setup(load_train_config(config, overrides))
    result = run(tr)
    return tr.task.policy.model, result.final_dir


def evaluate(cfg: ModpoFrontConfig, model: Any, tokenizer: Any) -> dict[str, float]:
    from diffdpo.toy.tiny_lm_objectives import evaluate_objectives

    return evaluate_objectives(model.eval(), tokenizer, samples_per_prompt=cfg.eval_samples_per_prompt,
                               seed=cfg.eval_seed)


def soup(base_dir: Path, states: list[dict[str, Any]], weights: list[float]) -> Any:
    """A model with the weights ``sum_k w_k theta_k`` of full fine-tunes of the model in ``base_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    mixed = {k: sum(w * s[k].float() for w, s in zip(weights, states)) for k in states[0]}
    model.load_state_dict(mixed, strict=True)
    return model.eval()


def run_seed(cfg: ModpoFrontConfig, seed: int) -> list[dict[str, Any]]:
    """The two single-objective DPO models, then every method at every weight, for one seed."""
    from transformers import AutoTokenizer

    from diffdpo.toy.tiny_lm import build_world

    world = build_world(world_root(cfg, seed), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    runs = Path(cfg.out_dir) / "runs" / f"seed{seed}"
    common = _overrides(cfg, seed, runs, world.root)
    rows: list[dict[str, Any]] = []

    def record(method: str, w0: float, model: Any) -> None:
        scores = evaluate(cfg, model, tokenizer)
        rows.append({"method": method, "w_positivity": w0, "seed": seed, **scores})
        print(f"modpo-front seed {seed} {method} w_0={w0:g}: positivity {scores['gold_positivity']:.3f}, "
              f"conciseness {scores['gold_conciseness']:.3f}")

    states = {}
    for objective, w0 in (("positivity", 1.0), ("conciseness", 0.0)):
        run_dir = runs / f"dpo_{objective}"
        model, final = train(cfg.dpo_config, [*common, f"output_dir={run_dir}",
                                              f"tiny_lm_objectives.objective={objective}"])
        states[objective] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record(f"dpo_{objective}", w0, model)
        if objective == "conciseness":
            margin_model = final
    for w0 in cfg.weights:
        w = [w0, 1.0 - w0]
        if "modpo" in cfg.methods:
            model, _ = train(cfg.modpo_config, [
                *common, f"output_dir={runs / f'modpo_w{w0:g}'}", "tiny_lm_objectives.objective=positivity",
                f"loss.modpo_weights=[{w[0]!r},{w[1]!r}]", "tiny_lm_objectives.margin.kinds=[implicit]",
                f"tiny_lm_objectives.margin.models=[{margin_model}]",
                f"tiny_lm_objectives.margin.cache_dir={Path(cfg.out_dir) / 'margin_cache'}"])
            record("modpo", w0, model)
        if "mixed_dpo" in cfg.methods:
            model, _ = train(cfg.dpo_config, [
                *common, f"output_dir={runs / f'mixed_dpo_w{w0:g}'}", "tiny_lm_objectives.objective=mixture",
                f"tiny_lm_objectives.mixture_weights=[{w[0]!r},{w[1]!r}]"])
            record("mixed_dpo", w0, model)
        if "soup" in cfg.methods:
            record("soup", w0, soup(world.model_dir, [states["positivity"], states["conciseness"]], w))
    return rows


# ------------------------------------------------------------------------------------------------
# summary


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float] = HYPERVOLUME_REFERENCE) -> float:
    """Area dominated by ``points`` (both objectives maximised) above ``reference``: the 2-D hypervolume."""
    pts = sorted(((max(x, reference[0]), max(y, reference[1])) for x, y in points), reverse=True)
    area, best_y = 0.0, reference[1]
    for x, y in pts:  # x descending: each point adds the strip above the best y so far
        if y > best_y:
            area += (x - reference[0]) * (y - best_y)
            best_y = y
    return area


def _front_methods(rows: list[dict[str, Any]]) -> list[str]:
    return [m for m in dict.fromkeys(r["method"] for r in rows) if m not in EXTREMES]


def summarise(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, tuple[float, float, float]]]:
    """Per (method, w_0): means and 95% t-intervals over seeds; per front method: its hypervolume (mean, low, high)
    over seeds, the front including the two single-objective DPO models."""
    out = []
    for method, w0 in dict.fromkeys((r["method"], float(r["w_positivity"])) for r in rows):
        mine = [r for r in rows if r["method"] == method and float(r["w_positivity"]) == w0]
        p = t_interval([float(r["gold_positivity"]) for r in mine])
        c = t_interval([float(r["gold_conciseness"]) for r in mine])
        out.append({"method": method, "w_positivity": w0, "seeds": len(mine), "positivity_mean": p[0],
                    "positivity_t_low": p[1], "positivity_t_high": p[2], "conciseness_mean": c[0],
                    "conciseness_t_low": c[1], "conciseness_t_high": c[2]})
    volumes = {m: t_interval(list(v.values())) for m, v in per_seed_hypervolumes(rows).items()}
    return out, volumes


def per_seed_hypervolumes(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """{method: {seed: hypervolume of its front plus both single-objective DPO models}}."""
    seeds = list(dict.fromkeys(int(r["seed"]) for r in rows))
    return {m: {s: hypervolume([(float(r["gold_positivity"]), float(r["gold_conciseness"])) for r in rows
                                if int(r["seed"]) == s and r["method"] in (m, *EXTREMES)]) for s in seeds}
            for m in _front_methods(rows)}


def hypervolume_gaps(rows: list[dict[str, Any]], baseline: str = "mixed_dpo") -> dict[str, tuple[float, float, float]]:
    """Per method: its hypervolume minus ``baseline``'s on the same seed (paired: the world's variation cancels),
    mean and 95% t-interval over seeds."""
    hv = per_seed_hypervolumes(rows)
    if baseline not in hv:
        return {}
    return {m: t_interval([v[s] - hv[baseline][s] for s in v]) for m, v in hv.items() if m != baseline}


def check_goal(summary: list[dict[str, Any]]) -> tuple[bool | None, list[str]]:
    """Does the MODPO front dominate or match the mixed-data DPO front?

    For every mixed-data DPO point b (mean over seeds) some MODPO point a must reach at least b's lower 95%
    bound on both objectives (a dominates b, or is within b's noise); one seed: b's mean. Returns (verdict,
    one line per mixed point naming the MODPO point that covers it, or none). None: a front is missing.
    """
    mixed = [s for s in summary if s["method"] == "mixed_dpo"]
    modpo = [s for s in summary if s["method"] == "modpo"]
    if not mixed or not modpo:
        return None, []

    def low(s: dict[str, Any], k: str) -> float:
        v = s[f"{k}_t_low"]
        return s[f"{k}_mean"] if math.isnan(v) else v

    lines, ok = [], True
    for b in mixed:
        cover = [a for a in modpo if a["positivity_mean"] >= low(b, "positivity")
                 and a["conciseness_mean"] >= low(b, "conciseness")]
        strict = [a for a in cover if a["positivity_mean"] >= b["positivity_mean"]
                  and a["conciseness_mean"] >= b["conciseness_mean"]]
        ok = ok and bool(cover)
        who = ", ".join(f"w_0={a['w_positivity']:g}" for a in (strict or cover)) or "none"
        kind = "dominated by" if strict else "matched (within its interval) by" if cover else "not covered:"
        lines.append(f"mixed_dpo w_0={b['w_positivity']:g} ({b['positivity_mean']:.2f}, {b['conciseness_mean']:.2f}) "
                     f"{kind} MODPO {who}")
    return ok, lines


def _error_bars(rows: list[dict[str, Any]], key: str) -> list[list[float]]:
    """[[below], [above]] distances of the t-interval bounds from the means (0 where there is no interval)."""
    means = [float(s[f"{key}_mean"]) for s in rows]
    lows = [float(s[f"{key}_t_low"]) for s in rows]
    highs = [float(s[f"{key}_t_high"]) for s in rows]
    return [[0.0 if math.isnan(lo) else m - lo for m, lo in zip(means, lows)],
            [0.0 if math.isnan(hi) else hi - m for m, hi in zip(means, highs)]]


def plot_front(summary: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Gold positivity vs gold conciseness, one line per method over w_0, 95% error bars; saved if ``path``."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left as it is

    fig = Figure(figsize=(6.5, 4.8))
    ax = fig.add_subplot()
    for method in dict.fromkeys(s["method"] for s in summary):
        mine = sorted((s for s in summary if s["method"] == method), key=lambda s: float(s["w_positivity"]))
        x = [float(s["positivity_mean"]) for s in mine]
        y = [float(s["conciseness_mean"]) for s in mine]

        style = dict(fmt="s", ms=8) if method in EXTREMES else dict(fmt="o-")
        ax.errorbar(x, y, xerr=_error_bars(mine, "positivity"), yerr=_error_bars(mine, "conciseness"), capsize=3,
                    label=method, **style)
        if method not in EXTREMES:
            for s, xi, yi in zip(mine, x, y):
                ax.annotate(f"{float(s['w_positivity']):g}", (xi, yi), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("gold positivity (positive - negative adjectives)")
    ax.set_ylabel("gold conciseness (- words)")
    ax.set_title("tiny world: fronts over w_0 = weight of positivity (95% t-intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _markdown(cfg: ModpoFrontConfig, summary: list[dict[str, Any]], volumes: dict[str, tuple[float, float, float]],
              gaps: dict[str, tuple[float, float, float]], goal: tuple[bool | None, list[str]]) -> str:
    def f(x: float) -> str:
        return "n/a" if math.isnan(float(x)) else f"{float(x):.2f}"

    lines = ["| method | w_0 | seeds | gold positivity (mean, 95% t) | gold conciseness (mean, 95% t) |",
             "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {float(s['w_positivity']):g} | {s['seeds']} | {f(s['positivity_mean'])} "
                     f"[{f(s['positivity_t_low'])}, {f(s['positivity_t_high'])}] | {f(s['conciseness_mean'])} "
                     f"[{f(s['conciseness_t_low'])}, {f(s['conciseness_t_high'])}] |")
    lines += ["", f"Hypervolume above {HYPERVOLUME_REFERENCE} (front plus both single-objective DPO models; mean, 95% t "
              "over seeds):", ""]
    lines += [f"- {m}: {f(v[0])} [{f(v[1])}, {f(v[2])}]" for m, v in volumes.items()]
    if gaps:
        lines += ["", "Hypervolume minus mixed_dpo's on the same seed (paired; mean, 95% t over seeds):", ""]
        lines += [f"- {m}: {f(v[0])} [{f(v[1])}, {f(v[2])}]" for m, v in gaps.items()]
    verdict = {True: "met", False: "not met", None: "not checked"}[goal[0]]
    lines += ["", f"Goal (MODPO front dominates or matches the mixed-data DPO front): **{verdict}**", ""]
    lines += [f"- {line}" for line in goal[1]]
    lines += ["", "Command: `diffdpo modpo-front --config configs/modpo_front_tiny.yaml`", "",
              f"Config: `{json.dumps(asdict(cfg))}`", ""]
    return "\n".join(lines)


def write_report(cfg: ModpoFrontConfig, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """summary.csv, front.png and summary.md under ``cfg.out_dir`` from the result rows; (summary, goal)."""
    out = Path(cfg.out_dir)
    summary, volumes = summarise(rows)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    plot_front(summary, out / "front.png")
    goal = check_goal(summary)
    (out / "summary.md").write_text(_markdown(cfg, summary, volumes, hypervolume_gaps(rows), goal))
    return summary, goal


def run_modpo_front(cfg: ModpoFrontConfig) -> list[dict[str, Any]]:
    """Every seed, then results.csv, summary.csv, front.png and summary.md; the summary rows."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        rows += run_seed(cfg, seed)
        write_csv(out / "results.csv", rows, RESULT_COLUMNS)  # after every seed: a crash keeps the rest
    summary, goal = write_report(cfg, rows)
    print(f"goal (MODPO front dominates or matches mixed-data DPO): "
          f"{ {True: 'met', False: 'not met', None: 'not checked'}[goal[0]] }")
    return summary

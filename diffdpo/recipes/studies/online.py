"""Offline vs online preference optimisation on the tiny review world, with the same prompt budget.

``diffdpo study-online --config configs/study_online_tiny.yaml`` trains every method of ``methods`` for every
seed of ``seeds`` through the shipped configs (``configs/lm_*_tiny.yaml``, ``configs/mpo_tiny.yaml``) and the
one training loop, evaluates each trained policy against the base model with one evaluator
(:func:`evaluate_vs_base`), and writes under ``out_dir``:

* ``results.csv``: one row per (method, seed): wins / ties / losses of the gold judge, the win rate with its
  Wilson 95% interval, and the KL to the base (analytic estimator, nats per completion) with its standard error;
* ``summary.csv``: per method, the mean win rate over seeds with a 95% t-interval, the pooled win rate
  (all comparisons of all seeds) with its Wilson interval, and the mean KL with a 95% t-interval;
* ``study.png``: win rate vs KL per method, error bars on both axes (t-intervals; Wilson with one seed);
* ``summary.md``: the table, the goal of issue 15 (met / not met per clause) and the command.

Methods (name -> shipped config): ``offline_dpo`` (lm_dpo_tiny), ``online_dpo`` (lm_online_dpo_tiny),
``online_ipo`` (lm_online_ipo_tiny), ``ipo_md_0.125`` and ``ipo_md_0.25`` (lm_ipomd_tiny with
``online.mixture`` 0.125 / 0.25), ``grao`` (lm_grao_tiny), ``mpo`` (mpo_tiny: the MPO recipe's stages).

**Prompt budget.** Every method gets ``steps x per_device_batch_size`` annotated prompts (512 with the
defaults 32 x 16, the number of preference pairs in the tiny world):

* online DPO, online IPO, IPO-MD: ``steps`` steps of ``per_device_batch_size`` prompts, each prompt one
  sampled pair labelled by the judge: ``steps x B`` annotated pairs;
* offline DPO: ``steps`` steps of ``B`` pairs out of the first ``steps x B`` pairs of the world
  (``tiny_lm.data.max_rows``): ``steps x B`` annotated pairs, each seen once when ``steps x B`` <= 512. Above
  512 the world has no more pairs: offline DPO then repeats them (the budget cannot be equalised there);
* GRAO: ``steps x B`` prompts too, but each prompt gets ``online.group_size`` (G = 4) samples, each judged
  against the pair's chosen review: G judge calls per prompt, and it also reads the chosen review as a
  reference answer. Equal in prompts, not in judge calls (G x as many);
* MPO: stage 1 offline DPO ``steps // 2`` steps (``B`` easy pairs each), stage 2 online IPO the other
  ``steps - steps // 2`` steps (``B`` hard prompts each): ``steps x B`` in all. Not counted: the reward model
  scores every pair of the world once to split them into easy and hard (2 x 512 reward calls).

**Seeds.** Seed ``s`` uses the world built with seed ``s`` (base model and pairs; ``world`` for seed 0,
``<world>_seed<s>`` otherwise) and trains with seed ``s``: the offline task and MPO build their world with the
run's seed, so one world cannot serve every seed. The intervals over seeds include the world's variation.

**Evaluation** (the online task's :meth:`diffdpo.online.lm.OnlineLMTask.evaluate`, applied to any policy):
``eval_samples_per_prompt`` reviews per held-out subject (``EVAL_SUBJECTS``) from the policy and from the base
with the same generator per row (paired), judged by the world's exact oracle; ties count as non-wins. All
methods are sampled at temperature 1 without filters (GRAO trains at 0.7), so the KL estimators of
:func:`diffdpo.eval.kl.lm_kl_estimates` are valid on the same samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.config import help_meta
from diffdpo.recipes.studies.common import evaluate_vs_base, read_csv, t_interval, write_csv

read_results = read_csv  # the name the notebook and tests use

#: method name -> (shipped config, extra overrides)
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "offline_dpo": ("lm_dpo_tiny.yaml", ()),
    "online_dpo": ("lm_online_dpo_tiny.yaml", ()),
    "online_ipo": ("lm_online_ipo_tiny.yaml", ()),
    "ipo_md_0.125": ("lm_ipomd_tiny.yaml", ("tiny_lm_online.online.mixture=0.125",)),
    "ipo_md_0.25": ("lm_ipomd_tiny.yaml", ("tiny_lm_online.online.mixture=0.25",)),
    "grao": ("lm_grao_tiny.yaml", ()),
    "mpo": ("mpo_tiny.yaml", ()),
}

RESULT_COLUMNS = ["method", "seed", "steps", "annotated_prompts", "wins", "ties", "losses", "n", "win_rate",
                  "win_rate_low", "win_rate_high", "kl", "kl_stderr"]
SUMMARY_COLUMNS = ["method", "seeds", "win_rate_mean", "win_rate_t_low", "win_rate_t_high", "wins", "ties", "losses",
                   "pooled_win_rate", "pooled_wilson_low", "pooled_wilson_high", "kl_mean", "kl_t_low", "kl_t_high"]


@dataclass
class OnlineStudyConfig:
    """The ``diffdpo study-online`` recipe on the tiny world."""

    out_dir: str = field(default="runs/study_online_tiny", metadata=help_meta("runs, CSVs, PNG and summary.md go here"))
    world: str = field(default="runs/tiny_lm_world", metadata=help_meta("tiny world of seed 0; seed s uses <world>_seed<s>"))
    configs_dir: str = field(default="", metadata=help_meta("folder of the methods' configs; empty = the repository's configs/"))
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata=help_meta(
        "methods to run: " + ", ".join(METHODS)))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=help_meta("seeds (world and training)"))
    steps: int = field(default=32, metadata=help_meta("optimizer steps per method (MPO: split over its two stages)"))
    per_device_batch_size: int = field(default=16, metadata=help_meta("prompts (pairs) per step, every method"))
    eval_samples_per_prompt: int = field(default=32, metadata=help_meta("policy/base comparisons per held-out prompt"))
    max_new_tokens: int = field(default=16, metadata=help_meta("sampled tokens per completion, training and evaluation"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples"))
    fast: bool = field(default=False, metadata=help_meta("tests: first seed only, 2 steps of 4 prompts, 4 comparisons per prompt"))

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; use some of {', '.join(METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        if self.fast:
            self.seeds, self.steps, self.per_device_batch_size = self.seeds[:1], 2, 4
            self.eval_samples_per_prompt, self.max_new_tokens = 4, 8
        if self.steps < 2 or self.per_device_batch_size < 1 or self.eval_samples_per_prompt < 1:
            raise ValueError("steps must be >= 2 (MPO has two stages), per_device_batch_size and "
                             "eval_samples_per_prompt >= 1")


def _configs_dir(cfg: OnlineStudyConfig) -> Path:
    return Path(cfg.configs_dir) if cfg.configs_dir else Path(__file__).resolve().parents[3] / "configs"


def world_root(cfg: OnlineStudyConfig, seed: int) -> Path:
    return Path(cfg.world) if seed == 0 else Path(f"{cfg.world}_seed{seed}")


# ------------------------------------------------------------------------------------------------
# training


def _train_overrides(cfg: OnlineStudyConfig, seed: int, run_dir: Path, steps: int) -> list[str]:
    return [f"output_dir={run_dir}", f"seed={seed}", f"max_steps={steps}", f"per_device_batch_size={cfg.per_device_batch_size}",
            "gradient_accumulation_steps=1", "progress_bar=false", "tensorboard=false", "checkpoint_every=0",
            "eval_every=0", "overwrite=true"]


def train_method(cfg: OnlineStudyConfig, method: str, seed: int, world: Any, run_dir: Path) -> Any:
    """Train one method on one seed (see the module docstring's budget); the trained policy model."""
    from diffdpo.train import load_train_config, run, setup

    name, extra = METHODS[method]
    path = _configs_dir(cfg) / name
    if method == "mpo":
        return _train_mpo(cfg, seed, world, run_dir, path)
    common = _train_overrides(cfg, seed, run_dir, cfg.steps)
    if method == "offline_dpo":
        section = ["tiny_lm.world=" + str(world.root), f"tiny_lm.data.max_rows={cfg.steps * cfg.per_device_batch_size}",
                   "tiny_lm.eval_samples_per_prompt=1"]  # the task's own positive-rate check; unused here
    else:
        section = ["tiny_lm_online.world=" + str(world.root), f"tiny_lm_online.online.max_new_tokens={cfg.max_new_tokens}",
                   f"tiny_lm_online.online.eval_samples_per_prompt={cfg.eval_samples_per_prompt}"]
    tr = setup(load_train_config(path, [*common, *section, *extra]))
    run(tr)
    return tr.task.policy.model


def _train_mpo(cfg: OnlineStudyConfig, seed: int, world: Any, run_dir: Path, path: Path) -> Any:
    """:func:`diffdpo.recipes.mpo.run_mpo`'s two stages (its report is not needed): the stage-2 policy."""
    from diffdpo.config import load_config
    from diffdpo.recipes import mpo
    from diffdpo.train import run, setup

    mcfg = load_config(mpo.MPOConfig, path, [
        f"output_dir={run_dir}", f"world={world.root}", f"seed={seed}", f"stage1_steps={cfg.steps // 2}",
        f"stage2_steps={cfg.steps - cfg.steps // 2}", f"per_device_batch_size={cfg.per_device_batch_size}",
        f"stage1_config={_configs_dir(cfg) / 'lm_dpo_tiny.yaml'}",
        f"stage2_config={_configs_dir(cfg) / 'lm_online_ipo_tiny.yaml'}", f"max_new_tokens={cfg.max_new_tokens}",
        f"eval_samples_per_prompt={cfg.eval_samples_per_prompt}"])
    prep = mpo.prepare(mcfg)
    quiet = ["tensorboard=false", "eval_every=0", "overwrite=true", "tiny_lm.eval_samples_per_prompt=1"]
    tr1 = setup(mpo.stage1_config(mcfg, world, prep["easy"], quiet))
    run(tr1)
    stage1_dir = mpo.save_stage1_model(tr1.task, world.model_dir, run_dir / "stage1_model")
    s2 = mpo.stage2_config(mcfg, world, stage1_dir, prep["hard_prompts"])
    s2.tensorboard, s2.eval_every, s2.overwrite = False, 0, True
    s2.tiny_lm_online.online.max_new_tokens = cfg.max_new_tokens
    tr2 = setup(s2)
    run(tr2)
    return tr2.task.policy.model


def run_one(cfg: OnlineStudyConfig, method: str, seed: int) -> dict[str, Any]:
    """Build (or reuse) the seed's world, train the method, evaluate it against the world's base model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffdpo.toy.tiny_lm import build_world

    world = build_world(world_root(cfg, seed), seed=seed)
    run_dir = Path(cfg.out_dir) / "runs" / method / f"seed{seed}"
    model = train_method(cfg, method, seed, world, run_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(world.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    with torch.no_grad():
        result = evaluate_vs_base(model, base, tokenizer, samples_per_prompt=cfg.eval_samples_per_prompt,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed)
    return {"method": method, "seed": seed, "steps": cfg.steps,
            "annotated_prompts": cfg.steps * cfg.per_device_batch_size, **result}


# ------------------------------------------------------------------------------------------------
# summary


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (first-seen order): the t-intervals over seeds and the pooled Wilson interval."""
    from diffdpo.eval.winrate import wilson_interval

    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        wins, ties, losses = (sum(int(r[k]) for r in mine) for k in ("wins", "ties", "losses"))
        n = wins + ties + losses
        wr, wr_low, wr_high = t_interval([float(r["win_rate"]) for r in mine])
        kl, kl_low, kl_high = t_interval([float(r["kl"]) for r in mine])
        pooled_low, pooled_high = wilson_interval(wins, n)
        out.append({"method": method, "seeds": len(mine), "win_rate_mean": wr, "win_rate_t_low": wr_low,
                    "win_rate_t_high": wr_high, "wins": wins, "ties": ties, "losses": losses,
                    "pooled_win_rate": wins / n if n else math.nan, "pooled_wilson_low": pooled_low,
                    "pooled_wilson_high": pooled_high, "kl_mean": kl, "kl_t_low": kl_low, "kl_t_high": kl_high})
    return out


def _lower_bound(s: dict[str, Any]) -> float:
    """The t-interval's lower bound over seeds; with one seed, the pooled Wilson bound."""
    return s["win_rate_t_low"] if s["seeds"] > 1 else s["pooled_wilson_low"]


def check_goal(summary: list[dict[str, Any]]) -> list[tuple[str, bool | None]]:
    """Issue 15's goal, clause by clause (None = cannot be checked: a method is missing).

    "Beats offline DPO at equal or lower KL": a higher mean win rate than offline DPO and a mean KL no higher
    than offline DPO's (its t-interval's upper bound with several seeds: equal within noise counts as equal).
    "Beats the base": the win rate's lower 95% bound above 0.5 (see :func:`_lower_bound`).
    """
    by = {s["method"]: s for s in summary}
    clauses: list[tuple[str, bool | None]] = []
    off = by.get("offline_dpo")
    for m in ("online_ipo", "ipo_md_0.125", "ipo_md_0.25"):
        text = f"{m} beats offline_dpo (higher mean win rate) at equal or lower KL"
        if off is None or m not in by:
            clauses.append((text, None))
            continue
        kl_cap = off["kl_t_high"] if off["seeds"] > 1 else off["kl_mean"]
        clauses.append((text, by[m]["win_rate_mean"] > off["win_rate_mean"] and by[m]["kl_mean"] <= kl_cap))
    for s in summary:
        clauses.append((f"{s['method']}: lower 95% bound of the win rate vs base above 0.5", _lower_bound(s) > 0.5))
    return clauses


def plot_study(summary: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Win rate vs KL to the base per method, 95% error bars on both axes; saved to ``path`` if given."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left as it is

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for s in summary:
        y_low, y_high = ((s["win_rate_t_low"], s["win_rate_t_high"]) if s["seeds"] > 1
                         else (s["pooled_wilson_low"], s["pooled_wilson_high"]))
        x_low, x_high = (s["kl_t_low"], s["kl_t_high"]) if s["seeds"] > 1 else (s["kl_mean"], s["kl_mean"])
        x, y = s["kl_mean"], s["win_rate_mean"]
        ax.errorbar(x, y, xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]], fmt="o", capsize=3,
                    label=s["method"])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("KL(policy || base), nats per completion")
    ax.set_ylabel("gold win rate vs base")
    ax.set_title("tiny world, equal prompt budget (95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _markdown(cfg: OnlineStudyConfig, summary: list[dict[str, Any]], goal: list[tuple[str, bool | None]]) -> str:
    def f(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.3f}"

    lines = ["| method | seeds | win rate (mean, 95% t) | pooled W/T/L | pooled (Wilson 95%) | KL (mean, 95% t) |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['seeds']} | {f(s['win_rate_mean'])} [{f(s['win_rate_t_low'])}, "
                     f"{f(s['win_rate_t_high'])}] | {s['wins']}/{s['ties']}/{s['losses']} | {f(s['pooled_win_rate'])} "
                     f"[{f(s['pooled_wilson_low'])}, {f(s['pooled_wilson_high'])}] | {f(s['kl_mean'])} "
                     f"[{f(s['kl_t_low'])}, {f(s['kl_t_high'])}] |")
    verdict = {True: "met", False: "not met", None: "not checked"}
    lines += ["", "Goal (issue 15):", ""] + [f"- {text}: **{verdict[ok]}**" for text, ok in goal]
    lines += ["", f"{cfg.steps} steps x {cfg.per_device_batch_size} prompts = "
              f"{cfg.steps * cfg.per_device_batch_size} annotated prompts per method and seed.", "",
              "Command: `diffdpo study-online --config configs/study_online_tiny.yaml`", "",
              f"Config: `{json.dumps(asdict(cfg))}`", ""]
    return "\n".join(lines)


def run_online_study(cfg: OnlineStudyConfig) -> list[dict[str, Any]]:
    """Every method x seed, then results.csv, summary.csv, study.png and summary.md; the summary rows."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            row = run_one(cfg, method, seed)
            print(f"study-online {method} seed {seed}: win rate {row['win_rate']:.3f} "
                  f"[{row['win_rate_low']:.3f}, {row['win_rate_high']:.3f}], KL {row['kl']:.3f}")
            rows.append(row)
            write_csv(out / "results.csv", rows, RESULT_COLUMNS)  # after every run: a crash keeps the rest
    summary = summarise(rows)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    plot_study(summary, out / "study.png")
    goal = check_goal(summary)
    (out / "summary.md").write_text(_markdown(cfg, summary, goal))
    for text, ok in goal:
        print(f"goal: {text}: {'met' if ok else 'not checked' if ok is None else 'not met'}")
    return summary

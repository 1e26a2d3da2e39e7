"""Plain DPO vs RLHF-V dense DPO on the tiny review world with hallucinations, equal steps, several seeds.

``diffdpo study-dense --config configs/study_dense_tiny.yaml`` trains every method of ``methods`` for every seed
of ``seeds`` through ``configs/dense_dpo_tiny.yaml`` and the one training loop (same pairs, steps, batch and
optimiser for all), samples held-out reviews from each trained policy and from the base, and writes under
``out_dir``:

* ``results.csv``: one row per (method, seed), the base included: wrong-word errors / samples, the error rate
  with its Wilson 95% interval, the well-formed rate (reviews of the world's grammar: a policy that breaks down
  writes no wrong word but no review either), the positive rate, mean words, and the KL to the base (analytic,
  nats per completion);
* ``summary.csv``: per method, the mean error, good (well-formed and error-free) and well-formed rates and KL
  over seeds with 95% t-intervals, the pooled error rate with its Wilson interval, and the paired differences
  (same seed) of error and good rates to the plain DPO of the same normalisation, with 95% t-intervals;
* ``study.png``: error, good and well-formed rates per method with the 95% t-intervals; ``summary.md``: the
  table and the command.

Methods (Yu et al. 2023, "RLHF-V", arXiv 2312.00849, eq. 5; gamma = ``gamma``, 5 as in the paper):

* ``dpo``: summed log-probs, every token weight 1 (beta ``beta``);
* ``dense_spans``: weighted sum, tokens of the annotated spans weigh gamma on both sides (the form of RLHF-V's
  released training command: ``dpo_use_average False``, weights on both sides);
* ``dense_diff``: as ``dense_spans``, the weights from a token diff of the pair (no span annotations);
* ``dpo_mean``: length-averaged log-probs, weights 1 (beta ``beta_average``): the baseline of the next;
* ``dense_spans_mean``: the paper's eq. 5, the weighted mean ``(sum_u + gamma sum_c) / (|y_u| + gamma |y_c|)``
  (beta ``beta_average``);
* ``dense_diff_mean``: eq. 5 with token-diff weights.

Means are about 1/length of sums, so the averaged methods take their own beta. Seed ``s`` uses the world built
with seed ``s`` (``world`` for seed 0, ``<world>_seed<s>`` otherwise) and trains with seed ``s``; the evaluation
samples use ``eval_seed`` for every policy, the same generator per row.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.config import help_meta
from diffdpo.recipes.studies.common import read_csv, t_interval, write_csv

read_results = read_csv

#: method name -> (dense weights: None | "spans" | "diff", averaged log-probs)
METHODS: dict[str, tuple[str | None, bool]] = {
    "dpo": (None, False),
    "dense_spans": ("spans", False),
    "dense_diff": ("diff", False),
    "dpo_mean": (None, True),
    "dense_spans_mean": ("spans", True),
    "dense_diff_mean": ("diff", True),
}

RESULT_COLUMNS = ["method", "seed", "steps", "pairs", "errors", "n", "error_rate", "error_low", "error_high",
                  "good_rate", "well_formed_rate", "positive_rate", "length_words", "kl"]
SUMMARY_COLUMNS = ["method", "seeds", "error_rate_mean", "error_rate_t_low", "error_rate_t_high", "errors", "n",
                   "pooled_error_rate", "pooled_wilson_low", "pooled_wilson_high", "plain", "vs_plain_error_mean",
                   "vs_plain_error_t_low", "vs_plain_error_t_high", "good_mean", "good_t_low", "good_t_high",
                   "vs_plain_good_mean", "vs_plain_good_t_low", "vs_plain_good_t_high", "well_formed_mean",
                   "well_formed_t_low", "well_formed_t_high", "kl_mean", "kl_t_low", "kl_t_high", "positive_rate_mean"]


@dataclass
class DenseStudyConfig:
    """The ``diffdpo study-dense`` recipe on the tiny hallucination world."""

    out_dir: str = field(default="runs/study_dense_tiny", metadata=help_meta("runs, CSVs, PNG and summary.md go here"))
    world: str = field(default="runs/tiny_lm_hallucination_world",
                       metadata=help_meta("hallucination world of seed 0; seed s uses <world>_seed<s>"))
    config: str = field(default="", metadata=help_meta("training config; empty = configs/dense_dpo_tiny.yaml"))
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata=help_meta(
        "methods to run: " + ", ".join(METHODS)))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=help_meta("seeds (world and training)"))
    steps: int = field(default=32, metadata=help_meta("optimizer steps per method (32 x 16 = the world's 512 pairs once)"))
    per_device_batch_size: int = field(default=16, metadata=help_meta("pairs per step"))
    gamma: float = field(default=5.0, metadata=help_meta("weight of corrected tokens (RLHF-V paper: 5)"))
    beta: float = field(default=0.1, metadata=help_meta("beta of the summed methods (dpo, dense_spans, dense_diff)"))
    beta_average: float = field(default=0.5, metadata=help_meta("beta of the averaged methods (*_mean; paper: 0.5)"))
    eval_samples_per_prompt: int = field(default=64, metadata=help_meta("sampled reviews per held-out prompt"))
    max_new_tokens: int = field(default=16, metadata=help_meta("sampled tokens per review"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples"))
    fast: bool = field(default=False, metadata=help_meta("tests: first seed, dpo and dense_spans, 2 steps of 4 pairs, "
                                                         "4 samples per prompt, a small world"))

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; use some of {', '.join(METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        if self.fast:
            self.seeds, self.steps, self.per_device_batch_size = self.seeds[:1], 2, 4
            self.methods = [m for m in self.methods if m in ("dpo", "dense_spans")] or self.methods[:1]
            self.eval_samples_per_prompt, self.max_new_tokens = 4, 8
        if self.steps < 1 or self.per_device_batch_size < 1 or self.eval_samples_per_prompt < 1:
            raise ValueError("steps, per_device_batch_size and eval_samples_per_prompt must be >= 1")
        if self.gamma <= 0 or self.beta <= 0 or self.beta_average <= 0:
            raise ValueError("gamma, beta and beta_average must be > 0")


def world_root(cfg: DenseStudyConfig, seed: int) -> Path:
    return Path(cfg.world) if seed == 0 else Path(f"{cfg.world}_seed{seed}")


def _world(cfg: DenseStudyConfig, seed: int) -> Any:
    from diffdpo.toy.tiny_lm_hallucination import build_world

    small = {"n_pairs": 64, "sft_steps": 20} if cfg.fast else {}
    return build_world(world_root(cfg, seed), seed=seed, **small)


def method_overrides(cfg: DenseStudyConfig, method: str) -> list[str]:
    """The training-config overrides that make ``method`` (see the module docstring)."""
    weights, average = METHODS[method]
    s = "tiny_lm_hallucination."
    return [f"{s}dense_gamma={cfg.gamma if weights else 'null'}", f"{s}spans={'false' if weights == 'diff' else 'true'}",
            f"{s}average_log_prob={str(average).lower()}", f"loss.beta={cfg.beta_average if average else cfg.beta}"]


def train_method(cfg: DenseStudyConfig, method: str, seed: int, world: Any, run_dir: Path) -> Any:
    """Train one method on one seed's world through the training config; the trained policy model."""
    from diffdpo.train import load_train_config, run, setup

    path = Path(cfg.config) if cfg.config else Path(__file__).resolve().parents[3] / "configs" / "dense_dpo_tiny.yaml"
    overrides = [f"output_dir={run_dir}", f"seed={seed}", f"max_steps={cfg.steps}",
                 f"per_device_batch_size={cfg.per_device_batch_size}", "gradient_accumulation_steps=1",
                 "progress_bar=false", "tensorboard=false", "checkpoint_every=0", "eval_every=0", "overwrite=true",
                 f"tiny_lm_hallucination.world={world.root}", "tiny_lm_hallucination.eval_samples_per_prompt=1",
                 f"tiny_lm_hallucination.data.max_rows={cfg.steps * cfg.per_device_batch_size}",
                 *method_overrides(cfg, method)]
    tr = setup(load_train_config(path, overrides))
    run(tr)
    return tr.task.policy.model


def _row(cfg: DenseStudyConfig, method: str, seed: int, ev: dict[str, float]) -> dict[str, Any]:
    from diffdpo.eval.winrate import wilson_interval

    errors, n = int(ev["eval/errors"]), int(ev["eval/n"])
    low, high = wilson_interval(errors, n)
    trained = method != "base"
    return {"method": method, "seed": seed, "steps": cfg.steps if trained else 0,
            "pairs": cfg.steps * cfg.per_device_batch_size if trained else 0, "errors": errors, "n": n,
            "error_rate": errors / n, "error_low": low, "error_high": high, "good_rate": ev["eval/good_rate"],
            "well_formed_rate": ev["eval/well_formed_rate"],
            "positive_rate": ev["eval/positive_rate"], "length_words": ev["eval/length_words"],
            "kl": ev.get("eval/kl", 0.0)}


def run_seed(cfg: DenseStudyConfig, seed: int) -> list[dict[str, Any]]:
    """The base and every method on one seed's world: one result row each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffdpo.toy.tiny_lm_hallucination import evaluate_errors

    world = _world(cfg, seed)
    base = AutoModelForCausalLM.from_pretrained(world.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    kwargs = dict(samples_per_prompt=cfg.eval_samples_per_prompt, seed=cfg.eval_seed, max_new_tokens=cfg.max_new_tokens)
    rows = [_row(cfg, "base", seed, evaluate_errors(base, tokenizer, **kwargs))]
    for method in cfg.methods:
        model = train_method(cfg, method, seed, world, Path(cfg.out_dir) / "runs" / method / f"seed{seed}").eval()
        rows.append(_row(cfg, method, seed, evaluate_errors(model, tokenizer, ref_model=base, **kwargs)))
    return rows


# ------------------------------------------------------------------------------------------------
# summary


def plain_of(method: str) -> str | None:
    """The plain DPO with the same normalisation as ``method`` (its paired baseline); None for the base."""
    if method == "base":
        return None
    return "dpo_mean" if METHODS[method][1] else "dpo"


def _paired(rows: list[dict[str, Any]], mine: list[dict[str, Any]], plain: str | None, key: str
            ) -> tuple[float, float, float]:
    """Mean and 95% t-interval of ``key`` minus the plain method's on the same seed."""
    theirs = {int(r["seed"]): float(r[key]) for r in rows if r["method"] == plain}
    diffs = [float(r[key]) - theirs[int(r["seed"])] for r in mine if int(r["seed"]) in theirs]
    return t_interval(diffs) if diffs else (math.nan, math.nan, math.nan)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (first-seen order): t-intervals over seeds, the pooled Wilson interval of the error rate, and
    the paired differences (same seed) of error and good rates to the plain DPO of the same normalisation."""
    from diffdpo.eval.winrate import wilson_interval

    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        errors, n = sum(int(r["errors"]) for r in mine), sum(int(r["n"]) for r in mine)
        p_low, p_high = wilson_interval(errors, n)
        s: dict[str, Any] = {"method": method, "seeds": len(mine), "errors": errors, "n": n,
                             "pooled_error_rate": errors / n, "pooled_wilson_low": p_low, "pooled_wilson_high": p_high,
                             "plain": plain_of(method) or "",
                             "positive_rate_mean": sum(float(r["positive_rate"]) for r in mine) / len(mine)}
        for name, key in (("error_rate", "error_rate"), ("good", "good_rate"), ("well_formed", "well_formed_rate"),
                          ("kl", "kl")):
            s[f"{name}_mean"], s[f"{name}_t_low"], s[f"{name}_t_high"] = t_interval([float(r[key]) for r in mine])
        for name, key in (("error", "error_rate"), ("good", "good_rate")):
            d = _paired(rows, mine, plain_of(method), key)
            s[f"vs_plain_{name}_mean"], s[f"vs_plain_{name}_t_low"], s[f"vs_plain_{name}_t_high"] = d
        out.append(s)
    return out


def plot_study(summary: list[dict[str, Any]], path: str | Path | None = None,
               rows: list[dict[str, Any]] | None = None) -> Any:
    """Error, good and well-formed rates per method, 95% error bars (t over seeds; Wilson / none with one seed),
    and with ``rows`` (results.csv) each seed's value as a dot; saved to ``path`` if given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4))
    names = [s["method"] for s in summary]
    panels = (("error_rate", "with a wrong word"), ("good", "well-formed, no wrong word"),
              ("well_formed", "well-formed (with or without)"))
    for k, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for i, s in enumerate(summary):
            y = s[f"{key}_mean"]
            low, high = s[f"{key}_t_low"], s[f"{key}_t_high"]
            if s["seeds"] < 2:
                low, high = ((s["pooled_wilson_low"], s["pooled_wilson_high"]) if key == "error_rate" else (y, y))
            ax.bar(i, y, color="grey" if s["method"] == "base" else f"C{i}", alpha=0.8)
            ax.errorbar(i, y, yerr=[[y - low], [high - y]], fmt="none", ecolor="black", capsize=4)
            seeds = [float(r[f"{key}_rate" if key != "error_rate" else key]) for r in rows or []
                     if r["method"] == s["method"]]
            ax.plot([i] * len(seeds), seeds, "o", color="black", markersize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_ylabel(f"share of sampled reviews: {label}", fontsize=8)
    fig.suptitle("tiny hallucination world, equal steps: mean, 95% t-interval over seeds, dots = seeds", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _markdown(cfg: DenseStudyConfig, summary: list[dict[str, Any]]) -> str:
    def f(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.3f}"

    def ci(s: dict[str, Any], name: str) -> str:
        return f"{f(s[name + '_mean'])} [{f(s[name + '_t_low'])}, {f(s[name + '_t_high'])}]"

    lines = ["| method | error rate | minus plain DPO (paired) | pooled errors/n [Wilson] | good rate | "
             "minus plain DPO (paired) | well-formed | KL to base | positive rate |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {ci(s, 'error_rate')} | {ci(s, 'vs_plain_error')} | {s['errors']}/{s['n']} "
                     f"[{f(s['pooled_wilson_low'])}, {f(s['pooled_wilson_high'])}] | {ci(s, 'good')} | "
                     f"{ci(s, 'vs_plain_good')} | {ci(s, 'well_formed')} | {ci(s, 'kl')} | {f(s['positive_rate_mean'])} |")
    lines += ["", f"Means over {summary[0]['seeds']} seeds with 95% t-intervals; paired differences against the plain "
              "DPO of the same normalisation (dpo for summed, dpo_mean for averaged methods), same seed. Error rate: "
              "share of sampled held-out reviews with a wrong word; good rate: well-formed and without one."]
    lines += ["", f"{cfg.steps} steps x {cfg.per_device_batch_size} pairs per method and seed; gamma {cfg.gamma}, "
              f"beta {cfg.beta} (summed), {cfg.beta_average} (averaged).", "",
              "Command: `diffdpo study-dense --config configs/study_dense_tiny.yaml`", "",
              f"Config: `{json.dumps(asdict(cfg))}`", ""]
    return "\n".join(lines)


def run_dense_study(cfg: DenseStudyConfig) -> list[dict[str, Any]]:
    """Every seed (base + methods), then results.csv, summary.csv, study.png and summary.md; the summary rows."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for row in run_seed(cfg, seed):
            print(f"study-dense {row['method']} seed {seed}: error rate {row['error_rate']:.3f} "
                  f"[{row['error_low']:.3f}, {row['error_high']:.3f}], well-formed {row['well_formed_rate']:.3f}, "
                  f"KL {row['kl']:.3f}")
            rows.append(row)
        write_csv(out / "results.csv", rows, RESULT_COLUMNS)  # after every seed: a crash keeps the rest
    summary = summarise(rows)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    plot_study(summary, out / "study.png", rows)
    (out / "summary.md").write_text(_markdown(cfg, summary))
    return summary

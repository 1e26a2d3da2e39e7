"""Separability of preference data: single-model vs multi-model pairs, and what DPO learns from each.

"More is Less" (Wang et al. 2025, arXiv 2504.02193): pairs with the chosen completion from a stronger model
and the rejected one self-generated are highly linearly separable, and DPO on them learns a shortcut (more
reward hacking, jailbreaks); self-generated pairs ranked by a judge are safer.
``diffdpo study-separability --config configs/study_separability_tiny.yaml``, per seed of ``seeds``:

1. **Two sets on the same prompts.** ``samples_per_prompt`` samples of the policy (the base) per prompt,
   scored by the gold judge. *Single-model*: best vs worst of them. *Multi-model*: the same worst as
   rejected, the chosen written by a stronger generator (tiny world: :func:`diffdpo.toy.tiny_lm_style.style_review`,
   4 positive adjectives in alphabetical order; a real model: one sample of ``strong_model``). Ties dropped.
2. **Probes** (:mod:`diffdpo.eval.probe`, held-out accuracy on a 30% split by pair): a logistic regression on
   the policy's pooled last hidden states over the completion tokens, chosen vs rejected as two classes
   (``rows``, the separability) and on the pair difference (``difference``); the same ``rows`` probe on the
   length alone and on bag-of-words counts, the shortcuts.
3. **DPO on each set** (same steps, ``train_config``) and two measures: the gold win rate against the base on
   held-out prompts (:func:`~diffdpo.recipes.studies.common.evaluate_vs_base`), and the **robustness** on
   held-out adversarial pairs where the shortcut and the gold disagree (tiny world:
   :func:`diffdpo.toy.tiny_lm_style.adversarial_pairs`, held-out subjects; a real model: the ``adversarial``
   file): the share of pairs whose gold-better completion gets the higher DPO implicit reward
   ``log pi(y|x) - log pi_base(y|x)`` (a tie counts half). On the tiny world also the **style rate**: the share
   of the policy's held-out samples in the stronger generator's form (the shortcut taken when writing).

Outputs under ``out_dir``: ``results.csv`` (one row per set and seed), ``summary.csv`` (per set, mean over
seeds with 95% t-intervals), ``separability.png`` (robustness and win rate vs separability, one point per
set, 95% error bars on both axes) and ``summary.md``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.config import help_meta
from diffdpo.recipes.studies.common import evaluate_vs_base, read_csv, t_interval, write_csv
from diffdpo.recipes.studies.length import (
    best_worst_pairs,
    load_lm,
    method_overrides,
    train_with_evals,
    write_jsonl,
)
from diffdpo.recipes.studies.online import world_root
from diffdpo.rewards.lm import n_words

read_results = read_csv

SETS = ("single_model", "multi_model")
PROBES = ("probe_hidden_rows", "probe_hidden_diff", "probe_length_rows", "probe_bow_rows")
_METRICS = (*PROBES, "win_rate", "kl", "robustness", "style_rate", "length_words")
RESULT_COLUMNS = ["set", "seed", "pairs", "ties_dropped", "chosen_gold", "rejected_gold", "chosen_words",
                  "rejected_words", *PROBES, "probe_heldout", "wins", "ties", "losses", "win_rate", "win_rate_low",
                  "win_rate_high", "kl", "robustness", "robustness_n", "style_rate", "length_words"]
SUMMARY_COLUMNS = ["set", "seeds"] + [f"{m}_{s}" for m in _METRICS for s in ("mean", "low", "high")]

COMMAND = "diffdpo study-separability --config configs/study_separability_tiny.yaml"


@dataclass
class SeparabilityStudyConfig:
    """The ``diffdpo study-separability`` recipe (tiny review world by default, real models on a GPU)."""

    out_dir: str = field(default="runs/study_separability_tiny", metadata=help_meta("sets, CSVs, PNG and summary.md go here"))
    world: str = field(default="runs/tiny_lm_world", metadata=help_meta(
        "tiny world of seed 0 (seed s: <world>_seed<s>); unused with model"))
    train_config: str = field(default="configs/study_separability_train_tiny.yaml", metadata=help_meta(
        "training YAML (task lm); the study sets model, data, loss, steps and batch"))
    model: str = field(default="", metadata=help_meta("policy (base) model path or hub id; empty = the tiny world's"))
    strong_model: str = field(default="", metadata=help_meta("stronger generator for the multi-model chosen (with model)"))
    gold_model: str = field(default="", metadata=help_meta("gold reward model (sequence classifier) (with model)"))
    prompts: str = field(default="", metadata=help_meta("training prompts file (with model)"))
    eval_prompts: str = field(default="", metadata=help_meta("held-out prompts file (with model)"))
    adversarial: str = field(default="", metadata=help_meta(
        "jsonl of held-out prompt/chosen/rejected pairs, gold prefers chosen, the shortcut rejected (with model)"))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=help_meta("seeds (world, sets, training)"))
    steps: int = field(default=32, metadata=help_meta("DPO steps on each set"))
    per_device_batch_size: int = field(default=16, metadata=help_meta("pairs per step"))
    beta: float = field(default=0.1, metadata=help_meta("DPO beta"))
    samples_per_prompt: int = field(default=4, metadata=help_meta("policy samples per prompt (best vs worst)"))
    eval_samples_per_prompt: int = field(default=32, metadata=help_meta("policy/base comparisons per held-out prompt"))
    adversarial_per_prompt: int = field(default=16, metadata=help_meta("tiny world: adversarial pairs per held-out subject"))
    max_new_tokens: int = field(default=16, metadata=help_meta("sampled tokens per completion"))
    heldout_fraction: float = field(default=0.3, metadata=help_meta("share of pairs held out by the probes"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples"))
    sft_steps: int = field(default=300, metadata=help_meta("SFT steps of the tiny world's base model (its default)"))
    fast: bool = field(default=False, metadata=help_meta(
        "tests: first seed, 3 steps of 4 pairs, 4 comparisons per prompt, 60 SFT steps"))

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        if self.fast:
            self.seeds, self.steps, self.per_device_batch_size = self.seeds[:1], 3, 4
            self.eval_samples_per_prompt, self.adversarial_per_prompt, self.sft_steps = 4, 4, 60
        if self.steps < 1 or self.per_device_batch_size < 1 or self.samples_per_prompt < 2:
            raise ValueError("steps and per_device_batch_size must be >= 1, samples_per_prompt >= 2")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        real = (self.strong_model, self.gold_model, self.prompts, self.eval_prompts, self.adversarial)
        if self.model and not all(real):
            raise ValueError("model is set: set strong_model, gold_model, prompts, eval_prompts and adversarial too")


@dataclass
class World:
    """What one seed needs: the policy, prompts, a gold reward model, the stronger generator, adversarial pairs."""

    model_dir: str
    train_prompts: list[str]
    eval_prompts: list[str]
    gold: Any  # reward model: (prompts, completions) -> (N,)
    strong: Any  # (prompts, seed) -> one chosen completion per prompt
    adversarial: list[dict[str, str]]
    tiny: bool


def build(cfg: SeparabilityStudyConfig, seed: int) -> World:
    """The tiny world of the seed with the style generator, or the configured real models."""
    import torch

    if cfg.model:
        from diffdpo.eval.compare import read_prompts
        from diffdpo.lm.data import load_rows
        from diffdpo.lm.generate import sample_completions
        from diffdpo.rewards.lm import HFRewardModel

        device = "cuda" if torch.cuda.is_available() else "cpu"

        def strong(prompts: list[str], s: int) -> list[str]:
            model, tok = load_lm(cfg.strong_model, device)
            return sample_completions(model, tok, prompts, n=1, max_new_tokens=cfg.max_new_tokens, seed=s).texts

        return World(cfg.model, read_prompts(cfg.prompts), read_prompts(cfg.eval_prompts),
                     HFRewardModel(cfg.gold_model, device=device), strong, load_rows(cfg.adversarial)[0], tiny=False)
    from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, SUBJECTS, build_world, prompt_for
    from diffdpo.toy.tiny_lm_judge import TinyWorldJudge
    from diffdpo.toy.tiny_lm_style import adversarial_pairs, style_review

    world = build_world(world_root(cfg, seed), seed=seed, sft_steps=cfg.sft_steps)

    def strong(prompts: list[str], s: int) -> list[str]:
        rng = random.Random(s)
        return [style_review(rng) for _ in prompts]

    return World(str(world.model_dir), [prompt_for(s) for s in SUBJECTS], [prompt_for(s) for s in EVAL_SUBJECTS],
                 TinyWorldJudge(), strong, adversarial_pairs(EVAL_SUBJECTS, cfg.adversarial_per_prompt, seed + 100),
                 tiny=True)


def make_sets(cfg: SeparabilityStudyConfig, world: World, model: Any, tokenizer: Any, seed: int
              ) -> dict[str, tuple[list[dict[str, str]], int]]:
    """Set name -> (pairs, ties dropped): single-model best vs worst; multi-model strong chosen vs that worst."""
    from diffdpo.lm.generate import sample_completions

    n_prompts = cfg.steps * cfg.per_device_batch_size
    prompts = [world.train_prompts[i % len(world.train_prompts)] for i in range(n_prompts)]
    comps = sample_completions(model, tokenizer, prompts, n=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                               seed=seed)
    rows = [prompts[i] for i in comps.prompt_index.tolist()]
    scores = world.gold(rows, comps.texts).tolist()
    single, single_ties = best_worst_pairs(comps, scores)
    worst: dict[int, int] = {}
    for r, i in enumerate(comps.prompt_index.tolist()):
        if i not in worst or scores[r] < scores[worst[i]]:
            worst[i] = r
    strong = world.strong(prompts, seed + 1)
    strong_scores = world.gold(prompts, strong).tolist()
    multi, multi_ties = [], 0
    for i, p in enumerate(prompts):
        if strong_scores[i] <= scores[worst[i]]:  # the strong one is not better: no pair
            multi_ties += 1
            continue
        multi.append({"prompt": p, "chosen": strong[i], "rejected": comps.texts[worst[i]]})
    for name, pairs in (("single_model", single), ("multi_model", multi)):
        if len(pairs) < cfg.per_device_batch_size:
            raise ValueError(f"{name}: only {len(pairs)} pairs for seed {seed}; raise steps or samples_per_prompt")
    return {"single_model": (single, single_ties), "multi_model": (multi, multi_ties)}


def probe_set(pairs: list[dict[str, str]], model: Any, tokenizer: Any, *, seed: int, heldout_fraction: float
              ) -> dict[str, Any]:
    """Held-out accuracies of the four probes on one set (see the module docstring)."""
    from diffdpo.eval.probe import bag_of_words_features, length_features, pair_probe, pooled_hidden_states

    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    kw = dict(seed=seed, heldout_fraction=heldout_fraction)
    h_w = pooled_hidden_states(model, tokenizer, prompts, chosen)
    h_l = pooled_hidden_states(model, tokenizer, prompts, rejected)
    bow, _ = bag_of_words_features(chosen + rejected)
    rows = pair_probe(h_w, h_l, mode="rows", **kw)
    return {"probe_hidden_rows": rows.heldout_accuracy,
            "probe_hidden_diff": pair_probe(h_w, h_l, mode="difference", **kw).heldout_accuracy,
            "probe_length_rows": pair_probe(length_features(chosen), length_features(rejected), mode="rows",
                                            **kw).heldout_accuracy,
            "probe_bow_rows": pair_probe(bow[: len(pairs)], bow[len(pairs):], mode="rows", **kw).heldout_accuracy,
            "probe_heldout": rows.n_heldout}


def implicit_reward_accuracy(policy: Any, base: Any, tokenizer: Any, pairs: list[dict[str, str]]) -> float:
    """Share of pairs with ``log pi(y_w|x) - log pi_base(y_w|x) > `` the same for ``y_l`` (ties half): the DPO
    implicit reward's ranking, completions ending with EOS. The log-ratios are the per-sequence k1 values of
    :func:`diffdpo.eval.kl.lm_kl_estimates` (``sum_t log pi - log pi_ref``), used here on given texts."""
    from types import SimpleNamespace

    from diffdpo.eval.kl import lm_kl_estimates

    prompt_ids, completion_ids = [], []
    for p in pairs:
        for key in ("chosen", "rejected"):
            prompt_ids.append(tokenizer(p["prompt"])["input_ids"])
            completion_ids.append(tokenizer(p[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    est = lm_kl_estimates(policy, SimpleNamespace(prompt_ids=prompt_ids, completion_ids=completion_ids),
                          ref_model=base, pad_token_id=tokenizer.pad_token_id or 0)
    u = est.per_sequence["k1"].view(-1, 2)  # (pairs, [chosen, rejected])
    return float(((u[:, 0] > u[:, 1]).double() + 0.5 * (u[:, 0] == u[:, 1]).double()).mean())


def style_and_length(policy: Any, tokenizer: Any, world: World, cfg: SeparabilityStudyConfig) -> tuple[float, float]:
    """Tiny world: share of the policy's held-out samples in the stronger generator's form, mean words."""
    from diffdpo.lm.generate import sample_completions

    comps = sample_completions(policy, tokenizer, world.eval_prompts, n=cfg.eval_samples_per_prompt,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed)
    words = sum(n_words(t) for t in comps.texts) / len(comps.texts)
    if not world.tiny:
        return math.nan, words
    from diffdpo.toy.tiny_lm_style import has_style_form

    return sum(has_style_form(t) for t in comps.texts) / len(comps.texts), words


def run_seed(cfg: SeparabilityStudyConfig, seed: int) -> list[dict[str, Any]]:
    """Both sets of one seed: data, probes, DPO, evaluations."""
    import torch

    from diffdpo.rewards.lm import BradleyTerryPreference

    world = build(cfg, seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tokenizer = load_lm(world.model_dir, device)
    out = Path(cfg.out_dir)
    with torch.no_grad():
        sets = make_sets(cfg, world, base, tokenizer, seed)
    rows = []
    for name, (pairs, ties) in sets.items():
        data = write_jsonl(out / "data" / f"seed{seed}" / f"{name}.jsonl", pairs)
        pp = [p["prompt"] for p in pairs]
        row: dict[str, Any] = {
            "set": name, "seed": seed, "pairs": len(pairs), "ties_dropped": ties,
            "chosen_gold": float(world.gold(pp, [p["chosen"] for p in pairs]).mean()),
            "rejected_gold": float(world.gold(pp, [p["rejected"] for p in pairs]).mean()),
            "chosen_words": sum(n_words(p["chosen"]) for p in pairs) / len(pairs),
            "rejected_words": sum(n_words(p["rejected"]) for p in pairs) / len(pairs)}
        row.update(probe_set(pairs, base, tokenizer, seed=seed, heldout_fraction=cfg.heldout_fraction))
        overrides = method_overrides(name, "sigmoid", (), model_dir=world.model_dir, data=data,
                                     run_dir=out / "runs" / name / f"seed{seed}", seed=seed, steps=cfg.steps,
                                     batch=cfg.per_device_batch_size, beta=cfg.beta)
        policy = train_with_evals(cfg.train_config, overrides, (), lambda *_: None).eval()
        prefer = None if world.tiny else BradleyTerryPreference(world.gold, hard=True)
        with torch.no_grad():
            row.update(evaluate_vs_base(policy, base, tokenizer, samples_per_prompt=cfg.eval_samples_per_prompt,
                                        max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed,
                                        prompts=world.eval_prompts, prefer=prefer))
            row["robustness"] = implicit_reward_accuracy(policy, base, tokenizer, world.adversarial)
            row["robustness_n"] = len(world.adversarial)
            row["style_rate"], row["length_words"] = style_and_length(policy, tokenizer, world, cfg)
        print(f"study-separability {name} seed {seed}: hidden probe {row['probe_hidden_rows']:.3f}, length probe "
              f"{row['probe_length_rows']:.3f}, win rate {row['win_rate']:.3f}, robustness {row['robustness']:.3f}, "
              f"style rate {row['style_rate']:.3f}")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# summary, plot, markdown


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per set (first-seen order): mean over seeds with a 95% t-interval of each metric."""
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        s: dict[str, Any] = {"set": name, "seeds": len(mine)}
        for m in _METRICS:
            s[f"{m}_mean"], s[f"{m}_low"], s[f"{m}_high"] = t_interval([float(r[m]) for r in mine])
        out.append(s)
    return out


def plot_study(summary: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Robustness and gold win rate vs separability (hidden-state probe), one point per set, 95% t error bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)

    def err(s: dict[str, Any], m: str) -> list[list[float]]:
        mean, lo, hi = float(s[f"{m}_mean"]), float(s[f"{m}_low"]), float(s[f"{m}_high"])
        return [[0.0], [0.0]] if math.isnan(lo) else [[mean - lo], [hi - mean]]

    for ax, metric, label in ((axes[0], "robustness", "robustness (adversarial pairs ranked right)"),
                              (axes[1], "win_rate", "gold win rate vs base")):
        for s in summary:
            ax.errorbar(float(s["probe_hidden_rows_mean"]), float(s[f"{metric}_mean"]), xerr=err(s, "probe_hidden_rows"),
                        yerr=err(s, metric), fmt="o", capsize=3, label=s["set"])
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("separability: hidden-state probe, held-out accuracy")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("single-model vs multi-model preference sets (95% t-intervals over seeds)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _ci(s: dict[str, Any], m: str) -> str:
    def f(x: Any) -> str:
        return "n/a" if math.isnan(float(x)) else f"{float(x):.3f}"

    return f"{f(s[f'{m}_mean'])} [{f(s[f'{m}_low'])}, {f(s[f'{m}_high'])}]"


def _markdown(cfg: SeparabilityStudyConfig, summary: list[dict[str, Any]]) -> str:
    cols = [("probe_hidden_rows", "hidden probe (rows)"), ("probe_hidden_diff", "hidden probe (difference)"),
            ("probe_length_rows", "length probe"), ("probe_bow_rows", "bag-of-words probe"),
            ("win_rate", "gold win rate vs base"), ("robustness", "robustness"), ("style_rate", "style rate"),
            ("length_words", "words"), ("kl", "KL to base")]
    lines = ["| set | seeds | " + " | ".join(label for _, label in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for s in summary:
        lines.append(f"| {s['set']} | {s['seeds']} | " + " | ".join(_ci(s, m) for m, _ in cols) + " |")
    lines += ["", "Means over seeds with 95% t-intervals; probes: held-out accuracy (chance 0.5).", "",
              f"Command: `{COMMAND}`", "", f"Config: `{json.dumps(asdict(cfg))}`", ""]
    return "\n".join(lines)


def run_separability_study(cfg: SeparabilityStudyConfig) -> list[dict[str, Any]]:
    """Every seed, then results.csv, summary.csv, separability.png and summary.md; the summary rows."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        rows += run_seed(cfg, seed)
        write_csv(out / "results.csv", rows, RESULT_COLUMNS)  # after every seed: a crash keeps the rest
    summary = summarise(rows)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    plot_study(summary, out / "separability.png")
    (out / "summary.md").write_text(_markdown(cfg, summary))
    return summary

"""Length exploitation: how long do completions grow under a length-biased judge, and does length-regularised
DPO hold them back? (CheXalign, Hein et al. 2024, arXiv 2410.07025: lengths grew up to 3.2x.)

``diffdpo study-length --config configs/study_length_tiny.yaml``, per seed of ``seeds``:

1. **World.** The long-review tiny world (:mod:`diffdpo.toy.tiny_lm_long`, its base writes 1-8 adjectives,
   about 2 on average) for seed ``s`` under ``<world>`` (``<world>_seed<s>`` for s > 0), or a real model
   (``model``, a path or hub id) with prompt files and a reward model (``gold_model``) as the gold.
2. **Pairs, as CheXalign.** ``samples_per_prompt`` completions of the base per training prompt (temperature
   1), scored by the **length-biased proxy** :class:`diffdpo.rewards.lm.NoisyJudge` (gold +
   ``length_bias`` x whitespace words); best vs worst is a pair, ties dropped. KTO reads the same pairs
   unpaired: chosen -> desirable, rejected -> undesirable.
3. **Training.** Each method of ``methods`` (DPO, IPO, KTO, ORPO, length-regularised DPO
   ``-logsigmoid(beta * h + alpha * (|y_w| - |y_l|))`` with token lengths, :func:`diffdpo.losses.preference_loss`
   ``loss_type="length_dpo"``) trains ``steps`` steps of ``per_device_batch_size`` pairs (one epoch of the
   pairs with the defaults) through the one training loop, from ``train_config`` (a training YAML whose
   model, data and loss the study fills in).
4. **Evaluation** every ``eval_every`` steps and at step 0 (the base): ``eval_samples_per_prompt``
   completions per held-out prompt (temperature 1, seed ``eval_seed``): mean length in words and tokens, the
   length ratio to the base (per prompt: the base's mean words on that prompt), the gold score and the
   **length-controlled gold** ``gold / max(words / ref_words, 1)`` per completion (CheXalign's length-controlled
   score, the reference being the base's mean length on the prompt).

Outputs under ``out_dir``: ``results.csv`` (one row per method, seed and evaluation step), ``pairs.csv`` (the
pairs' lengths and gold per seed: what the proxy rewards), ``summary.csv`` (per method and step, mean over
seeds with 95% t-intervals), ``length.png`` (length ratio and length-controlled gold vs step, bands = 95%
t-intervals) and ``summary.md`` (maximum growth per method, what the regulariser does, the command).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.config import help_meta
from diffdpo.recipes.studies.common import read_csv, t_interval, write_csv
from diffdpo.recipes.studies.online import world_root  # seed 0: world, seed s: <world>_seed<s>
from diffdpo.rewards.lm import n_words

read_results = read_csv  # the name the notebook and tests use

#: method -> (loss.type, extra training overrides); length_dpo's alpha comes from the study's length_alpha
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dpo": ("sigmoid", ()),
    "ipo": ("ipo", ()),
    "kto": ("kto", ("lm.layout=packed",)),
    "orpo": ("orpo", ("lm.average_log_prob=true",)),
    "length_dpo": ("length_dpo", ()),
    "dpo_gold_pairs": ("sigmoid", ()),  # control: DPO on pairs ranked by the gold, no length bias
}

RESULT_COLUMNS = ["method", "seed", "step", "pairs_seen", "length_words", "length_tokens", "length_ratio", "gold",
                  "lc_gold", "proxy", "unfinished"]
PAIR_COLUMNS = ["seed", "pairs", "ties_dropped", "chosen_words", "rejected_words", "chosen_gold", "rejected_gold",
                "chosen_longer"]
_METRICS = ("length_ratio", "length_words", "length_tokens", "gold", "lc_gold")
SUMMARY_COLUMNS = ["method", "step", "seeds"] + [f"{m}_{s}" for m in _METRICS for s in ("mean", "low", "high")]

COMMAND = "diffdpo study-length --config configs/study_length_tiny.yaml"


@dataclass
class LengthStudyConfig:
    """The ``diffdpo study-length`` recipe (tiny long-review world by default, a real model on a GPU)."""

    out_dir: str = field(default="runs/study_length_tiny", metadata=help_meta("pairs, CSVs, PNG and summary.md go here"))
    world: str = field(default="runs/tiny_lm_long_world", metadata=help_meta(
        "long-review tiny world of seed 0 (seed s: <world>_seed<s>); unused with model"))
    train_config: str = field(default="configs/study_length_train_tiny.yaml", metadata=help_meta(
        "training YAML (task lm); the study sets model, data, loss type, steps and batch"))
    model: str = field(default="", metadata=help_meta("base model path or hub id; empty = the tiny world's"))
    prompts: str = field(default="", metadata=help_meta("training prompts file (read_prompts); empty = the tiny world's"))
    eval_prompts: str = field(default="", metadata=help_meta("held-out prompts file; empty = the tiny world's"))
    gold_model: str = field(default="", metadata=help_meta(
        "gold reward model (sequence classifier path or hub id); empty = the tiny world's mean sentiment"))
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata=help_meta(
        "methods to run: " + ", ".join(METHODS)))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=help_meta("seeds (world, pairs, training)"))
    steps: int = field(default=32, metadata=help_meta("optimizer steps per method"))
    per_device_batch_size: int = field(default=16, metadata=help_meta("pairs per step"))
    eval_every: int = field(default=8, metadata=help_meta("evaluate every N steps (and at step 0)"))
    beta: float = field(default=0.1, metadata=help_meta("beta of every method (ORPO: lambda), CheXalign 0.1"))
    length_alphas: list[float] = field(default_factory=lambda: [0.05, 0.5], metadata=help_meta(
        "length_dpo's alphas per token of length gap; one run each, named length_dpo_a<alpha>"))
    length_bias: float = field(default=0.25, metadata=help_meta("proxy = gold + length_bias x words"))
    samples_per_prompt: int = field(default=4, metadata=help_meta("base samples per training prompt (best vs worst)"))
    eval_samples_per_prompt: int = field(default=32, metadata=help_meta("samples per held-out prompt per evaluation"))
    max_new_tokens: int = field(default=24, metadata=help_meta("sampled tokens per completion (8 adjectives = 16 + EOS)"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples"))
    sft_steps: int = field(default=400, metadata=help_meta("SFT steps of the tiny world's base model"))
    fast: bool = field(default=False, metadata=help_meta(
        "tests: first seed, 4 steps of 4 pairs, evaluation every 2 steps, 4 samples per prompt, 60 SFT steps"))

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; use some of {', '.join(METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        if self.fast:
            self.seeds, self.steps, self.per_device_batch_size, self.eval_every = self.seeds[:1], 4, 4, 2
            self.eval_samples_per_prompt, self.sft_steps = 4, 60
        if self.steps < 1 or self.per_device_batch_size < 1 or self.eval_every < 1 or self.samples_per_prompt < 2:
            raise ValueError("steps, per_device_batch_size and eval_every must be >= 1, samples_per_prompt >= 2")
        if not self.length_alphas or min(self.length_alphas) < 0 or self.beta <= 0:
            raise ValueError(f"length_alphas must be >= 0 (at least one) and beta > 0, got {self.length_alphas} "
                             f"and {self.beta}")
        if self.model and not (self.prompts and self.eval_prompts and self.gold_model):
            raise ValueError("model is set: set prompts, eval_prompts and gold_model too (the tiny world's are "
                             "only for its own model)")


# ------------------------------------------------------------------------------------------------
# what both studies share: a base (world or real model), best-vs-worst pairs, training with evaluations


@dataclass
class Base:
    """A base model and the prompts and gold judge that go with it."""

    model_dir: str
    train_prompts: list[str]
    eval_prompts: list[str]
    gold: Callable[[Sequence[str], Sequence[str]], Any]  # reward model: (prompts, completions) -> (N,)


def repo_path(path: str) -> Path:
    """A relative config path is looked up from the working directory, then from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(__file__).resolve().parents[3] / p


def load_lm(path: str | Path, device: Any = "cpu") -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer) from a local folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path)


def best_worst_pairs(completions: Any, scores: Sequence[float]) -> tuple[list[dict[str, str]], int]:
    """Per prompt row of :class:`diffdpo.lm.generate.Completions`: its best-scored sample as chosen, its worst
    as rejected (the first of equals); prompts whose samples all score the same are dropped (ties).
    Returns the pair rows and the number of ties."""
    groups: dict[int, list[int]] = {}
    for row, i in enumerate(completions.prompt_index.tolist()):
        groups.setdefault(i, []).append(row)
    pairs, ties = [], 0
    for i, rows in groups.items():
        best = max(rows, key=lambda r: scores[r])
        worst = min(rows, key=lambda r: scores[r])
        if scores[best] == scores[worst]:
            ties += 1
            continue
        pairs.append({"prompt": completions.prompts[i], "chosen": completions.texts[best],
                      "rejected": completions.texts[worst]})
    return pairs, ties


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_with_evals(train_config: str, overrides: Sequence[str], eval_steps: Sequence[int],
                     evaluate: Callable[[Any, int], None]) -> Any:
    """Set up the one training loop from ``train_config`` + ``overrides`` and step it to ``max_steps``,
    calling ``evaluate(policy_model, step)`` after each step in ``eval_steps``; the trained policy model."""
    from diffdpo.train import load_train_config, micro_batches, setup, train_step

    tr = setup(load_train_config(repo_path(train_config), overrides))
    batches = micro_batches(tr.task, tr.cfg, tr.accelerator, tr.state)
    while tr.state.step < tr.cfg.max_steps:
        train_step(tr, batches)
        tr.state.step += 1
        if tr.state.step in eval_steps:
            evaluate(tr.task.policy.model, tr.state.step)
    return tr.task.policy.model


def method_overrides(method: str, loss_type: str, extra: Sequence[str], *, model_dir: str, data: Path,
                     run_dir: Path, seed: int, steps: int, batch: int, beta: float) -> list[str]:
    return [f"output_dir={run_dir}", f"seed={seed}", f"max_steps={steps}", f"per_device_batch_size={batch}",
            "gradient_accumulation_steps=1", "progress_bar=false", "tensorboard=false", "checkpoint_every=0",
            "eval_every=0", "overwrite=true", f"loss.type={loss_type}", f"loss.beta={beta}",
            f"lm.model.pretrained={model_dir}", f"lm.data.source={data}", *extra]


# ------------------------------------------------------------------------------------------------
# the study


def lc_gold(gold: float, words: float, ref_words: float) -> float:
    """CheXalign's length-controlled score: ``gold / max(words / ref_words, 1)``; longer than the reference
    divides the score by the length ratio, shorter leaves it as it is."""
    return gold / max(words / ref_words, 1.0)


def build_base(cfg: LengthStudyConfig, seed: int) -> Base:
    """The tiny long-review world of the seed (built once), or the configured real model."""
    from diffdpo.rewards.lm import ProgramJudge

    if cfg.model:
        import torch

        from diffdpo.eval.compare import read_prompts
        from diffdpo.rewards.lm import HFRewardModel

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return Base(cfg.model, read_prompts(cfg.prompts), read_prompts(cfg.eval_prompts),
                    HFRewardModel(cfg.gold_model, device=device))
    from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, SUBJECTS, prompt_for
    from diffdpo.toy.tiny_lm_long import build_long_world, mean_sentiment

    world = build_long_world(world_root(cfg, seed), seed=seed, sft_steps=cfg.sft_steps)
    return Base(str(world.model_dir), [prompt_for(s) for s in SUBJECTS], [prompt_for(s) for s in EVAL_SUBJECTS],
                ProgramJudge(lambda prompt, completion: mean_sentiment(completion), name="mean sentiment"))


def make_pairs(cfg: LengthStudyConfig, base: Base, model: Any, tokenizer: Any, seed: int, data_dir: Path
               ) -> dict[str, Any]:
    """Sample, score by the length-biased proxy, keep best vs worst; write pairs.jsonl and unpaired.jsonl."""
    from diffdpo.lm.generate import sample_completions
    from diffdpo.rewards.lm import NoisyJudge

    n_prompts = cfg.steps * cfg.per_device_batch_size  # one epoch of pairs (fewer after ties)
    prompts = [base.train_prompts[i % len(base.train_prompts)] for i in range(n_prompts)]
    comps = sample_completions(model, tokenizer, prompts, n=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                               seed=seed)
    proxy = NoisyJudge(base.gold, length_bias=cfg.length_bias)
    rows = [prompts[i] for i in comps.prompt_index.tolist()]
    scores = proxy(rows, comps.texts).tolist()
    pairs, ties = best_worst_pairs(comps, scores)
    gold_pairs, _ = best_worst_pairs(comps, base.gold(rows, comps.texts).tolist())  # the control's pairs
    if min(len(pairs), len(gold_pairs)) < cfg.per_device_batch_size:
        raise ValueError(f"only {min(len(pairs), len(gold_pairs))} untied pairs for seed {seed}: raise "
                         "samples_per_prompt or steps")
    write_jsonl(data_dir / "pairs.jsonl", pairs)
    write_jsonl(data_dir / "pairs_gold.jsonl", gold_pairs)
    write_jsonl(data_dir / "unpaired.jsonl", [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                                              for p in pairs for k in ("chosen", "rejected")])
    pp = [p["prompt"] for p in pairs]
    gold_w = base.gold(pp, [p["chosen"] for p in pairs]).tolist()
    gold_l = base.gold(pp, [p["rejected"] for p in pairs]).tolist()
    words_w = [n_words(p["chosen"]) for p in pairs]
    words_l = [n_words(p["rejected"]) for p in pairs]
    return {"seed": seed, "pairs": len(pairs), "ties_dropped": ties, "chosen_words": _mean(words_w),
            "rejected_words": _mean(words_l), "chosen_gold": _mean(gold_w), "rejected_gold": _mean(gold_l),
            "chosen_longer": _mean([float(a > b) for a, b in zip(words_w, words_l)])}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def evaluate_lengths(model: Any, tokenizer: Any, base: Base, *, samples_per_prompt: int, max_new_tokens: int,
                     seed: int, ref_words: dict[str, float] | None = None) -> dict[str, Any]:
    """Lengths, gold and length-controlled gold of ``model``'s samples on the held-out prompts.

    ``ref_words`` (prompt -> the base's mean words there) is the reference of the length ratio and of the
    length-controlled gold; ``None`` = these samples are the base's (ratio 1), and the returned
    ``ref_words`` is that table. Tokens: completion tokens without the EOS.
    """
    from diffdpo.lm.generate import sample_completions

    comps = sample_completions(model, tokenizer, base.eval_prompts, n=samples_per_prompt,
                               max_new_tokens=max_new_tokens, seed=seed)
    prompts = [base.eval_prompts[i] for i in comps.prompt_index.tolist()]
    words = [n_words(t) for t in comps.texts]
    tokens = [len(c) - int(f) for c, f in zip(comps.completion_ids, comps.finished.tolist())]
    if ref_words is None:
        per: dict[str, list[int]] = {}
        for p, w in zip(prompts, words):
            per.setdefault(p, []).append(w)
        ref_words = {p: max(_mean(ws), 1e-9) for p, ws in per.items()}
    gold = base.gold(prompts, comps.texts).tolist()
    return {"length_words": _mean(words), "length_tokens": _mean(tokens),
            "length_ratio": _mean([w / ref_words[p] for p, w in zip(prompts, words)]),
            "gold": _mean(gold), "lc_gold": _mean([lc_gold(g, w, ref_words[p]) for g, w, p in zip(gold, words, prompts)]),
            "unfinished": 1.0 - _mean(comps.finished.float().tolist()), "ref_words": ref_words}


def runs(cfg: LengthStudyConfig) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(run name, loss type, extra overrides, data file) per training run: one per method, one per alpha of
    length_dpo (``length_dpo_a<alpha>``)."""
    out = []
    for method in cfg.methods:
        loss_type, extra = METHODS[method]
        data = {"kto": "unpaired.jsonl", "dpo_gold_pairs": "pairs_gold.jsonl"}.get(method, "pairs.jsonl")
        if method == "length_dpo":
            out += [(f"length_dpo_a{a:g}", loss_type, (*extra, f"loss.length_alpha={a}"), data)
                    for a in cfg.length_alphas]
        else:
            out.append((method, loss_type, extra, data))
    return out


def run_seed(cfg: LengthStudyConfig, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs from the seed's base, then every method trained with its evaluations: (result rows, pair stats)."""
    import torch

    base = build_base(cfg, seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_lm(base.model_dir, device)
    out = Path(cfg.out_dir)
    data_dir = out / "data" / f"seed{seed}"
    ev = dict(samples_per_prompt=cfg.eval_samples_per_prompt, max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed)
    with torch.no_grad():
        pair_stats = make_pairs(cfg, base, model, tokenizer, seed, data_dir)
        base_eval = evaluate_lengths(model, tokenizer, base, **ev)
    del model
    ref_words = base_eval.pop("ref_words")
    rows = []
    eval_steps = sorted({s for s in range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)} | {cfg.steps})
    for method, loss_type, extra, data_name in runs(cfg):
        data = data_dir / data_name
        rows.append(_row(cfg, method, seed, 0, base_eval))

        def evaluate(policy: Any, step: int, method: str = method) -> None:
            with torch.no_grad():
                result = evaluate_lengths(policy, tokenizer, base, ref_words=ref_words, **ev)
            result.pop("ref_words")
            rows.append(_row(cfg, method, seed, step, result))
            print(f"study-length {method} seed {seed} step {step}: length x{result['length_ratio']:.2f}, "
                  f"gold {result['gold']:.3f}, LC gold {result['lc_gold']:.3f}")

        overrides = method_overrides(method, loss_type, extra, model_dir=base.model_dir, data=data,
                                     run_dir=out / "runs" / method / f"seed{seed}", seed=seed, steps=cfg.steps,
                                     batch=cfg.per_device_batch_size, beta=cfg.beta)
        train_with_evals(cfg.train_config, overrides, eval_steps, evaluate)
    return rows, pair_stats


def _row(cfg: LengthStudyConfig, method: str, seed: int, step: int, result: dict[str, Any]) -> dict[str, Any]:
    proxy = result["gold"] + cfg.length_bias * result["length_words"]  # mean proxy = mean gold + bias x mean words
    return {"method": method, "seed": seed, "step": step, "pairs_seen": step * cfg.per_device_batch_size,
            **{k: result[k] for k in ("length_words", "length_tokens", "length_ratio", "gold", "lc_gold",
                                      "unfinished")}, "proxy": proxy}


# ------------------------------------------------------------------------------------------------
# summary, plot, markdown


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and step (first-seen order): mean over seeds with 95% t-intervals of each metric."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for step in sorted({int(r["step"]) for r in mine}):
            at = [r for r in mine if int(r["step"]) == step]
            s: dict[str, Any] = {"method": method, "step": step, "seeds": len(at)}
            for m in _METRICS:
                s[f"{m}_mean"], s[f"{m}_low"], s[f"{m}_high"] = t_interval([float(r[m]) for r in at])
            out.append(s)
    return out


def plot_study(summary: Sequence[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Two panels: length ratio to the base and length-controlled gold vs step, one line per method, bands =
    95% t-intervals over seeds; saved to ``path`` if given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "length_ratio", "mean length / base's (words)"),
                              (axes[1], "lc_gold", "length-controlled gold")):
        for method in dict.fromkeys(s["method"] for s in summary):
            mine = [s for s in summary if s["method"] == method]
            x = [int(s["step"]) for s in mine]
            y = [float(s[f"{metric}_mean"]) for s in mine]
            (line,) = ax.plot(x, y, marker="o", ms=3, label=method)
            lo, hi = [float(s[f"{metric}_low"]) for s in mine], [float(s[f"{metric}_high"]) for s in mine]
            if not any(math.isnan(v) for v in lo + hi):
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle("length-biased proxy: length growth and length-controlled gold (95% t-intervals over seeds)",
                 fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _f(x: Any) -> str:
    x = float(x)
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _ci(s: dict[str, Any], m: str) -> str:
    return f"{_f(s[f'{m}_mean'])} [{_f(s[f'{m}_low'])}, {_f(s[f'{m}_high'])}]"


def growth_table(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the step of its largest mean length ratio (that row) and its last step's row."""
    out = []
    for method in dict.fromkeys(s["method"] for s in summary):
        mine = [s for s in summary if s["method"] == method]
        out.append({"method": method, "max": max(mine, key=lambda s: float(s["length_ratio_mean"])), "last": mine[-1]})
    return out


def _markdown(cfg: LengthStudyConfig, summary: Sequence[dict[str, Any]], pair_stats: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | max length ratio (mean, 95% t) | at step | final length ratio | final gold | final LC gold |",
             "|---|---|---|---|---|---|"]
    table = growth_table(summary)
    for t in table:
        m, last = t["max"], t["last"]
        lines.append(f"| {t['method']} | {_ci(m, 'length_ratio')} | {m['step']} | {_ci(last, 'length_ratio')} | "
                     f"{_ci(last, 'gold')} | {_ci(last, 'lc_gold')} |")
    by = {t["method"]: t["last"] for t in table}
    for a in cfg.length_alphas:
        name = f"length_dpo_a{a:g}"
        if "dpo" in by and name in by:
            d, r = by["dpo"], by[name]
            lines += ["", f"Regulariser alpha {a:g}: final length ratio {_ci(r, 'length_ratio')} vs "
                      f"{_ci(d, 'length_ratio')} with DPO; LC gold {_ci(r, 'lc_gold')} vs {_ci(d, 'lc_gold')}."]
    lines += ["", "Pairs (best vs worst of the base's samples by the length-biased proxy, per seed):", "",
              "| seed | pairs | ties dropped | chosen words | rejected words | chosen longer | chosen gold | rejected gold |",
              "|---|---|---|---|---|---|---|---|"]
    for p in pair_stats:
        lines.append(f"| {p['seed']} | {p['pairs']} | {p['ties_dropped']} | {_f(p['chosen_words'])} | "
                     f"{_f(p['rejected_words'])} | {_f(p['chosen_longer'])} | {_f(p['chosen_gold'])} | "
                     f"{_f(p['rejected_gold'])} |")
    lines += ["", f"Command: `{COMMAND}`", "", f"Config: `{json.dumps(asdict(cfg))}`", ""]
    return "\n".join(lines)


def run_length_study(cfg: LengthStudyConfig) -> list[dict[str, Any]]:
    """Every seed and method, then results.csv, pairs.csv, summary.csv, length.png and summary.md; the summary."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    pair_stats: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        seed_rows, stats = run_seed(cfg, seed)
        rows += seed_rows
        pair_stats.append(stats)
        write_csv(out / "results.csv", rows, RESULT_COLUMNS)  # after every seed: a crash keeps the rest
        write_csv(out / "pairs.csv", pair_stats, PAIR_COLUMNS)
    summary = summarise(rows)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    plot_study(summary, out / "length.png")
    (out / "summary.md").write_text(_markdown(cfg, summary, pair_stats))
    return summary

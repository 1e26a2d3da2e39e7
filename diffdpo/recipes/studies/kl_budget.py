"""Over-optimisation of direct alignment: the KL budget (study 1) and likelihood indicators (study 2).

``diffdpo study-kl-budget --config configs/study_kl_budget_tiny.yaml`` measures, for DPO (``sigmoid``), IPO
(``ipo``) and SLiC (``hinge``) at several betas and seeds, how gold quality moves with the KL to the reference
over one epoch and beyond, and whether likelihood indicators turn before gold quality peaks:

* **Proxy labels.** Pairs are sampled from the base model (two completions per prompt, temperature 1) and
  labelled by a proxy judge, :class:`diffdpo.rewards.lm.NoisyJudge` around the gold judge: a length bias
  (``length_bias`` per whitespace piece) and a share ``flip_rate`` of flipped labels; proxy ties are dropped.
  The gold judge is the tiny world's exact oracle, or a reward model (``gold_reward_model``).
* **Training.** The shipped training config (``train_config``) through the one loop, with
  ``steps_per_epoch = pairs / per_device_batch_size`` and ``max_steps = epochs x steps_per_epoch``; the task
  is evaluated in-process every ``eval_every`` steps (the loop's ``eval_every`` hook) and before step 1.
* **Each evaluation** (:func:`evaluate_policy`), on held-out prompts:

  - gold: ``eval_samples_per_prompt`` completions from the policy and from the base with the same
    generator per row, judged by the gold judge (:func:`diffdpo.recipes.studies.common.evaluate_vs_base`);
    ``win_rate`` counts ties as non-wins, ``win_score = (wins + ties / 2) / n`` counts them half (the base
    against itself scores exactly 0.5; with paired sampling near the base most comparisons are ties, so the
    fits use ``win_score`` with the offset R0 = 0.5);
  - KL(pi || pi_ref): the **analytic** estimator of :mod:`diffdpo.eval.kl` (the exact next-token KL summed
    along the policy's own samples at temperature 1; nats per completion; k1 and k3 are in the CSV too);
  - indicators on the policy's held-out generations (the same samples): top-k entropy in bits and top-k
    mass of the next-token distribution at every generated token (EOS included), averaged over tokens
    (Shi et al. 2024, arXiv 2410.11677, Sec. 5, k = 10; the entropy is that of the top-k probabilities
    renormalised to sum to 1, as :mod:`diffdpo.lm.logps` computes ``overopt/topk_entropy``, in bits);
  - on held-out proxy-labelled pairs (sampled and labelled like the training pairs, on the held-out
    prompts): the chosen completion's summed log-likelihood under the policy, the implicit log-ratio
    margin ``(log pi - log pi_ref)(chosen) - (...)(rejected)`` in nats (beta-free), and implicit accuracy.

* **Fits** (:func:`fit_objective`, Rafailov et al. 2024, arXiv 2406.02900): per objective, pooled over
  betas, seeds and steps, ``R(d) = 0.5 + d (alpha - b log d)`` and the quadratic ``0.5 + d (alpha - b d)``
  with ``d = sqrt(KL)`` (:func:`diffdpo.eval.scaling.fit_scaling_law`): R^2, RMSE, the KL at the peak, and
  whether gold peaks before one epoch (share of runs whose best evaluation comes before ``steps_per_epoch``).
* **Turns and leads** (:func:`indicator_turn`): an indicator turns at the best step of
  :class:`diffdpo.early_stop.EarlyStopper` in ``turn`` mode with ``turn_patience`` (the extremum after which it
  moves the other way for that many evaluations; no turn if it never does). The gold peak is the step of the
  highest ``win_score``. Lead = gold-peak step - turn step (> 0: the indicator turned first).
* **Early stop** (:func:`early_stop_outcomes`): the trainer's rule ``early_stop`` (metric, mode, patience) is
  replayed on each run's logged curve (training up to the stop is the same run, so this is the run the
  trainer would have stopped): gold at the stopped step, at the watched metric's best step, at the end.

Outputs under ``out_dir``: ``results.csv`` (one row per objective, beta, seed and evaluated step),
``fits.csv``, ``leads.csv``, ``early_stop.csv``, ``kl_budget.png``, ``likelihood_indicators.png``,
``summary.md``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffdpo.config import help_meta
from diffdpo.recipes.studies.common import read_csv, t_interval, write_csv

OBJECTIVES = ("sigmoid", "ipo", "hinge")
OBJECTIVE_NAMES = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "SLiC (hinge)"}
#: indicator column -> label; the leads table covers these
INDICATORS = {"topk_entropy_bits": "top-10 entropy (bits)", "topk_mass": "top-10 mass",
              "chosen_logp": "chosen log-lik. (nats)", "margin": "log-ratio margin (nats)"}

RESULT_COLUMNS = ["objective", "beta", "seed", "step", "epoch", "kl", "kl_stderr", "kl_k1", "kl_k3", "wins", "ties",
                  "losses", "n", "win_rate", "win_rate_low", "win_rate_high", "win_score", "topk_entropy_bits",
                  "topk_mass", "gen_length", "chosen_logp", "rejected_logp", "margin", "accuracy"]
FIT_COLUMNS = ["objective", "form", "n", "alpha", "b", "r2", "rmse", "kl_peak", "kl_peak_low", "kl_peak_high", "d_peak",
               "r_peak", "kl_at_epoch",
               "peak_before_epoch_fit", "runs", "runs_peak_before_epoch", "peak_epoch_median"]
LEAD_COLUMNS = ["objective", "beta", "seed", "gold_peak_step", "gold_peak_score", "indicator", "direction",
                "turn_step", "lead_steps"]
STOP_COLUMNS = ["rule", "objective", "beta", "seed", "metric", "stopped_step", "best_step", "score_stopped", "score_best",
                "score_end", "score_peak", "end_step"]


@dataclass
class KLBudgetStudyConfig:
    """The ``diffdpo study-kl-budget`` recipe (studies 1 and 2 of issue 18)."""

    out_dir: str = field(default="runs/study_kl_budget_tiny", metadata=help_meta("runs, CSVs, PNGs and summary.md go here"))
    world: str = field(default="runs/tiny_lm_world", metadata=help_meta("tiny world of seed 0; seed s uses <world>_seed<s>"))
    train_config: str = field(default="", metadata=help_meta("training config of every run; empty = configs/lm_dpo_tiny.yaml"))
    train_overrides: list[str] = field(default_factory=list, metadata=help_meta("key=value overrides of train_config"))
    model: str = field(default="", metadata=help_meta("policy and reference model (folder or hub id); empty = the tiny world's base"))
    train_prompts: str = field(default="", metadata=help_meta("prompts of the proxy pairs: a file or hub dataset with a prompt column; empty = tiny world"))
    train_split: str = field(default="train", metadata=help_meta("split of train_prompts"))
    eval_prompts: str = field(default="", metadata=help_meta("held-out prompts (same kinds of source); empty = the tiny world's held-out subjects"))
    eval_split: str = field(default="test", metadata=help_meta("split of eval_prompts"))
    max_eval_prompts: int = field(default=16, metadata=help_meta("use at most this many held-out prompts"))
    gold: str = field(default="count", metadata=help_meta(
        "tiny-world gold: count (the oracle: positive minus negative adjectives) or polarity (its sign)"))
    gold_reward_model: str = field(default="", metadata=help_meta("gold judge: a num_labels=1 classifier (replaces gold)"))
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES), metadata=help_meta("loss types: sigmoid, ipo, hinge"))
    sigmoid_betas: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], metadata=help_meta("DPO betas"))
    ipo_betas: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], metadata=help_meta("IPO betas"))
    hinge_betas: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], metadata=help_meta("SLiC betas"))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=help_meta("seeds (world, pairs, training)"))
    pairs: int = field(default=256, metadata=help_meta("proxy-labelled training pairs (one epoch)"))
    eval_pairs_per_prompt: int = field(default=16, metadata=help_meta("held-out proxy pairs per held-out prompt"))
    flip_rate: float = field(default=0.2, metadata=help_meta("proxy judge: share of flipped labels"))
    length_bias: float = field(default=0.75, metadata=help_meta("proxy judge: reward added per whitespace piece of a completion"))
    per_device_batch_size: int = field(default=16, metadata=help_meta("pairs per step"))
    lr: float = field(default=3e-4, metadata=help_meta("learning rate of every run (constant)"))
    epochs: float = field(default=1.5, metadata=help_meta("training length in epochs over the pairs"))
    eval_every: int = field(default=2, metadata=help_meta("evaluate every N steps (and before step 1)"))
    eval_samples_per_prompt: int = field(default=16, metadata=help_meta("policy/base comparisons per held-out prompt"))
    max_new_tokens: int = field(default=12, metadata=help_meta("sampled tokens per completion (pairs and evaluation)"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples"))
    topk: int = field(default=10, metadata=help_meta("k of the top-k entropy / mass indicators"))
    turn_patience: int = field(default=2, metadata=help_meta("evaluations an indicator must move back before its extremum is a turn"))
    turn_smoothing: int = field(default=1, metadata=help_meta("turns on the trailing mean over this many evaluations; 1 = raw"))
    early_stop_metric: str = field(default="topk_entropy_bits", metadata=help_meta("indicator column the early-stop rule watches"))
    early_stop_mode: str = field(default="turn", metadata=help_meta("max, min or turn (diffdpo.early_stop)"))
    early_stop_patience: int = field(default=2, metadata=help_meta("evaluations without improvement before stopping"))
    early_stop_smoothing: int = field(default=1, metadata=help_meta("early stop on the trailing mean over this many evaluations"))
    device: str = field(default="auto", metadata=help_meta("auto (cuda if available), cpu or cuda"))
    fast: bool = field(default=False, metadata=help_meta("tests: one seed, one beta per objective, 4 steps of 8 pairs, tiny evaluation"))

    def __post_init__(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ValueError(f"objectives: unknown {unknown}; use some of {', '.join(OBJECTIVES)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        if self.gold not in ("polarity", "count"):
            raise ValueError(f"gold={self.gold!r}; use polarity or count (or gold_reward_model for a real model)")
        for o in self.objectives:
            betas = self.betas(o)
            if not betas or any(not (math.isfinite(b) and b > 0) for b in betas):
                raise ValueError(f"{o}_betas must be finite numbers > 0, got {betas}")
        if self.fast:
            self.seeds = self.seeds[:1]
            for o in OBJECTIVES:
                setattr(self, f"{o}_betas", self.betas(o)[len(self.betas(o)) // 2 :][:1])
            self.pairs, self.per_device_batch_size, self.epochs, self.eval_every = 16, 4, 1.5, 2
            self.eval_samples_per_prompt, self.eval_pairs_per_prompt, self.max_new_tokens = 2, 2, 8
        if not 0.0 <= self.flip_rate <= 1.0:
            raise ValueError(f"flip_rate must be in [0, 1], got {self.flip_rate}")
        if self.pairs < self.per_device_batch_size or self.per_device_batch_size < 1:
            raise ValueError(f"pairs ({self.pairs}) must be >= per_device_batch_size ({self.per_device_batch_size}) >= 1")
        if self.max_eval_prompts < 1:
            raise ValueError(f"max_eval_prompts must be >= 1, got {self.max_eval_prompts}")
        if self.epochs <= 0 or self.eval_every < 1 or self.eval_samples_per_prompt < 1 or self.eval_pairs_per_prompt < 1:
            raise ValueError("epochs must be > 0, eval_every, eval_samples_per_prompt and eval_pairs_per_prompt >= 1")
        if self.early_stop_metric not in INDICATORS and self.early_stop_metric != "win_score":
            raise ValueError(f"early_stop_metric={self.early_stop_metric!r}; use one of {', '.join(INDICATORS)} or win_score")
        from diffdpo.early_stop import EarlyStopConfig

        EarlyStopConfig(metric=self.early_stop_metric, mode=self.early_stop_mode, patience=self.early_stop_patience,
                        smoothing=self.early_stop_smoothing)
        EarlyStopConfig(metric="x", mode="turn", patience=self.turn_patience, smoothing=self.turn_smoothing)

    def betas(self, objective: str) -> list[float]:
        return list(getattr(self, f"{objective}_betas"))

    @property
    def steps_per_epoch(self) -> int:
        return self.pairs // self.per_device_batch_size

    @property
    def max_steps(self) -> int:
        return max(1, round(self.epochs * self.steps_per_epoch))


def _repo_configs() -> Path:
    return Path(__file__).resolve().parents[3] / "configs"


def _device(cfg: KLBudgetStudyConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


# ------------------------------------------------------------------------------------------------
# prompts, judges and proxy-labelled pairs


def study_prompts(cfg: KLBudgetStudyConfig, tokenizer: Any) -> tuple[list[str], list[str]]:
    """(prompts of the proxy pairs, held-out prompts of every evaluation): the tiny world's subjects, or the
    ``prompt`` column of ``train_prompts`` / ``eval_prompts`` (:func:`diffdpo.online.lm.load_prompts`)."""
    from diffdpo.online.lm import load_prompts
    from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, SUBJECTS, prompt_for

    train = (load_prompts(cfg.train_prompts, tokenizer, split=cfg.train_split, max_rows=cfg.pairs)
             if cfg.train_prompts else [prompt_for(s) for s in SUBJECTS])
    held = (load_prompts(cfg.eval_prompts, tokenizer, split=cfg.eval_split, max_rows=cfg.max_eval_prompts)
            if cfg.eval_prompts else [prompt_for(s) for s in EVAL_SUBJECTS][: cfg.max_eval_prompts])
    return train, held


def gold_judge(cfg: KLBudgetStudyConfig) -> Any:
    """The gold reward model: a sequence classifier (``gold_reward_model``), or on the tiny world its oracle
    (``gold: count``, positive minus negative adjectives) or that score's sign (``gold: polarity``).

    The oracle's count rewards length in positive reviews (each positive adjective adds one) and punishes it in
    negative ones, so a length-biased proxy disagrees with it on negative reviews only; against polarity,
    which ignores length, the length bias is all disagreement.
    """
    if cfg.gold_reward_model:
        from diffdpo.rewards.lm import HFRewardModel

        return HFRewardModel(cfg.gold_reward_model, device=_device(cfg))
    from diffdpo.rewards.lm import ProgramJudge
    from diffdpo.toy.tiny_lm import judge
    from diffdpo.toy.tiny_lm_judge import TinyWorldJudge

    if cfg.gold == "count":
        return TinyWorldJudge()
    return ProgramJudge(lambda prompt, completion: float(math.copysign(1.0, judge(completion)) if judge(completion) else 0.0),
                        name="tiny world polarity")


def proxy_pairs(model: Any, tokenizer: Any, prompts: Sequence[str], n_pairs: int, proxy: Any, gold: Any, *,
                seed: int, max_new_tokens: int) -> tuple[list[dict[str, str]], dict[str, float]]:
    """``n_pairs`` (prompt, chosen, rejected) rows: two samples of ``model`` per pair, labelled by ``proxy``.

    Prompts are used round-robin; proxy ties (and NaN) are dropped and more pairs are sampled (up to 8 rounds).
    Returns the rows and counts: the share of kept pairs where the proxy's choice agrees with the gold judge
    (among pairs gold does not tie), and the share gold ties.
    """
    from diffdpo.lm.generate import sample_completions

    rows: list[dict[str, str]] = []
    agree = gold_decided = gold_ties = 0
    for round_ in range(8):
        need = n_pairs - len(rows)
        if need <= 0:
            break
        per_prompt = -(-need // len(prompts)) + 1  # a few spare pairs for the ties
        comps = sample_completions(model, tokenizer, list(prompts), n=2 * per_prompt, max_new_tokens=max_new_tokens,
                                   temperature=1.0, seed=seed * 1009 + round_)
        rows_prompts = [comps.prompts[i] for i in comps.prompt_index.tolist()]
        a_idx = list(range(0, len(comps), 2))
        p = [rows_prompts[i] for i in a_idx]
        a = [comps.texts[i] for i in a_idx]
        b = [comps.texts[i + 1] for i in a_idx]
        label = proxy.prefer(p, a, b)  # (N,) 1 / 0.5 / 0
        gold_a, gold_b = gold(p, a).float(), gold(p, b).float()
        for i in range(len(p)):
            if len(rows) >= n_pairs or not math.isfinite(float(label[i])) or float(label[i]) == 0.5:
                continue
            a_wins = float(label[i]) == 1.0
            rows.append({"prompt": p[i], "chosen": a[i] if a_wins else b[i], "rejected": b[i] if a_wins else a[i]})
            if float(gold_a[i]) == float(gold_b[i]):
                gold_ties += 1
            else:
                gold_decided += 1
                agree += int((float(gold_a[i]) > float(gold_b[i])) == a_wins)
    if len(rows) < n_pairs:
        raise ValueError(f"only {len(rows)} of {n_pairs} proxy pairs could be labelled (the proxy ties too often); "
                         "lower pairs or change length_bias")
    return rows, {"agree_with_gold": agree / max(gold_decided, 1), "gold_ties": gold_ties / len(rows)}


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------
# one evaluation of a policy


def sample_base(task_or_model: Any, tokenizer: Any, eval_prompts: Sequence[str], *, samples_per_prompt: int,
                max_new_tokens: int, seed: int) -> list[str]:
    """The base model's held-out completions, drawn once per seed: every evaluation compares against them."""
    from diffdpo.lm.generate import sample_completions

    return sample_completions(task_or_model, tokenizer, list(eval_prompts), n=samples_per_prompt,
                              max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, batch_size=64).texts


@torch.no_grad()
def evaluate_policy(task: Any, eval_prompts: Sequence[str], base_texts: Sequence[str], eval_pairs: Any, gold: Any, *,
                    samples_per_prompt: int, max_new_tokens: int, seed: int) -> dict[str, float]:
    """Gold win rate and KL against the reference, top-k indicators on generations, held-out pair statistics.

    ``task`` is a full fine-tuning :class:`diffdpo.lm.task.LMPreferenceTask` (its frozen copy is the base);
    ``base_texts`` the base's completions of :func:`sample_base` with the same ``seed``, so each policy sample
    meets the base sample drawn with the same generator (as :func:`diffdpo.recipes.studies.common.evaluate_vs_base`,
    whose base samples would be the same at every evaluation); ties are non-wins in ``win_rate``
    (:func:`diffdpo.eval.winrate.win_rate`, Wilson 95%), half a win in ``win_score``. ``eval_pairs`` is a
    tokenised held-out pair dataset (:func:`diffdpo.lm.data.load_preference_data`).
    """
    from diffdpo.adapters import eval_mode
    from diffdpo.eval.kl import lm_kl_estimates
    from diffdpo.eval.winrate import win_rate
    from diffdpo.lm.generate import sample_completions
    from diffdpo.lm.packing import Group, collate_groups
    from diffdpo.online.lm import annotate

    policy, tokenizer = task.policy, task.tokenizer
    if task.ref_policy is None:
        raise ValueError("the KL-budget study needs the reference as a frozen copy (full fine-tuning: lm.lora.enabled=false)")
    model, base = policy.model, task.ref_policy.model
    with eval_mode(policy, task.ref_policy):
        comps = sample_completions(model, tokenizer, list(eval_prompts), n=samples_per_prompt,
                                   max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, batch_size=64)
        rows = [comps.prompts[i] for i in comps.prompt_index.tolist()]
        probs = annotate(lambda p, a, b: _hard_prefer(gold, p, a, b), rows, comps.texts, list(base_texts)).probs
        p = probs[probs.isfinite()].tolist()
        wr = win_rate(p, [1.0 - x for x in p])
        kl = lm_kl_estimates(model, comps, ref_model=base, pad_token_id=tokenizer.pad_token_id or 0, batch_size=64)
        groups = [Group(list(pr), [list(c)]) for pr, c in zip(comps.prompt_ids, comps.completion_ids) if c]
        tokens = collate_groups(groups, task.cfg.layout, tokenizer.pad_token_id or 0).to(task.device)
        stats = policy(tokens)  # TokenLogps: topk_entropy and topk_mass (M,) over every generated token
        pairs = task.compute(policy, task.collate([eval_pairs[i] for i in range(len(eval_pairs))]),
                             torch.arange(len(eval_pairs)))
    u_c = pairs.policy_chosen - pairs.ref_chosen  # (B,) log-ratios
    u_r = pairs.policy_rejected - pairs.ref_rejected
    return {"wins": wr.wins, "ties": wr.ties, "losses": wr.losses, "n": wr.n, "win_rate": wr.rate,
            "win_rate_low": wr.ci_low, "win_rate_high": wr.ci_high,
            "win_score": (wr.wins + 0.5 * wr.ties) / wr.n if wr.n else math.nan,
            "kl": kl.value("analytic"), "kl_stderr": float(kl.analytic_stderr), "kl_k1": kl.k1, "kl_k3": kl.k3,
            "topk_entropy_bits": float(stats.topk_entropy.mean()) / math.log(2.0),
            "topk_mass": float(stats.topk_mass.mean()),
            "gen_length": sum(len(c) for c in comps.completion_ids) / len(comps),
            "chosen_logp": float(pairs.policy_chosen.mean()), "rejected_logp": float(pairs.policy_rejected.mean()),
            "margin": float((u_c - u_r).mean()), "accuracy": float((u_c > u_r).float().mean())}


def _hard_prefer(gold: Any, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
    from diffdpo.rewards.lm import hard_preference

    return hard_preference(gold(list(prompts), list(a)).float(), gold(list(prompts), list(b)).float())


# ------------------------------------------------------------------------------------------------
# one training run, evaluated in-process


def _train_config(cfg: KLBudgetStudyConfig, objective: str, beta: float, seed: int, run_dir: Path,
                  pairs_path: Path, model_dir: str) -> Any:
    from diffdpo.train import load_train_config

    path = Path(cfg.train_config) if cfg.train_config else _repo_configs() / "lm_dpo_tiny.yaml"
    overrides = [f"output_dir={run_dir}", f"seed={seed}", f"max_steps={cfg.max_steps}",
                 f"per_device_batch_size={cfg.per_device_batch_size}", "gradient_accumulation_steps=1",
                 "effective_batch_size=0", f"optim.lr={cfg.lr}", "optim.lr_scheduler=constant", "optim.warmup_steps=0",
                 f"loss.type={objective}", f"loss.beta={beta}", "progress_bar=false", "tensorboard=false",
                 "checkpoint_every=0", f"eval_every={cfg.eval_every}", f"log_every={cfg.eval_every}", "overwrite=true",
                 *cfg.train_overrides]
    tcfg = load_train_config(path, overrides)
    section = getattr(tcfg, tcfg.task)
    section.model.pretrained, section.data.source, section.data.max_rows = model_dir, str(pairs_path), None
    section.topk = cfg.topk
    if section.lora.enabled:
        raise ValueError(f"{path}: the KL-budget study needs full fine-tuning (lora.enabled: false) so that the "
                         "reference is a frozen copy")
    return tcfg


def train_and_evaluate(cfg: KLBudgetStudyConfig, objective: str, beta: float, seed: int, model_dir: str,
                       pairs_path: Path, eval_pairs_path: Path, eval_prompts: Sequence[str], base_texts: Sequence[str],
                       gold: Any) -> list[dict[str, Any]]:
    """Train one (objective, beta, seed) run; one result row per evaluated step (step 0 = the base)."""
    from accelerate import Accelerator

    from diffdpo.lm.data import TokenizeOptions, load_preference_data
    from diffdpo.lm.task import LMPreferenceTask
    from diffdpo.task import TaskContext
    from diffdpo.train import run, setup

    run_dir = Path(cfg.out_dir) / "runs" / objective / f"beta{beta:g}" / f"seed{seed}"
    tcfg = _train_config(cfg, objective, beta, seed, run_dir, pairs_path, model_dir)
    section = getattr(tcfg, tcfg.task)
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, cpu=_device(cfg) == "cpu")
    context = TaskContext(accelerator=accelerator, seed=seed, loss_type=objective,
                          per_device_batch_size=tcfg.per_device_batch_size)
    task = LMPreferenceTask(section, **context.kwargs())
    d = section.data
    opts = TokenizeOptions(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                           truncation_mode=d.truncation_mode, add_eos=d.add_eos)
    eval_pairs = load_preference_data(str(eval_pairs_path), task.tokenizer, opts)

    def evaluate() -> dict[str, float]:  # the loop's eval_every hook: logged as eval/<column> in metrics.jsonl
        result = evaluate_policy(task, eval_prompts, base_texts, eval_pairs, gold,
                                 samples_per_prompt=cfg.eval_samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                 seed=cfg.eval_seed)
        return {f"eval/{k}": v for k, v in result.items()}

    task.evaluate = evaluate
    history = [{"step": 0, **evaluate()}, *run(setup(tcfg, task)).history]
    rows = [{"step": h["step"], **{k[len("eval/"):]: v for k, v in h.items() if k.startswith("eval/")}}
            for h in history if "eval/win_score" in h]
    return [{"objective": objective, "beta": beta, "seed": seed, "epoch": r["step"] / cfg.steps_per_epoch, **r}
            for r in rows]


# ------------------------------------------------------------------------------------------------
# analysis: fits, turns, leads, early stop


def _runs(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float, int], list[dict[str, Any]]]:
    """Rows grouped by (objective, beta, seed), each list sorted by step (values converted to floats)."""
    out: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for r in rows:
        key = (str(r["objective"]), float(r["beta"]), int(r["seed"]))
        out.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: int(r["step"])) for k, v in out.items()}


def gold_peak(steps: Sequence[int], scores: Sequence[float]) -> tuple[int, float]:
    """(step, score) of the highest gold score (the first one on a tie)."""
    i = max(range(len(scores)), key=lambda j: (float(scores[j]), -j))
    return int(steps[i]), float(scores[i])


def indicator_turn(steps: Sequence[int], values: Sequence[float], patience: int, smoothing: int = 1
                   ) -> tuple[int | None, int]:
    """(turn step, direction) of an indicator curve: :class:`diffdpo.early_stop.EarlyStopper` in ``turn`` mode.

    The direction (+1 rising, -1 falling, 0 flat) is set by the first move away from the first value; the
    turn is the extremum after which the curve moves back for ``patience`` evaluations in a row (None if
    it never does, e.g. a monotone curve). ``smoothing`` > 1: on the trailing mean over that many evaluations.
    """
    from diffdpo.early_stop import EarlyStopConfig, EarlyStopper

    stopper = EarlyStopper(EarlyStopConfig(metric="indicator", mode="turn", patience=patience, smoothing=smoothing))
    for s, v in zip(steps, values):
        if stopper.update(int(s), float(v)):
            return stopper.best_step, stopper.direction
    return None, stopper.direction


def leads(rows: Sequence[dict[str, Any]], patience: int, smoothing: int = 1) -> list[dict[str, Any]]:
    """One row per (objective, beta, seed, indicator): gold peak, the indicator's turn and the lead in steps."""
    out = []
    for (objective, beta, seed), run_rows in _runs(rows).items():
        steps = [int(r["step"]) for r in run_rows]
        peak_step, peak_score = gold_peak(steps, [float(r["win_score"]) for r in run_rows])
        for name in INDICATORS:
            turn, direction = indicator_turn(steps, [float(r[name]) for r in run_rows], patience, smoothing)
            out.append({"objective": objective, "beta": beta, "seed": seed, "gold_peak_step": peak_step,
                        "gold_peak_score": peak_score, "indicator": name, "direction": direction,
                        "turn_step": "" if turn is None else turn,
                        "lead_steps": "" if turn is None else peak_step - turn})
    return out


def early_stop_outcomes(rows: Sequence[dict[str, Any]], metric: str, mode: str, patience: int, smoothing: int = 1
                        ) -> list[dict[str, Any]]:
    """The trainer's early-stop rule replayed on each run: gold at the stopped step, the best step and the end.

    A run the rule never stops is stopped at its last step (stopped = end).
    """
    from diffdpo.early_stop import EarlyStopConfig, EarlyStopper

    out = []
    for (objective, beta, seed), run_rows in _runs(rows).items():
        stopper = EarlyStopper(EarlyStopConfig(metric=metric, mode=mode, patience=patience, smoothing=smoothing))
        score = {int(r["step"]): float(r["win_score"]) for r in run_rows}
        for r in run_rows:
            if stopper.update(int(r["step"]), float(r[metric])):
                break
        end = int(run_rows[-1]["step"])
        stopped = stopper.stopped_step if stopper.stopped else end
        best = stopper.best_step if stopper.best_step is not None else end
        out.append({"objective": objective, "beta": beta, "seed": seed, "metric": metric, "stopped_step": stopped,
                    "best_step": best, "score_stopped": score[stopped], "score_best": score[best],
                    "score_end": score[end], "score_peak": max(score.values()), "end_step": end})
    return out


def fit_objective(rows: Sequence[dict[str, Any]], objective: str, steps_per_epoch: int, bootstrap: int = 1000
                  ) -> list[dict[str, Any]]:
    """Both scaling-law forms fitted to one objective's (KL, win score) points, pooled over betas and seeds; the
    KL at the peak with a 95% percentile bootstrap interval over points (``bootstrap`` resamples, 0 = none)."""
    from diffdpo.eval.scaling import fit_scaling_law

    mine = [r for r in rows if r["objective"] == objective]
    kl = [max(float(r["kl"]), 0.0) for r in mine]
    score = [float(r["win_score"]) for r in mine]
    at_epoch = [float(r["kl"]) for r in mine if int(r["step"]) == steps_per_epoch]
    kl_epoch = sum(at_epoch) / len(at_epoch) if at_epoch else math.nan
    runs = _runs(mine)
    peaks = [gold_peak([int(r["step"]) for r in v], [float(r["win_score"]) for r in v])[0] for v in runs.values()]
    before = sum(p < steps_per_epoch for p in peaks)
    out = []
    for form in ("log", "quadratic"):
        fit = fit_scaling_law(kl, score, form=form, offset=0.5, bootstrap=bootstrap, seed=0).to_dict()
        low, high = fit.get("kl_peak_ci", (math.nan, math.nan))
        out.append({"objective": objective, "form": form, "n": fit["n"], "alpha": fit["alpha"], "b": fit["b"],
                    "r2": fit["r2"], "rmse": fit["rmse"], "kl_peak": fit["kl_peak"], "kl_peak_low": low,
                    "kl_peak_high": high, "d_peak": fit["d_peak"],
                    "r_peak": fit["r_peak"], "kl_at_epoch": kl_epoch,
                    "peak_before_epoch_fit": bool(fit["kl_peak"] < kl_epoch), "runs": len(peaks),
                    "runs_peak_before_epoch": before,
                    "peak_epoch_median": _median([p / steps_per_epoch for p in peaks])})
    return out


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return math.nan if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


def _seed_means(rows: Sequence[dict[str, Any]], objective: str, key: str) -> list[float]:
    """Per seed, the mean of ``key`` over that objective's betas: the unit the 95% t-intervals are over."""
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        if r["objective"] == objective and r[key] != "":
            by_seed.setdefault(int(r["seed"]), []).append(float(r[key]))
    return [sum(v) / len(v) for _, v in sorted(by_seed.items())]


# ------------------------------------------------------------------------------------------------
# figures


def _interval(values: Sequence[float]) -> tuple[float, float, float]:
    m, lo, hi = t_interval(values) if values else (math.nan, math.nan, math.nan)
    return (m, m, m) if math.isnan(lo) else (m, lo, hi)


def _by_beta_step(rows: Sequence[dict[str, Any]], objective: str, key: str
                  ) -> dict[float, list[tuple[int, tuple[float, float, float]]]]:
    """beta -> [(step, (mean, low, high) of ``key`` over seeds)] (a single seed: no interval)."""
    cells: dict[tuple[float, int], list[float]] = {}
    for r in rows:
        if r["objective"] == objective:
            value = float(r[key]) if key != "sqrt_kl" else math.sqrt(max(float(r["kl"]), 0.0))
            cells.setdefault((float(r["beta"]), int(r["step"])), []).append(value)
    out: dict[float, list[tuple[int, tuple[float, float, float]]]] = {}
    for (beta, step), values in sorted(cells.items()):
        out.setdefault(beta, []).append((step, _interval(values)))
    return out


def _binned(rows: Sequence[dict[str, Any]], edges: Any) -> list[tuple[float, float, float, float]]:
    """Per sqrt(KL) bin: (centre, mean, low, high) of the win score, the 95% t-interval over seeds of each
    seed's mean in the bin (bins that not every seed reaches get no interval)."""
    import numpy as np

    out = []
    seeds = sorted({int(r["seed"]) for r in rows})
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [r for r in rows if lo <= math.sqrt(max(float(r["kl"]), 0.0)) < hi]
        per_seed = [np.mean([float(r["win_score"]) for r in inside if int(r["seed"]) == s]) for s in seeds
                    if any(int(r["seed"]) == s for r in inside)]
        if per_seed:
            m, low, high = _interval(per_seed) if len(per_seed) == len(seeds) else (float(np.mean(per_seed)),) * 3
            out.append((0.5 * (lo + hi), m, low, high))
    return out


def plot_kl_budget(rows: Sequence[dict[str, Any]], path: str | Path | None = None, bins: int = 8) -> Any:
    """Gold win score vs sqrt(KL) per objective: every evaluation as a faint point (colour = beta), the binned
    mean with the 95% t-interval over seeds (black), the pooled log and quadratic fits, and their bands
    (95% t-intervals of the per-seed fits)."""
    import numpy as np
    from matplotlib.figure import Figure

    from diffdpo.eval.scaling import fit_scaling_law

    objectives = list(dict.fromkeys(str(r["objective"]) for r in rows))
    fig = Figure(figsize=(5 * len(objectives), 4.3))
    axes = fig.subplots(1, len(objectives), squeeze=False)[0]
    for ax, objective in zip(axes, objectives):
        mine = [r for r in rows if r["objective"] == objective]
        kl_all = np.array([max(float(r["kl"]), 0.0) for r in mine])
        score = np.array([float(r["win_score"]) for r in mine])
        for c, beta in enumerate(dict.fromkeys(float(r["beta"]) for r in mine)):
            sel = np.array([float(r["beta"]) == beta for r in mine])
            ax.scatter(np.sqrt(kl_all[sel]), score[sel], s=7, alpha=0.35, color=f"C{c % 10}", lw=0,
                       label=f"beta {beta:g}")
        d_max = math.sqrt(kl_all.max()) * 1.02 if kl_all.size and kl_all.max() > 0 else 1.0
        edges = np.linspace(0.0, d_max, bins + 1)
        binned = _binned(mine, edges)
        if binned:
            x, m, low, high = (np.array(v) for v in zip(*binned))
            ax.errorbar(x, m, yerr=[m - low, high - m], fmt="o", color="k", ms=4, capsize=3, lw=1,
                        label="binned mean, 95% t over seeds")
        d = np.linspace(0.0, d_max, 200)
        for form, style in (("log", "-"), ("quadratic", "--")):
            if len(mine) < 2:
                continue
            pooled = fit_scaling_law(kl_all, score, form=form, offset=0.5)
            ax.plot(d, pooled.predict(d**2), style, color="k" if form == "log" else "0.35", lw=1.3,
                    label=f"{form} fit (R^2 {pooled.r2:.2f}, KL* {pooled.kl_peak:.2g})")
            per_seed = []
            for seed in sorted({int(r["seed"]) for r in mine}):
                sr = [r for r in mine if int(r["seed"]) == seed]
                if len(sr) >= 2:
                    per_seed.append(fit_scaling_law([max(float(r["kl"]), 0.0) for r in sr],
                                                    [float(r["win_score"]) for r in sr], form=form,
                                                    offset=0.5).predict(d**2))
            if len(per_seed) >= 2:
                band = [_interval(list(col)) for col in np.array(per_seed).T]
                ax.fill_between(d, [b[1] for b in band], [b[2] for b in band], color="k",
                                alpha=0.12 if form == "log" else 0.06, lw=0)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        low_y = min(0.3, float(score.min()) - 0.05) if score.size else 0.3
        ax.set_ylim(low_y, 1.02)
        ax.set_xlim(0.0, d_max)
        ax.set_xlabel("sqrt(KL(policy || base)), nats^0.5 (analytic estimator)")
        ax.set_ylabel("gold win score vs base (ties = 1/2)")
        ax.set_title(OBJECTIVE_NAMES.get(objective, objective))
        ax.legend(fontsize=6, loc="best", framealpha=0.6)
    fig.suptitle("KL budget on the tiny world: all evaluations (points), binned means with 95% t-intervals over "
                 "seeds, pooled fits with per-seed 95% bands", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_indicators(rows: Sequence[dict[str, Any]], steps_per_epoch: int, path: str | Path | None = None) -> Any:
    """Gold win score and the four indicators vs step (rows) per objective (columns): one line per beta,
    the mean over seeds with a 95% t-band; the dotted line marks one epoch."""
    from matplotlib.figure import Figure

    objectives = list(dict.fromkeys(str(r["objective"]) for r in rows))
    keys = {"win_score": "gold win score", **INDICATORS}
    fig = Figure(figsize=(4.6 * len(objectives), 2.3 * len(keys)))
    axes = fig.subplots(len(keys), len(objectives), squeeze=False, sharex="col")
    for j, objective in enumerate(objectives):
        for i, (key, label) in enumerate(keys.items()):
            ax = axes[i][j]
            for c, (beta, cells) in enumerate(_by_beta_step(rows, objective, key).items()):
                steps = [s for s, _ in cells]
                mean, low, high = zip(*[v for _, v in cells])
                ax.plot(steps, mean, lw=1.1, color=f"C{c % 10}", label=f"beta {beta:g}")
                ax.fill_between(steps, low, high, color=f"C{c % 10}", alpha=0.15, lw=0)
            ax.axvline(steps_per_epoch, color="grey", lw=0.7, ls=":")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if i == 0:
                ax.set_title(OBJECTIVE_NAMES.get(objective, objective))
                ax.legend(fontsize=6)
            if i == len(keys) - 1:
                ax.set_xlabel("step (dotted: one epoch)")
    fig.suptitle("Likelihood indicators on held-out generations beside gold (means over seeds, 95% t-bands)",
                 fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# ------------------------------------------------------------------------------------------------
# summary


def _f(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.{digits}f}")


def _ci(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "n/a"
    m, lo, hi = t_interval(values)
    return f"{_f(m, digits)} [{_f(lo, digits)}, {_f(hi, digits)}]" if len(values) > 1 else _f(m, digits)


def summary_tables(cfg: KLBudgetStudyConfig, fits: Sequence[dict[str, Any]], lead_rows: Sequence[dict[str, Any]],
                   stops: Sequence[dict[str, Any]]) -> str:
    """The markdown tables of summary.md: fits, leads per objective and indicator, early stop."""
    lines = ["| objective | form | n | alpha | b | R^2 | RMSE | KL at peak (95% bootstrap) | mean KL at 1 epoch | fitted peak before 1 epoch "
             "| runs peaking before 1 epoch | median peak (epochs) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in fits:
        lines.append(f"| {OBJECTIVE_NAMES[f['objective']]} | {f['form']} | {f['n']} | {_f(f['alpha'])} | {_f(f['b'])} | "
                     f"{_f(f['r2'])} | {_f(f['rmse'])} | {_f(f['kl_peak'])} [{_f(f['kl_peak_low'])}, {_f(f['kl_peak_high'])}] | "
                     f"{_f(f['kl_at_epoch'])} | "
                     f"{'yes' if str(f['peak_before_epoch_fit']) == 'True' else 'no'} | "
                     f"{f['runs_peak_before_epoch']}/{f['runs']} | {_f(f['peak_epoch_median'], 2)} |")
    lines += ["", "Indicator turns vs the gold peak (lead = gold-peak step - turn step; > 0: the indicator turned first). "
              "Per objective and indicator: runs with a turn, mean lead over the runs with one and, over seeds, the "
              "per-seed mean lead with its 95% t-interval; direction = how the curve first moved (+1 up, -1 down).", "",
              "| objective | indicator | runs with a turn | first move up / down | mean lead (steps) | per-seed mean lead, 95% t | "
              "turned before the peak |", "|---|---|---|---|---|---|---|"]
    for objective in cfg.objectives:
        for name, label in INDICATORS.items():
            mine = [r for r in lead_rows if r["objective"] == objective and r["indicator"] == name]
            turned = [r for r in mine if r["turn_step"] != ""]
            ups = sum(int(r["direction"]) > 0 for r in mine)
            downs = sum(int(r["direction"]) < 0 for r in mine)
            lead_values = [float(r["lead_steps"]) for r in turned]
            first = sum(v > 0 for v in lead_values)
            lines.append(f"| {OBJECTIVE_NAMES[objective]} | {label} | {len(turned)}/{len(mine)} | {ups} / {downs} | "
                         f"{_f(sum(lead_values) / len(lead_values), 1) if lead_values else 'n/a'} | "
                         f"{_ci(_seed_means(turned, objective, 'lead_steps'), 1)} | {first}/{len(turned)} |")
    lines += ["", f"Early stop (the trainer's `early_stop` rule replayed on each run; patience {cfg.early_stop_patience}, "
              f"smoothing {cfg.early_stop_smoothing}; the configured rule `{cfg.early_stop_metric}/{cfg.early_stop_mode}` "
              "first, then every other indicator as a turn rule): gold win score at the stopped step, at the watched "
              "metric's best step, at the end of training and at the run's best evaluation (oracle); per seed the mean "
              "over betas, then the mean over seeds with a 95% t-interval.", "",
              "| rule | objective | stopped step (mean) | gold at stop | gold at best step | gold at end | gold peak (oracle) | "
              "stop - end |", "|---|---|---|---|---|---|---|---|"]
    for rule in dict.fromkeys(str(r.get("rule", r["metric"])) for r in stops):
        for objective in cfg.objectives:
            mine = [dict(r, gain=float(r["score_stopped"]) - float(r["score_end"])) for r in stops
                    if r["objective"] == objective and str(r.get("rule", r["metric"])) == rule]
            if not mine:
                continue
            mean_stop = sum(float(r["stopped_step"]) for r in mine) / len(mine)
            lines.append(f"| {rule} | {OBJECTIVE_NAMES[objective]} | {mean_stop:.1f} | "
                         + " | ".join(_ci(_seed_means(mine, objective, k)) for k in
                                      ("score_stopped", "score_best", "score_end", "score_peak", "gain")) + " |")
    return "\n".join(lines)


def _markdown(cfg: KLBudgetStudyConfig, fits: Sequence[dict[str, Any]], lead_rows: Sequence[dict[str, Any]],
              stops: Sequence[dict[str, Any]], pair_stats: dict[int, dict[str, float]], wall_s: float,
              command: str) -> str:
    agree = ", ".join(f"seed {s}: {v['agree_with_gold']:.2f}" for s, v in sorted(pair_stats.items()))
    lines = ["# KL budget and likelihood indicators (tiny world)", "",
             f"Command: `{command}` ({wall_s / 60:.1f} min wall).", "",
             f"{cfg.pairs} proxy pairs (NoisyJudge: flip_rate {cfg.flip_rate}, length_bias {cfg.length_bias} per piece; "
             f"proxy agrees with gold on {agree} of the pairs gold decides), batch {cfg.per_device_batch_size} "
             f"= {cfg.steps_per_epoch} steps per epoch, {cfg.max_steps} steps ({cfg.epochs} epochs), lr {cfg.lr}, "
             f"evaluated every {cfg.eval_every} steps on {cfg.eval_samples_per_prompt} samples per held-out prompt. "
             "KL: analytic estimator on the policy's samples (temperature 1), nats per completion. Gold: win score "
             "vs the base with ties counted 1/2. Seeds: " + ", ".join(map(str, cfg.seeds)) + ".", "",
             summary_tables(cfg, fits, lead_rows, stops), "", f"Config: `{json.dumps(asdict(cfg))}`", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the study


@dataclass
class SeedData:
    """What every run of one seed shares: the base model, the proxy pairs, the held-out prompts and pairs,
    the base's held-out samples, and how often the proxy agrees with gold on the training pairs."""

    model_dir: str
    pairs: Path
    eval_pairs: Path
    eval_prompts: list[str]
    base_texts: list[str]
    stats: dict[str, float]


def prepare_seed(cfg: KLBudgetStudyConfig, seed: int, gold: Any) -> SeedData:
    """Build (or reuse) the seed's tiny world (or load ``model``), label its proxy pairs, sample the base once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffdpo.rewards.lm import NoisyJudge

    if cfg.model:
        model_dir = cfg.model
    else:
        from diffdpo.recipes.studies.online import world_root
        from diffdpo.toy.tiny_lm import build_world

        model_dir = str(build_world(world_root(cfg, seed), seed=seed).model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # sampling pads finished rows
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir).to(_device(cfg)).eval()
    proxy = NoisyJudge(gold, flip_rate=cfg.flip_rate, length_bias=cfg.length_bias, seed=seed)
    train_prompts, held = study_prompts(cfg, tokenizer)
    with torch.no_grad():
        pairs, stats = proxy_pairs(base, tokenizer, train_prompts, cfg.pairs, proxy, gold, seed=seed,
                                   max_new_tokens=cfg.max_new_tokens)
        eval_pairs, _ = proxy_pairs(base, tokenizer, held, cfg.eval_pairs_per_prompt * len(held), proxy, gold,
                                    seed=seed + 7919, max_new_tokens=cfg.max_new_tokens)
        base_texts = sample_base(base, tokenizer, held, samples_per_prompt=cfg.eval_samples_per_prompt,
                                 max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed)
    root = Path(cfg.out_dir) / "data" / f"seed{seed}"
    _write_jsonl(root / "pairs.jsonl", pairs)
    _write_jsonl(root / "eval_pairs.jsonl", eval_pairs)
    (root / "proxy.json").write_text(json.dumps(stats))
    return SeedData(model_dir, root / "pairs.jsonl", root / "eval_pairs.jsonl", held, base_texts, stats)


def analyse(cfg: KLBudgetStudyConfig, rows: Sequence[dict[str, Any]]) -> tuple[list, list, list]:
    """(fits, leads, early-stop rows) of the result rows. Early stop: the configured rule first, then every
    other indicator as a ``turn`` rule with the same patience and smoothing (``rule`` column)."""
    fits = [f for o in cfg.objectives if any(r["objective"] == o for r in rows)
            for f in fit_objective(rows, o, cfg.steps_per_epoch)]
    rules = [(cfg.early_stop_metric, cfg.early_stop_mode)]
    rules += [(name, "turn") for name in INDICATORS if (name, "turn") not in rules]
    stops = [dict(r, rule=f"{metric}/{mode}") for metric, mode in rules
             for r in early_stop_outcomes(rows, metric, mode, cfg.early_stop_patience, cfg.early_stop_smoothing)]
    return fits, leads(rows, cfg.turn_patience, cfg.turn_smoothing), stops


def write_outputs(cfg: KLBudgetStudyConfig, command: str, wall_s: float) -> dict[str, Any]:
    """From ``out_dir/results.csv`` (and each seed's ``data/seed<s>/proxy.json``): fits.csv, leads.csv,
    early_stop.csv, the two figures and summary.md; returns the analysis."""
    out = Path(cfg.out_dir)
    rows = read_csv(out / "results.csv")
    fits, lead_rows, stops = analyse(cfg, rows)
    write_csv(out / "fits.csv", fits, FIT_COLUMNS)
    write_csv(out / "leads.csv", lead_rows, LEAD_COLUMNS)
    write_csv(out / "early_stop.csv", stops, STOP_COLUMNS)
    plot_kl_budget(rows, out / "kl_budget.png")
    plot_indicators(rows, cfg.steps_per_epoch, out / "likelihood_indicators.png")
    stats = {s: json.loads((out / "data" / f"seed{s}" / "proxy.json").read_text()) for s in cfg.seeds
             if (out / "data" / f"seed{s}" / "proxy.json").is_file()}
    (out / "summary.md").write_text(_markdown(cfg, fits, lead_rows, stops, stats, wall_s, command))
    return {"fits": fits, "leads": lead_rows, "early_stop": stops, "wall_s": wall_s}


def run_kl_budget_study(cfg: KLBudgetStudyConfig, command: str = "diffdpo study-kl-budget --config "
                        "configs/study_kl_budget_tiny.yaml") -> dict[str, Any]:
    """Every objective x beta x seed, then the CSVs, figures and summary.md; returns the analysis."""
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gold = gold_judge(cfg)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        data = prepare_seed(cfg, seed, gold)
        for objective in cfg.objectives:
            for beta in cfg.betas(objective):
                run_rows = train_and_evaluate(cfg, objective, beta, seed, data.model_dir, data.pairs, data.eval_pairs,
                                              data.eval_prompts, data.base_texts, gold)
                peak_step, peak = gold_peak([r["step"] for r in run_rows], [r["win_score"] for r in run_rows])
                print(f"study-kl-budget {objective} beta {beta:g} seed {seed}: gold peak {peak:.3f} at step "
                      f"{peak_step}, end {run_rows[-1]['win_score']:.3f} at KL {run_rows[-1]['kl']:.2f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
                rows += run_rows
                write_csv(out / "results.csv", rows, RESULT_COLUMNS)  # after every run: a crash keeps the rest
    result = write_outputs(cfg, command, time.perf_counter() - start)
    print(f"study-kl-budget: wrote {out}/results.csv, fits.csv, leads.csv, early_stop.csv, kl_budget.png, "
          f"likelihood_indicators.png, summary.md ({result['wall_s'] / 60:.1f} min)")
    return result

"""Pieces every study recipe shares: intervals over seeds, CSV in and out, and the tiny world's evaluator.

* :func:`t_interval`: mean and 95% t-interval over seeds (the project reports 3 seeds with 95% intervals).
* :func:`read_csv` / :func:`write_csv`: the CSVs every study writes (one row per run, one per summary line).
* :func:`evaluate_vs_base`: gold win rate of a policy against the base model and KL(policy || base), on the
  tiny review world's held-out prompts by default, or on any prompts with any judge.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{(1+level)/2, n-1} * sd / sqrt(n); NaN bounds with one value."""
    from scipy.stats import t

    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf((1 + level) / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV as dicts of strings (convert with ``float(...)`` where needed)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` (only ``columns``, in that order) to ``path``, replacing it."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: r[k] for k in columns} for r in rows)


def evaluate_vs_base(model: Any, base: Any, tokenizer: Any, *, samples_per_prompt: int, max_new_tokens: int,
                     seed: int = 1234, prompts: Sequence[str] | None = None,
                     prefer: Callable[..., Any] | None = None) -> dict[str, float]:
    """Gold win rate of ``model`` against ``base`` and KL(model || base) on held-out prompts.

    ``prompts`` default to the tiny world's held-out subjects and ``prefer`` (a preference model's ``prefer``:
    prompts, completions_a, completions_b -> P(a beats b)) to its exact oracle. As
    :meth:`diffdpo.online.lm.OnlineLMTask.evaluate`: the same generator per (prompt, sample) row for both
    models, ties are non-wins (:func:`diffdpo.eval.winrate.win_rate`, Wilson 95%). KL:
    :func:`diffdpo.eval.kl.lm_kl_estimates` on the policy's samples (temperature 1), analytic estimator.
    """
    from diffdpo.eval.kl import lm_kl_estimates
    from diffdpo.eval.winrate import win_rate
    from diffdpo.lm.generate import sample_completions
    from diffdpo.online.lm import annotate

    if prompts is None:
        from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, prompt_for

        prompts = [prompt_for(s) for s in EVAL_SUBJECTS]
    if prefer is None:
        from diffdpo.toy.tiny_lm_judge import TinyWorldJudge

        prefer = TinyWorldJudge().prefer
    prompts = list(prompts)
    kwargs = dict(n=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    policy = sample_completions(model, tokenizer, prompts, **kwargs)
    ref = sample_completions(base, tokenizer, prompts, **kwargs)
    rows = [prompts[i] for i in policy.prompt_index.tolist()]
    probs = annotate(prefer, rows, policy.texts, ref.texts).probs
    p = probs[probs.isfinite()].tolist()
    wr = win_rate(p, [1.0 - x for x in p])
    kl = lm_kl_estimates(model, policy, ref_model=base, pad_token_id=tokenizer.pad_token_id or 0)
    return {"wins": wr.wins, "ties": wr.ties, "losses": wr.losses, "n": wr.n, "win_rate": wr.rate,
            "win_rate_low": wr.ci_low, "win_rate_high": wr.ci_high, "kl": kl.value("analytic"),
            "kl_stderr": float(kl.analytic_stderr if kl.analytic_stderr is not None else kl.k3_stderr)}

"""Linear separability probes for preference data: can a linear classifier tell chosen from rejected?

"More is Less" (Wang et al. 2025, "More is Less: The Pitfalls of Multi-Model Synthetic Preference Data
in DPO Safety Alignment", arXiv 2504.02193) finds that pairs with the chosen completion from a stronger
model and the rejected one self-generated are highly linearly separable, and that DPO on them learns a
shortcut. The paper's probe details were not found; ours is **our choice**: an L2-regularised logistic
regression on standardised features, fitted by full-batch L-BFGS (torch, float64, seeded), with a
held-out split, reporting held-out accuracy and its Wilson 95% interval
(:func:`diffdpo.eval.winrate.wilson_interval`).

:func:`pair_probe` probes pairs: by default the difference of the chosen and rejected features (can a
linear score rank the chosen first?), or each completion on its own. Features (one row per completion):

* :func:`pooled_hidden_states`: the mean over the **completion tokens** of a causal LM's last-layer
  hidden states (the states at the completion's own positions, after reading the prompt; prompt tokens
  are excluded so that the prompt, shared by chosen and rejected, cannot carry the label);
* :func:`length_features`: the completion length (tokens with a tokenizer, else whitespace words), the
  shortcut of length exploitation;
* :func:`bag_of_words_features`: word counts over a vocabulary (lexical shortcuts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

PairProbeMode = Literal["difference", "rows"]


@dataclass
class ProbeResult:
    """Accuracy of a fitted logistic-regression probe on its training and held-out rows."""

    train_accuracy: float
    heldout_accuracy: float
    heldout_correct: int
    n_train: int
    n_heldout: int
    ci_low: float  # Wilson 95% interval of the held-out accuracy
    ci_high: float
    weights: np.ndarray  # (F,) on standardised features
    bias: float

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "weights"}


def _split(n: int, heldout_fraction: float, seed: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, held-out), seeded; rows sharing a group (a pair) stay on one side."""
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(n)
    unique = rng.permutation(np.unique(groups))
    n_held = max(1, int(round(heldout_fraction * unique.size)))
    if n_held >= unique.size:
        raise ValueError(f"heldout_fraction={heldout_fraction} leaves no training rows ({unique.size} groups)")
    held = np.isin(groups, unique[:n_held])
    return np.flatnonzero(~held), np.flatnonzero(held)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean BCE + (l2 / 2) ||w||^2 (bias unpenalised) by L-BFGS from zero: a convex problem,
    so the start fixes the result."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(features: Any, labels: Any, *, heldout_fraction: float = 0.3, l2: float = 1e-2, seed: int = 0,
                 max_iter: int = 500, groups: Sequence[int] | np.ndarray | None = None) -> ProbeResult:
    """Fit a logistic-regression probe on a seeded train split; report train and held-out accuracy.

    Args:
        features: (N, F) array or tensor. Standardised with the **training** rows' mean and std (constant
            columns left at 0).
        labels: (N,) 0/1 or bool.
        heldout_fraction: share of rows (or of groups) held out, in (0, 1).
        l2: L2 penalty on the weights (on standardised features; > 0 keeps separable data finite).
        seed: seeds the split (the fit itself is deterministic). max_iter: L-BFGS iterations.
        groups: (N,) group id per row, e.g. the pair index, so a pair's chosen and rejected rows fall on
            the same side of the split.
    """
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be (N, F) and labels (N,), got {x.shape} and {y.shape}")
    if not set(np.unique(y)) <= {0.0, 1.0}:
        raise ValueError("labels must be 0/1 (or bool)")
    if not 0.0 < heldout_fraction < 1.0 or not l2 >= 0:
        raise ValueError(f"heldout_fraction must be in (0, 1) and l2 >= 0, got {heldout_fraction} and {l2}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    g = None if groups is None else np.asarray(groups)
    if g is not None and g.shape != y.shape:
        raise ValueError(f"groups must be (N,) = ({y.size},), got {g.shape}")
    train, held = _split(x.shape[0], heldout_fraction, seed, g)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    z = torch.from_numpy((x - mean) / std)
    t = torch.from_numpy(y)
    w, b = _fit_logistic(z[train], t[train], l2, max_iter)
    pred = ((z @ w + b) > 0).double()
    correct = (pred == t).numpy()
    from diffdpo.eval.winrate import wilson_interval

    held_correct = int(correct[held].sum())
    lo, hi = wilson_interval(held_correct, held.size)
    return ProbeResult(float(correct[train].mean()), held_correct / held.size, held_correct, int(train.size),
                       int(held.size), lo, hi, w.numpy(), float(b))


def pair_probe(chosen_features: Any, rejected_features: Any, *, mode: PairProbeMode = "difference",
               **kwargs: Any) -> ProbeResult:
    """:func:`linear_probe` on preference pairs, split by pair (a pair's rows all on one side).

    ``mode="difference"`` (default): rows ``f_w - f_l`` (label 1) and ``f_l - f_w`` (label 0), i.e. whether
    a linear score ``w . f`` ranks the chosen completion first, the Bradley-Terry accuracy a linear reward
    on these features (and so DPO's shortcut) can reach. ``mode="rows"``: each completion on its own,
    chosen 1 and rejected 0: whether chosen and rejected completions form two classes at all, a stricter
    test (chosen always longer within a pair does not make lengths separable across pairs).
    Takes the keyword arguments of :func:`linear_probe` except ``groups``.
    """
    c = np.asarray(chosen_features, dtype=np.float64)
    r = np.asarray(rejected_features, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 2:
        raise ValueError(f"chosen and rejected features must both be (pairs, F), got {c.shape} and {r.shape}")
    if mode not in ("difference", "rows"):
        raise ValueError(f"mode={mode!r} is unknown; choose difference or rows")
    n = c.shape[0]
    groups = np.concatenate([np.arange(n), np.arange(n)])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    rows = np.concatenate([c - r, r - c]) if mode == "difference" else np.concatenate([c, r])
    return linear_probe(rows, labels, groups=groups, **kwargs)


# ------------------------------------------------------------------------------------------------
# feature builders


def length_features(texts: Sequence[str], tokenizer: Any | None = None) -> np.ndarray:
    """(N, 1) completion lengths: tokens (``tokenizer(text, add_special_tokens=False)``) or whitespace words."""
    if tokenizer is None:
        lengths = [len(t.split()) for t in texts]
    else:
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return np.asarray(lengths, dtype=np.float64).reshape(-1, 1)


def bag_of_words_features(texts: Sequence[str], vocabulary: Sequence[str] | None = None, *,
                          lowercase: bool = True) -> tuple[np.ndarray, list[str]]:
    """(N, V) word counts (whitespace words) and the vocabulary (sorted words of ``texts`` when not given;
    words outside it are ignored)."""
    words = [(t.lower() if lowercase else t).split() for t in texts]
    vocab = sorted({w for ws in words for w in ws}) if vocabulary is None else list(vocabulary)
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(texts), len(vocab)), dtype=np.float64)
    for row, ws in enumerate(words):
        for w in ws:
            if w in index:
                out[row, index[w]] += 1.0
    return out, vocab


@torch.no_grad()
def pooled_hidden_states_from_ids(model: Any, prompt_ids: Sequence[Sequence[int]],
                                  completion_ids: Sequence[Sequence[int]], *, batch_size: int = 16,
                                  pad_token_id: int = 0) -> np.ndarray:
    """(N, d) mean of the last hidden states over each completion's token positions (right padding).

    ``model`` is a transformers causal LM (``output_hidden_states=True`` is requested; the last entry is
    used). An empty completion gives a row of zeros.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[np.ndarray] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            ps = [list(p) for p in prompt_ids[start : start + batch_size]]
            cs = [list(c) for c in completion_ids[start : start + batch_size]]
            width = max(len(p) + len(c) for p, c in zip(ps, cs))
            ids = torch.full((len(ps), width), pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(ps), width), dtype=torch.long)
            pool = torch.zeros((len(ps), width), dtype=torch.float32)  # 1 on completion positions
            for i, (p, c) in enumerate(zip(ps, cs)):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
                attn[i, : len(p) + len(c)] = 1
                pool[i, len(p) : len(p) + len(c)] = 1.0
            out = model(input_ids=ids.to(device), attention_mask=attn.to(device), output_hidden_states=True)
            hidden = out.hidden_states[-1].float().cpu()  # (B, L, d)
            summed = (hidden * pool.unsqueeze(-1)).sum(dim=1)  # (B, d)
            rows.append((summed / pool.sum(dim=1, keepdim=True).clamp(min=1.0)).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows).astype(np.float64)


def pooled_hidden_states(model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], *,
                         batch_size: int = 16) -> np.ndarray:
    """(N, d) completion-token mean of a causal LM's last hidden states for (prompt, completion) texts.

    The prompt is tokenised as ``tokenizer(prompt)`` (special tokens added, as :mod:`diffdpo.lm.data`
    does) and the completion as ``tokenizer(completion, add_special_tokens=False)``, concatenated.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pooled_hidden_states_from_ids(model, prompt_ids, completion_ids, batch_size=batch_size,
                                         pad_token_id=pad)


def binomial_chance_bound(n: int, z: float = 3.0) -> float:
    """Half-width ``z * sqrt(0.25 / n)`` of chance accuracy around 0.5 on ``n`` held-out rows."""
    return z * math.sqrt(0.25 / n)

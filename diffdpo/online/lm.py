"""Online preference optimisation of a causal LM as a task of the one training loop: online DPO, online
SLiC, online IPO and IPO-MD.

Each micro-batch of prompts (``lm.data.source``: rows with a ``prompt``, text or chat messages) goes
through :meth:`OnlineLMTask.compute`:

1. **Generate** (no gradient): two completions per prompt from the *current* policy
   (:func:`diffdpo.lm.generate.sample_completions`, KV cache, one generator per sample), or for
   IPO-MD from the geometric mixture ``log pi_b = (1 - b) log pi + b log pi_ref + const`` with
   ``b = online.mixture`` (Calandriello et al. 2024, "Human Alignment of Large Language Models
   through Online Preference Optimisation", arXiv 2403.08635, Sec. 5). The sampler's seed is derived
   from the run's seed and the epoch of the loop's per-sample ``keys``, so a run (and a resumed run)
   draws the same completions; a prompt's samples do not depend on the batch it is in.
2. **Annotate** with a preference model ``P(y1 beats y2)`` (a reward model ``r`` becomes
   ``sigmoid(r1 - r2)``, Bradley-Terry, or the hard 1 / 0.5 / 0 comparison). Bad generations are
   counted and left out (``count/...`` metrics): empty completions (EOS at once), duplicate pairs
   (``y1 == y2``), completions that hit ``max_new_tokens`` without EOS (kept unless
   ``online.drop_truncated``), NaN labels, annotator calls that raise (the batch is then retried pair by
   pair, so one bad pair costs only itself).
3. **Log-probs** of the sampled token ids (never re-tokenised text), policy and reference (the LoRA
   adapter disabled, or a frozen copy) in one packed forward, as the offline LM task computes them.
4. **Labels to the loss** (:func:`diffdpo.train.apply_loss` -> :func:`diffdpo.losses.preference_loss`):

   * hard labels (``loss.type`` sigmoid = online DPO, hinge = online SLiC, or any paired loss): chosen =
     the annotator's winner, rejected = the loser; a tie (p = 0.5) is left out of the loss and counted;
   * soft labels (``loss.type=ipo``: online IPO and IPO-MD): chosen = y1, rejected = y2 and
     ``loss_inputs["preference_probs"] = p``, the loss ``p (h - 1/(2 tau))^2 + (1 - p) (h + 1/(2 tau))^2``
     with ``h = (log pi(y1) - log pi_ref(y1)) - (log pi(y2) - log pi_ref(y2))``, i.e. h regressed towards
     ``(2p - 1) / (2 tau)`` (online IPO, Calandriello et al. 2024; the soft-label form is from a secondary
     summary, see :mod:`diffdpo.losses`); a tie is a pair with p = 0.5 (h regressed to 0), kept and counted.

   A micro-batch with no usable pair returns empty tensors still attached to the forward graph: a zero
   loss with a zero gradient, never NaN.

Metrics (pair-weighted means unless named ``count/...``, which are per-step totals): ``count/samples``,
``count/annotated_pairs``, ``count/ties``, ``count/empty``, ``count/duplicates``, ``count/no_eos``,
``count/nan_labels``, ``count/judge_errors`` (annotator calls that raised), ``count/unlabelled``
(pairs left without a label), ``online/samples_per_s``, ``online/length`` (mean completion tokens),
``kl/sampled`` and ``kl/token``. ``kl/sampled`` is the k1 estimator of KL(pi || pi_ref): the mean over
sampled completions of ``sum_t log pi(y_t | .) - log pi_ref(y_t | .)``; it is unbiased for samples from
the policy, and for IPO-MD (samples from the mixture) it estimates ``E_mix[log pi / pi_ref]`` instead.
``kl/token`` is the exact next-token KL averaged over the sampled positions.

:meth:`OnlineLMTask.evaluate` (the loop calls it every ``eval_every`` steps; also written to
``eval.json`` at export) samples the policy and the reference on held-out prompts with the same
generator per (prompt, sample), so each comparison is paired, judges policy vs reference with the gold
preference model and reports wins/ties/losses with a Wilson 95% interval
(:func:`diffdpo.eval.winrate.win_rate`; ties count as non-wins, ``eval/win_rate_ties_half`` counts them
as half).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffdpo.config import help_meta
from diffdpo.lm.config import LMConfig
from diffdpo.lm.generate import Completions, sample_completions
from diffdpo.lm.logps import sequence_logps
from diffdpo.lm.packing import Group, collate_groups
from diffdpo.lm.task import LMPreferenceTask
from diffdpo.losses import GROUP_LOSS_TYPES, POINTWISE_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES
from diffdpo.task import GroupLogpsOut, LogpsOut, TaskContext, TaskSpec

#: ``preferences(prompts, completions_a, completions_b) -> (N,)`` P(a beats b); may hold NaN or raise.
Preferences = Callable[[Sequence[str], Sequence[str], Sequence[str]], torch.Tensor]
#: ``rewards(prompts, completions) -> (N,)`` a reward model's scores; may hold NaN or raise.
Rewards = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# config


@dataclass
class AnnotatorConfig:
    """The preference model that labels the sampled pairs."""

    kind: str = field(default="reward_model", metadata=help_meta("reward_model | preference_model (HF sequence classifiers)"))
    path: str = field(default="", metadata=help_meta("folder (or hub id) of a num_labels=1 sequence classifier"))
    bradley_terry: bool = field(default=True, metadata=help_meta(
        "reward model: P(y1 beats y2) = sigmoid(r1 - r2); false = hard 1 / 0.5 / 0 by comparing rewards"))
    batch_size: int = field(default=32, metadata=help_meta("texts per annotator forward"))
    max_length: int = field(default=512, metadata=help_meta("annotator tokens per text (keeps the end)"))

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError("annotator.batch_size and annotator.max_length must be >= 1")


@dataclass
class OnlineConfig:
    """Sampling, labels and evaluation of the online task."""

    mixture: float = field(default=0.0, metadata=help_meta("IPO-MD: sample from the geometric mixture with the reference, b in [0, 1); 0 = the policy"))
    max_new_tokens: int = field(default=64, metadata=help_meta("the most sampled tokens per completion (EOS included)"))
    temperature: float | None = field(default=None, metadata=help_meta("sampling temperature; None = 0.7 for grao (the paper), 1.0 otherwise"))
    top_k: int = field(default=0, metadata=help_meta("top-k filter; 0 = off"))
    top_p: float = field(default=1.0, metadata=help_meta("nucleus filter; 1 = off"))
    generation_batch_size: int = field(default=64, metadata=help_meta("(prompt, sample) rows decoded together"))
    labels: Literal["auto", "hard", "soft"] = field(default="auto", metadata=help_meta(
        "auto = soft for loss.type=ipo (online IPO, IPO-MD), hard (winner, loser) otherwise"))
    drop_truncated: bool = field(default=False, metadata=help_meta("leave out pairs with a completion that hit max_new_tokens without EOS"))
    eval_source: str = field(default="", metadata=help_meta("held-out prompt file for the win rate against the reference; empty = no evaluation"))
    eval_samples_per_prompt: int = field(default=16, metadata=help_meta("policy/reference comparisons per held-out prompt"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples (the same every evaluation)"))
    group_size: int = field(default=8, metadata=help_meta("grao: G completions sampled per prompt (paper 8)"))
    group_reward: Literal["judge", "raw"] = field(default="judge", metadata=help_meta(
        "grao: judge = sign(r(o) - r(y)) against the reference answer y (+1/0/-1, the paper's judge); raw = r(o), r(y)"))

    def __post_init__(self) -> None:
        if not 0.0 <= self.mixture < 1.0:
            raise ValueError(f"online.mixture must be in [0, 1) (0 = online IPO, 0.125 = the paper's IPO-MD), got {self.mixture}")
        if self.max_new_tokens < 1 or self.generation_batch_size < 1 or self.eval_samples_per_prompt < 1:
            raise ValueError("online.max_new_tokens, generation_batch_size and eval_samples_per_prompt must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"online.group_size must be >= 2 (GRAO compares the samples of a group), got {self.group_size}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"online.temperature must be > 0 (two greedy samples are duplicates), got {self.temperature}")


@dataclass
class OnlineLMConfig(LMConfig):
    """The ``lm_online:`` section: an ``lm`` section whose data are prompts, plus sampling and annotation."""

    online: OnlineConfig = field(default_factory=OnlineConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)


# ------------------------------------------------------------------------------------------------
# prompts and annotators


class PromptDataset(torch.utils.data.Dataset):
    """Prompt texts (chat prompts rendered with the tokenizer's template); items ``{"prompt", "index"}``."""

    def __init__(self, prompts: list[str], source: str = "<memory>", references: list[str] | None = None) -> None:
        self.prompts, self.source, self.references = prompts, source, references

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"prompt": self.prompts[i], "index": i}
        if self.references is not None:
            item["reference"] = self.references[i]
        return item


def load_prompts(source: str, tokenizer: Any, *, split: str = "train", max_rows: int | None = None) -> list[str]:
    """The ``prompt`` column of a prompt file (.jsonl/.json/.parquet, a saved dataset or a hub id); a chat
    prompt (a list of messages) is rendered with the chat template and the generation prompt."""
    from diffdpo.lm.data import is_conversational, load_rows

    rows, name = load_rows(source, split)
    rows = rows[:max_rows] if max_rows is not None else rows
    prompts = []
    for n, row in enumerate(rows):
        value = row.get("prompt")
        if is_conversational(value):
            value = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}, row {n}: needs a non-empty 'prompt' (text or chat messages), has columns "
                             f"{', '.join(sorted(row))}")
        prompts.append(value)
    if not prompts:
        raise ValueError(f"{name}: no prompt to sample from")
    return prompts


def load_references(source: str, *, split: str = "train", max_rows: int | None = None) -> list[str]:
    """Each row's reference answer (GRAO): its ``reference`` column, else its ``chosen`` (a preference pair's
    winner); text, or chat messages whose last message's content is taken."""
    from diffdpo.lm.data import is_conversational, load_rows

    rows, name = load_rows(source, split)
    rows = rows[:max_rows] if max_rows is not None else rows
    out = []
    for n, row in enumerate(rows):
        value = row.get("reference", row.get("chosen"))
        if is_conversational(value):
            value = value[-1].get("content") if value else None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}, row {n}: GRAO needs a reference answer, a non-empty 'reference' or 'chosen' "
                             f"(text or chat messages); the row has columns {', '.join(sorted(row))}")
        out.append(value)
    return out


def build_reward_model(cfg: AnnotatorConfig, device: Any = "cpu") -> Rewards:
    """The raw reward model of ``cfg`` (GRAO's ``online.group_reward=raw``): an HF reward model by path."""
    from diffdpo.rewards.lm import HFRewardModel

    if cfg.kind != "reward_model" or not cfg.path:
        raise ValueError(f"online.group_reward=raw needs a reward model (annotator.kind=reward_model with a path), "
                         f"got annotator.kind={cfg.kind!r}; or use online.group_reward=judge")
    return HFRewardModel(cfg.path, device=device, batch_size=cfg.batch_size, max_length=cfg.max_length)


def build_annotator(cfg: AnnotatorConfig, device: Any = "cpu") -> Preferences:
    """A preference model from an HF sequence classifier (:mod:`diffdpo.rewards.lm`)."""
    from diffdpo.rewards.lm import BradleyTerryPreference, HFPreferenceModel, HFRewardModel

    if not cfg.path:
        raise ValueError("annotator.path is empty: give the folder of a sequence-classification reward or "
                         "preference model (e.g. one `diffdpo reward-model train` wrote)")
    if cfg.kind == "reward_model":
        rm = HFRewardModel(cfg.path, device=device, batch_size=cfg.batch_size, max_length=cfg.max_length)
        return BradleyTerryPreference(rm, hard=not cfg.bradley_terry)
    if cfg.kind == "preference_model":
        return HFPreferenceModel(cfg.path, device=device, batch_size=cfg.batch_size, max_length=cfg.max_length)
    raise ValueError(f"annotator.kind={cfg.kind!r} is unknown; use reward_model or preference_model")


@dataclass
class Annotation:
    """Preferences of N pairs (NaN where none came back) and what went wrong on the way."""

    probs: torch.Tensor  # (N,) float32 P(y1 beats y2)
    nan: int = 0  # pairs the annotator answered with NaN
    errors: int = 0  # annotator calls that raised


def annotate(preferences: Preferences, prompts: list[str], a: list[str], b: list[str]) -> Annotation:
    """Call the annotator on all pairs at once; if that raises, pair by pair (a pair that raises gets NaN)."""
    n = len(prompts)
    if n == 0:
        return Annotation(torch.zeros(0))
    try:
        probs = _checked(preferences(prompts, a, b), n)
        return Annotation(probs, nan=int((~torch.isfinite(probs)).sum()))
    except Exception as exc:  # noqa: BLE001 - any annotator failure is counted, the step goes on
        _warn(exc)
    probs, nan, errors = torch.full((n,), float("nan")), 0, 1
    for i in range(n):
        try:
            probs[i] = _checked(preferences(prompts[i : i + 1], a[i : i + 1], b[i : i + 1]), 1)[0]
            nan += int(not math.isfinite(float(probs[i])))
        except Exception as exc:  # noqa: BLE001
            errors += 1
            _warn(exc)
    return Annotation(probs, nan=nan, errors=errors)


def _checked(values: Any, n: int) -> torch.Tensor:
    values = torch.as_tensor(values).detach().float().cpu().reshape(-1)
    if values.numel() != n:
        raise ValueError(f"the annotator returned {values.numel()} values for {n} pairs")
    return values


def _warn(exc: Exception) -> None:
    warnings.warn(f"online annotation: the annotator raised {type(exc).__name__}: {exc}; those pairs are left out",
                  RuntimeWarning, stacklevel=3)


def epoch_seed(seed: int, epoch: int) -> int:
    """The sampler seed of one pass over the prompts (stable hash of the run seed and the epoch)."""
    digest = hashlib.blake2b(f"online\x1f{int(seed)}\x1f{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ------------------------------------------------------------------------------------------------
# the task


class OnlineLMTask(LMPreferenceTask):
    """Online DPO / SLiC / IPO and IPO-MD on the shared loop (see the module docstring)."""

    def __init__(self, cfg: OnlineLMConfig, *, loss_type: str, accelerator: Any, seed: int = 0,
                 per_device_batch_size: int = 1, gradient_checkpointing: bool = False,
                 annotator: Preferences | None = None, gold: Preferences | None = None,
                 gold_reward: Callable[[Sequence[str], Sequence[str]], torch.Tensor] | None = None,
                 reward: Rewards | None = None, model: Any = None, tokenizer: Any = None) -> None:
        if loss_type in POINTWISE_LOSS_TYPES or loss_type in REFERENCE_FREE_LOSS_TYPES or loss_type == "sft":
            raise ValueError(f"loss.type={loss_type!r}: online training needs a paired loss with a reference "
                             "(sigmoid = online DPO, hinge = online SLiC, ipo = online IPO / IPO-MD)")
        if cfg.reference.kind == "precomputed":
            raise ValueError("lm.reference.kind=precomputed cannot score completions sampled during training; "
                             "use auto, adapters_disabled or frozen_copy")
        self.group = loss_type in GROUP_LOSS_TYPES  # GRAO: G samples + the reference answer per prompt
        self.samples_per_prompt = cfg.online.group_size if self.group else 2
        self.temperature = cfg.online.temperature if cfg.online.temperature is not None else (0.7 if self.group else 1.0)
        labels = cfg.online.labels if cfg.online.labels != "auto" else ("soft" if loss_type == "ipo" else "hard")
        if labels == "soft" and loss_type != "ipo":
            raise ValueError(f"online.labels=soft needs loss.type=ipo (preference_probs), got {loss_type!r}")
        self.soft = labels == "soft"
        # the annotator before the model: a wrong path is a one-line error before anything heavy loads
        self.annotator = annotator if annotator is not None else build_annotator(cfg.annotator, accelerator.device)
        self.gold = gold if gold is not None else self.annotator
        self.gold_reward = gold_reward
        self.reward = reward
        if self.group and cfg.online.group_reward == "raw" and reward is None:
            self.reward = build_reward_model(cfg.annotator, accelerator.device)
        super().__init__(cfg, loss_type=loss_type, accelerator=accelerator, seed=seed,
                         per_device_batch_size=per_device_batch_size, gradient_checkpointing=gradient_checkpointing,
                         model=model, tokenizer=tokenizer)
        o = cfg.online
        self.eval_prompts = (load_prompts(o.eval_source, self.tokenizer) if o.eval_source else [])
        self._ref_eval: Completions | None = None  # the reference's evaluation samples never change
        self._last_start: float | None = None
        self._eval_seconds = 0.0

    # ---- data ----------------------------------------------------------------------------------

    def _load_data(self, per_device_batch_size: int) -> PromptDataset:
        d = self.cfg.data
        refs = load_references(d.source, split=d.split, max_rows=d.max_rows) if self.group else None
        return PromptDataset(load_prompts(d.source, self.tokenizer, split=d.split, max_rows=d.max_rows), d.source, refs)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"prompts": [it["prompt"] for it in items],
               "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
        if self.group:
            out["references"] = [it["reference"] for it in items]
        return out

    # ---- sampling and annotation ---------------------------------------------------------------

    def _ref_model(self) -> Any:
        return self.ref_policy.model if self.ref_policy is not None else None

    def sample(self, prompts: list[str], keys: torch.Tensor) -> Completions:
        """Two completions per prompt (G for GRAO; prompt-major rows), seeded by the run seed and the keys' epoch."""
        o, n = self.cfg.online, len(self._dataset)
        epochs = (keys // n).tolist()
        parts: list[tuple[list[int], Completions]] = []
        for epoch in sorted(set(epochs)):  # the loop's micro-batches never span epochs; direct callers may
            rows = [i for i, e in enumerate(epochs) if e == epoch]
            comps = sample_completions(self.policy.model, self.tokenizer, [prompts[i] for i in rows],
                                       n=self.samples_per_prompt, max_new_tokens=o.max_new_tokens, temperature=self.temperature, top_k=o.top_k,
                                       top_p=o.top_p, seed=epoch_seed(self.seed, epoch),
                                       batch_size=o.generation_batch_size, mixture=o.mixture, ref_model=self._ref_model())
            parts.append((rows, comps))
        return parts[0][1] if len(parts) == 1 else _merge(parts, prompts, self.samples_per_prompt)

    def _annotate_pairs(self, comps: Completions) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(probs (N,), usable (N,) bool, counts) for the N sampled pairs."""
        eos = self.tokenizer.eos_token_id
        ids, fin = comps.completion_ids, comps.finished.tolist()
        n = len(comps.prompts)
        empty = [not [t for t in c if t != eos] for c in ids]  # nothing before EOS
        dup = [ids[2 * i] == ids[2 * i + 1] for i in range(n)]
        candidate = [not (empty[2 * i] or empty[2 * i + 1] or dup[i]
                          or (self.cfg.online.drop_truncated and not (fin[2 * i] and fin[2 * i + 1])))
                     for i in range(n)]
        todo = [i for i in range(n) if candidate[i]]
        ann = annotate(self.annotator, [comps.prompts[i] for i in todo], [comps.texts[2 * i] for i in todo],
                       [comps.texts[2 * i + 1] for i in todo])
        probs = torch.full((n,), float("nan"))
        if todo:
            probs[torch.tensor(todo)] = ann.probs
        labelled = torch.isfinite(probs)
        ties = labelled & (probs == 0.5)
        usable = labelled & (torch.ones_like(ties) if self.soft else ~ties)
        counts = {"count/samples": float(2 * n), "count/annotated_pairs": float(labelled.sum()),
                  "count/ties": float(ties.sum()), "count/empty": float(sum(empty)), "count/duplicates": float(sum(dup)),
                  "count/no_eos": float(len(fin) - sum(fin)), "count/nan_labels": float(ann.nan),
                  "count/judge_errors": float(ann.errors), "count/unlabelled": float(len(todo) - int(labelled.sum()))}
        return probs, usable, counts

    # ---- the PreferenceTask protocol -----------------------------------------------------------

    def compute(self, model: torch.nn.Module, batch: dict[str, Any], keys: torch.Tensor) -> LogpsOut:
        """Sample, annotate, score the sampled ids; (winner, loser) or (y1, y2) + soft labels (module docstring);
        for GRAO a :class:`GroupLogpsOut` (:meth:`compute_group`)."""
        if self.group:
            return self.compute_group(model, batch, keys)  # type: ignore[return-value]
        start = time.perf_counter()
        prompts: list[str] = batch["prompts"]
        comps = self.sample(prompts, keys.cpu())
        probs, usable, counts = self._annotate_pairs(comps)
        n = len(prompts)
        groups = [Group(list(comps.prompt_ids[2 * i]), [list(comps.completion_ids[2 * i]),
                                                        list(comps.completion_ids[2 * i + 1])]) for i in range(n)]
        tokens = collate_groups(groups, self.cfg.layout, self.tokenizer.pad_token_id).to(self.device)
        ref_hidden, ref_head = self._reference_hidden(tokens)
        out = model(tokens, ref_hidden, ref_head)  # TokenLogps, (M,) each
        logps = sequence_logps(out.logps, tokens, average=self.cfg.average_log_prob)  # (2N,): y1 then y2
        ref_logps = sequence_logps(out.ref_logps, tokens, average=self.cfg.average_log_prob)  # (2N,)
        lengths = tokens.completion_lengths.to(logps.device)  # (2N,)
        idx = usable.nonzero().squeeze(-1).to(logps.device)  # (U,)
        first = torch.arange(n, device=logps.device)
        if self.soft:  # (y1, y2) with p = P(y1 beats y2)
            c, r = first, first + n
        else:  # (winner, loser)
            y2_wins = torch.nan_to_num(probs, nan=1.0).to(logps.device) < 0.5
            c, r = torch.where(y2_wins, first + n, first), torch.where(y2_wins, first, first + n)
        c, r = c[idx], r[idx]
        result = LogpsOut(logps[c], logps[r], ref_logps[c], ref_logps[r],
                          chosen_lengths=lengths[c], rejected_lengths=lengths[r])
        if self.soft:
            result.loss_inputs["preference_probs"] = probs.to(logps.device)[idx]
        result.metrics = self._metrics(out, tokens, counts, start)
        return result

    # ---- GRAO ------------------------------------------------------------------------------------

    def compute_group(self, model: torch.nn.Module, batch: dict[str, Any], keys: torch.Tensor) -> GroupLogpsOut:
        """GRAO's inputs: G samples per prompt (no gradient), their rewards and the reference answer's, and the
        policy's length-averaged log-probs J_exp(o_i) and J_imit(y) in one packed forward (with gradient).

        A group with a NaN reward (or an annotator failure) is left out and counted (``count/dropped_groups``).
        """
        start = time.perf_counter()
        prompts, answers = batch["prompts"], batch["references"]
        g, n = self.samples_per_prompt, len(prompts)
        comps = self.sample(prompts, keys.cpu())  # N * G rows, prompt-major
        rewards, answer_rewards, counts = self._group_rewards(comps, answers)  # (N, G), (N,)
        groups = [Group(list(comps.prompt_ids[i * g]),
                        [list(comps.completion_ids[i * g + j]) for j in range(g)]
                        + [self._answer_ids(prompts[i], comps.prompt_ids[i * g], answers[i])]) for i in range(n)]
        tokens = collate_groups(groups, self.cfg.layout, self.tokenizer.pad_token_id).to(self.device)
        ref_hidden, ref_head = self._reference_hidden(tokens)  # the base, for the KL diagnostics only
        out = model(tokens, ref_hidden, ref_head)  # TokenLogps, (M,) each
        avg = sequence_logps(out.logps, tokens, average=True)  # ((G + 1) N,), branch-major
        table = avg.view(g + 1, n).T  # (N, G + 1): samples, then the reference answer
        usable = torch.isfinite(rewards).all(dim=1) & torch.isfinite(answer_rewards)  # (N,)
        idx = usable.nonzero().squeeze(-1).to(avg.device)  # (U,)
        counts["count/dropped_groups"] = float(n - int(usable.sum()))
        result = GroupLogpsOut(table[idx, :g], table[idx, g], rewards.to(avg.device)[idx],
                               answer_rewards.to(avg.device)[idx])
        result.metrics = self._metrics(out, tokens, counts, start, sampled=g * n)
        result.metrics["rewards/mean"] = torch.nan_to_num(rewards).mean()
        return result

    def _answer_ids(self, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
        """Token ids of the reference answer after ``prompt_ids`` (as the offline LM data tokenises completions:
        the tokenisation of prompt + answer past the prompt, EOS appended when ``data.add_eos``)."""
        tok = self.tokenizer
        full = list(tok(prompt + answer)["input_ids"])
        ids = full[len(prompt_ids):] if full[: len(prompt_ids)] == list(prompt_ids) else \
            list(tok(answer, add_special_tokens=False)["input_ids"])  # the tokenisations diverge: the answer alone
        if self.cfg.data.add_eos and tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids.append(tok.eos_token_id)
        return ids

    def _group_rewards(self, comps: Completions, answers: list[str]
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(N, G) sample rewards, (N,) reference-answer rewards (NaN where none came back) and counts.

        ``online.group_reward=judge`` (default): the annotator compares each sample with the reference answer,
        R(o_i) = sign(2 P(o_i beats y) - 1) in {+1, 0, -1} (for a reward model, sign(r(o_i) - r(y))), and
        R(y) = 0 (y against itself is a tie). ``raw``: R = the reward model's score of each text.
        """
        g, n = self.samples_per_prompt, len(answers)
        eos = self.tokenizer.eos_token_id
        rows = comps.prompt_index.tolist()
        prompts = [comps.prompts[i] for i in rows]
        if self.cfg.online.group_reward == "judge":
            ann = annotate(self.annotator, prompts, comps.texts, [answers[i] for i in rows])
            # torch.sign(NaN) is 0: keep NaN (a missing label) apart from a tie
            rewards = torch.where(torch.isfinite(ann.probs), torch.sign(2 * ann.probs - 1), ann.probs)
            answer_rewards = torch.zeros(n)
        else:  # the reward model on the N G samples and the N answers, through annotate's failure handling
            assert self.reward is not None
            reward = self.reward
            ann = annotate(lambda p, a, _b: reward(p, a), prompts + list(comps.prompts), comps.texts + answers,
                           comps.texts + answers)
            rewards, answer_rewards = ann.probs[: n * g], ann.probs[n * g :]
        fin = comps.finished.tolist()
        counts = {"count/samples": float(n * g), "count/annotated_pairs": float(torch.isfinite(rewards).sum()),
                  "count/ties": float((rewards == answer_rewards.repeat_interleave(g)).sum()),
                  "count/empty": float(sum(not [t for t in c if t != eos] for c in comps.completion_ids)),
                  "count/no_eos": float(len(fin) - sum(fin)), "count/nan_labels": float(ann.nan),
                  "count/judge_errors": float(ann.errors)}
        return rewards.view(n, g), answer_rewards, counts

    def _metrics(self, out: Any, tokens: Any, counts: dict[str, float], start: float, sampled: int | None = None
                 ) -> dict[str, torch.Tensor]:
        """Counts, throughput, length and KL on the first ``sampled`` sequences (the samples; all if None)."""
        sums = sequence_logps(out.logps.detach(), tokens)[:sampled]  # summed, whatever the loss averages
        ref_sums = sequence_logps(out.ref_logps, tokens)[:sampled]
        now = time.perf_counter()
        # throughput over the whole cycle since the previous micro-batch began (backward, optimizer step
        # included), evaluation time excluded; the first micro-batch counts its own time only
        since = start if self._last_start is None else self._last_start
        seconds = max(now - since - self._eval_seconds, 1e-9)
        self._last_start, self._eval_seconds = start, 0.0
        m = {k: torch.tensor(v) for k, v in counts.items()}
        m["online/samples_per_s"] = torch.tensor(counts["count/samples"] / seconds)
        m["online/length"] = tokens.completion_lengths[:sampled].float().mean()
        m["kl/sampled"] = (sums - ref_sums).mean()  # k1 estimator on the samples
        if out.token_kl is not None:
            m["kl/token"] = out.token_kl.mean()
        return m

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Gold win rate of the policy against the reference on the held-out prompts (module docstring)."""
        if not self.eval_prompts:
            return {}
        from diffdpo.eval.winrate import win_rate

        began = time.perf_counter()
        o, k = self.cfg.online, self.cfg.online.eval_samples_per_prompt
        kwargs = dict(n=k, max_new_tokens=o.max_new_tokens, temperature=self.temperature, top_k=o.top_k, top_p=o.top_p,
                      seed=o.eval_seed, batch_size=o.generation_batch_size, ref_model=self._ref_model())
        policy = sample_completions(self.policy.model, self.tokenizer, self.eval_prompts, **kwargs)
        if self._ref_eval is None:  # mixture 1 = the reference, with the same generator per row as the policy
            self._ref_eval = sample_completions(self.policy.model, self.tokenizer, self.eval_prompts, mixture=1.0,
                                                **kwargs)
        ref = self._ref_eval
        prompts = [self.eval_prompts[i] for i in policy.prompt_index.tolist()]
        ann = annotate(self.gold, prompts, policy.texts, ref.texts)
        ok = torch.isfinite(ann.probs)
        p = ann.probs[ok].tolist()
        result: dict[str, float] = {"eval/unlabelled": float((~ok).sum())}
        if p:
            wr = win_rate(p, [1.0 - x for x in p])
            result.update({"eval/win_rate": wr.rate, "eval/win_rate_low": wr.ci_low, "eval/win_rate_high": wr.ci_high,
                           "eval/wins": float(wr.wins), "eval/ties": float(wr.ties), "eval/losses": float(wr.losses),
                           "eval/win_rate_ties_half": (wr.wins + 0.5 * wr.ties) / wr.n})
        result["eval/length"] = sum(len(c) for c in policy.completion_ids) / len(policy)
        if self.gold_reward is not None:
            result["eval/gold_reward"] = float(self.gold_reward(prompts, policy.texts).float().mean())
            result["eval/base_gold_reward"] = float(self.gold_reward(prompts, ref.texts).float().mean())
        result.update(self.extra_eval(prompts, policy.texts, ref.texts))
        self._eval_seconds += time.perf_counter() - began
        return result

    def extra_eval(self, prompts: list[str], policy_texts: list[str], ref_texts: list[str]) -> dict[str, float]:
        """More evaluation metrics of a subclass (a world's gold measures); none here."""
        return {}

    def export(self, out_dir: Path) -> None:
        """The LM task's export, plus ``eval.json`` (the evaluation above) when held-out prompts are set."""
        super().export(out_dir)
        if not self.eval_prompts:
            return
        result = self.evaluate()
        (Path(out_dir) / "eval.json").write_text(json.dumps(result, indent=1))
        if "eval/win_rate" in result:
            print(f"online evaluation: win rate vs the reference {result['eval/win_rate']:.3f} "
                  f"[{result['eval/win_rate_low']:.3f}, {result['eval/win_rate_high']:.3f}] "
                  f"(W/T/L {result['eval/wins']:.0f}/{result['eval/ties']:.0f}/{result['eval/losses']:.0f})")


def _merge(parts: list[tuple[list[int], Completions]], prompts: list[str], n: int = 2) -> Completions:
    """Completions of several sampler calls back in the order of ``prompts`` (``n`` rows per prompt)."""
    rows: dict[int, tuple[Completions, int]] = {}
    for where, comps in parts:
        for local, i in enumerate(where):
            rows[i] = (comps, local)
    order = [(rows[i][0], n * rows[i][1] + j) for i in range(len(prompts)) for j in range(n)]
    return Completions(
        prompts=list(prompts),
        prompt_index=torch.tensor([i for i in range(len(prompts)) for _ in range(n)], dtype=torch.long),
        sample_index=torch.tensor([j for _ in prompts for j in range(n)], dtype=torch.long),
        prompt_ids=[c.prompt_ids[r] for c, r in order],
        completion_ids=[c.completion_ids[r] for c, r in order],
        texts=[c.texts[r] for c, r in order],
        finished=torch.stack([c.finished[r] for c, r in order]),
    )


def _build_task(cfg: OnlineLMConfig, context: TaskContext) -> OnlineLMTask:
    return OnlineLMTask(cfg, **context.kwargs())


TASK = TaskSpec("lm_online", OnlineLMConfig, _build_task, default_beta=0.1,
                description="online DPO / SLiC / IPO and IPO-MD of a causal LM: sample, annotate, train")

"""Annotators for language models: reward models and preference models with one batched interface each.

* A **reward model** is ``reward_model(prompts, completions) -> torch.Tensor``: float32, shape ``(N,)``,
  one reward per (prompt, completion) pair, on the CPU.
* A **preference model** is ``preference_model(prompts, completions_a, completions_b) -> torch.Tensor``:
  float32, shape ``(N,)``, ``P(a beats b)`` in [0, 1].

Implementations:

* :class:`ProgramJudge`: a reward computed by a program, ``score(prompt, completion) -> float``; its
  :meth:`~ProgramJudge.prefer` is the matching hard preference model (1 / 0.5 / 0). The tiny LM world's
  exact oracle is one (``diffdpo.toy.tiny_lm_judge.TinyWorldJudge``; it lives beside its world because the
  library imports no toy world).
* :class:`NoisyJudge`: any reward model with a length bias added and, as a preference model, labels
  flipped at a given rate (reproducibly per pair): the proxy judge of over-optimisation studies.
* :class:`BradleyTerryPreference`: a preference model from a reward model, ``sigmoid(r_a - r_b)``.
* :class:`HFRewardModel` and :class:`HFPreferenceModel`: a transformers sequence classifier with one
  output (``num_labels=1``) loaded from a local folder (or a hub id), such as the ones
  :func:`diffdpo.rewards.reward_model.train_reward_model` writes. ``trust_remote_code`` is never set.

Bad values: a reward model may return NaN (a broken model, an overflow); the classes here pass NaN on
as it is (a NaN reward gives a NaN preference, never a silent tie). :func:`finite_mask` says which
entries are usable so the caller can drop and count the rest. A judge that raises is the caller's to
handle.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from diffdpo.adapters import resolve_dtype


class RewardModel(Protocol):
    """``reward_model(prompts, completions) -> (N,)`` float32 rewards, one per (prompt, completion)."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor: ...


class PreferenceModel(Protocol):
    """``preference_model(prompts, completions_a, completions_b) -> (N,)`` float32 ``P(a beats b)`` in [0, 1]."""

    def __call__(self, prompts: Sequence[str], completions_a: Sequence[str],
                 completions_b: Sequence[str]) -> torch.Tensor: ...


def finite_mask(values: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: which rewards (or preferences) are finite, i.e. usable; ``(~mask).sum()`` is the count
    to report as dropped."""
    return torch.isfinite(values)


def hard_preference(rewards_a: torch.Tensor, rewards_b: torch.Tensor) -> torch.Tensor:
    """``(N,)``: 1.0 where ``rewards_a > rewards_b``, 0.0 where smaller, 0.5 on a tie; NaN where either is NaN."""
    labels = torch.full_like(rewards_a, 0.5, dtype=torch.float32)
    labels[rewards_a > rewards_b] = 1.0
    labels[rewards_a < rewards_b] = 0.0
    labels[rewards_a.isnan() | rewards_b.isnan()] = float("nan")
    return labels


def _columns(name: str, prompts: Sequence[str], *completions: Sequence[str]) -> list[list[str]]:
    """The columns as lists of strings of one length, or a ValueError saying which one does not fit."""
    columns = [list(prompts), *(list(c) for c in completions)]
    labels = ["prompts", *(["completions"] if len(completions) == 1 else ["completions_a", "completions_b"])]
    for label, column in zip(labels, columns):
        if isinstance(column, str) or len(column) != len(columns[0]):
            raise ValueError(f"{name}: {label} must be a list of {len(columns[0])} strings (one per prompt), "
                             f"got {type(column).__name__ if isinstance(column, str) else len(column)}")
        bad = next((i for i, v in enumerate(column) if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"{name}: {label}[{bad}] is a {type(column[bad]).__name__}, not a string; "
                             "render chat messages to text first (e.g. tokenizer.apply_chat_template(..., tokenize=False))")
    return columns


class BradleyTerryPreference:
    """A preference model from a reward model: ``P(a beats b) = sigmoid(r(x, a) - r(x, b))``, the
    Bradley-Terry model (Bradley & Terry 1952; the RLHF reward model of Ouyang et al. 2022, eq. 1).
    ``hard=True`` gives 1.0 / 0.5 / 0.0 by comparing the rewards instead. Both completions go through the
    reward model in one call of ``2N``."""

    def __init__(self, reward_model: RewardModel, *, hard: bool = False) -> None:
        self.reward_model = reward_model
        self.hard = hard

    def __call__(self, prompts: Sequence[str], completions_a: Sequence[str],
                 completions_b: Sequence[str]) -> torch.Tensor:
        prompts, completions_a, completions_b = _columns("preference model", prompts, completions_a, completions_b)
        n = len(prompts)
        rewards = self.reward_model(prompts + prompts, completions_a + completions_b).float()  # (2N,)
        rewards_a, rewards_b = rewards[:n], rewards[n:]
        return hard_preference(rewards_a, rewards_b) if self.hard else torch.sigmoid(rewards_a - rewards_b)


class ProgramJudge:
    """A reward model computed by a program: ``score(prompt, completion) -> float``, one call per pair.
    :meth:`prefer` is its preference model: 1.0 / 0.5 / 0.0 by comparing the two rewards."""

    def __init__(self, score: Callable[[str, str], float], name: str = "program judge") -> None:
        self.score = score
        self.name = name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        prompts, completions = _columns(self.name, prompts, completions)
        return torch.tensor([float(self.score(p, c)) for p, c in zip(prompts, completions)], dtype=torch.float32)

    def prefer(self, prompts: Sequence[str], completions_a: Sequence[str],
               completions_b: Sequence[str]) -> torch.Tensor:
        """``(N,)`` hard preferences (a :class:`PreferenceModel`): 1.0 if a scores higher, 0.5 on a tie, else 0.0."""
        return BradleyTerryPreference(self, hard=True)(prompts, completions_a, completions_b)


def n_words(text: str) -> int:
    """Whitespace-separated pieces of ``text`` (punctuation standing apart counts): the length unit of
    :class:`NoisyJudge`'s bias."""
    return len(text.split())


class NoisyJudge:
    """A judge that is wrong on purpose, to stand for a proxy judge against the gold one.

    * As a reward model: ``gold(prompt, completion) + length_bias * n_words(completion)`` (:func:`n_words`:
      whitespace-separated pieces), so a positive bias rewards longer completions.
    * As a preference model (:meth:`prefer`): the hard label of those biased rewards (1.0 / 0.5 / 0.0,
      as :class:`ProgramJudge`), flipped (``label -> 1 - label``; a tie stays 0.5, a NaN stays NaN) with
      probability ``flip_rate``. Whether a pair flips is decided by ``random.Random(key).random() < flip_rate``
      where ``key`` is the first 8 bytes of the sha256 of ``[seed, prompt, sorted([a, b])]`` as JSON. So the
      decision depends only on the texts and the seed: not on the batch size, the order of the pairs, or the
      order of a and b (``prefer(x, b, a) == 1 - prefer(x, a, b)``); asking twice about one pair gives one
      answer, like a labeller who has made up their mind. ``flip_rate=1`` flips every label.
    """

    def __init__(self, gold: RewardModel, flip_rate: float = 0.0, length_bias: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= flip_rate <= 1.0:
            raise ValueError(f"NoisyJudge: flip_rate must be in [0, 1], got {flip_rate}")
        self.gold = gold
        self.flip_rate = flip_rate
        self.length_bias = length_bias
        self.seed = seed

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        prompts, completions = _columns("NoisyJudge", prompts, completions)
        bias = torch.tensor([n_words(c) for c in completions], dtype=torch.float32) * self.length_bias
        return self.gold(prompts, completions).float() + bias

    def flips(self, prompts: Sequence[str], completions_a: Sequence[str],
              completions_b: Sequence[str]) -> torch.Tensor:
        """``(N,)`` bool: which pairs' labels :meth:`prefer` flips (see the class docstring)."""
        prompts, completions_a, completions_b = _columns("NoisyJudge", prompts, completions_a, completions_b)
        return torch.tensor([self._flipped(p, a, b) for p, a, b in zip(prompts, completions_a, completions_b)],
                            dtype=torch.bool)

    def _flipped(self, prompt: str, a: str, b: str) -> bool:
        text = json.dumps([self.seed, prompt, sorted([a, b])])
        key = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return random.Random(key).random() < self.flip_rate

    def prefer(self, prompts: Sequence[str], completions_a: Sequence[str],
               completions_b: Sequence[str]) -> torch.Tensor:
        """``(N,)`` hard preferences of the biased rewards, a share ``flip_rate`` of them flipped."""
        prompts, completions_a, completions_b = _columns("NoisyJudge", prompts, completions_a, completions_b)
        labels = BradleyTerryPreference(self, hard=True)(prompts, completions_a, completions_b)
        flips = self.flips(prompts, completions_a, completions_b)
        return torch.where(flips, 1.0 - labels, labels)


# ------------------------------------------------------------------------------------------------
# transformers sequence classifiers with one output


def _expected(path: str | Path) -> str:
    return (f"{path}: expected a sequence-classification model with num_labels=1 "
            "(AutoModelForSequenceClassification)")


def check_sequence_classifier(path: str | Path, config: Any) -> None:
    """A ValueError naming ``path`` unless ``config`` is a sequence classifier with one output."""
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        hint = ("; train a reward model on it with `diffdpo reward-model train` (head=value_head)"
                if any(a.endswith("ForCausalLM") for a in architectures) else "")
        raise ValueError(f"{_expected(path)}, got {', '.join(architectures)}{hint}")
    if config.num_labels != 1:
        raise ValueError(f"{_expected(path)}, got num_labels={config.num_labels}")


def load_model_config(path: str | Path, key: str = "path") -> Any:
    """``AutoConfig`` of a local folder (or a hub id), with one-line errors for a missing or unreadable one."""
    from transformers import AutoConfig

    from diffdpo.config import check_model_source

    check_model_source(str(path), key)
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a transformers model config ({' '.join(str(exc).split())[:200]})"
                         ) from exc


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer at ``path``, padding on the right (a causal model's positions then do not depend on the
    batch), cutting long texts on the left (the score is read at the last token), pad = EOS if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer


class LogitScorer:
    """One scalar logit per text from a sequence classifier with ``num_labels=1``, ``batch_size`` texts at a
    time, float32 on the CPU; texts longer than ``max_length`` tokens keep their last ``max_length``."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, max_length: int) -> None:
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
        if model.config.pad_token_id is None:  # the classifier finds each text's last token by the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                             add_special_tokens=True)
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def logits(self, texts: list[str]) -> torch.Tensor:
        """``(N,)`` logits with gradients (the caller sets train or eval mode)."""
        return self.model(**self.encode(texts)).logits[:, 0]  # (N,)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            out = [self.logits(texts[i:i + self.batch_size]).float().cpu() for i in range(0, len(texts), self.batch_size)]
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)


def load_sequence_classifier(path: str | Path, *, device: str | torch.device = "cpu",
                             dtype: str | torch.dtype = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a sequence classifier with one output at ``path`` (checked first, with a
    one-line error naming what was expected), in eval mode on ``device``."""
    from transformers import AutoModelForSequenceClassification

    config = load_model_config(path)
    check_sequence_classifier(path, config)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    weights = {"use_safetensors": True} if any(Path(str(path)).glob("*.safetensors")) else {}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch_dtype, **weights)
    except ValueError as exc:  # a model type with no sequence-classification class
        raise ValueError(f"{_expected(path)}: {' '.join(str(exc).split())[:200]}") from exc
    return model.to(device).eval(), load_tokenizer(path)


class HFRewardModel:
    """A reward model from a transformers sequence classifier with ``num_labels=1``: the reward is its logit
    for ``prompt + completion`` (plain string concatenation, the tokenizer's special tokens added as it adds
    them; render a chat prompt to text with its template first). A decoder's classifier (``LlamaFor...``)
    reads it at the last token, so a text longer than ``max_length`` tokens keeps its last tokens.

    Texts are padded on the right, so a reward does not depend on the batch (up to float rounding).
    ``path`` is a local folder, or a hub id (the download is the user's business); a folder that holds
    anything but a one-output sequence classifier (a ``*ForCausalLM``, a two-label classifier) is a
    ValueError naming it and what was expected.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 batch_size: int = 32, max_length: int = 512) -> None:
        model, tokenizer = load_sequence_classifier(path, device=device, dtype=dtype)
        self.path = str(path)
        self.scorer = LogitScorer(model, tokenizer, batch_size=batch_size, max_length=max_length)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, batch_size: int = 32, max_length: int = 512) -> HFRewardModel:
        """The reward model of a sequence classifier already in memory (e.g. during training)."""
        self = cls.__new__(cls)  # no loading: the model is given
        self.path = "<memory>"
        self.scorer = LogitScorer(model, tokenizer, batch_size=batch_size, max_length=max_length)
        return self

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        prompts, completions = _columns("HFRewardModel", prompts, completions)
        return self.scorer([reward_text(p, c) for p, c in zip(prompts, completions)])


class HFPreferenceModel:
    """A pairwise preference model from a transformers sequence classifier with ``num_labels=1`` that reads
    ``prompt + a + separator + b`` and whose logit says how likely a beats b. The separator defaults to
    ``" {sep} "`` with the tokenizer's SEP token (EOS if it has none).

    A classifier reading a pair in order is not exactly antisymmetric, so the answer averages both orders:
    ``P(a beats b) = (sigmoid(f(a, b)) + 1 - sigmoid(f(b, a))) / 2``, which makes ``P(a, b) + P(b, a) = 1``
    and ``P(a, a) = 0.5``. Both orders go through the model in one call of ``2N`` texts.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 batch_size: int = 32, max_length: int = 512, separator: str | None = None) -> None:
        model, tokenizer = load_sequence_classifier(path, device=device, dtype=dtype)
        self.path = str(path)
        self.scorer = LogitScorer(model, tokenizer, batch_size=batch_size, max_length=max_length)
        self.separator = separator if separator is not None else default_separator(tokenizer)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, batch_size: int = 32, max_length: int = 512,
                   separator: str | None = None) -> HFPreferenceModel:
        """The preference model of a sequence classifier already in memory (e.g. during training)."""
        self = cls.__new__(cls)  # no loading: the model is given
        self.path = "<memory>"
        self.scorer = LogitScorer(model, tokenizer, batch_size=batch_size, max_length=max_length)
        self.separator = separator if separator is not None else default_separator(tokenizer)
        return self

    def __call__(self, prompts: Sequence[str], completions_a: Sequence[str],
                 completions_b: Sequence[str]) -> torch.Tensor:
        prompts, completions_a, completions_b = _columns("HFPreferenceModel", prompts, completions_a, completions_b)
        texts = [pair_text(p, a, b, self.separator) for p, a, b in zip(prompts, completions_a, completions_b)]
        texts += [pair_text(p, b, a, self.separator) for p, a, b in zip(prompts, completions_a, completions_b)]
        n = len(prompts)
        probs = torch.sigmoid(self.scorer(texts))  # (2N,): a-then-b, then b-then-a
        return 0.5 * (probs[:n] + 1.0 - probs[n:])


def reward_text(prompt: str, completion: str) -> str:
    """What a reward model reads: ``prompt + completion``."""
    return prompt + completion


def pair_text(prompt: str, completion_a: str, completion_b: str, separator: str) -> str:
    """What a pairwise preference model reads: ``prompt + a + separator + b``."""
    return prompt + completion_a + separator + completion_b


def default_separator(tokenizer: Any) -> str:
    """``" {sep} "``: the tokenizer's SEP token (EOS if it has none) with a space either side."""
    token = tokenizer.sep_token or tokenizer.eos_token
    if token is None:
        raise ValueError("the tokenizer has neither a SEP nor an EOS token; pass separator= explicitly")
    return f" {token} "

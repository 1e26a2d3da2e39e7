"""Batched sampling from a causal LM with the KV cache, seeded per prompt, from the policy or a geometric mixture.

:func:`sample_completions` is the sampler of the online methods (online DPO/IPO, IPO-MD, GRAO): it
draws ``n`` completions per prompt and keeps their token ids, so log-probs are later computed on the
exact tokens that were sampled, never on re-tokenised text.

* **Seeded per prompt.** Each sample owns a ``torch.Generator`` seeded from ``(seed, prompt text,
  occurrence of that text in the list, sample index)`` (:func:`sample_seed`), and each step draws one
  uniform number from it and inverts the row's CDF. A prompt's samples therefore do not depend on the
  batch size, on the prompt's position in the list or on the other prompts in its batch (up to float
  rounding of the logits, which differ in the last bits between batch shapes and could only matter for
  a draw that lands within ~1e-7 of a CDF step).
* **Our own decoding loop.** Left-padded prompts are prefilled once with ``use_cache=True``, then each
  step feeds the last token with the cache. Position ids follow HF ``generate``: ``cumsum(mask) - 1``
  over the real tokens. ``temperature=0`` is greedy (argmax), token for token what ``model.generate``
  with ``do_sample=False`` gives. ``top_k``/``top_p`` filter as HF's warpers do, after the temperature.
  A row stops at EOS (kept in its ``completion_ids``); rows that reach ``max_new_tokens`` first are
  ``finished=False``.
* **Geometric mixture** (``mixture = b > 0``; IPO-MD, Calandriello et al. 2024, "Human Alignment of
  Large Language Models through Online Preference Optimisation", arXiv 2403.08635; the regularised
  policy of Nash-MD, Munos et al. 2023, "Nash Learning from Human Feedback", arXiv 2312.00886): at every
  token the next-token distribution is ``log pi_b = (1 - b) log pi + b log pi_ref + const``, renormalised
  (:func:`mixture_logprobs`); ``b = 0`` is the policy, ``b = 1`` the reference. TRL's
  ``GeometricMixtureWrapper`` computes ``log_softmax(b * z_ref + (1 - b) * z_policy)`` on the raw logits,
  the same distribution: the log-partition terms of the two log-softmaxes are constants per step.
  Temperature and top-k/top-p apply to the mixture, as ``generate`` applies them to the wrapper's output.
  The reference is ``ref_model`` when given (full fine-tuning); otherwise the policy must carry LoRA
  adapters and the reference is **the same module with its adapters off**
  (:func:`diffdpo.adapters.adapters_disabled`): one model, two KV caches, one per adapter mode, each
  step running the module once with adapters on (policy cache) and once with them off (reference cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffdpo.adapters import adapters_disabled, eval_mode, tuner_layers


@dataclass
class Completions:
    """Sampled completions, prompt-major: row ``i * n + j`` is sample ``j`` of ``prompts[i]``."""

    prompts: list[str]  # the prompts as given, in input order
    prompt_index: Tensor  # (N * n,) long: which prompt each row continues
    sample_index: Tensor  # (N * n,) long: which of that prompt's n samples it is
    prompt_ids: list[list[int]]  # per row, the prompt's token ids (no padding)
    completion_ids: list[list[int]]  # per row, sampled ids without padding; ends with EOS when finished
    texts: list[str]  # per row, the decoded completion (see :func:`completion_text`)
    finished: Tensor  # (N * n,) bool: True = ended with EOS, False = stopped at max_new_tokens

    def __len__(self) -> int:
        return len(self.completion_ids)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per row: ``prompt`` and ``completion`` (the text data format of :mod:`diffdpo.lm.data`)
        plus ``prompt_ids``, ``completion_ids``, ``finished``, ``prompt_index`` and ``sample_index``."""
        return [
            {
                "prompt": self.prompts[i],
                "completion": self.texts[r],
                "prompt_ids": list(self.prompt_ids[r]),
                "completion_ids": list(self.completion_ids[r]),
                "finished": bool(self.finished[r]),
                "prompt_index": i,
                "sample_index": int(self.sample_index[r]),
            }
            for r, i in enumerate(self.prompt_index.tolist())
        ]


def mixture_logprobs(policy_logits: Tensor, ref_logits: Tensor, mixture: float) -> Tensor:
    """Normalised log-probs (float32, same shape) of the geometric mixture of two next-token distributions.

    ``log_softmax((1 - b) * log_softmax(z_policy) + b * log_softmax(z_ref))`` with ``b = mixture``: the
    per-token mixture of IPO-MD (Calandriello et al. 2024, arXiv 2403.08635) and Nash-MD (Munos
    et al. 2023, arXiv 2312.00886), equal to TRL's ``log_softmax(b * z_ref + (1 - b) * z_policy)``.
    """
    if not 0.0 <= mixture <= 1.0:
        raise ValueError(f"mixture must be in [0, 1] (0 = policy, 1 = reference), got {mixture!r}")
    policy_logps = F.log_softmax(policy_logits.float(), dim=-1)
    ref_logps = F.log_softmax(ref_logits.float(), dim=-1)
    return F.log_softmax((1.0 - mixture) * policy_logps + mixture * ref_logps, dim=-1)


def sample_seed(seed: int, prompt: str, occurrence: int, sample: int) -> int:
    """The generator seed of one sample: a stable hash (not Python's salted ``hash``) of
    ``(seed, occurrence, sample, prompt)``. ``occurrence`` counts earlier copies of the same prompt text
    in the list, so duplicated prompts get different samples while the order of distinct prompts does
    not matter."""
    key = f"{int(seed)}\x1f{int(occurrence)}\x1f{int(sample)}\x1f{prompt}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # < 2**63


def completion_text(tokenizer: Any, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """The completion as text that, appended to the prompt's text, gives the text of the whole sequence.

    It is ``decode(prompt + completion)`` minus ``decode(prompt)`` (special tokens skipped), so a
    completion of the tiny world reads ``" good , warm ."`` with the leading space, exactly as
    :func:`diffdpo.toy.tiny_lm.sample_reviews` returns it, and a BPE tokenizer's own spacing is kept.
    An empty completion (EOS at once) is ``""``. Falls back to decoding the completion alone when the
    joint decoding does not start with the prompt's text.
    """
    prompt_text = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(completion_ids), skip_special_tokens=True)
    if full.startswith(prompt_text):
        return full[len(prompt_text) :]
    return tokenizer.decode(list(completion_ids), skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------
# one model in one adapter mode, with its own KV cache


def _forward_names(model: Any) -> tuple[str, str | None]:
    """The forward's keyword for the KV cache (``cache`` from transformers 5.x, ``past_key_values``
    before) and for keeping only the last logits (``logits_to_keep``, or None when absent)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep


class _CachedLM:
    """A causal LM with its KV cache over one batch; ``adapters_off`` runs it with its LoRA adapters
    disabled, so a LoRA policy and its reference are two of these over the same module."""

    def __init__(self, model: Any, *, adapters_off: bool = False) -> None:
        self.model = model
        self.layers = tuner_layers(model) if adapters_off else None  # found once, toggled every step
        self.cache_name, self.keep_name = _forward_names(model)
        self.cache: Any = None

    def reset(self) -> None:
        self.cache = None

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """float32 next-token logits (B, V) after the last position; the cache grows by the inputs."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "position_ids": position_ids, "use_cache": True}
        if self.cache is not None:
            kwargs[self.cache_name] = self.cache
        if self.keep_name is not None:
            kwargs[self.keep_name] = 1
        mode = adapters_disabled(self.model, self.layers) if self.layers is not None else contextlib.nullcontext()
        with mode:
            out = self.model(**kwargs)
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits[:, -1].float()  # (B, V)


def _sources(model: Any, mixture: float, ref_model: Any | None) -> tuple[_CachedLM, _CachedLM | None]:
    """The policy and, with a mixture, the reference (``ref_model``, else ``model`` with adapters off)."""
    if not 0.0 <= mixture <= 1.0:
        raise ValueError(f"mixture must be in [0, 1] (0 = policy, 1 = reference), got {mixture!r}")
    policy = _CachedLM(model)
    if mixture == 0.0:
        return policy, None
    if ref_model is not None:
        return policy, _CachedLM(ref_model)
    if not tuner_layers(model):
        raise ValueError(
            f"mixture={mixture} samples from a mixture with the reference model, but none was given: pass "
            "ref_model=... (full fine-tuning) or a policy with LoRA adapters (its reference is the adapters off)"
        )
    return policy, _CachedLM(model, adapters_off=True)


# ------------------------------------------------------------------------------------------------
# the decoding loop


def _left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention mask, position ids), each (B, L): prompts right-aligned, positions from 0 at each
    prompt's first real token (``cumsum(mask) - 1``, as HF ``generate`` computes them)."""
    length = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), length), dtype=torch.long)
    for r, p in enumerate(prompt_ids):
        ids[r, length - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, length - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """HF's TopK then TopP warpers: ``-inf`` outside the k largest (ties kept), then outside the
    smallest set of most probable tokens whose mass exceeds ``top_p`` (at least one token kept)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1.0 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _draw(logps: Tensor, generators: Sequence[torch.Generator], temperature: float, top_k: int,
          top_p: float) -> Tensor:
    """Next token per row (B,): argmax at temperature 0, else the row's own uniform draw pushed through
    the inverse CDF of its (tempered, filtered) distribution."""
    if temperature == 0.0:
        return logps.argmax(-1)
    probs = _filter(logps / temperature, top_k, top_p).double().softmax(-1)  # (B, V)
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)  # (B,)
    # u * total can round up to the total: fall back to the last token of positive probability
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    return torch.minimum(tokens, last)


def _sample_batch(policy: _CachedLM, reference: _CachedLM | None, mixture: float,
                  prompt_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator], *,
                  max_new_tokens: int, temperature: float, top_k: int, top_p: float, eos_id: int,
                  pad_id: int, device: Any) -> tuple[list[list[int]], list[bool]]:
    """Completion ids and finished flags of one batch of prompts (one generator per row)."""
    ids, mask, positions = _left_pad(prompt_ids, pad_id, device)
    sources = [policy] if reference is None else [policy, reference]
    for source in sources:
        source.reset()
    logits = [source(ids, mask, positions) for source in sources]  # prefill, each (B, V)
    batch = len(prompt_ids)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logps = (F.log_softmax(logits[0], dim=-1) if reference is None
                 else mixture_logprobs(logits[0], logits[1], mixture))  # (B, V)
        nxt = _draw(logps, generators, temperature, top_k, top_p).masked_fill(done, pad_id)  # (B,)
        tokens[:, step] = nxt
        ended = (nxt == eos_id) & ~done
        lengths = torch.where(ended, step + 1, lengths)
        done = done | ended
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = [source(nxt.unsqueeze(-1), mask, positions) for source in sources]
    for source in sources:
        source.reset()  # free the caches
    tokens, lengths, done = tokens.tolist(), lengths.tolist(), done.tolist()
    return [row[:n] for row, n in zip(tokens, lengths)], done


def _check_args(n: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                batch_size: int) -> None:
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; sampling needs one to know where a completion ends")
    pad_id = tokenizer.pad_token_id
    return eos_id, eos_id if pad_id is None else pad_id


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[str], *, n: int = 1, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int,
                       batch_size: int = 32, mixture: float = 0.0, ref_model: Any | None = None) -> Completions:
    """``n`` sampled completions per prompt, from ``model`` or from its geometric mixture with the reference.

    Args:
        model: a transformers causal LM (LoRA adapters allowed; then it is the reference too).
        tokenizer: its tokenizer; prompts are tokenised as ``tokenizer(prompt)`` (special tokens added, as
            :mod:`diffdpo.lm.data` tokenises prompts), EOS ends a completion.
        prompts: prompt texts; duplicates are allowed and get different samples.
        n: samples per prompt.
        max_new_tokens: the most tokens per completion (EOS included).
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k, top_p: HF's filters (0 and 1.0 = off), applied after the temperature.
        seed: the run's seed; each sample's generator is :func:`sample_seed` of it.
        batch_size: rows (prompt, sample) decoded together; results do not depend on it.
        mixture: ``b`` of the geometric mixture ``(1 - b) log pi + b log pi_ref`` (0 = the policy).
        ref_model: the reference for ``mixture > 0`` under full fine-tuning; ``None`` = ``model`` with its
            LoRA adapters off.

    Returns:
        :class:`Completions`, prompt-major (row ``i * n + j`` is sample ``j`` of prompt ``i``).
    """
    _check_args(n, max_new_tokens, temperature, top_k, top_p, batch_size)
    policy, reference = _sources(model, mixture, ref_model)
    eos_id, pad_id = _special_ids(tokenizer)
    device = _device(model)
    prompts = list(prompts)
    ids_of_prompt = [list(tokenizer(p)["input_ids"]) for p in prompts]
    seen: dict[str, int] = {}
    occurrence = []
    for p in prompts:
        occurrence.append(seen.get(p, 0))
        seen[p] = occurrence[-1] + 1
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
    # prompts of similar length share a batch (less padding); the order changes no sample
    order = sorted(range(len(rows)), key=lambda r: len(ids_of_prompt[rows[r][0]]))
    completion_ids: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    with eval_mode(model, ref_model if reference is not None else None):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            generators = [torch.Generator().manual_seed(sample_seed(seed, prompts[i], occurrence[i], j))
                          for i, j in (rows[r] for r in chunk)]
            out, done = _sample_batch(
                policy, reference, mixture, [ids_of_prompt[rows[r][0]] for r in chunk], generators,
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                eos_id=eos_id, pad_id=pad_id, device=device)
            for r, ids, flag in zip(chunk, out, done):
                completion_ids[r], finished[r] = ids, flag
    prompt_ids = [ids_of_prompt[i] for i, _ in rows]
    return Completions(
        prompts=prompts,
        prompt_index=torch.tensor([i for i, _ in rows], dtype=torch.long),
        sample_index=torch.tensor([j for _, j in rows], dtype=torch.long),
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        texts=[completion_text(tokenizer, p, c) for p, c in zip(prompt_ids, completion_ids)],
        finished=torch.tensor(finished, dtype=torch.bool),
    )


@torch.no_grad()
def next_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], *, mixture: float = 0.0,
                        ref_model: Any | None = None) -> Tensor:
    """(N, V) float32 log-probs of the first completion token after each prompt, from the policy or the
    same mixture :func:`sample_completions` samples from (before temperature and filters)."""
    policy, reference = _sources(model, mixture, ref_model)
    _, pad_id = _special_ids(tokenizer)
    ids, mask, positions = _left_pad([list(tokenizer(p)["input_ids"]) for p in prompts], pad_id, _device(model))
    with eval_mode(model, ref_model if reference is not None else None):
        logits = policy(ids, mask, positions)
        if reference is None:
            return F.log_softmax(logits, dim=-1)
        return mixture_logprobs(logits, reference(ids, mask, positions), mixture)

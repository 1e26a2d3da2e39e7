"""Training a reward model or a pairwise preference model from preference pairs (``prompt``, ``chosen``,
``rejected``), the annotators :class:`diffdpo.rewards.lm.HFRewardModel` and
:class:`diffdpo.rewards.lm.HFPreferenceModel` then load from ``output_dir``.

* ``kind=bradley_terry``: a reward model ``r(x, y)``, the logit of a one-output sequence classifier read at the
  last token of ``prompt + completion``, trained with the Bradley-Terry loss ``-log sigmoid(r(x, y_w) - r(x, y_l))``
  (Ouyang et al. 2022, "Training language models to follow instructions with human feedback", eq. 1).
* ``kind=pairwise``: a preference model ``f(x, a, b)``, the logit of a one-output classifier reading
  ``prompt + a + separator + b``, trained with binary cross-entropy on each pair in both orders: (chosen,
  rejected) labelled 1 and (rejected, chosen) labelled 0 (the pairwise preference model of Munos et al. 2023,
  "Nash Learning from Human Feedback", Sec. 3, here a classifier over the concatenated pair).

The model is any ``AutoModelForSequenceClassification`` checkpoint with one output
(``head=sequence_classification``), or a causal LM given a value head (``head=value_head``): transformers' own
``*ForSequenceClassification`` class of that architecture loads the causal LM's body and adds a new, seeded
``score`` layer (hidden -> 1) in place of the LM head. ``head=auto`` picks by the checkpoint's architecture.

Held-out pair accuracy (``r(x, y_w) > r(x, y_l)``, or ``P(chosen beats rejected) > 0.5``) is measured before and
after training with the same annotator classes that later load the saved model, so the two agree.

    diffdpo reward-model train --config configs/reward_model_tiny.yaml [key=value ...]
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from diffdpo.config import UserError, help_meta
from diffdpo.rewards.lm import (
    HFPreferenceModel,
    HFRewardModel,
    LogitScorer,
    check_sequence_classifier,
    default_separator,
    load_model_config,
    load_tokenizer,
    pair_text,
    reward_text,
)

RewardModelKind = Literal["bradley_terry", "pairwise"]
HeadKind = Literal["auto", "sequence_classification", "value_head"]


@dataclass
class RewardModelConfig:
    """``diffdpo reward-model train``: a reward or preference model from preference pairs."""

    model: str = field(default="", metadata=help_meta(
        "sequence-classification checkpoint (num_labels=1) or causal LM: folder or hub id; empty: the world's"))
    data: str = field(default="", metadata=help_meta(
        "preference pairs (prompt, chosen, rejected): .jsonl/.json/.parquet, saved dataset or hub id; empty: the world's"))
    kind: RewardModelKind = field(default="bradley_terry", metadata=help_meta(
        "bradley_terry: a reward model r(x, y); pairwise: a preference model P(a beats b | x)"))
    head: HeadKind = field(default="auto", metadata=help_meta(
        "sequence_classification: the checkpoint's own head; value_head: a new score layer on a causal LM; auto: by architecture"))
    world: str = field(default="", metadata=help_meta(
        "'package.module:function' building an embedded world in world_dir (returns .model_dir, .pairs)"))
    world_dir: str = field(default="", metadata=help_meta("folder of the embedded world (built if missing)"))
    eval_fraction: float = field(default=0.1, metadata=help_meta("share of the pairs held out for pair accuracy"))
    lr: float = field(default=1e-4, metadata=help_meta("AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=help_meta("AdamW weight decay"))
    epochs: int = field(default=1, metadata=help_meta("passes over the training pairs (when max_steps is 0)"))
    max_steps: int = field(default=0, metadata=help_meta("optimizer steps; 0: epochs decide"))
    batch_size: int = field(default=16, metadata=help_meta("pairs per optimizer step"))
    eval_batch_size: int = field(default=64, metadata=help_meta("texts per forward pass when scoring held-out pairs"))
    max_length: int = field(default=512, metadata=help_meta("tokens per text; longer texts keep their last tokens"))
    device: str = field(default="cpu", metadata=help_meta("cpu, cuda, cuda:1, mps ..."))
    dtype: str = field(default="float32", metadata=help_meta("weights' dtype: float32 | bfloat16 | float16"))
    seed: int = field(default=0, metadata=help_meta("seed of the split, the batch order and the new head"))
    output_dir: str = field(default="runs/reward_model", metadata=help_meta("where the model and metrics.json go"))
    overwrite: bool = field(default=False, metadata=help_meta("replace a reward model already in output_dir"))

    def __post_init__(self) -> None:
        if (not self.model or not self.data) and not self.world:
            raise ValueError("set model and data (or world and world_dir: an embedded world that supplies them)")
        if self.world and (self.world.count(":") != 1 or not self.world_dir):
            raise ValueError(f"world={self.world!r} must read 'package.module:function' and needs world_dir")
        if self.kind not in ("bradley_terry", "pairwise"):
            raise ValueError(f"kind must be bradley_terry or pairwise, got {self.kind!r}")
        if self.head not in ("auto", "sequence_classification", "value_head"):
            raise ValueError(f"head must be auto, sequence_classification or value_head, got {self.head!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("batch_size", "eval_batch_size", "max_length", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.lr <= 0:
            raise ValueError(f"max_steps must be >= 0 and lr > 0, got {self.max_steps} and {self.lr}")


# ------------------------------------------------------------------------------------------------
# losses: per pair, the caller reduces


def bradley_terry_losses(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``-log sigmoid(r_w - r_l)`` (Ouyang et al. 2022, eq. 1); ln 2 when the rewards are equal."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def pairwise_losses(chosen_first_logits: torch.Tensor, rejected_first_logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean of the binary cross-entropies of f(x, y_w, y_l) against label 1 and f(x, y_l, y_w) against 0."""
    return 0.5 * (F.softplus(-chosen_first_logits) + F.softplus(rejected_first_logits))


# ------------------------------------------------------------------------------------------------
# data, model, output folder


def resolve_sources(cfg: RewardModelConfig) -> tuple[str, str]:
    """``(model, data)``: the configured ones, the embedded world's where empty (built once, by ``cfg.world``)."""
    if cfg.model and cfg.data:
        return cfg.model, cfg.data
    import importlib

    module, _, name = cfg.world.partition(":")
    try:
        build = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"world={cfg.world!r}: cannot import it ({exc})") from exc
    world = build(cfg.world_dir)
    return cfg.model or str(world.model_dir), cfg.data or str(world.pairs)


def read_pairs(source: str) -> list[dict[str, str]]:
    """Rows with string ``prompt``, ``chosen``, ``rejected``; a bad row is a ValueError naming the source and row."""
    from diffdpo.lm.data import load_rows

    rows, name = load_rows(source)
    if not rows:
        raise UserError(f"{name}: no preference pairs; give rows with prompt, chosen, rejected")
    pairs = []
    for n, row in enumerate(rows):
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise UserError(f"{name}, row {n}: missing column {key!r}; reward-model data needs prompt, chosen, "
                                f"rejected (got {', '.join(sorted(row))})")
            if not isinstance(row[key], str):
                raise UserError(f"{name}, row {n}: {key!r} is a {type(row[key]).__name__}, not a string; render chat "
                                "messages to text first (or drop the row)")
        pairs.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    return pairs


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: a seeded shuffle; at least one held-out pair when ``eval_fraction > 0``."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(pairs) * eval_fraction)) if eval_fraction > 0 else 0
    if len(pairs) - n_eval < 1:
        raise UserError(f"{len(pairs)} pair(s) leave none to train on with eval_fraction={eval_fraction}")
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def load_trainable(cfg: RewardModelConfig, path: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer, head)``: a one-output sequence classifier at ``path``, or a causal LM at ``path``
    with a new seeded value head; ``head`` says which was built."""
    from transformers import AutoModelForSequenceClassification

    from diffdpo.adapters import resolve_dtype

    config = load_model_config(path, key="model")
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    head = cfg.head if cfg.head != "auto" else ("sequence_classification" if is_classifier else "value_head")
    if head == "sequence_classification":
        check_sequence_classifier(path, config)
    elif is_classifier:
        raise UserError(f"{path} already is a sequence classifier ({', '.join(config.architectures)}); "
                        "use head=sequence_classification (or auto) to train its own head")
    torch.manual_seed(cfg.seed)  # the new score layer's initialisation
    extra = {} if head == "sequence_classification" else {"num_labels": 1}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(cfg.dtype), **extra)
    except ValueError as exc:  # an architecture with no sequence-classification class
        raise UserError(f"{path}: cannot build a sequence classifier with one output from it "
                        f"({' '.join(str(exc).split())[:200]})") from exc
    tokenizer = load_tokenizer(path)
    model.config.pad_token_id = tokenizer.pad_token_id  # saved with the model: batched scoring needs it
    return model.to(cfg.device), tokenizer, head


_OUTPUT_PATTERNS = ("metrics.json", "config.json", "generation_config.json", "model*.safetensors*",
                    "pytorch_model*.bin*", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "vocab.*", "merges.txt")


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` (which deletes the files a reward model folder holds)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir={str(out)!r} is a file; choose a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (" ..." if len(held) > 5 else "")
        raise UserError(f"output_dir={str(out)!r} is not empty ({shown}): choose another output_dir or set "
                        "overwrite=true (deletes the model, tokenizer and metrics.json there)")
    for pattern in _OUTPUT_PATTERNS if held else ():
        for p in out.glob(pattern):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------------
# training


def pair_accuracy(kind: RewardModelKind, scorer: LogitScorer, pairs: list[dict]) -> float | None:
    """Share of ``pairs`` the model ranks right (``None`` for no pairs), through the annotator classes."""
    if not pairs:
        return None
    prompts, chosen, rejected = ([p[k] for p in pairs] for k in ("prompt", "chosen", "rejected"))
    kw = {"batch_size": scorer.batch_size, "max_length": scorer.max_length}
    if kind == "bradley_terry":
        rewards = HFRewardModel.from_model(scorer.model, scorer.tokenizer, **kw)(prompts + prompts, chosen + rejected)
        right = rewards[: len(pairs)] > rewards[len(pairs):]
    else:
        right = HFPreferenceModel.from_model(scorer.model, scorer.tokenizer, **kw)(prompts, chosen, rejected) > 0.5
    return float(right.double().mean())


def batch_losses(kind: RewardModelKind, scorer: LogitScorer, batch: list[dict]) -> torch.Tensor:
    """``(B,)`` per-pair losses of one batch, both halves in one forward pass of ``2B`` texts."""
    prompts, chosen, rejected = ([p[k] for p in batch] for k in ("prompt", "chosen", "rejected"))
    if kind == "bradley_terry":
        texts = [reward_text(p, c) for p, c in zip(prompts + prompts, chosen + rejected)]
        logits = scorer.logits(texts)  # (2B,): chosen, then rejected
        return bradley_terry_losses(logits[: len(batch)], logits[len(batch):])
    sep = default_separator(scorer.tokenizer)  # as HFPreferenceModel reads pairs
    texts = [pair_text(p, w, r, sep) for p, w, r in zip(prompts, chosen, rejected)]
    texts += [pair_text(p, r, w, sep) for p, w, r in zip(prompts, chosen, rejected)]
    logits = scorer.logits(texts)  # (2B,): chosen first, then rejected first
    return pairwise_losses(logits[: len(batch)], logits[len(batch):])


def batches(pairs: list[dict], batch_size: int, steps: int, seed: int):
    """``steps`` batches, reshuffled (seeded) at each pass over ``pairs``; the last of a pass may be smaller."""
    rng = random.Random(seed)
    done = 0
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            if done == steps:
                return
            yield [pairs[i] for i in order[start:start + batch_size]]
            done += 1


def train_reward_model(cfg: RewardModelConfig) -> dict[str, Any]:
    """Train, save the model and tokenizer (``save_pretrained``) and ``metrics.json`` in ``cfg.output_dir``;
    returns the metrics (held-out accuracy before and after, the loss curve, counts)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = Path(cfg.output_dir)
    prepare_output_dir(out, cfg.overwrite)
    model_path, data_path = resolve_sources(cfg)
    train_pairs, eval_pairs = split_pairs(read_pairs(data_path), cfg.eval_fraction, cfg.seed)
    model, tokenizer, head = load_trainable(cfg, model_path)
    scorer = LogitScorer(model, tokenizer, batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
    accuracy_before = pair_accuracy(cfg.kind, scorer, eval_pairs)

    steps = cfg.max_steps or cfg.epochs * math.ceil(len(train_pairs) / cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    model.train()
    bar = tqdm(batches(train_pairs, cfg.batch_size, steps, cfg.seed), total=steps, desc=f"reward model ({cfg.kind})")
    for batch in bar:
        loss = batch_losses(cfg.kind, scorer, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()

    metrics = {
        "kind": cfg.kind, "head": head, "model": model_path, "data": data_path,
        "n_train": len(train_pairs), "n_eval": len(eval_pairs), "steps": steps,
        "eval_accuracy_before": accuracy_before, "eval_accuracy_after": pair_accuracy(cfg.kind, scorer, eval_pairs),
        "train_loss": losses, "seconds": round(time.perf_counter() - started, 2), "config": asdict(cfg),
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def main(config_path: str | None, overrides: list[str]) -> int:
    """``diffdpo reward-model train --config PATH [key=value ...]``: train, print the held-out accuracy."""
    from diffdpo.config import load_config

    cfg = load_config(RewardModelConfig, config_path, overrides)
    metrics = train_reward_model(cfg)

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"held-out pair accuracy ({metrics['n_eval']} pairs): {pct(metrics['eval_accuracy_before'])} -> "
          f"{pct(metrics['eval_accuracy_after'])}; {cfg.kind} model saved to {cfg.output_dir}")
    return 0

"""The one training loop shared by every modality; it imports none of them.

A modality is a :class:`diffdpo.task.PreferenceTask`, found by name in the task registry
(:mod:`diffdpo.task`): it owns the trainable module, the dataset and a
``compute(model, batch, keys)`` that returns per-sample log-likelihoods (or proxies) of the policy and
the reference. The loop turns them into a loss with :mod:`diffdpo.losses` (never a private copy), and
does everything else: accelerate (mixed precision, DDP/DeepSpeed/FSDP via ``accelerate launch``),
gradient accumulation, optimiser and warmup schedule, clipping, non-finite-loss skipping, logging
(tqdm, TensorBoard, ``metrics.jsonl``) and atomic, exactly resumable checkpoints.

Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, eq. 14) is the case ``logp = -0.5 * mse``::

    L = -log sigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)))
      = -log sigmoid(-0.5 * beta * ((m_w - m_l) - (r_w - r_l)))

Reading order: config -> setup (:func:`train`) -> :func:`train_step` -> checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffdpo.config import help_meta
from diffdpo.early_stop import EarlyStopConfig, EarlyStopper
from diffdpo.task import (
    GroupLogpsOut,
    LogpsOut,
    PointwiseLogpsOut,
    PreferenceTask,
    TaskContext,
    get_task,
)

# ------------------------------------------------------------------------------------------------
# config


@dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor", "adamw8bit"] = field(
        default="adamw", metadata=help_meta("adamw | adafactor (no relative step, no parameter scaling) | adamw8bit (bitsandbytes)")
    )
    lr: float = field(default=1e-5, metadata=help_meta("learning rate (per sample if scale_lr)"))
    scale_lr: bool = field(default=False, metadata=help_meta("multiply lr by the effective batch size (official: 1e-8 x 2048)"))
    weight_decay: float = field(default=1e-2, metadata=help_meta("decoupled weight decay"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=help_meta("Adam betas"))
    eps: float = field(default=1e-8, metadata=help_meta("Adam epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=help_meta("clip the gradient norm to this; 0 = no clipping"))
    lr_scheduler: str = field(
        default="constant_with_warmup",
        metadata=help_meta("diffusers.optimization.get_scheduler name: constant, constant_with_warmup, linear, cosine, ..."),
    )
    warmup_steps: int = field(default=0, metadata=help_meta("warmup optimizer steps"))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0) or self.warmup_steps < 0 or not self.max_grad_norm >= 0:
            raise ValueError(f"optim: lr must be a finite number > 0 (got {self.lr}), warmup_steps and "
                             "max_grad_norm >= 0")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {self.betas}")


@dataclass
class LossConfig:
    """Every loss hyperparameter, mapped onto :mod:`diffdpo.losses` in one place (:meth:`loss_kwargs`)."""

    type: str = field(default="sigmoid", metadata=help_meta("a preference loss (sigmoid, ipo, ...) or pointwise (kto, dro, ...)"))
    beta: float | None = field(default=None, metadata=help_meta("beta of diffdpo.losses; None = the task's default (diffusion 5000, lm 0.1)"))
    label_smoothing: float = field(default=0.0, metadata=help_meta("label smoothing / flip rate (cdpo, robust, ...)"))
    f_divergence: str = field(default="reverse_kl", metadata=help_meta("f-DPO divergence"))
    f_alpha: float = field(default=0.5, metadata=help_meta("alpha of the alpha-divergence"))
    ipo_length_normalize: bool = field(default=True, metadata=help_meta("IPO: divide summed log-ratios by completion length (TRL)"))
    simpo_gamma: float = field(default=0.5, metadata=help_meta("SimPO target reward margin"))
    length_alpha: float = field(default=0.05, metadata=help_meta("length_dpo: alpha of the token-length gap (CheXalign 0.05)"))
    kto_desirable_weight: float = field(default=1.0, metadata=help_meta("KTO lambda_D"))
    kto_undesirable_weight: float = field(default=1.0, metadata=help_meta("KTO lambda_U"))
    dro_anchored: bool = field(default=False, metadata=help_meta("dso_dro: the bounded reference-anchored variant"))
    grao_beta: float = field(default=0.5, metadata=help_meta("grao: weight of the imitation term (paper 0.5)"))
    grao_lambda: float = field(default=0.6, metadata=help_meta("grao: weight of the reference-aware alignment term (paper 0.6)"))
    modpo_weights: list[float] = field(default_factory=list, metadata=help_meta(
        "modpo: [w_0, w_1, ..., w_K], w_0 the trained objective's weight (> 0), the others the margin objectives'; sum 1"))

    def __post_init__(self) -> None:
        from diffdpo.losses import GROUP_LOSS_TYPES, POINTWISE_LOSS_TYPES, PREFERENCE_LOSS_TYPES

        known = PREFERENCE_LOSS_TYPES + POINTWISE_LOSS_TYPES + GROUP_LOSS_TYPES
        if self.type not in known:
            raise ValueError(f"loss.type={self.type!r} is unknown; use one of {', '.join(known)}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"loss.beta must be a finite number > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if min(self.kto_desirable_weight, self.kto_undesirable_weight) <= 0:
            raise ValueError("loss.kto_desirable_weight and loss.kto_undesirable_weight must be > 0")
        if not (min(self.grao_beta, self.grao_lambda) >= 0 and math.isfinite(self.grao_beta + self.grao_lambda)):
            raise ValueError("loss.grao_beta and loss.grao_lambda must be finite and >= 0")
        if self.type == "modpo":
            self._check_modpo_weights()

    def _check_modpo_weights(self) -> None:
        """MODPO's weight vector lies on the simplex with w_0 > 0 (Zhou et al. 2023, arXiv 2310.03708, eq. 8)."""
        w = [float(x) for x in self.modpo_weights]
        if len(w) < 2:
            raise ValueError(f"loss.type=modpo needs loss.modpo_weights=[w_0, w_1, ...] (1 + number of margin "
                             f"objectives, at least 2 numbers), got {self.modpo_weights}")
        if not all(math.isfinite(x) and x >= 0 for x in w) or w[0] <= 0 or abs(sum(w) - 1.0) > 1e-6:
            raise ValueError(f"loss.modpo_weights={self.modpo_weights} must be >= 0 with w_0 > 0 and sum to 1 "
                             f"(they sum to {sum(w):.6g})")

    @property
    def pointwise(self) -> bool:
        from diffdpo.losses import POINTWISE_LOSS_TYPES

        return self.type in POINTWISE_LOSS_TYPES

    @property
    def group(self) -> bool:
        """A group loss (G samples per query, :class:`diffdpo.task.GroupLogpsOut`): grao."""
        from diffdpo.losses import GROUP_LOSS_TYPES

        return self.type in GROUP_LOSS_TYPES

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``preference_loss`` / ``pointwise_loss`` for this type (beta included)."""
        if self.beta is None:
            raise ValueError("loss.beta is not set and the task has no default beta: set loss.beta")
        if self.group:  # GRAO's beta weighs imitation, not a KL: its own knob (loss.beta is unused)
            return {"beta": self.grao_beta, "lam": self.grao_lambda}
        if self.pointwise:
            extra: dict[str, Any] = {}
            if self.type == "kto":
                extra = {"desirable_weight": self.kto_desirable_weight, "undesirable_weight": self.kto_undesirable_weight}
            elif self.type == "dso_dro":
                extra = {"anchored": self.dro_anchored}
            return {"loss_type": self.type, "beta": self.beta, **extra}
        out: dict[str, Any] = {"loss_type": self.type, "beta": self.beta, "label_smoothing": self.label_smoothing,
                               "f_divergence": self.f_divergence, "f_alpha": self.f_alpha}
        if self.type == "simpo":
            out["simpo_gamma"] = self.simpo_gamma
        if self.type == "length_dpo":
            out["length_alpha"] = self.length_alpha
        if self.type == "modpo":  # the margin rewards themselves are data: the task gives them (loss_inputs)
            out["weights"] = [float(x) for x in self.modpo_weights]
        return out


@dataclass
class TrainConfig:
    """The loop's settings; :func:`train_config_class` adds the chosen task's section (named after it)."""

    task: str = field(default="diffusion", metadata=help_meta("registered task (diffusion, lm, tiny_lm, ...) or package.module:name"))
    output_dir: str = field(default="runs/diffusion_dpo", metadata=help_meta("logs, checkpoints and final weights go here"))
    seed: int = field(default=0, metadata=help_meta("seed of data order, noise, timesteps and prompt dropout"))
    max_steps: int = field(default=2000, metadata=help_meta("optimizer steps"))
    per_device_batch_size: int = field(default=1, metadata=help_meta("pairs per device per micro-batch"))
    gradient_accumulation_steps: int = field(default=1, metadata=help_meta("micro-batches per optimizer step"))
    effective_batch_size: int = field(
        default=0, metadata=help_meta("if > 0: derive gradient_accumulation_steps = this / (per_device x processes)")
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata=help_meta("accelerate mixed precision"))
    gradient_checkpointing: bool = field(default=False, metadata=help_meta("trade compute for activation memory"))
    dataloader_workers: int = field(default=0, metadata=help_meta("DataLoader worker processes"))
    log_every: int = field(default=1, metadata=help_meta("log metrics every N steps"))
    eval_every: int = field(default=0, metadata=help_meta("log the task's evaluate() metrics every N steps (if it has one); 0 = never"))
    tensorboard: bool = field(default=True, metadata=help_meta("also log to TensorBoard in output_dir/tensorboard"))
    progress_bar: bool = field(default=True, metadata=help_meta("tqdm progress bar on the main process"))
    checkpoint_every: int = field(default=500, metadata=help_meta("save a resumable checkpoint every N steps; 0 = never"))
    checkpoints_total_limit: int = field(default=3, metadata=help_meta("keep only the newest N checkpoints; 0 = all"))
    checkpoint_weights: bool = field(
        default=True, metadata=help_meta("also export usable weights into each checkpoint (LoRA: small; full: large)")
    )
    resume_from: str | None = field(default=None, metadata=help_meta("checkpoint folder, or 'latest' in output_dir"))
    overwrite: bool = field(default=False, metadata=help_meta(
        "start afresh in an output_dir that holds another run (its checkpoints, metrics and final weights are deleted)"))
    max_consecutive_nonfinite: int = field(
        default=5, metadata=help_meta("stop after this many optimizer steps in a row with a non-finite loss")
    )
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)  # off unless early_stop.metric is set

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.per_device_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("max_steps, per_device_batch_size and gradient_accumulation_steps must be >= 1")
        if self.max_consecutive_nonfinite < 1 or self.log_every < 1 or self.eval_every < 0:
            raise ValueError("max_consecutive_nonfinite and log_every must be >= 1, eval_every >= 0")


_CONFIG_CLASSES: dict[tuple[str, type], type] = {}


def train_config_class(task: str) -> type:
    """``TrainConfig`` plus one field named after ``task`` holding that task's config section."""
    spec = get_task(task)
    key = (spec.name, spec.config_class)
    if key not in _CONFIG_CLASSES:
        section = (spec.name, spec.config_class, field(default_factory=spec.config_class))
        cls = make_dataclass(f"TrainConfig_{spec.name}", [section], bases=(TrainConfig,))
        cls.__module__ = __name__
        _CONFIG_CLASSES[key] = cls
    return _CONFIG_CLASSES[key]


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A training config from YAML + ``key=value`` overrides, with only the chosen task's section.

    The task is read first (``task:`` in the file, or ``task=`` on the command line); a section of
    another task is an error. ``loss.beta`` left out takes the task's default beta.
    """
    from diffdpo.config import ConfigError, load_config, peek_key

    name = str(peek_key(path, overrides, "task", default=TrainConfig.task))
    try:
        get_task(name)  # an unknown task is named before the rest of the config is read
    except ValueError as exc:
        where = f"invalid config in {str(path)!r}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from exc
    cfg = load_config(train_config_class(name), path, overrides)
    _fill_default_beta(cfg)
    return cfg


def _fill_default_beta(cfg: TrainConfig) -> None:
    """``loss.beta`` left out takes the default of the task ``cfg.task`` names."""
    if cfg.loss.beta is None:
        cfg.loss.beta = get_task(cfg.task).default_beta


def build_task(cfg: TrainConfig, accelerator: Any) -> PreferenceTask:
    """The task ``cfg.task`` names, built by its registered factory from its own config section."""
    spec = get_task(cfg.task)
    section = getattr(cfg, spec.name, None)
    if section is None:
        raise ValueError(f"the config has no {spec.name!r} section; load it with load_train_config")
    check_loss = getattr(section, "check_loss", None)  # a section's cross-check of the loss, before any model loads
    if callable(check_loss):
        check_loss(cfg.loss)
    context = TaskContext(accelerator=accelerator, seed=cfg.seed, loss_type=cfg.loss.type,
                          per_device_batch_size=cfg.per_device_batch_size,
                          gradient_checkpointing=cfg.gradient_checkpointing)
    return spec.factory(section, context)


def apply_loss(out: LogpsOut | PointwiseLogpsOut | GroupLogpsOut, cfg: LossConfig
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample losses [B] and detached batch-mean metrics, from :mod:`diffdpo.losses`."""
    from diffdpo.losses import grao_loss, pointwise_loss, preference_loss

    kwargs = cfg.loss_kwargs()
    if isinstance(out, GroupLogpsOut) or cfg.group:
        if not (isinstance(out, GroupLogpsOut) and cfg.group):
            raise ValueError(f"loss.type={cfg.type!r} and the task's output ({type(out).__name__}) do not match: "
                             "group losses (grao) need G samples per query from a group task")
        res = grao_loss(out.policy_samples, out.policy_reference, out.rewards, out.reference_rewards,
                        **kwargs, **out.loss_inputs)
        return res.losses, res.metrics()
    if isinstance(out, PointwiseLogpsOut):
        if not cfg.pointwise:
            raise ValueError(f"the task gives pointwise log-likelihoods; loss.type={cfg.type!r} needs pairs")
        res = pointwise_loss(out.policy, out.ref, out.labels, **kwargs, **out.loss_inputs)
        return res.losses, res.metrics()
    if cfg.pointwise:
        raise ValueError(f"the task gives pairs; loss.type={cfg.type!r} is pointwise")
    # IPO length-normalises its log-ratios (TRL's convention, on by default); length_dpo regularises the
    # length difference (CheXalign). Tasks without lengths (diffusion) get the loss's own error for length_dpo.
    wants_lengths = (cfg.type == "ipo" and cfg.ipo_length_normalize) or cfg.type == "length_dpo"
    if wants_lengths and out.chosen_lengths is not None:
        kwargs.update(chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths)
    res = preference_loss(out.policy_chosen, out.policy_rejected, out.ref_chosen, out.ref_rejected,
                          **kwargs, **out.loss_inputs)
    return res.losses, res.metrics()


# ------------------------------------------------------------------------------------------------
# data position and batches


@dataclass
class TrainState:
    """Everything besides weights/optimizer that a resumed run needs (saved as JSON)."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    epoch: int = 0
    batch_in_epoch: int = 0  # global micro-batches of ``epoch`` already consumed
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    empty_batches: int = 0
    early_stop: dict[str, Any] = field(default_factory=dict)  # EarlyStopper.state_dict() (resumable)


class _Keyed(torch.utils.data.Dataset):
    """Dataset items tagged with a stable key ``epoch * len + index`` (seeds per-sample randomness)."""

    def __init__(self, base: Any, epoch: int) -> None:
        self.base, self.epoch = base, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.epoch * len(self.base) + i, self.base[i]


class _EpochBatches(torch.utils.data.Sampler):
    """This process's share of each global batch of a seeded per-epoch permutation, from ``start`` on."""

    def __init__(self, n: int, *, seed: int, epoch: int, per_device: int, rank: int, world: int, start: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.per_device, self.rank, self.world = per_device, rank, world

    def __len__(self) -> int:
        return max(self.n // (self.per_device * self.world) - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        global_batch = self.per_device * self.world
        for b in range(self.start, self.n // global_batch):
            lo = b * global_batch + self.rank * self.per_device
            yield order[lo : lo + self.per_device]


def _make_collate(task: PreferenceTask):
    def collate(rows: list[tuple[int, Any]]) -> tuple[torch.Tensor, Any]:
        kept = [(k, item) for k, item in rows if item is not None]  # undecodable rows come back as None
        keys = torch.tensor([k for k, _ in kept], dtype=torch.long)
        return keys, (task.collate([item for _, item in kept]) if kept else None)

    return collate


def data_summary(dataset: Any) -> str | None:
    """What the dataset's reader kept and dropped (``dataset.stats.summary()``), if it keeps such counts."""
    stats = getattr(dataset, "stats", None)
    return stats.summary() if stats is not None and hasattr(stats, "summary") else None


def micro_batches(task: PreferenceTask, cfg: TrainConfig, accelerator: Any, state: TrainState
                  ) -> Iterator[tuple[torch.Tensor, Any]]:
    """Endless ``(keys, batch)`` micro-batches from ``state``'s data position, advancing it as they are taken."""
    dataset = task.dataset()
    n, world = len(dataset), accelerator.num_processes
    if n < cfg.per_device_batch_size * world:
        from diffdpo.config import UserError

        summary = data_summary(dataset)
        counts = f"; {' '.join(summary.split())}" if summary else ""
        raise UserError(f"the dataset has {n} items, fewer than one global batch "
                        f"({cfg.per_device_batch_size} x {world} processes){counts}")
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state.epoch)
        sampler = _EpochBatches(n, seed=cfg.seed, epoch=state.epoch, per_device=cfg.per_device_batch_size,
                                rank=accelerator.process_index, world=world, start=state.batch_in_epoch)
        loader = torch.utils.data.DataLoader(_Keyed(dataset, state.epoch), batch_sampler=sampler,
                                             collate_fn=_make_collate(task), num_workers=cfg.dataloader_workers)
        for keys, batch in loader:
            state.batch_in_epoch += 1
            yield keys, batch
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


# ------------------------------------------------------------------------------------------------
# optimiser and schedule


def resolve_accumulation(cfg: TrainConfig, num_processes: int) -> int:
    """Micro-batches per step: as configured, or derived from ``effective_batch_size``."""
    if cfg.effective_batch_size <= 0:
        return cfg.gradient_accumulation_steps
    per_micro = cfg.per_device_batch_size * num_processes
    if cfg.effective_batch_size % per_micro:
        raise ValueError(f"effective_batch_size={cfg.effective_batch_size} is not a multiple of "
                         f"per_device_batch_size x processes = {per_micro}")
    return cfg.effective_batch_size // per_micro


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW, Adafactor (as in the official SDXL Diffusion-DPO run) or 8-bit AdamW."""
    params = list(params)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False, clip_threshold=1.0)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError("optim.name=adamw8bit needs bitsandbytes: pip install 'diffdpo[bnb]'") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max_steps)


# ------------------------------------------------------------------------------------------------
# one optimizer step


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


@dataclass
class Trainer:
    """The objects one step needs; built by :func:`setup`."""

    cfg: TrainConfig
    accelerator: Any
    task: PreferenceTask
    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    accumulation: int
    lr: float
    state: TrainState = field(default_factory=TrainState)

    @property
    def effective_batch_size(self) -> int:
        return self.cfg.per_device_batch_size * self.accelerator.num_processes * self.accumulation


def _micro_step(tr: Trainer, keys: torch.Tensor, batch: Any, sync: bool, sums: dict[str, torch.Tensor]) -> bool:
    """Forward + backward of one micro-batch; adds count-weighted metrics to ``sums``. Returns finiteness."""
    if keys.numel() == 0:
        tr.state.empty_batches += 1
        return True
    no_sync = contextlib.nullcontext() if sync else tr.accelerator.no_sync(tr.model)
    with no_sync, tr.accelerator.autocast():
        out = tr.task.compute(tr.model, batch, keys)
        losses, metrics = apply_loss(out, tr.cfg.loss)  # (B,)
        if out.aux_losses is not None:  # a task-supplied regulariser, e.g. DSO's denoising term
            metrics["loss/aux"] = out.aux_losses.detach().mean()
            losses = losses + out.aux_losses  # (B,)
        # sum / nominal pairs per step: batch b x accumulation a gives the same gradient for any b*a
        loss = losses.float().sum() / (tr.cfg.per_device_batch_size * tr.accumulation)
        tr.accelerator.backward(loss)  # even if non-finite, so DDP ranks stay in step; grads dropped below
    n = torch.tensor(float(out.size), device=losses.device)
    sums["count"] = sums.get("count", 0) + n
    for name, value in {**(metrics if out.size else {}), **out.metrics}.items():
        # "count/..." metrics are totals (summed); the rest are pair-weighted means (none from an empty batch)
        weight = 1.0 if name.startswith(COUNT_PREFIX) else n
        sums[name] = sums.get(name, 0) + torch.as_tensor(value).detach().float().to(n.device) * weight
    return bool(torch.isfinite(losses.detach()).all())


def train_step(tr: Trainer, batches: Iterator[tuple[torch.Tensor, Any]]) -> dict[str, float]:
    """Accumulate ``tr.accumulation`` micro-batches, then clip and step (or skip a non-finite step)."""
    sums: dict[str, torch.Tensor] = {}
    finite = True
    for i in range(tr.accumulation):
        keys, batch = next(batches)
        finite &= _micro_step(tr, keys, batch, sync=i == tr.accumulation - 1, sums=sums)
    flag = tr.accelerator.reduce(torch.tensor(0.0 if finite else 1.0, device=tr.accelerator.device), "sum")
    logs = _reduce_metrics(tr, sums)
    if float(flag) > 0:
        tr.optimizer.zero_grad(set_to_none=True)
        tr.state.nonfinite_total += 1
        tr.state.nonfinite_in_a_row += 1
        logs.update(skipped=1.0, nonfinite_total=float(tr.state.nonfinite_total))
        if tr.state.nonfinite_in_a_row >= tr.cfg.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{tr.state.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (at step "
                f"{tr.state.step + 1}); stopping. Lower optim.lr or loss.beta, use bf16 instead of fp16, "
                "or run the VAE in float32 (diffusion.model.vae_dtype=float32)."
            )
        return logs
    tr.state.nonfinite_in_a_row = 0
    max_norm = tr.cfg.optim.max_grad_norm if tr.cfg.optim.max_grad_norm > 0 else math.inf
    grad_norm = tr.accelerator.clip_grad_norm_(tr.task.trainable_parameters(), max_norm)
    logs["lr"] = float(tr.lr_scheduler.get_last_lr()[0])
    tr.optimizer.step()
    tr.lr_scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    # fp16: the grad scaler itself skips steps whose gradients overflowed (the loss was finite)
    logs.update(grad_norm=float(grad_norm), skipped=0.0, scaler_skipped=float(tr.accelerator.optimizer_step_was_skipped))
    return logs


#: Task metrics whose names start with this are per-step totals (summed over micro-batches and processes),
#: e.g. an online task's annotated pairs or dropped generations; every other metric is a pair-weighted mean.
COUNT_PREFIX = "count/"


def _reduce_metrics(tr: Trainer, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Count-weighted means (totals for ``count/...``) over micro-batches and processes (one sync per step)."""
    if not sums:
        return {"pairs": 0.0}
    names = sorted(k for k in sums if k != "count")
    stacked = torch.stack([torch.as_tensor(sums[k]).float() for k in ["count", *names]])
    stacked = tr.accelerator.reduce(stacked.to(tr.accelerator.device), "sum").cpu()
    count = float(stacked[0])
    return {"pairs": count, **{k: float(v) / (1.0 if k.startswith(COUNT_PREFIX) else max(count, 1.0))
                               for k, v in zip(names, stacked[1:])}}


# ------------------------------------------------------------------------------------------------
# logging


#: Metrics the progress bar shows when a step has them, and their labels there.
_BAR_KEYS = {"loss": "loss", "rewards/accuracies": "accuracies", "rewards/margins": "margins", "grad_norm": "grad_norm",
             "online/samples_per_s": "samples/s", "count/annotated_pairs": "annotated", "kl/sampled": "kl",
             "eval/win_rate": "win_rate"}


class MetricsLogger:
    """Per-step metrics to ``metrics.jsonl``, TensorBoard and the progress bar (main process only)."""

    def __init__(self, cfg: TrainConfig, accelerator: Any, initial_step: int) -> None:
        self.main = accelerator.is_main_process
        self.out = Path(cfg.output_dir)
        self.writer = self.bar = None
        self.shown: dict[str, float] = {}
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.out / "metrics.jsonl").open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, logs: dict[str, float]) -> None:
        if not self.main:
            return
        self.jsonl.write(json.dumps({"step": step, **logs}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in logs.items():
                self.writer.add_scalar(name, value, step)
        if self.bar is not None:
            self.shown.update({k: logs[k] for k in _BAR_KEYS if k in logs})  # an evaluation stays shown until the next
            self.bar.set_postfix({_BAR_KEYS[k]: f"{v:.4g}" for k, v in self.shown.items()}, refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.main:
            return
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, written to a temporary folder and renamed into place


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer ``state_dict`` -> (flat tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        rest["state"][str(idx)] = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{name}"] = value.detach().cpu().contiguous()
            else:
                rest["state"][str(idx)][name] = value
    return tensors, rest


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in rest["state"].items()}
    for key, value in tensors.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global stream is what we restore)
    return tensors, {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = rest["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = rest["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))  # noqa: NPY002


def save_checkpoint(tr: Trainer) -> Path | None:
    """Write ``output_dir/checkpoints/step-XXXXXXX`` atomically (temp folder, then rename)."""
    from safetensors.torch import save_file

    acc = tr.accelerator
    root = Path(tr.cfg.output_dir) / "checkpoints"
    final = root / f"step-{tr.state.step:07d}"
    tmp = root / f".tmp-{final.name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tr.task.state_dict().items()},
                  str(tmp / "model.safetensors"))
        opt_tensors, opt_rest = _split_optimizer_state(tr.optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        extra = {"optimizer": opt_rest, "lr_scheduler": tr.lr_scheduler.state_dict(), "state": asdict(tr.state)}
        if acc.scaler is not None:
            extra["grad_scaler"] = acc.scaler.state_dict()
        (tmp / "trainer_state.json").write_text(json.dumps(extra, default=_json_default))
        from diffdpo.config import save_config

        save_config(tr.cfg, tmp / "config.yaml")
        if tr.cfg.checkpoint_weights:
            tr.task.export(tmp / "weights")
    acc.wait_for_everyone()
    rng_tensors, rng_rest = _rng_state()  # every process keeps its own RNG streams
    save_file(rng_tensors, str(tmp / f"rng_{acc.process_index}.safetensors"))
    (tmp / f"rng_{acc.process_index}.json").write_text(json.dumps(rng_rest))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune_checkpoints(root, tr.cfg.checkpoints_total_limit)
    acc.wait_for_everyone()
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def _prune_checkpoints(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(cfg: TrainConfig) -> Path | None:
    """``resume_from`` as a folder; ``latest`` = newest complete checkpoint in output_dir (None if none)."""
    if not cfg.resume_from:
        return None
    if cfg.resume_from != "latest":
        path = Path(cfg.resume_from)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume_from={str(path)!r} is not a checkpoint folder (no trainer_state.json)")
        return path
    done = sorted((Path(cfg.output_dir) / "checkpoints").glob("step-*"))
    return done[-1] if done else None


def _check_shapes(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor], path: Path) -> None:
    from diffdpo.config import UserError

    for name, value in saved.items():
        if name in current and tuple(current[name].shape) != tuple(value.shape):
            raise UserError(f"checkpoint {str(path)!r} was made with another model shape: {name} is "
                            f"{tuple(value.shape)} there, {tuple(current[name].shape)} here (a different LoRA rank "
                            "or model?); resume with the checkpoint's config.yaml settings")


def load_checkpoint(tr: Trainer, path: Path) -> None:
    """Restore weights, optimizer, LR schedule, grad scaler, RNG and data position from ``path``."""
    from safetensors.torch import load_file

    extra = json.loads((path / "trainer_state.json").read_text())
    saved = load_file(str(path / "model.safetensors"))
    _check_shapes(saved, tr.task.state_dict(), path)
    tr.task.load_state_dict(saved)
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    tr.optimizer.load_state_dict(_join_optimizer_state(opt_tensors, extra["optimizer"]))
    tr.lr_scheduler.load_state_dict(extra["lr_scheduler"])
    if tr.accelerator.scaler is not None and "grad_scaler" in extra:
        tr.accelerator.scaler.load_state_dict(extra["grad_scaler"])
    tr.state = TrainState(**extra["state"])
    rank = tr.accelerator.process_index
    rng_file = path / f"rng_{rank}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng_{rank}.json").read_text()))


# ------------------------------------------------------------------------------------------------
# setup and the loop


def setup(cfg: TrainConfig, task: PreferenceTask | None = None) -> Trainer:
    """Accelerator, task, optimizer, LR schedule; restores a checkpoint if ``resume_from`` names one."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cfg.loss.beta is None and task is not None:
        raise ValueError("loss.beta must be set when a task object is handed to the loop")
    _fill_default_beta(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    prepare_output_dir(cfg, main_process=accelerator.is_main_process)  # before loading models: fail fast
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    task = task if task is not None else build_task(cfg, accelerator)
    accumulation = resolve_accumulation(cfg, accelerator.num_processes)
    effective = cfg.per_device_batch_size * accelerator.num_processes * accumulation
    lr = cfg.optim.lr * effective if cfg.optim.scale_lr else cfg.optim.lr
    optimizer = build_optimizer(task.trainable_parameters(), cfg.optim, lr)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.max_steps)  # stepped once per optimizer step
    model, optimizer = accelerator.prepare(task.trainable_module(), optimizer)
    tr = Trainer(cfg, accelerator, task, model, optimizer, lr_scheduler, accumulation, lr)
    checkpoint = find_checkpoint(cfg)
    if checkpoint is not None:
        load_checkpoint(tr, checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {tr.state.step}")
    if accelerator.is_main_process:
        _truncate_metrics(Path(cfg.output_dir) / "metrics.jsonl", tr.state.step)  # one run per metrics file
    return tr


_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "final", "tensorboard")


def prepare_output_dir(cfg: TrainConfig, *, main_process: bool = True) -> None:
    """Refuse an output_dir that holds another run unless resuming or told to overwrite; check it is writable.

    A run in a folder with earlier checkpoints, metrics or final weights would prune or mix them.
    """
    from diffdpo.config import UserError

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir={str(out)!r} is a file; choose a folder")
    earlier = [name for name in _RUN_OUTPUTS if (out / name).exists()]
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    if earlier and not cfg.resume_from and not cfg.overwrite:
        held = f"checkpoints up to {steps[-1]}" if steps else ", ".join(earlier)
        raise UserError(f"output_dir={str(out)!r} already holds a run ({held}): continue it with resume_from=latest, "
                        "start afresh with overwrite=true (deletes its checkpoints, metrics and final weights), "
                        "or choose another output_dir")
    if cfg.resume_from and cfg.overwrite:
        raise UserError("resume_from and overwrite=true contradict each other: choose one")
    if not main_process:
        return
    if cfg.overwrite:
        for name in earlier:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir={str(out)!r} is not writable ({exc.strerror or exc}); choose another folder") from exc


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of ``metrics.jsonl`` up to ``step`` (the resumed run appends the rest)."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines()
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(r + "\n" for r in kept))


@dataclass
class TrainResult:
    steps: int
    final_dir: Path | None
    history: list[dict[str, float]]
    nonfinite_total: int
    stopped_step: int | None = None  # early stop: the step it fired at (None = ran to max_steps)
    early_stop_best_step: int | None = None  # early stop: the watched metric's best step (or its turn)


def _early_stop_fires(tr: Trainer, stopper: EarlyStopper, logs: dict[str, float], eval_step: bool) -> bool:
    """Feed ``early_stop.metric`` to the stopper at the steps that log it; True = stop now.

    A per-step metric (``overopt/topk_entropy``, ``kl/sequence``) counts every step; an evaluation metric
    (``eval/...``) at the ``eval_every`` steps. Missing where it should be (an evaluation step, or any step
    without evaluations) is an error naming the logged metrics.
    """
    if tr.cfg.early_stop.metric not in logs and not (eval_step or not tr.cfg.eval_every):
        return False
    fired = stopper.update_from(tr.state.step, logs)
    tr.state.early_stop = stopper.state_dict()
    return fired


def run(tr: Trainer) -> TrainResult:
    """The loop: steps from the current state to ``max_steps``, checkpoints, final export."""
    cfg, acc = tr.cfg, tr.accelerator
    acc.print(f"effective batch {tr.effective_batch_size} pairs ({cfg.per_device_batch_size} per device x "
              f"{acc.num_processes} processes x {tr.accumulation} accumulation), lr {tr.lr:.4g}")
    logger = MetricsLogger(cfg, acc, tr.state.step)
    batches = micro_batches(tr.task, cfg, acc, tr.state)
    history: list[dict[str, float]] = []
    stopper = EarlyStopper(cfg.early_stop) if cfg.early_stop.enabled else None
    if stopper is not None and tr.state.early_stop:
        stopper.load_state_dict(tr.state.early_stop)  # resumed: the patience and best so far carry on
    try:
        while tr.state.step < cfg.max_steps and not (stopper is not None and stopper.stopped):
            logs = train_step(tr, batches)
            tr.state.step += 1
            eval_step = bool(cfg.eval_every) and tr.state.step % cfg.eval_every == 0
            if eval_step and hasattr(tr.task, "evaluate"):
                logs.update(tr.task.evaluate())  # e.g. a win rate against the reference on held-out prompts
            history.append({"step": tr.state.step, **logs})
            stop = stopper is not None and _early_stop_fires(tr, stopper, logs, eval_step)
            if tr.state.step % cfg.log_every == 0 or tr.state.step == cfg.max_steps or stop:
                logger.log(tr.state.step, logs)
            logger.advance()
            if cfg.checkpoint_every and (tr.state.step % cfg.checkpoint_every == 0 or stop):
                save_checkpoint(tr)  # a stopped run keeps its last state as a checkpoint too
    finally:
        logger.close()
    if stopper is not None and stopper.stopped:
        acc.print(f"early stop at step {stopper.stopped_step}: {cfg.early_stop.metric} has not improved for "
                  f"{cfg.early_stop.patience} evaluations (best at step {stopper.best_step})")
    summary = data_summary(tr.task.dataset())
    if summary:
        acc.print(summary)  # rows read, ties dropped, corrupt rows skipped (this process's view)
    if history and sum(h.get("pairs", 0.0) for h in history) == 0:
        from diffdpo.config import UserError

        raise UserError(f"no usable example in {len(history)} steps: every batch was empty (all rows undecodable?)"
                        + (f"; {' '.join(summary.split())}" if summary else ""))
    final = Path(cfg.output_dir) / "final"
    if acc.is_main_process:  # export beside, then rename: an interrupted export never looks complete
        tmp = final.with_name(".final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tr.task.export(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    acc.wait_for_everyone()
    return TrainResult(tr.state.step, final, history, tr.state.nonfinite_total,
                       stopper.stopped_step if stopper is not None else None,
                       stopper.best_step if stopper is not None else None)


def train(cfg: TrainConfig, task: PreferenceTask | None = None) -> TrainResult:
    """Set up and run a training job from a config (``task`` overrides the one ``cfg.task`` names)."""
    return run(setup(cfg, task))


def main(config_path: str | None, overrides: Sequence[str] = ()) -> int:
    """Entry point of ``diffdpo train --config PATH key=value ...``."""
    cfg = load_train_config(config_path, overrides)
    result = train(cfg)
    print(f"trained {result.steps} steps; weights in {result.final_dir}"
          + (f"; {result.nonfinite_total} non-finite steps skipped" if result.nonfinite_total else ""))
    return 0

"""The task protocol and the task registry: what a modality gives the training loop, and how it is found.

Every direct alignment algorithm needs only per-sample log-likelihoods (or proxies) of the policy and
the reference. A modality supplies them through a :class:`PreferenceTask`: it owns the trainable module
and the dataset, and its ``compute(model, batch, keys)`` returns a :class:`LogpsOut` (pairs) or a
:class:`PointwiseLogpsOut` (labelled samples) or a :class:`GroupLogpsOut` (G samples per query).
The loop (:mod:`diffdpo.train`) turns them into a loss
with :mod:`diffdpo.losses`; it imports no modality.

A modality makes itself known with :func:`register_task`: a name, its config class (the config
section of that name), a factory and defaults such as the default beta. ``diffdpo train`` finds a
task by name among

* the built-in tasks, declared as ``diffdpo.tasks`` entry points in ``pyproject.toml`` (a package
  adds a modality the same way, without editing this file or the loop);
* tasks registered in this process (:func:`register_task`);
* ``"package.module:name"``: the module is imported (it registers ``name`` when imported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

# ------------------------------------------------------------------------------------------------
# what a task returns


@dataclass
class LogpsOut:
    """Per-pair log-likelihoods (or proxies) from a paired task; each tensor is [B].

    Only data-dependent loss inputs come with it (completion lengths, margin rewards, ...); every loss
    hyperparameter lives in the loss config (:class:`diffdpo.train.LossConfig`).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached batch means
    # [B] completion lengths of summed log-probs, used by IPO's length normalisation when the loss asks
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    loss_inputs: dict[str, Any] = field(default_factory=dict)  # other data, e.g. MODPO margin rewards
    # optional [B] term the loop adds to the per-pair losses, e.g. a denoising (SFT) regulariser
    aux_losses: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.policy_chosen.shape[0])


@dataclass
class PointwiseLogpsOut:
    """Per-sample log-likelihoods with labels, for KTO/DRO-style losses; each tensor is [B]."""

    policy: torch.Tensor
    ref: torch.Tensor | None
    labels: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_inputs: dict[str, Any] = field(default_factory=dict)  # data, e.g. KTO's KL log-probs, DRO's values
    aux_losses: torch.Tensor | None = None  # optional [B] term added to the per-sample losses

    @property
    def size(self) -> int:
        return int(self.policy.shape[0])


@dataclass
class GroupLogpsOut:
    """G sampled completions per query and a reference answer, for group losses (GRAO).

    Log-probs are length-averaged over completion tokens (GRAO's J_exp, J_imit); rewards come from the
    task's annotator. No reference-model term: GRAO's reference is the answer, not a model.
    """

    policy_samples: torch.Tensor  # [B, G] length-averaged policy log-probs of the sampled completions
    policy_reference: torch.Tensor  # [B] length-averaged policy log-probs of the reference answers
    rewards: torch.Tensor  # [B, G] rewards of the samples
    reference_rewards: torch.Tensor  # [B] rewards of the reference answers
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_inputs: dict[str, Any] = field(default_factory=dict)
    aux_losses: torch.Tensor | None = None  # optional [B] term added to the per-query losses

    @property
    def size(self) -> int:
        return int(self.policy_samples.shape[0])


@runtime_checkable
class PreferenceTask(Protocol):
    """What a modality provides to the loop. ``keys`` are stable per-sample integers (epoch and dataset
    index) from which the task seeds its per-sample randomness, so results do not depend on batch
    size, accumulation, process count or resumption."""

    def trainable_module(self) -> torch.nn.Module: ...
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...
    def dataset(self) -> Any: ...
    def collate(self, items: list[Any]) -> Any: ...
    def compute(self, model: torch.nn.Module, batch: Any, keys: torch.Tensor
                ) -> LogpsOut | PointwiseLogpsOut | GroupLogpsOut: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
    def export(self, out_dir: Path) -> None: ...


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``module`` by name (LoRA adapters, or every weight of a full fine-tune)."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``module``'s parameters; every trainable tensor must be present."""
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
    unknown = [n for n in state if n not in params]
    if unknown:
        raise KeyError(f"checkpoint has {len(unknown)} tensors this model does not, e.g. {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ------------------------------------------------------------------------------------------------
# the registry


@dataclass
class TaskContext:
    """What a task factory gets besides its own config section (never the whole training config)."""

    accelerator: Any
    seed: int = 0
    loss_type: str = "sigmoid"
    per_device_batch_size: int = 1
    gradient_checkpointing: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (shallow: the accelerator is passed, not copied), for task
        constructors that take them one by one."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TaskSpec:
    """A registered task: ``factory(section, context) -> PreferenceTask``.

    ``config_class`` is the dataclass of the config section named ``name`` (``diffusion:``, ``lm:``, ...);
    ``default_beta`` is the loss beta used when a config leaves ``loss.beta`` out.
    """

    name: str
    config_class: type
    factory: Callable[[Any, TaskContext], PreferenceTask]
    default_beta: float
    description: str = ""


_REGISTRY: dict[str, TaskSpec] = {}
_ENTRY_POINT_GROUP = "diffdpo.tasks"


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Make ``spec`` available under ``spec.name`` (an error if the name is taken, unless ``replace``)."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old is not spec and not replace:
        raise ValueError(f"a task named {spec.name!r} is already registered ({old.factory!r})")
    if not spec.name.isidentifier():
        raise ValueError(f"task name {spec.name!r} must be a Python identifier (it names a config section)")
    _REGISTRY[spec.name] = spec
    return spec


def _load_entry_points(name: str | None = None) -> None:
    """Register the built-in tasks declared as entry points (only ``name``'s when given: loading one
    modality's config imports no other modality)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY and (name is None or ep.name == name):
            spec = ep.load()
            if not isinstance(spec, TaskSpec):
                raise TypeError(f"entry point {ep.value!r} ({_ENTRY_POINT_GROUP}) is not a TaskSpec")
            register_task(spec)


def get_task(name: str) -> TaskSpec:
    """The task registered as ``name``; ``"package.module:name"`` imports the module first."""
    if ":" in name:
        import importlib

        module, _, name = name.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"task {module}:{name}: cannot import {module!r} ({exc})") from exc
    if name not in _REGISTRY:
        _load_entry_points(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(task_names())} "
                         "(or 'package.module:name' for a task that module registers)")
    return _REGISTRY[name]


def task_names() -> list[str]:
    """Names of every known task (built-in entry points included)."""
    _load_entry_points()
    return sorted(_REGISTRY)

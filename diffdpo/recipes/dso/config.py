"""The DSO recipe's config (``diffdpo dso --config configs/dso_toy.yaml``); docs/dso.md explains each option."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffdpo.adapters import LoraConfig
from diffdpo.config import help_meta
from diffdpo.train import LossConfig, OptimConfig
from sim.config import StabilityConfig

MAX_ROUNDS = 998  # the seed layout (diffdpo.recipes.dso.seeds) has one block per round


def _toy_generator_args() -> dict[str, Any]:
    return {"folder": "data/toy_voxels", "sample_steps": 25}


@dataclass
class DSOConfig:
    """One DSO experiment; ``configs/dso_toy.yaml`` is the default recipe."""

    generator: str = field(default="diffdpo.toy.voxel_model:VoxelGenerator.load",
                           metadata=help_meta("the 3D generator: 'package.module:Name' called with generator_args"))
    generator_args: dict[str, Any] = field(default_factory=_toy_generator_args,
                                           metadata=help_meta("keyword arguments of the generator"))
    output_dir: str = field(default="runs/dso_toy", metadata=help_meta("reports, scores, plots and adapters"))
    seed: int = field(default=0, metadata=help_meta("seed of sampling seeds, pair subsampling and training noise"))
    rounds: int = field(default=3, metadata=help_meta(f"self-improvement rounds R (at most {MAX_ROUNDS})"))
    samples_per_class: int = field(default=32, metadata=help_meta("training samples per class and round"))
    group_size: int = field(default=8, metadata=help_meta("consecutive seeds of one class form a group; pairs stay inside"))
    max_pairs_per_group: int = field(default=16, metadata=help_meta("cap on (good, bad) pairs per group"))
    drop_uniform: bool = field(default=True, metadata=help_meta("pointwise losses: skip groups whose samples all agree"))
    eval_per_class: int = field(default=24, metadata=help_meta("held-out samples per class (fixed seeds)"))
    steps_per_round: int = field(default=60, metadata=help_meta("optimizer steps per round"))
    epochs_per_round: float = field(default=0.0, metadata=help_meta(
        "if > 0: steps = epochs x items / batch_size, at most steps_per_round"))
    lr_decay_per_round: float = field(default=1.0, metadata=help_meta("round r trains at optim.lr x decay^(r-1)"))
    batch_size: int = field(default=8, metadata=help_meta("pairs (or samples) per step"))
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True, rank=8, alpha=8.0), metadata=help_meta(
        "LoRA adapter (enabled=false: full fine-tune with a frozen copy as reference; empty target_modules: "
        "the generator's lora_target_modules)"))
    min_fidelity: float = field(default=0.0, metadata=help_meta(
        "a stable sample is good only if its fidelity (IoU with the nearest same-class training object) is >= this"))
    require_recognised: bool = field(default=False, metadata=help_meta(
        "a stable sample is good only if its nearest training object is of its own class"))
    aux_weight: float = field(default=0.0, metadata=help_meta("weight of the denoising (SFT) regulariser; 0 = off"))
    aux_source: str = field(default="data", metadata=help_meta("regulariser latents: 'data' (training objects) or 'winners'"))
    rescue_pairs: int = field(default=0, metadata=help_meta(
        "pair up to this many samples of each group with no good sample with a good training object; 0 = off"))
    reference: str = field(default="base", metadata=help_meta(
        "'base' (the shipped model every round) or 'previous' (the policy the round started from)"))
    validate_per_class: int = field(default=0, metadata=help_meta(
        "if > 0: validate each round's update on this many fresh samples per class; 0 = keep every round"))
    class_drop_tolerance: float = field(default=0.2, metadata=help_meta(
        "validation: the largest fall of one class's good (or recognised) share that still accepts a round"))
    backtrack: int = field(default=0, metadata=help_meta(
        "validation: shorter steps (1/2, 1/4, ...) tried before reverting a rejected update; at most 4"))
    threads: int = field(default=1, metadata=help_meta("torch CPU threads"))
    grid_samples: int = field(default=4, metadata=help_meta("objects per class in the before/after render"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=5))
    loss: LossConfig = field(default_factory=lambda: LossConfig(type="sigmoid", beta=500.0))
    sim: StabilityConfig = field(default_factory=StabilityConfig, metadata=help_meta("sim.StabilityConfig: backend, "
                                                                                     "duration, threshold, ..."))
    sim_workers: int = field(default=0, metadata=help_meta("sim worker processes; 0 = in this process"))

    def __post_init__(self) -> None:
        if self.reference not in ("base", "previous"):
            raise ValueError(f"reference must be 'base' or 'previous', got {self.reference!r}")
        if not 0.0 < self.lr_decay_per_round <= 1.0:
            raise ValueError(f"lr_decay_per_round must be in (0, 1], got {self.lr_decay_per_round}")
        if not 0 <= self.backtrack <= 4:
            raise ValueError(f"backtrack must be in [0, 4] (each try has its own block of validation seeds), got {self.backtrack}")
        if self.validate_per_class < 0 or not 0.0 <= self.class_drop_tolerance <= 1.0:
            raise ValueError("validate_per_class must be >= 0 and class_drop_tolerance in [0, 1]")
        if self.rescue_pairs < 0:
            raise ValueError(f"rescue_pairs must be >= 0, got {self.rescue_pairs}")
        if min(self.rounds, self.samples_per_class, self.group_size, self.eval_per_class, self.steps_per_round,
               self.batch_size, self.max_pairs_per_group) < 1:
            raise ValueError("rounds, samples_per_class, group_size, eval_per_class, steps_per_round, batch_size "
                             "and max_pairs_per_group must be >= 1")
        if self.rounds > MAX_ROUNDS:
            raise ValueError(f"rounds must be <= {MAX_ROUNDS} (one block of sampling seeds per round), got {self.rounds}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.aux_source not in ("data", "winners"):
            raise ValueError(f"aux_source must be 'data' or 'winners', got {self.aux_source!r}")
        if self.epochs_per_round < 0:
            raise ValueError(f"epochs_per_round must be >= 0, got {self.epochs_per_round}")
        if self.aux_weight < 0 or not 0.0 <= self.min_fidelity <= 1.0:
            raise ValueError("aux_weight must be >= 0 and min_fidelity in [0, 1]")
        if self.loss.beta is None:
            raise ValueError("loss.beta must be set (DSO: 500)")

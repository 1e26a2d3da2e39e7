"""A tiny class-conditional diffusion model over 16^3 occupancy grids, and its DSO generator.

The grid ``[z, y, x]`` is read as a 16-channel 16x16 image (z-slices as channels) by a diffusers
``UNet2DModel`` with a class embedding (one class per object kind of :mod:`diffdpo.toy.voxels`).
It predicts the clean object (``prediction_type="sample"``): calibration on this world found that
epsilon prediction collapsed to solid blobs while x0 prediction learns legs and overhangs.
Sampling is deterministic DDIM (eta 0) from seeded noise, so fixed seeds give a fixed held-out set.
The flow-matching objective (``objective="flow"``: rectified flow, velocity target, Euler sampler)
is the one TRELLIS and DSO use; it trains through the same code.

:class:`VoxelGenerator` implements :class:`diffdpo.dso.generator.Generator3D`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffdpo.diffusion.schedule import DDPMSchedule, FlowMatchingSchedule, build_schedule
from diffdpo.toy.voxels import (
    CLASSES,
    GRID,
    decoded_occupancy,
    make_objects,
    occupancy_to_mesh,
    to_occupancy,
    to_tensor,
)

Objective = Literal["sample", "epsilon", "flow"]


@dataclass
class ToyVoxelsConfig:
    """Settings of ``scripts/pretrain_toy_voxels.py`` (the shipped checkpoint uses these defaults)."""

    seed: int = field(default=0, metadata={"help": "seed of initialisation, data and noise"})
    objective: str = field(default="sample", metadata={"help": "sample (x0) | epsilon | flow"})
    n_per_class: int = field(default=1000, metadata={"help": "training objects per class (fixed set)"})
    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "objects per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (cosine decay, 100 warmup)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1 on shared cores)"})
    out: str = field(default="data/toy_voxels", metadata={"help": "output folder"})
    eval_per_class: int = field(default=24, metadata={"help": "held-out samples per class for base_report.json"})

    def __post_init__(self) -> None:
        if self.objective not in ("sample", "epsilon", "flow"):
            raise ValueError(f"objective must be sample, epsilon or flow, got {self.objective!r}")
        if min(self.steps, self.batch_size, self.n_per_class) < 1:
            raise ValueError("steps, batch_size and n_per_class must be >= 1")


def build_unet(seed: int = 0, block_out_channels: Sequence[int] = (32, 64, 64)) -> Any:
    """A fresh class-conditional ``UNet2DModel``: 16 z-slices in, 16 out, attention only at 4x4."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=GRID, in_channels=GRID, out_channels=GRID, layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        num_class_embeds=len(CLASSES), norm_num_groups=8, attention_head_dim=8,
    )


def objective_schedule(objective: Objective) -> DDPMSchedule | FlowMatchingSchedule:
    """The training schedule of an objective (cosine DDPM for sample/epsilon; rectified flow), through
    the shared :func:`diffdpo.diffusion.schedule.build_schedule`."""
    if objective == "flow":
        return build_schedule(None, "flow", logit_mean=0.0, logit_std=1.0, timestep_scale=1000.0)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=objective)
    return build_schedule(sched, objective)


class VoxelGenerator:
    """The toy voxel diffusion model as a :class:`diffdpo.dso.generator.Generator3D`."""

    condition_names: Sequence[str] = CLASSES
    latent_shape: tuple[int, ...] = (GRID, GRID, GRID)
    lora_target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")

    def __init__(self, network: Any, objective: Objective = "sample", *, sample_steps: int = 25,
                 sample_batch: int = 128, mesh_keep: str = "largest") -> None:
        self.network, self.objective = network, objective
        self.schedule = objective_schedule(objective)
        self.sample_steps, self.sample_batch, self.mesh_keep = sample_steps, sample_batch, mesh_keep

    @classmethod
    def load(cls, folder: str | Path, **kw: Any) -> VoxelGenerator:
        """Load a checkpoint written by :func:`save_generator` (e.g. the shipped ``data/toy_voxels``)."""
        from diffusers import UNet2DModel

        folder = Path(folder)
        meta_file = folder / "voxel_model.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder} has no voxel_model.json; run scripts/pretrain_toy_voxels.py first")
        meta = json.loads(meta_file.read_text())
        unet = UNet2DModel.from_pretrained(str(folder / "unet"))
        return cls(unet.eval(), meta["objective"], **kw)

    # ---- Generator3D ------------------------------------------------------------------------------

    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                conditions: torch.Tensor) -> torch.Tensor:
        t = timesteps.to(x_t.device)
        return network(x_t, t, class_labels=conditions.to(x_t.device).long()).sample  # (N, 16, 16, 16)

    @torch.no_grad()
    def sample(self, conditions: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        if len(conditions) != len(seeds):
            raise ValueError(f"got {len(conditions)} conditions but {len(seeds)} seeds")
        was_training = self.network.training
        self.network.eval()
        out = []
        for lo in range(0, len(seeds), self.sample_batch):
            cond = torch.as_tensor(list(conditions[lo:lo + self.sample_batch]), dtype=torch.long)
            noise = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                                 for s in seeds[lo:lo + self.sample_batch]])  # (n, 16, 16, 16)
            out.append(self._euler(noise, cond) if self.objective == "flow" else self._ddim(noise, cond))
        self.network.train(was_training)
        return torch.cat(out)

    def decode(self, latents: torch.Tensor) -> list[Any]:
        return [occupancy_to_mesh(occ, keep=self.mesh_keep) for occ in self.occupancy(latents)]

    # ---- helpers ---------------------------------------------------------------------------------

    def training_latents(self, conditions: Sequence[int], seed: int) -> torch.Tensor:
        """Fresh objects of the training distribution (new procedural draws), one per condition."""
        from diffdpo.toy.voxels import MAKERS

        rng = np.random.default_rng([seed, 7_777])
        grids = [to_tensor(MAKERS[CLASSES[int(c)]](rng)) for c in conditions]
        return torch.from_numpy(np.stack(grids))  # (N, 16, 16, 16)

    def reference_bank(self, n_per_class: int = 200, seed: int = 0) -> Any:
        """The first ``n_per_class`` training objects per class, to measure samples against."""
        from diffdpo.toy.voxels import ShapeBank, make_objects

        return ShapeBank(make_objects(n_per_class, seed))

    def occupancy(self, latents: torch.Tensor) -> np.ndarray:
        """Latents in [-1, 1] -> the decoded objects as bool grids (N, 16, 16, 16) ``[z, y, x]``: the
        kept component(s) resting on z = 0, i.e. what the simulator scores."""
        raw = to_occupancy(latents.detach().cpu().numpy())
        return np.stack([decoded_occupancy(o, self.mesh_keep) for o in raw])

    def _ddim(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) from the network's prediction."""
        a_bar = self.schedule.alphas_cumprod.float()
        ts = torch.linspace(len(a_bar) - 1, 0, self.sample_steps).round().long()
        for i, t in enumerate(ts):
            a_t = a_bar[t]
            a_prev = a_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            pred = self.predict(self.network, x, t.repeat(len(x)), cond)
            if self.objective == "sample":
                x0 = pred.clamp(-1, 1)
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            else:  # epsilon
                eps = pred
                x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x

    def _euler(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Euler steps of the rectified-flow ODE from t = 1 (noise) to t = 0, velocity ``eps - x0``."""
        ts = torch.linspace(1.0, 0.0, self.sample_steps + 1)
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = self.predict(self.network, x, (t * self.schedule.timestep_scale).repeat(len(x)), cond)
            x = x + (t_next - t) * v
        return x.clamp(-1, 1)


def save_generator(gen: VoxelGenerator, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """``folder/unet`` (diffusers, safetensors) and ``folder/voxel_model.json``."""
    folder = Path(folder)
    gen.network.save_pretrained(str(folder / "unet"), safe_serialization=True)
    meta = {"objective": gen.objective, "classes": list(CLASSES), "grid": GRID, **(extra or {})}
    (folder / "voxel_model.json").write_text(json.dumps(meta, indent=2))


# ------------------------------------------------------------------------------------------------
# pretraining


def _cosine(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def training_set(n_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed training objects as tensors: grids (N, 16, 16, 16) in {-1, 1} and labels (N,)."""
    objects = make_objects(n_per_class, seed)
    x = torch.from_numpy(np.stack([to_tensor(o.occupancy) for o in objects]))
    return x, torch.tensor([o.label for o in objects])


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random mirror in x and in y per object (stability and class are mirror-invariant)."""
    flip_x = torch.rand(len(x), generator=g) < 0.5
    flip_y = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip_x[:, None, None, None], x.flip(-1), x)
    return torch.where(flip_y[:, None, None, None], x.flip(-2), x)


def pretrain(gen: VoxelGenerator, cfg: ToyVoxelsConfig, log: Any = print) -> dict[str, float]:
    """Denoising pretraining on the fixed training set (uniform weighting); returns timing and loss."""
    x_all, y_all = training_set(cfg.n_per_class, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    net = gen.network.train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    t0, ema = time.time(), None
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _cosine(step, cfg.steps)
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)
        x0, y = augment(x_all[idx], g), y_all[idx]
        t = torch.cat([gen.schedule.sample_t(g) for _ in range(len(idx))])
        noise = torch.randn(x0.shape, generator=g)
        pred = gen.predict(net, gen.schedule.add_noise(x0, noise, t), gen.schedule.model_timesteps(t), y)
        loss = torch.mean((pred - gen.schedule.target(x0, noise, t)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 250 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d} loss {ema:.4f} ({time.time() - t0:.0f}s)")
    net.eval()
    return {"train_seconds": round(time.time() - t0, 1), "final_loss": round(float(ema), 5)}


def config_dict(cfg: ToyVoxelsConfig) -> dict[str, Any]:
    return asdict(cfg)

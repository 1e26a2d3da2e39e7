"""A second, deliberately different :class:`Generator3D`: two stacked boxes from a 4-number latent.

The latent ``(width, depth, height, shift)`` in [-1, 1] is denoised by a small MLP (a plain
``nn.Module``, not a diffusers model) trained with flow matching; ``decode`` builds the mesh with
trimesh. The upper box is shifted sideways by ``shift``: the object tips over when the shift exceeds
half the width, so stable and unstable samples both occur. Nothing here is voxel-specific.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffdpo.diffusion.schedule import FlowMatchingSchedule


class BoxDenoiser(torch.nn.Module):
    def __init__(self, n_conditions: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(n_conditions, hidden)
        self.inp = torch.nn.Linear(4 + 1, hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.inp(torch.cat([x, t[:, None] / 1000.0], dim=1)) + self.embed(cond))
        return self.out(torch.nn.functional.silu(self.mid(h)))


class BoxGenerator:
    condition_names: Sequence[str] = ("short", "tall")
    latent_shape: tuple[int, ...] = (4,)
    lora_target_modules: Sequence[str] = ("inp", "mid", "out")

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.network = BoxDenoiser(len(self.condition_names))
        self.schedule = FlowMatchingSchedule()

    def predict(self, network, x_t, timesteps, conditions):
        return network(x_t, timesteps.float(), conditions.long())

    @torch.no_grad()
    def sample(self, conditions, seeds):
        x = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        cond = torch.as_tensor(list(conditions), dtype=torch.long)
        ts = torch.linspace(1.0, 0.0, 5)
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t) * self.predict(self.network, x, (t * 1000).repeat(len(x)), cond)
        return x.clamp(-1, 1)

    def training_latents(self, conditions, seed):
        """The box world's "training objects": uniform sizes, top shifts in [-0.5, 0.5] (a share tips over)."""
        x = torch.rand(len(conditions), 4, generator=torch.Generator().manual_seed(int(seed))) * 2 - 1
        x[:, 3] *= 0.5
        return x

    def decode(self, latents):
        import trimesh

        meshes = []
        for w, d, h, s in latents.tolist():
            w, d, h = 0.3 + 0.2 * (w + 1), 0.3 + 0.2 * (d + 1), 0.3 + 0.3 * (h + 1)
            bottom = trimesh.creation.box((w, d, h))
            bottom.apply_translation((0, 0, h / 2))
            top = trimesh.creation.box((w, d, h))
            top.apply_translation((0.9 * s, 0, 1.5 * h))
            meshes.append(trimesh.util.concatenate([bottom, top]))
        return meshes

"""A small task that only exists in the tests, registered through the public registry when imported.

It proves that a new modality needs no edit of the loop or the core: one scalar "model" w scores
sequences x with logp = w * x; pairs prefer the larger x, so DPO must raise w.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffdpo.config import help_meta
from diffdpo.task import LogpsOut, TaskContext, TaskSpec, register_task


@dataclass
class ScalarConfig:
    pairs: int = field(default=16, metadata=help_meta("number of (chosen, rejected) pairs"))
    gap: float = field(default=1.0, metadata=help_meta("chosen x minus rejected x"))

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError("scalar.pairs must be >= 1")


class ScalarTask:
    def __init__(self, cfg: ScalarConfig, context: TaskContext) -> None:
        self.cfg, self.context = cfg, context
        self.module = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.module.weight)

    def trainable_module(self) -> torch.nn.Module:
        return self.module

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.module.weight]

    def dataset(self) -> list[tuple[float, float]]:
        return [(i / self.cfg.pairs + self.cfg.gap, i / self.cfg.pairs) for i in range(self.cfg.pairs)]

    def collate(self, items: list[tuple[float, float]]) -> torch.Tensor:
        return torch.tensor(items)  # (B, 2)

    def compute(self, model: torch.nn.Module, batch: torch.Tensor, keys: torch.Tensor) -> LogpsOut:
        logp = model(batch.reshape(-1, 1)).reshape(-1, 2)  # (B, 2)
        return LogpsOut(logp[:, 0], logp[:, 1], torch.zeros(len(batch)), torch.zeros(len(batch)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": self.module.weight.detach()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.weight.data.copy_(state["w"])

    def export(self, out_dir: Path) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "w.json").write_text(json.dumps({"w": float(self.module.weight), "beta_seen": None}))


def _build(cfg: ScalarConfig, context: TaskContext) -> Any:
    return ScalarTask(cfg, context)


SPEC = register_task(TaskSpec("scalar", ScalarConfig, _build, default_beta=2.0,
                              description="a one-parameter task of the tests"),
                     replace=True)  # a test may drop this module from sys.modules; its re-import registers anew

"""The shared training loop with a toy, non-diffusion task: the loop is modality-agnostic.

The toy task's log-likelihood is a linear score ``w . x`` (policy) and the same score with frozen weights
(reference), so everything here runs in milliseconds.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from diffdpo.train import (
    LogpsOut,
    NonFiniteLossError,
    PointwiseLogpsOut,
    PreferenceTask,
    TrainConfig,
    train,
)


class ToyTask:
    """Pairs of 4-d feature vectors; ``nan_steps`` makes the policy log-likelihood NaN on those keys."""

    def __init__(self, n: int = 16, pointwise: bool = False, nan_keys: set[int] | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, 4, generator=g)  # (N, 2, D): chosen, rejected
        torch.manual_seed(0)
        self.policy = torch.nn.Linear(4, 1)
        self.ref = copy.deepcopy(self.policy).requires_grad_(False)
        self.pointwise, self.nan_keys = pointwise, nan_keys or set()

    def trainable_module(self):
        return self.policy

    def trainable_parameters(self):
        return list(self.policy.parameters())

    def dataset(self):
        return [{"x": self.x[i]} for i in range(len(self.x))]

    def collate(self, items):
        return torch.stack([it["x"] for it in items])  # (B, 2, D)

    def compute(self, model, batch, keys):
        logp = model(batch).squeeze(-1)  # (B, 2)
        if any(int(k) % len(self.x) in self.nan_keys for k in keys):
            logp = logp * float("nan")
        with torch.no_grad():
            ref = self.ref(batch).squeeze(-1)
        if self.pointwise:  # chosen items desirable, rejected undesirable
            labels = torch.tensor([True, False]).repeat(len(batch))
            return PointwiseLogpsOut(logp.reshape(-1), ref.reshape(-1), labels)
        return LogpsOut(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], {"toy/score": logp.mean().detach()})

    def state_dict(self):
        return {k: v.detach() for k, v in self.policy.state_dict().items()}

    def load_state_dict(self, state):
        self.policy.load_state_dict(state)

    def export(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.policy.state_dict(), out_dir / "toy.pt")


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=8, per_device_batch_size=4, tensorboard=False,
                      progress_bar=False, checkpoint_every=0)
    cfg.loss.beta = 1.0
    cfg.optim.lr = 0.1
    for key, value in kw.items():
        target = cfg
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return cfg


def test_toy_task_fits_the_protocol_and_dpo_learns(tmp_path):
    task = ToyTask()
    assert isinstance(task, PreferenceTask)
    result = train(_cfg(tmp_path, max_steps=12), task)
    losses = [h["loss"] for h in result.history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] and result.history[-1]["rewards/accuracies"] > 0.5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    logged = json.loads(lines[0])
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "lr",
                "grad_norm", "toy/score"):
        assert key in logged
    assert (tmp_path / "final" / "toy.pt").is_file()


def test_pointwise_losses_run_through_the_same_loop(tmp_path):
    result = train(_cfg(tmp_path, **{"loss.type": "kto"}), ToyTask(pointwise=True))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    with pytest.raises(ValueError, match="pointwise"):
        train(_cfg(tmp_path / "b", **{"loss.type": "sigmoid"}), ToyTask(pointwise=True))


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    """One batch holds key 3: its step is skipped (weights untouched), training goes on."""
    task = ToyTask(nan_keys={3})
    result = train(_cfg(tmp_path, max_steps=4), task)
    skipped = [h for h in result.history if h["skipped"]]
    assert len(skipped) == 1 and result.nonfinite_total == 1
    assert all(torch.isfinite(p).all() for p in task.policy.parameters())


def test_too_many_non_finite_steps_in_a_row_stop_with_a_clear_message(tmp_path):
    task = ToyTask(nan_keys=set(range(16)))
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row had a non-finite loss"):
        train(_cfg(tmp_path, max_consecutive_nonfinite=3), task)


def test_checkpoints_are_complete_pruned_and_resumable(tmp_path):
    full = train(_cfg(tmp_path / "a", checkpoint_every=2, checkpoints_total_limit=2), ToyTask())
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step-0000006", "step-0000008"]  # older pruned, no temp folders left
    resumed = train(_cfg(tmp_path / "a", max_steps=8, resume_from=str(tmp_path / "a" / "checkpoints" / "step-0000006")),
                    ToyTask())
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history][6:]


def test_effective_batch_size_sets_accumulation_and_scales_lr(tmp_path):
    from diffdpo.train import setup

    tr = setup(_cfg(tmp_path, effective_batch_size=8, **{"optim.scale_lr": True, "optim.lr": 1e-3}), ToyTask())
    assert tr.accumulation == 2 and tr.effective_batch_size == 8 and tr.lr == pytest.approx(8e-3)
    with pytest.raises(ValueError, match="multiple"):
        setup(_cfg(tmp_path, effective_batch_size=6), ToyTask())


class _BrokenExport(ToyTask):
    """Writes half its export, then dies (a kill during the final export)."""

    def export(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt


def test_an_interrupted_final_export_never_looks_complete(tmp_path):
    train(_cfg(tmp_path), ToyTask())
    before = sorted(p.name for p in (tmp_path / "final").iterdir())
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, overwrite=True), _BrokenExport())
    assert not (tmp_path / "final").exists()  # the old run's weights were deleted by overwrite=true, no half export
    assert before == ["toy.pt"] and (tmp_path / ".final.tmp" / "half.bin").is_file()
    train(_cfg(tmp_path, overwrite=True), ToyTask())
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["toy.pt"]


def test_output_dir_problems_are_named_before_training(tmp_path):
    from diffdpo.config import UserError

    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        train(_cfg(tmp_path / "file"), ToyTask())
    train(_cfg(tmp_path / "run"), ToyTask())
    with pytest.raises(UserError, match="already holds a run"):
        train(_cfg(tmp_path / "run"), ToyTask())
    with pytest.raises(UserError, match="contradict"):
        train(_cfg(tmp_path / "run", resume_from="latest", overwrite=True), ToyTask())

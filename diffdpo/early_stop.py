"""Early stopping on a logged indicator: stop when it stops improving, or when its trend turns.

Direct alignment over-optimises: gold quality is hump-shaped in KL and peaks early, often before one
epoch (Rafailov et al. 2024, arXiv 2406.02900), and the top-k entropy of the policy's next-token
distribution rises and then falls with its turn near the gold peak (Shi et al. 2024, "Understanding
Likelihood Over-optimisation in Direct Alignment Algorithms", arXiv 2410.11677). :class:`EarlyStopper`
watches one logged metric and says when to stop:

* ``mode="max"`` / ``"min"``: stop after ``patience`` evaluations in a row that do not beat the best
  value so far by more than ``min_delta`` (a win rate: max; a held-out loss: min);
* ``mode="turn"``: stop after the indicator's trend reverses: the first move away from the first value
  by more than ``min_delta`` sets the direction (up or down), and from then on it is ``max`` (or
  ``min``) mode; until a direction is set, nothing counts against the patience. ``best_step`` is then
  the turn (the peak of a hump, or the bottom of a valley).

``smoothing`` > 1 compares the trailing mean of the last ``smoothing`` evaluations instead of the raw
values (it lags the raw curve by about ``(smoothing - 1) / 2`` evaluations). A non-finite value counts
as not improving. Once it has fired, :meth:`EarlyStopper.update` keeps returning True.

The trainer (:func:`diffdpo.train.run`) reads the ``early_stop`` section of the training config::

    early_stop:
      metric: overopt/topk_entropy   # a metric the loop logs (metrics.jsonl), e.g. eval/win_rate, kl/sequence
      mode: turn                     # max | min | turn
      patience: 3                    # evaluations without improvement before stopping
      min_delta: 0.01
      smoothing: 1

and feeds the metric to an :class:`EarlyStopper` at every step that logs it (every step for a per-step metric,
the ``eval_every`` steps for an evaluation metric; missing where it should be is an error naming the logged
metrics). When it fires, the run stops with a checkpoint (if ``checkpoint_every`` > 0) and the final export;
``TrainResult.stopped_step`` / ``early_stop_best_step`` say where. The stopper's state is saved with the
train state, so a resumed run carries on its patience. An empty ``metric`` (the default) is off.

This module is core: it imports no modality.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from diffdpo.config import help_meta

EarlyStopMode = Literal["max", "min", "turn"]
EARLY_STOP_MODES: tuple[str, ...] = get_args(EarlyStopMode)


@dataclass
class EarlyStopConfig:
    """Stop training on a logged indicator (see :mod:`diffdpo.early_stop`); an empty metric = off."""

    metric: str = field(default="", metadata=help_meta("logged metric to watch, e.g. eval/win_rate or overopt/topk_entropy; empty = off"))
    mode: str = field(default="max", metadata=help_meta("max, min, or turn (stop once the trend reverses)"))
    patience: int = field(default=3, metadata=help_meta("evaluations without improvement before stopping"))
    min_delta: float = field(default=0.0, metadata=help_meta("an improvement (or a turn's first move) must exceed this"))
    smoothing: int = field(default=1, metadata=help_meta("trailing mean over this many evaluations; 1 = raw values"))

    def __post_init__(self) -> None:
        if self.mode not in EARLY_STOP_MODES:
            raise ValueError(f"early_stop.mode={self.mode!r} is unknown; choose one of {', '.join(EARLY_STOP_MODES)}")
        if self.patience < 1 or self.smoothing < 1:
            raise ValueError(f"early_stop.patience and early_stop.smoothing must be >= 1, got {self.patience} "
                             f"and {self.smoothing}")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"early_stop.min_delta must be a finite number >= 0, got {self.min_delta}")

    @property
    def enabled(self) -> bool:
        return bool(self.metric)


class EarlyStopper:
    """Feed it ``(step, value)`` at each evaluation; :meth:`update` returns True when training should stop."""

    def __init__(self, cfg: EarlyStopConfig) -> None:
        self.cfg = cfg
        self.best_step: int | None = None  # step of the best (smoothed) value: the checkpoint to keep
        self.best_value: float | None = None  # that value (smoothed), in the metric's own sign
        self.stopped_step: int | None = None  # step at which it fired
        self.bad_evaluations = 0  # evaluations in a row without improvement
        self.direction = {"max": 1, "min": -1, "turn": 0}[cfg.mode]  # +1 up is better, -1 down, 0 not yet known
        self.start_value: float | None = None  # turn mode: the first (smoothed) value
        self.history: list[tuple[int, float, float]] = []  # (step, value, smoothed)
        self._window: deque[float] = deque(maxlen=cfg.smoothing)

    @property
    def stopped(self) -> bool:
        return self.stopped_step is not None

    def update(self, step: int, value: float) -> bool:
        """Record one evaluation; True = stop now (and at every later call)."""
        if self.stopped:
            return True
        value = float(value)
        self._window.append(value)
        smoothed = sum(self._window) / len(self._window)
        self.history.append((int(step), value, smoothed))
        if not math.isfinite(smoothed):
            return self._not_improved(step)
        if self.direction == 0:  # turn mode, direction not known yet
            if self.start_value is None:
                self.start_value = smoothed
                self.best_step, self.best_value = int(step), smoothed
                return False
            if abs(smoothed - self.start_value) <= self.cfg.min_delta:
                return False
            self.direction = 1 if smoothed > self.start_value else -1
            self.best_step, self.best_value = int(step), smoothed
            return False
        if self.best_value is None or self.direction * (smoothed - self.best_value) > self.cfg.min_delta:
            self.best_step, self.best_value = int(step), smoothed
            self.bad_evaluations = 0
            return False
        return self._not_improved(step)

    def _not_improved(self, step: int) -> bool:
        if self.direction == 0:
            return False
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.cfg.patience:
            self.stopped_step = int(step)
            return True
        return False

    def update_from(self, step: int, logs: Mapping[str, Any]) -> bool:
        """:meth:`update` with ``logs[cfg.metric]``; a metric missing from ``logs`` is an error naming it."""
        if self.cfg.metric not in logs:
            raise ValueError(f"early_stop.metric={self.cfg.metric!r} is not among the logged metrics at step {step}: "
                             f"{', '.join(sorted(logs)) or '(none)'}; set early_stop.metric to one of them")
        return self.update(step, float(logs[self.cfg.metric]))

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (JSON-serialisable)."""
        return {"best_step": self.best_step, "best_value": self.best_value, "stopped_step": self.stopped_step,
                "bad_evaluations": self.bad_evaluations, "direction": self.direction,
                "start_value": self.start_value, "history": [list(h) for h in self.history],
                "window": list(self._window)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_step, self.best_value = state["best_step"], state["best_value"]
        self.stopped_step, self.bad_evaluations = state["stopped_step"], state["bad_evaluations"]
        self.direction, self.start_value = state["direction"], state["start_value"]
        self.history = [(int(s), float(v), float(m)) for s, v, m in state["history"]]
        self._window = deque(state["window"], maxlen=self.cfg.smoothing)

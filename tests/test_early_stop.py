"""Early stopping on synthetic indicator curves: patience, min_delta, the turn of a hump, smoothing, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffdpo.early_stop import EarlyStopConfig, EarlyStopper


def run(cfg: EarlyStopConfig, values, steps=None) -> tuple[EarlyStopper, int | None]:
    """Feed the curve (steps 10, 20, ... unless given); returns the stopper and the step it fired at."""
    stopper = EarlyStopper(cfg)
    steps = steps or [10 * (i + 1) for i in range(len(values))]
    for step, v in zip(steps, values):
        if stopper.update(step, v):
            return stopper, step
    return stopper, None


HUMP = [0.50, 0.55, 0.61, 0.66, 0.70, 0.72, 0.71, 0.69, 0.66, 0.62, 0.57, 0.51]  # peak at step 60


@pytest.mark.parametrize("patience", [1, 2, 3, 4])
def test_max_fires_after_patience_non_improving_evaluations_not_before(patience):
    """Peak at evaluation 6 (step 60): evaluations 7, 8, ... do not improve, so it fires at 6 + patience."""
    stopper, fired = run(EarlyStopConfig(metric="eval/win_rate", mode="max", patience=patience), HUMP)
    assert fired == 10 * (6 + patience)
    assert stopper.best_step == 60 and stopper.best_value == 0.72 and stopper.stopped
    # one evaluation fewer: it has not fired
    _, early = run(EarlyStopConfig(metric="m", mode="max", patience=patience), HUMP[: 5 + patience])
    assert early is None


def test_min_mode_on_a_loss_with_a_plateau_and_keeps_firing():
    loss = [1.0, 0.8, 0.7, 0.65, 0.66, 0.64, 0.67, 0.68, 0.69]
    stopper, fired = run(EarlyStopConfig(metric="eval/loss", mode="min", patience=3), loss)
    assert stopper.best_step == 60 and fired == 90
    assert stopper.update(100, 0.1)  # once fired, it stays fired (and ignores later values)
    assert stopper.best_step == 60


def test_an_improvement_resets_the_patience():
    """Two bad evaluations, then a new best, then two bad: patience 3 never fires."""
    values = [1.0, 0.9, 0.95, 1.1, 1.0, 1.05]
    _, fired = run(EarlyStopConfig(metric="m", mode="max", patience=3), values)
    assert fired is None


@pytest.mark.parametrize("patience", [1, 3])
def test_turn_fires_after_a_hump_peak(patience):
    """Top-k entropy rises then falls: 'turn' sets the direction up, then fires `patience` evaluations after the peak."""
    stopper, fired = run(EarlyStopConfig(metric="overopt/topk_entropy", mode="turn", patience=patience), HUMP)
    assert stopper.direction == 1 and stopper.best_step == 60 and fired == 10 * (6 + patience)


def test_turn_on_a_valley_and_never_on_a_monotone_curve():
    valley = [-v for v in HUMP]
    stopper, fired = run(EarlyStopConfig(metric="m", mode="turn", patience=2), valley)
    assert stopper.direction == -1 and stopper.best_step == 60 and fired == 80
    # 'max' on the valley would have fired at the start (the first value is its best)
    _, fired_max = run(EarlyStopConfig(metric="m", mode="max", patience=2), valley)
    assert fired_max == 30
    _, fired = run(EarlyStopConfig(metric="m", mode="turn", patience=1), list(np.linspace(0, 1, 50)))
    assert fired is None


def test_noise_within_min_delta_does_not_fire():
    """A flat indicator with noise of +-0.009 and min_delta 0.01: no direction, no improvement, no stop,
    in 'turn' mode; in 'max' mode the same noise after a rise cannot count as a new best."""
    rng = np.random.default_rng(0)
    flat = list(0.5 + rng.uniform(-0.0045, 0.0045, 200))
    _, fired = run(EarlyStopConfig(metric="m", mode="turn", patience=1, min_delta=0.01), flat)
    assert fired is None
    rising_then_flat = [0.1, 0.2, 0.3, 0.4] + flat[:10]
    stopper, fired = run(EarlyStopConfig(metric="m", mode="max", patience=5, min_delta=0.01), rising_then_flat)
    assert stopper.best_step == 50 and fired == 100  # the first flat value is a best (0.5 > 0.4 + 0.01)


def test_smoothing_ignores_single_noisy_dips():
    """A rising curve with a dip every 4th evaluation: raw 'max' with patience 1 fires at the first dip;
    a trailing mean over 4 evaluations rises steadily until the real peak."""
    values = [0.1 * i - (0.5 if i % 4 == 3 else 0.0) for i in range(20)] + [1.4, 1.3, 1.2, 1.0, 0.8, 0.6, 0.4]
    _, raw = run(EarlyStopConfig(metric="m", mode="max", patience=1), values)
    assert raw == 40
    stopper, smooth = run(EarlyStopConfig(metric="m", mode="max", patience=2, smoothing=4), values)
    assert smooth is not None and smooth > 200 and stopper.best_step >= 200


def test_non_finite_values_count_as_no_improvement():
    stopper, fired = run(EarlyStopConfig(metric="m", mode="max", patience=2), [0.1, 0.2, math.nan, math.inf])
    assert fired == 40 and stopper.best_step == 20


def test_resume_reproduces_the_uninterrupted_run():
    cfg = EarlyStopConfig(metric="m", mode="turn", patience=3, smoothing=2)
    whole, fired = run(cfg, HUMP)
    first = EarlyStopper(cfg)
    for i, v in enumerate(HUMP[:5]):
        assert not first.update(10 * (i + 1), v)
    resumed = EarlyStopper(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    fired_resumed = next((10 * (i + 6) for i, v in enumerate(HUMP[5:]) if resumed.update(10 * (i + 6), v)), None)
    assert fired_resumed == fired and resumed.best_step == whole.best_step and resumed.history == whole.history


def test_update_from_logs_and_config_errors():
    stopper = EarlyStopper(EarlyStopConfig(metric="eval/win_rate"))
    assert not stopper.update_from(5, {"eval/win_rate": 0.6, "loss": 0.7})
    with pytest.raises(ValueError, match=r"early_stop.metric='eval/win_rate' is not among .* loss"):
        stopper.update_from(6, {"loss": 0.7})
    assert not EarlyStopConfig().enabled and EarlyStopConfig(metric="x").enabled
    with pytest.raises(ValueError, match="early_stop.mode"):
        EarlyStopConfig(metric="x", mode="up")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopConfig(metric="x", patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopConfig(metric="x", min_delta=-0.1)


# ------------------------------------------------------------------------------------------------
# wired into the training loop (`diffdpo train`)


def _hump_task():
    """The tests' one-parameter task (DPO raises w steadily) with a gold score that is hump-shaped in w:
    ``eval/gold = w * (2 - w)``, largest at w = 1 (the over-optimisation curve in miniature)."""
    from diffdpo.task import TaskSpec, get_task, register_task
    from tests.registry_task import ScalarConfig, ScalarTask

    class HumpTask(ScalarTask):
        def evaluate(self) -> dict[str, float]:
            w = float(self.module.weight.detach())
            return {"eval/gold": w * (2.0 - w), "eval/w": w}

    try:
        return get_task("scalar_hump")
    except ValueError:
        return register_task(TaskSpec("scalar_hump", ScalarConfig, lambda cfg, ctx: HumpTask(cfg, ctx),
                                      default_beta=2.0, description="scalar task with a hump-shaped gold score"))


def _hump_config(tmp_path, **extra):
    import yaml

    _hump_task()
    data = {"task": "scalar_hump", "output_dir": str(tmp_path / "run"), "max_steps": 40, "per_device_batch_size": 4,
            "tensorboard": False, "progress_bar": False, "checkpoint_every": 100, "eval_every": 1,
            "optim": {"lr": 0.1, "weight_decay": 0.0, "lr_scheduler": "constant"}, "scalar_hump": {"pairs": 8},
            **extra}
    path = tmp_path / "hump.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_diffdpo_train_stops_on_the_configured_indicator_and_keeps_the_stopped_state(tmp_path):
    """w grows by about lr = 0.1 per Adam step, so eval/gold = w (2 - w) peaks near step 10; with
    mode max and patience 3 the run stops 3 evaluations after its best step, long before max_steps = 40,
    logs that step, exports final weights and writes a checkpoint of the stopped state."""
    from diffdpo.cli import main

    path = _hump_config(tmp_path, early_stop={"metric": "eval/gold", "mode": "max", "patience": 3})
    assert main(["train", "--config", str(path)]) == 0
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stopped = rows[-1]["step"]
    gold = {r["step"]: r["eval/gold"] for r in rows}
    best = max(gold, key=gold.get)
    assert 8 <= best <= 14 and stopped == best + 3 and stopped < 40
    assert abs(rows[best - 1]["eval/w"] - 1.0) < 0.1  # the peak of the hump
    assert all(gold[s] < gold[best] for s in range(best + 1, stopped + 1))
    assert (out / "final" / "w.json").is_file() and (out / "checkpoints" / f"step-{stopped:07d}").is_dir()
    state = json.loads((out / "checkpoints" / f"step-{stopped:07d}" / "trainer_state.json").read_text())["state"]
    assert state["early_stop"]["stopped_step"] == stopped and state["early_stop"]["best_step"] == best


def test_train_result_reports_the_stop_and_disabled_early_stop_changes_nothing(tmp_path):
    from diffdpo.train import load_train_config, train

    cfg = load_train_config(_hump_config(tmp_path), ["early_stop.metric=eval/gold", "early_stop.mode=turn",
                                                     "early_stop.patience=2", "checkpoint_every=0"])
    stopped = train(cfg)
    assert stopped.stopped_step == stopped.early_stop_best_step + 2 == stopped.steps < 40
    off = train(load_train_config(_hump_config(tmp_path), ["overwrite=true", "checkpoint_every=0"]))
    assert off.steps == 40 and off.stopped_step is None and off.early_stop_best_step is None
    # the same training up to the stop: early stopping only cuts the run short
    assert [h["loss"] for h in off.history[: stopped.steps]] == pytest.approx([h["loss"] for h in stopped.history])


def test_a_metric_the_run_never_logs_is_named_at_the_first_evaluation(tmp_path):
    from diffdpo.train import load_train_config, train

    cfg = load_train_config(_hump_config(tmp_path), ["early_stop.metric=eval/gold_typo", "eval_every=3"])
    with pytest.raises(ValueError, match=r"early_stop.metric='eval/gold_typo' is not among the logged metrics at "
                                         r"step 3: .*eval/gold"):
        train(cfg)

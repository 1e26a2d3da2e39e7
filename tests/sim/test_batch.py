"""Batch scoring: crash isolation, timeouts, ordering, worker counts, dependency errors."""

from __future__ import annotations

import time

import pytest

import sim
from sim import StabilityConfig
from sim.batch import resolve_workers
from tests.sim.meshes import box, faulty_batch


def test_crashes_and_hangs_are_isolated():
    """A real segfault, a hang, an abrupt exit and an exception in workers: each of those inputs
    is reported, the others are scored, and the order is kept."""
    items = faulty_batch()
    started = time.perf_counter()
    results = sim.score_meshes(items, StabilityConfig(timeout_s=1.0), workers=2)
    elapsed = time.perf_counter() - started
    assert [r.index for r in results] == list(range(len(items)))
    assert [r.reason for r in results] == [None, "crash", None, "timeout", "crash", "sim_error", None]
    assert "SIGSEGV" in results[1].error
    assert "killed" in results[3].error
    assert "exit code 3" in results[4].error
    assert "injected fault" in results[5].error
    assert results[0].stable and not results[2].stable and results[6].stable
    assert elapsed < 30  # the hang costs timeout + grace (3 s), not more


def test_soft_timeout_in_process():
    """In-process the per-mesh limit is checked between physics steps."""
    config = StabilityConfig(duration_s=10_000.0, timeout_s=0.3)
    started = time.perf_counter()
    (result,) = sim.score_meshes([box()], config, workers=0)
    assert time.perf_counter() - started < 5
    assert result.reason == "timeout" and not result.valid
    assert "timeout_s=0.3" in result.error
    assert result.n_faces == 12  # what was learnt before the timeout is kept


def test_worker_counts():
    assert resolve_workers(0, 10) == 0
    assert resolve_workers(4, 2) == 2
    assert resolve_workers(None, 1) == 1
    assert resolve_workers(None, 0) == 0
    with pytest.raises(ValueError, match="workers"):
        resolve_workers(-1, 3)
    with pytest.raises(TypeError, match="StabilityConfig"):
        sim.score_meshes([box()], config={"collision": "hull"})


def test_empty_batch():
    assert sim.score_meshes([], workers=2) == []


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    import sim.batch

    monkeypatch.setattr(sim.batch, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"diffdpo\[mujoco\]"):
        sim.score_meshes([box()], StabilityConfig(backend="mujoco"))
    with pytest.raises(ImportError, match=r"diffdpo\[coacd\]"):
        sim.score_meshes([box()], StabilityConfig(collision="coacd"))


def test_progress_bar_and_records(capsys):
    results = sim.score_meshes([box(), "missing.obj"], workers=0, progress=True)
    assert "2/2" in capsys.readouterr().err
    record = results[0].to_record()
    assert record["valid"] and record["warnings"] == "" and record["angle_deg"] < 1
    assert results[1].to_record()["reason"] == "missing_file"


def test_spawn_start_method():
    """The portable start method (macOS, Windows) works too."""
    (result,) = sim.score_meshes([box()], StabilityConfig(start_method="spawn"), workers=1)
    assert result.valid and result.stable

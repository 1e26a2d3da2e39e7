"""Scoring on Ray (``StabilityConfig(executor="ray")``): the process pool's results and guarantees.

One local Ray instance (2 CPUs) serves the whole module: starting Ray costs several seconds.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

import sim
from sim import StabilityConfig, StabilityResult
from sim.batch import FaultInjection
from tests.sim.meshes import box, faulty_batch, leaning_tower

RAY = StabilityConfig(executor="ray")
TIMING_FIELDS = ("wall_time_s", "cpu_time_s")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _comparable(result: StabilityResult) -> dict:
    record = dataclasses.asdict(result)
    for name in TIMING_FIELDS:
        record.pop(name)
    return record


def _assert_same(ray_results, pool_results):
    assert len(ray_results) == len(pool_results)
    for a, b in zip(ray_results, pool_results, strict=True):
        a, b = _comparable(a), _comparable(b)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float) and isinstance(b[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)


def test_same_results_as_the_process_pool(ray_instance):
    """Same inputs, same order, same labels and numbers; the perturbation makes each result depend
    on its position, so a mesh scored at the wrong place would show."""
    items = [box(), leaning_tower(), "missing.obj", box((0.3, 0.3, 1.6), (0, 0, 0.8)), leaning_tower(), box()]
    config = StabilityConfig(perturb_deg=3.0)
    pool = sim.score_meshes(items, config, workers=2)
    delivered: list[int] = []
    on_ray = sim.score_meshes(
        items,
        dataclasses.replace(config, executor="ray"),
        workers=2,
        on_result=lambda r: delivered.append(r.index),
    )
    _assert_same(on_ray, pool)
    assert [r.index for r in on_ray] == list(range(len(items)))
    assert sorted(delivered) == list(range(len(items)))  # on_result once per input
    assert [r.stable for r in on_ray] == [True, False, None, True, False, True]
    assert on_ray[2].reason == "missing_file"
    assert ray_instance.is_initialized()  # not ours to shut down


def test_crash_hang_and_exception_are_isolated(ray_instance):
    """A real segfault, a hang, an abrupt exit and an exception in Ray actors: each of those inputs
    is reported with its reason, the others are scored, the order is kept."""
    items = faulty_batch()
    results = sim.score_meshes(items, dataclasses.replace(RAY, timeout_s=1.0), workers=2)
    assert [r.index for r in results] == list(range(len(items)))
    assert [r.reason for r in results] == [None, "crash", None, "timeout", "crash", "sim_error", None]
    assert "Ray worker process died" in results[1].error
    assert "actor was killed" in results[3].error
    assert "injected fault" in results[5].error
    assert results[0].stable and not results[2].stable and results[6].stable
    assert all(not r.valid for r in results[1:6] if r.reason)


def test_known_results_are_not_rescored(ray_instance):
    """A known result is returned as given: the segfaulting input at its position is never sent."""
    known = StabilityResult(index=1, source="earlier run", valid=True, stable=False, angle_deg=42.0)
    delivered: list[int] = []
    results = sim.score_meshes(
        [box(), FaultInjection("segfault"), box()],
        RAY,
        workers=2,
        known_results={1: known},
        on_result=lambda r: delivered.append(r.index),
    )
    assert results[1] is known
    assert sorted(delivered) == [0, 2]
    assert results[0].stable and results[2].stable


def test_cli_with_executor_ray_writes_the_same_table(ray_instance, tmp_path):
    from diffdpo.cli import main as diffdpo_main
    from sim.cli import main

    folder = tmp_path / "meshes"
    folder.mkdir()
    for i in range(3):
        (box() if i % 2 else leaning_tower()).export(folder / f"m{i}.obj")
    args = ["score", str(folder), str(tmp_path / "missing.obj"), "perturb_deg=2", "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "pool.parquet"), "--workers", "2"]) == 0
    assert (
        diffdpo_main(["sim", *args, str(tmp_path / "ray.parquet"), "--executor", "ray", "--workers", "2"])
        == 0
    )
    pool = pd.read_parquet(tmp_path / "pool.parquet").drop(columns=list(TIMING_FIELDS))
    on_ray = pd.read_parquet(tmp_path / "ray.parquet").drop(columns=list(TIMING_FIELDS))
    pd.testing.assert_frame_equal(on_ray, pool)
    assert list(on_ray["stable"][:3]) == [False, True, False]


def test_cli_errors_are_one_line(tmp_path, capsys):
    from sim.cli import main

    box().export(tmp_path / "box.obj")
    out = str(tmp_path / "scores.csv")
    assert (
        main(["score", str(tmp_path / "box.obj"), "--executor", "ray", "--workers", "0", "--out", out]) == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "workers=0" in err and "executor='ray'" in err


def test_missing_ray_names_the_extra(monkeypatch):
    import sim.batch

    monkeypatch.setattr(sim.batch, "find_spec", lambda name: None if name == "ray" else object())
    with pytest.raises(ImportError, match=r"pip install 'diffdpo\[ray\]'"):
        sim.score_meshes([box()], RAY)


def test_config_fields_and_the_dso_recipe_option():
    """The DSO recipe scores through its ``sim`` section: ``sim.executor=ray sim.ray_address=auto``."""
    from diffdpo.config import load_config
    from diffdpo.recipes.dso.config import DSOConfig

    cfg = load_config(DSOConfig, None, ["sim.executor=ray", "sim.ray_address=auto", "sim_workers=4"])
    assert (cfg.sim.executor, cfg.sim.ray_address, cfg.sim_workers) == ("ray", "auto", 4)
    assert load_config(DSOConfig, None, []).sim.executor == "process"
    with pytest.raises(ValueError, match="executor"):
        StabilityConfig(executor="dask")
    with pytest.raises(ValueError, match="ray_address"):
        StabilityConfig(ray_address="  ")


def test_a_pool_run_resumes_on_ray():
    """Where a batch runs is not part of the partial file's settings (it changes no result)."""
    from sim.output import _config_record

    assert _config_record(RAY) == _config_record(StabilityConfig())
    assert "executor" not in _config_record(RAY)

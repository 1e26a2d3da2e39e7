"""Batch scoring: a pool of worker processes with per-mesh timeouts and crash isolation.

Each worker process owns one physics client (pybullet DIRECT or MuJoCo) and scores the meshes it is
sent one at a time, so a batch pays the process start-up once per worker, not once per mesh. Meshes
travel as file paths or as ``(vertices, faces)`` arrays. The parent watches every worker: a worker
that dies (segfault in the engine, out of memory, ...) or does not answer within the per-mesh
timeout (plus a grace period) is killed and replaced, its mesh gets ``valid=False`` with reason
``"crash"`` or ``"timeout"``, and the batch goes on. Results come back in input order.

``workers=0`` scores in the calling process: no start-up cost, but no hard isolation. Exceptions
and the per-mesh timeout (checked between physics steps and preparation stages) still give invalid
results, but a segfault in the engine takes the caller down and a hang inside a C call (VHACD on a
huge mesh) is not interrupted. Use it for small trusted batches and tests; use ``workers >= 1``
(the default) for generated meshes.

``StabilityConfig(executor="ray")`` runs the same batch on Ray actors, on this machine or a cluster,
with the same guarantees (:mod:`sim.ray_pool`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from multiprocessing.connection import wait
from typing import Any

from sim.config import StabilityConfig
from sim.mesh import MeshError, geometry_to_arrays
from sim.result import StabilityResult

Task = tuple[int, str, tuple[Any, ...]]

# A worker must say "ready" within this many seconds of being started.
STARTUP_TIMEOUT_S = 120.0
# Consecutive start-up failures before the batch gives up (an environment problem, not a mesh).
MAX_STARTUP_FAILURES = 3


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: an input that makes its worker really ``"segfault"``, ``"hang"``, ``"exit"`` or
    ``"raise"``, to exercise crash isolation. Never use it with ``workers=0``."""

    kind: str


def score_meshes(
    meshes: Iterable[Any],
    config: StabilityConfig | None = None,
    workers: int | None = None,
    *,
    progress: bool = False,
    on_result: Callable[[StabilityResult], None] | None = None,
    known_results: Mapping[int, StabilityResult] | None = None,
) -> list[StabilityResult]:
    """Score each mesh with the stability test of DSO (Li et al. 2025, arXiv 2503.22677).

    Args:
        meshes: file paths (anything trimesh reads: obj, glb/gltf, ply, stl, off),
            ``trimesh.Trimesh`` / ``trimesh.Scene`` objects, or ``(vertices, faces)`` pairs.
        config: the protocol; ``None`` means ``StabilityConfig()`` defaults.
        workers: worker processes; ``None`` = one per available CPU (at most one per mesh);
            ``0`` = score in this process (no crash isolation, see the module docstring). With
            ``config.executor="ray"``: Ray actors, ``None`` = one per CPU of the Ray cluster
            (``0`` is refused: it would silently skip Ray).
        progress: show a tqdm progress bar on stderr.
        on_result: called in this process with each new result as soon as it is known
            (completion order), e.g. to save finished rows while the batch runs.
        known_results: results already known by input position (e.g. from an interrupted run);
            those inputs are not scored again and their results are returned as given.

    Returns:
        One :class:`StabilityResult` per input, in input order. An input that cannot be simulated
        gives ``valid=False`` with a ``reason`` and an ``error`` message; the batch never raises for
        a bad mesh. It raises only for a bad argument or a broken environment (a missing optional
        dependency, workers that cannot start).
    """
    config = StabilityConfig() if config is None else config
    if not isinstance(config, StabilityConfig):
        raise TypeError(f"config must be a StabilityConfig, got {type(config).__name__}")
    check_dependencies(config)
    items = list(meshes)
    known_results = dict(known_results or {})
    if any(not 0 <= i < len(items) for i in known_results):
        raise ValueError(f"known_results has positions outside 0..{len(items) - 1}")
    results: list[StabilityResult | None] = [known_results.get(i) for i in range(len(items))]
    if config.executor == "ray" and workers == 0:
        raise ValueError(
            "workers=0 scores in this process and executor='ray' on Ray actors: give workers=None "
            "(one actor per CPU of the Ray cluster) or a number of actors"
        )
    n_workers = resolve_workers(workers, len(items) - len(known_results))
    bar = _progress_bar(len(items), progress)
    bar.update(len(known_results))

    def deliver(result: StabilityResult) -> None:
        results[result.index] = result
        bar.update(1)
        if on_result is not None:
            on_result(result)

    try:
        tasks: list[Task] = []
        for index, item in enumerate(items):
            if results[index] is not None:
                continue
            task = _make_task(index, item, config)
            if isinstance(task, StabilityResult):
                deliver(task)
            else:
                tasks.append(task)
        if not tasks:
            pass
        elif config.executor == "ray":
            from sim.ray_pool import run_on_ray

            run_on_ray(tasks, config, workers, deliver)
        elif n_workers == 0:
            run_in_process(tasks, config, deliver)
        else:
            WorkerPool(min(n_workers, len(tasks)), config).run(tasks, deliver)
    finally:
        bar.close()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:  # a bug in the pool, never expected: fail loudly rather than drop inputs
        raise RuntimeError(f"internal error: no result for inputs {missing[:10]}")
    return results  # type: ignore[return-value]


def check_dependencies(config: StabilityConfig) -> None:
    """Raise ImportError naming the extra to install when the config needs a missing package."""
    if config.backend == "mujoco" and find_spec("mujoco") is None:
        raise ImportError("backend='mujoco' needs MuJoCo: pip install 'diffdpo[mujoco]' (or mujoco)")
    if config.backend == "pybullet" and config.collision == "coacd" and find_spec("coacd") is None:
        raise ImportError("collision='coacd' needs CoACD: pip install 'diffdpo[coacd]' (or coacd)")
    if config.executor == "ray" and find_spec("ray") is None:
        from sim.ray_pool import RAY_EXTRA_HINT

        raise ImportError(RAY_EXTRA_HINT)


def resolve_workers(workers: int | None, n_tasks: int) -> int:
    """Number of worker processes: ``None`` = available CPUs, never more than the tasks."""
    if workers is None:
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            available = os.cpu_count() or 1
        workers = available
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"workers must be None or an integer >= 0, got {workers!r}")
    return min(workers, n_tasks)


def _make_task(index: int, item: Any, config: StabilityConfig) -> Task | StabilityResult:
    """A task for a worker, or directly an invalid result for an input we cannot even send."""
    if isinstance(item, FaultInjection):
        return index, f"<fault {item.kind}>", ("fault", item.kind)
    if isinstance(item, str | os.PathLike):
        source = os.fspath(item)
        return index, source, ("path", source)
    source = _describe(index, item)
    try:
        vertices, faces = geometry_to_arrays(item)
    except MeshError as exc:
        return StabilityResult.invalid(index, source, exc.reason, f"{source}: {exc}", backend=config.backend)
    return index, source, ("arrays", vertices, faces)


def _describe(index: int, item: Any) -> str:
    metadata = getattr(item, "metadata", None)
    if isinstance(metadata, dict):
        for key in ("file_path", "file_name"):
            if metadata.get(key):
                return str(metadata[key])
    return f"<{type(item).__name__} #{index}>"


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="mesh", desc="sim", dynamic_ncols=True)


def run_in_process(
    tasks: Sequence[Task], config: StabilityConfig, on_result: Callable[[StabilityResult], None]
) -> None:
    """Score tasks one by one in this process with a single engine."""
    from sim.worker import make_engine, score_task

    engine = make_engine(config)
    try:
        for task in tasks:
            on_result(score_task(task, config, engine))
    finally:
        engine.close()


# --------------------------------------------------------------------------------------------------
# the pool
# --------------------------------------------------------------------------------------------------


class _Worker:
    """Parent-side handle of one worker process and the tasks sent to it, oldest first."""

    def __init__(self, ctx: Any, config: StabilityConfig) -> None:
        from sim.worker import worker_main

        self.conn, child_conn = ctx.Pipe(duplex=True)
        # the worker exits by itself if this process dies without stopping it (kill -9)
        self.process = ctx.Process(target=worker_main, args=(child_conn, config, os.getpid()), daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.in_flight: deque[Task] = deque()
        # deadline of the oldest task in flight (or of the start-up); inf when idle
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def send(self, task: Task, hard_timeout_s: float) -> None:
        if not self.in_flight:
            self.deadline = time.monotonic() + hard_timeout_s
        self.in_flight.append(task)
        self.conn.send(task)

    def finished(self, hard_timeout_s: float) -> None:
        """The oldest task's result arrived; the next one (already queued) starts now."""
        self.in_flight.popleft()
        self.deadline = time.monotonic() + hard_timeout_s if self.in_flight else float("inf")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=2)
        self.kill()


class WorkerPool:
    """Long-lived worker processes, replaced when they die or hang.

    Each worker has up to ``PREFETCH`` tasks in its pipe, so that it never waits for the parent
    between meshes; the per-mesh deadline runs for the oldest task only (the worker scores its
    tasks in order). When a worker dies or hangs, its oldest task is reported and the tasks queued
    behind it, which never started, go back to the front of the queue.
    """

    PREFETCH = 2

    def __init__(self, n_workers: int, config: StabilityConfig) -> None:
        if n_workers < 1:
            raise ValueError("WorkerPool needs at least one worker")
        self.n_workers = n_workers
        self.config = config
        # the worker's soft timeout fires first; the parent kills only a worker stuck in C code
        self.hard_timeout_s = config.timeout_s + max(2.0, 0.25 * config.timeout_s)
        self.ctx = _context(config.start_method)

    def run(self, tasks: Sequence[Task], on_result: Callable[[StabilityResult], None]) -> None:
        """Score every task; ``on_result`` is called once per task, in completion order."""
        pending = deque(tasks)
        outstanding = len(tasks)
        startup_failures: list[str] = []
        workers = [_Worker(self.ctx, self.config) for _ in range(min(self.n_workers, len(tasks)))]
        try:
            while outstanding:
                for worker in workers:
                    while worker.ready and pending and len(worker.in_flight) < self.PREFETCH:
                        worker.send(pending.popleft(), self.hard_timeout_s)
                timeout = min(w.deadline for w in workers) - time.monotonic()
                wait([w.conn for w in workers] + [w.process.sentinel for w in workers], _clamp(timeout))
                for worker in list(workers):
                    done, failure = self._service(worker, on_result)
                    outstanding -= done
                    if failure is None:
                        continue
                    workers.remove(worker)
                    pending.extendleft(reversed(worker.in_flight))  # queued, never started
                    if failure:  # failed to start: an environment problem, not a mesh
                        startup_failures.append(failure)
                        if len(startup_failures) >= MAX_STARTUP_FAILURES:
                            raise RuntimeError(f"sim worker processes failed to start: {failure}")
                    else:
                        startup_failures.clear()
                    if pending:
                        workers.append(_Worker(self.ctx, self.config))
        finally:
            for worker in workers:
                worker.stop()

    def _service(
        self, worker: _Worker, on_result: Callable[[StabilityResult], None]
    ) -> tuple[int, str | None]:
        """Read a worker's messages and check its health.

        Returns (results delivered, failure): failure is None while the worker is fine, "" when it
        was killed or died (its oldest task reported, the others left in ``worker.in_flight``), and
        a message when it failed to start.
        """
        done = 0
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                    worker.deadline = float("inf")
                elif message[0] == "result":
                    worker.finished(self.hard_timeout_s)
                    on_result(message[2])
                    done += 1
                elif message[0] == "fatal":
                    worker.kill()
                    return done, message[1]
        except (EOFError, OSError):
            pass  # the worker died mid-message; handled below
        if worker.process.is_alive() and time.monotonic() <= worker.deadline:
            return done, None
        alive = worker.process.is_alive()
        worker.kill()
        if not worker.ready:
            what = "did not start in time" if alive else f"died at start-up ({_exit_text(worker)})"
            return done, f"worker process {what}"
        if not worker.in_flight:
            return done, ""  # died while idle: replace it
        index, source, _ = worker.in_flight.popleft()
        if alive:
            reason = "timeout"
            message = (
                f"{source}: no result within {self.hard_timeout_s:.1f} s (timeout_s="
                f"{self.config.timeout_s:g} plus grace); the worker was killed"
            )
        else:
            reason = "crash"
            message = (
                f"{source}: the worker process died while scoring this mesh ({_exit_text(worker)}); "
                "the physics engine or a mesh library crashed on it"
            )
        on_result(StabilityResult.invalid(index, source, reason, message, backend=self.config.backend))
        return done + 1, ""


def _clamp(timeout_s: float) -> float:
    """A wait time for ``connection.wait``: at least 0, at most 5 s (then we look again)."""
    return min(max(timeout_s, 0.0), 5.0)


def _exit_text(worker: _Worker) -> str:
    code = worker.process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _context(start_method: str) -> Any:
    """A multiprocessing context; the forkserver preloads the worker's heavy imports once."""
    if start_method not in mp.get_all_start_methods():
        start_method = "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["sim.worker"])
    return ctx

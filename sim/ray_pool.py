"""Batch scoring on Ray: the guarantees of the process pool, on one machine or a cluster.

``StabilityConfig(executor="ray")`` sends the batch to Ray actors instead of local worker processes.
Each actor is a long-lived Ray worker process with one physics client (like a worker of
:class:`sim.batch.WorkerPool`), so the engine and the heavy imports are paid once per actor, not once
per mesh. Actors rather than plain tasks, because an actor tells us when it is ready and runs its
calls in order: the per-mesh deadline then starts when the mesh starts, not when it was queued
behind a cold worker, which a task cannot tell us.

The guarantees are those of the process pool: one result per input, in input order; a mesh whose
actor dies (segfault, ``os._exit``, out of memory) gets ``valid=False`` with reason ``"crash"``; a
mesh with no answer within ``timeout_s`` plus grace gets reason ``"timeout"`` and its actor is killed
(``ray.kill``, which ends the process); in both cases the actor is replaced and the batch goes on.
Ray never retries a mesh by itself (``max_restarts=0``, ``max_task_retries=0``): a mesh that crashes
its worker would crash the retry too. Meshes travel as ``(vertices, faces)`` arrays or file paths (on
a cluster the paths must be readable on every node).

Ray is imported only here, and only when a batch runs with ``executor="ray"``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sim.config import StabilityConfig
from sim.result import StabilityResult

Task = tuple[int, str, tuple[Any, ...]]

RAY_EXTRA_HINT = "executor='ray' needs Ray: pip install 'diffdpo[ray]' (or ray)"
# An actor must be ready within this many seconds of being created (a cluster may have to start a node).
STARTUP_TIMEOUT_S = 120.0
# Consecutive start-up failures before the batch gives up (an environment problem, not a mesh).
MAX_STARTUP_FAILURES = 3


def import_ray() -> Any:
    """``ray``, or ImportError naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(RAY_EXTRA_HINT) from exc
    return ray


class RayScorer:
    """One Ray actor: a physics engine, reused for every mesh sent to it (see the module docstring)."""

    def __init__(self, config: StabilityConfig) -> None:
        with contextlib.suppress(OSError):  # the engines print to C-level stdout, which Ray forwards
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        from sim.worker import make_engine

        self.config = config
        self.engine = make_engine(config)

    def ready(self) -> int:
        return os.getpid()

    def score(self, task: Task) -> StabilityResult:
        from sim.worker import score_task

        return score_task(task, self.config, self.engine)


class _Actor:
    """Driver-side handle of one actor and the calls sent to it, oldest first."""

    def __init__(self, actor_class: Any, config: StabilityConfig) -> None:
        self.handle = actor_class.remote(config)
        self.ready_ref = self.handle.ready.remote()
        self.ready = False
        self.in_flight: deque[tuple[Task, Any]] = deque()
        # deadline of the oldest call in flight (or of the start-up); inf when idle
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def send(self, task: Task, hard_timeout_s: float) -> None:
        if not self.in_flight:
            self.deadline = time.monotonic() + hard_timeout_s
        self.in_flight.append((task, self.handle.score.remote(task)))

    def finished(self, hard_timeout_s: float) -> None:
        self.in_flight.popleft()
        self.deadline = time.monotonic() + hard_timeout_s if self.in_flight else float("inf")

    def watched_ref(self) -> Any:
        if not self.ready:
            return self.ready_ref
        return self.in_flight[0][1] if self.in_flight else None


class RayPool:
    """Ray actors, replaced when they die or hang; the Ray counterpart of :class:`sim.batch.WorkerPool`.

    Each actor has up to ``PREFETCH`` calls queued, so that it never waits for the driver between
    meshes; the per-mesh deadline runs for the oldest call only (an actor runs its calls in order).
    When an actor dies or hangs, its oldest mesh is reported and the calls queued behind it, which
    never started, go back to the front of the queue.
    """

    PREFETCH = 2

    def __init__(self, ray: Any, n_actors: int, config: StabilityConfig) -> None:
        if n_actors < 1:
            raise ValueError("RayPool needs at least one actor")
        self.ray = ray
        self.n_actors = n_actors
        self.config = config
        # the actor's soft timeout fires first; the driver kills only an actor stuck in C code
        self.hard_timeout_s = config.timeout_s + max(2.0, 0.25 * config.timeout_s)
        self.actor_class = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(RayScorer)

    def run(self, tasks: Sequence[Task], on_result: Callable[[StabilityResult], None]) -> None:
        """Score every task; ``on_result`` is called once per task, in completion order."""
        pending = deque(tasks)
        outstanding = len(tasks)
        startup_failures: list[str] = []
        actors = [_Actor(self.actor_class, self.config) for _ in range(min(self.n_actors, len(tasks)))]
        try:
            while outstanding:
                for actor in actors:
                    while actor.ready and pending and len(actor.in_flight) < self.PREFETCH:
                        actor.send(pending.popleft(), self.hard_timeout_s)
                watched = [ref for ref in (a.watched_ref() for a in actors) if ref is not None]
                timeout = min(max(min(a.deadline for a in actors) - time.monotonic(), 0.0), 5.0)
                if watched:
                    self.ray.wait(watched, num_returns=1, timeout=timeout)
                for actor in list(actors):
                    done, failure = self._service(actor, on_result)
                    outstanding -= done
                    if failure is None:
                        continue
                    actors.remove(actor)
                    pending.extendleft(reversed([task for task, _ in actor.in_flight]))  # never started
                    if failure:  # failed to start: an environment problem, not a mesh
                        startup_failures.append(failure)
                        if len(startup_failures) >= MAX_STARTUP_FAILURES:
                            raise RuntimeError(f"sim Ray actors failed to start: {failure}")
                    else:
                        startup_failures.clear()
                    if pending:
                        actors.append(_Actor(self.actor_class, self.config))
        finally:
            for actor in actors:
                self._kill(actor)

    def _service(self, actor: _Actor, on_result: Callable[[StabilityResult], None]) -> tuple[int, str | None]:
        """Collect an actor's finished calls and check its health.

        Returns (results delivered, failure): failure is None while the actor is fine, "" when it was
        killed or died (its oldest mesh reported, the others left in ``actor.in_flight``), and a
        message when it failed to start.
        """
        ray = self.ray
        if not actor.ready:
            if self._done(actor.ready_ref):
                try:
                    ray.get(actor.ready_ref)
                except ray.exceptions.RayError as exc:
                    self._kill(actor)
                    return 0, f"an actor died at start-up: {_first_line(exc)}"
                actor.ready = True
                actor.deadline = float("inf")
                return 0, None
            if time.monotonic() > actor.deadline:
                self._kill(actor)
                return (
                    0,
                    f"an actor did not start within {STARTUP_TIMEOUT_S:g} s (too few CPUs in the cluster?)",
                )
            return 0, None
        done = 0
        while actor.in_flight and self._done(actor.in_flight[0][1]):
            (index, source, _), ref = actor.in_flight[0]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                actor.in_flight.popleft()
                self._kill(actor)
                message = (
                    f"{source}: the Ray worker process died while scoring this mesh ({_exit_detail(exc)}); "
                    "the physics engine or a mesh library crashed on it"
                )
                on_result(
                    StabilityResult.invalid(index, source, "crash", message, backend=self.config.backend)
                )
                return done + 1, ""
            except ray.exceptions.RayError as exc:  # the call itself failed (e.g. unpicklable result)
                result = StabilityResult.invalid(
                    index, source, "sim_error", f"{source}: {_first_line(exc)}", backend=self.config.backend
                )
            actor.finished(self.hard_timeout_s)
            on_result(result)
            done += 1
        if actor.in_flight and time.monotonic() > actor.deadline:
            (index, source, _), _ref = actor.in_flight.popleft()
            self._kill(actor)
            message = (
                f"{source}: no result within {self.hard_timeout_s:.1f} s (timeout_s="
                f"{self.config.timeout_s:g} plus grace); the Ray actor was killed"
            )
            on_result(StabilityResult.invalid(index, source, "timeout", message, backend=self.config.backend))
            return done + 1, ""
        return done, None

    def _done(self, ref: Any) -> bool:
        ready, _ = self.ray.wait([ref], num_returns=1, timeout=0)
        return bool(ready)

    def _kill(self, actor: _Actor) -> None:
        with contextlib.suppress(Exception):  # already dead, or Ray is shutting down
            self.ray.kill(actor.handle, no_restart=True)


def run_on_ray(
    tasks: Sequence[Task],
    config: StabilityConfig,
    workers: int | None,
    on_result: Callable[[StabilityResult], None],
) -> None:
    """Score tasks on Ray actors: ``workers`` of them, at most one per CPU of the Ray cluster
    (``None`` = one per CPU).

    With ``config.ray_address`` set, connect to that cluster (unless this process already joined
    one); without it, use the Ray instance this process already joined, or start a local one with
    ``workers`` CPUs. A Ray instance started here is shut down at the end.
    """
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        if config.ray_address is not None:
            try:
                ray.init(address=config.ray_address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConnectionError(
                    f"cannot join the Ray cluster at ray_address={config.ray_address!r} ({_first_line(exc)}); "
                    "start one with `ray start --head` or give the address it printed"
                ) from exc
        else:
            n_cpus = workers if workers is not None else _local_cpus()
            ray.init(num_cpus=max(1, min(n_cpus, len(tasks))), include_dashboard=False, log_to_driver=False)
        started_here = True
    try:
        # an actor holds one CPU: more actors than CPUs would wait unscheduled and fail their start-up
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_actors = cpus if workers is None else min(workers, cpus)
        RayPool(ray, min(n_actors, len(tasks)), config).run(tasks, on_result)
    finally:
        if started_here:
            ray.shutdown()


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _exit_detail(exc: BaseException) -> str:
    """Ray's one-line account of how the worker ended, e.g. "Worker unexpectedly exits with a
    connection error code 2. End of file." (Ray does not report the signal number)."""
    text = str(exc)
    marker = "Worker exit detail:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip()
        return detail.split(" Some common causes")[0].strip()
    return _first_line(exc)

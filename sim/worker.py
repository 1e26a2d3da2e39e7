"""Scoring one input, and the worker-process loop around it.

This module imports the heavy dependencies at the top on purpose: the batch layer preloads it into
the forkserver, so that every worker (and every replacement of a crashed one) starts with numpy,
trimesh, scipy and pybullet already imported. ``import sim`` does not import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import scipy.spatial  # noqa: F401  (preloaded for the workers)
import trimesh  # noqa: F401  (preloaded for the workers)

from sim.config import StabilityConfig
from sim.mesh import MeshError, PreparedMesh, load_arrays, prepare_mesh
from sim.pybullet_backend import PybulletEngine, SimTimeout, import_pybullet
from sim.result import StabilityResult

import_pybullet()

# A task is (index, source, payload); payload is ("path", str), ("arrays", vertices, faces) or
# ("fault", kind) (a test hook that makes the worker crash or hang for real).
Task = tuple[int, str, tuple[Any, ...]]


def make_engine(config: StabilityConfig) -> Any:
    """The physics engine of ``config.backend`` (one per process, reused for every mesh)."""
    if config.backend == "mujoco":
        from sim.mujoco_backend import MujocoEngine

        return MujocoEngine()
    return PybulletEngine()


def score_task(task: Task, config: StabilityConfig, engine: Any) -> StabilityResult:
    """Load, prepare and simulate one input; every failure becomes an invalid result."""
    index, source, payload = task
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = started + config.timeout_s
    prep: PreparedMesh | None = None
    try:
        if payload[0] == "path":
            vertices, faces = load_arrays(payload[1])
        elif payload[0] == "arrays":
            vertices, faces = payload[1], payload[2]
        elif payload[0] == "fault":
            vertices, faces = _inject_fault(payload[1])
        else:
            raise ValueError(f"unknown task payload {payload[0]!r}")
        if time.perf_counter() > deadline:
            raise SimTimeout("reading the mesh took the whole budget")
        prep = prepare_mesh(vertices, faces, config, name=source)
        if time.perf_counter() > deadline:
            raise SimTimeout("mesh preparation took the whole budget")
        outcome = engine.simulate(prep, config, index, deadline)
    except MeshError as exc:
        return _invalid(index, source, exc.reason, str(exc), prep, config, started)
    except SimTimeout as exc:
        message = f"{source}: over the per-mesh limit timeout_s={config.timeout_s:g} ({exc})"
        return _invalid(index, source, "timeout", message, prep, config, started)
    except Exception as exc:  # a physics or library error must not stop the batch
        message = f"{source}: {type(exc).__name__}: {exc}"
        return _invalid(index, source, "sim_error", message, prep, config, started)
    return StabilityResult(
        index=index,
        source=source,
        valid=True,
        stable=bool(outcome.angle_deg < config.angle_threshold_deg),
        angle_deg=float(outcome.angle_deg),
        displacement=float(outcome.displacement),
        n_collision_parts=outcome.n_collision_parts,
        **_mesh_fields(prep, config),
        warnings=prep.warnings,
        wall_time_s=time.perf_counter() - started,
        cpu_time_s=time.process_time() - cpu_started,
    )


def _mesh_fields(prep: PreparedMesh | None, config: StabilityConfig) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "backend": config.backend,
        "collision": "hull" if config.backend == "mujoco" else config.collision,
    }
    if prep is not None:
        fields.update(
            mass_source=prep.mass_source,
            n_faces=prep.n_faces,
            n_components=prep.n_components,
            volume=prep.volume,
            mass=prep.mass,
            scale=prep.scale,
        )
    return fields


def _invalid(
    index: int,
    source: str,
    reason: str,
    message: str,
    prep: PreparedMesh | None,
    config: StabilityConfig,
    started: float,
) -> StabilityResult:
    return StabilityResult.invalid(
        index,
        source,
        reason,
        message,
        warnings=list(prep.warnings) if prep is not None else [],
        wall_time_s=time.perf_counter() - started,
        **_mesh_fields(prep, config),
    )


def _inject_fault(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Test hook: fail the way a broken physics engine would (see ``sim.batch.FaultInjection``)."""
    if kind == "segfault":
        ctypes.string_at(0)  # a real SIGSEGV
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "exit":
        os._exit(3)
    raise RuntimeError(f"injected fault {kind!r}")


def worker_main(conn: Any, config: StabilityConfig, parent_pid: int | None = None) -> None:
    """Worker loop: create one physics client, then score tasks until told to stop.

    ``parent_pid`` is the scoring process: the worker exits as soon as it is gone, however it ended
    (see :func:`exit_with_parent`). Ctrl-C is left to the parent, which stops the workers itself;
    a worker interrupted mid-mesh would otherwise look like a crash on that mesh.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    with contextlib.suppress(OSError):  # the engines print to C-level stdout; keep the CLI clean
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    try:
        engine = make_engine(config)
    except BaseException:
        conn.send(("fatal", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):
                break
            if task is None:
                break
            conn.send(("result", task[0], score_task(task, config, engine)))
    finally:
        engine.close()
        conn.close()


# --------------------------------------------------------------------------------------------------
# leaving with the parent
# --------------------------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 0.2
ORPHAN_EXIT_CODE = 75


def exit_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """End this process when ``parent_pid`` dies, even by SIGKILL (which runs no clean-up there).

    Two mechanisms, because neither covers every case alone. Everywhere, a daemon thread checks
    every ``poll_s`` seconds whether we were re-parented or ``parent_pid`` is gone; it needs the
    GIL, so a long C call (VHACD) delays it. On Linux the kernel also sends SIGKILL when our parent
    process exits (``prctl(PR_SET_PDEATHSIG)``), which does not wait for anything. With the
    forkserver start method that parent is the fork server, which exits once every holder of its
    "alive" pipe is gone; forkserver children inherit that pipe (to start processes of their own,
    which a worker never does), so the worker closes its copy and the server exits with the
    scoring process.
    """
    ppid = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        _release_forkserver()
    threading.Thread(
        target=_watch_parent, args=(parent_pid, ppid, poll_s), name="sim-parent-watch", daemon=True
    ).start()


def _release_forkserver() -> None:
    """Close this process's copy of the fork server's "alive" pipe (multiprocessing internals:
    ``forkserver._forkserver._forkserver_alive_fd``; nothing is done if they change)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive_fd, int):
        with contextlib.suppress(OSError):
            os.close(alive_fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def _watch_parent(parent_pid: int, ppid: int, poll_s: float) -> None:
    while os.getppid() == ppid and process_alive(parent_pid):
        time.sleep(poll_s)
    os._exit(ORPHAN_EXIT_CODE)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no procfs (not Linux): trust kill(0)
    return state not in ("Z", "X")

"""Stability-scoring throughput: our pybullet protocol vs DSO's MuJoCo protocol, side by side.

    python -m benchmarks.bench_sim [--n 200] [--workers 2] [--decomp-n 24]
    python -m benchmarks.bench_sim --executors [--n 200] [--workers 2]   # Ray vs the process pool

Meshes: procedural objects with analytic stability (``sim.shapes``: boxes, tables, towers with
overhang, L-shapes, cones on base and tip), voxelised and re-meshed with marching cubes into
watertight meshes of at most ``--max-faces`` faces, like a voxel/latent 3D generator's output. The
ground truth is re-derived from each re-meshed mesh (exact centre of mass, footprint at z = 0); only
objects at least 3 degrees from the tipping boundary (and, if unstable, able to fall at least 30
degrees) are kept.

Every protocol scores the same meshes, passed in memory as (vertices, faces), through the same
``sim.score_meshes`` pool with the same number of workers, so differences come from the physics
protocol, not from the plumbing:

- ours: pybullet, 2 s at 240 Hz, convex hull (the default), VHACD or CoACD decomposition;
- DSO (Li et al. 2025, arXiv 2503.22677): MuJoCo, 10 s at 1 ms, hull collision, density 1000,
  MuJoCo's default ('legacy') mesh inertia; also with exact inertia.

Reported per protocol: wall time and meshes/s (including the start of the worker processes; the
forkserver is warmed up first), CPU milliseconds per mesh summed over the workers (independent of
other load on shared cores), agreement with the analytic labels, and invalid results. Then the
throughput ratios to the DSO protocol, label agreement with it, and a physics-only comparison
(engine time per mesh, prepared meshes, one process).

``--executors`` instead scores the same meshes with the default protocol on the process pool and on
Ray actors (a local Ray instance with ``--workers`` CPUs, started before the clock starts; its start
time is printed apart), side by side with the ratio: the cost of Ray's plumbing on one machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec

import sim
from sim import StabilityConfig, shapes

MIN_MARGIN_DEG = 3.0
MIN_FALL_DEG = 30.0


@dataclass
class Run:
    name: str
    n: int
    wall_s: float
    cpu_ms: float
    agreement: float
    invalid: int
    labels: list[bool | None]

    @property
    def rate(self) -> float:
        return self.n / self.wall_s


def _remesh(args: tuple[int, int, int]) -> shapes.ShapeSample | None:
    """One generator-like mesh: a procedural object re-meshed below ``max_faces`` faces."""
    seed, index, max_faces = args
    kind = shapes.KINDS[index % len(shapes.KINDS)]
    sample = shapes.random_shapes(
        1,
        seed=seed * 100_003 + index,
        kinds=(kind,),
        min_margin_deg=MIN_MARGIN_DEG,
        min_fall_deg=MIN_FALL_DEG,
    )[0]
    for resolution in (32, 26, 20):
        remeshed = shapes.voxel_remesh(sample, resolution)
        if len(remeshed.faces) <= max_faces:
            break
    else:
        return None
    if abs(remeshed.margin_deg) < MIN_MARGIN_DEG:
        return None
    if not remeshed.stable and remeshed.fall_angle_deg < MIN_FALL_DEG:
        return None
    return remeshed


def make_meshes(n: int, seed: int, max_faces: int, workers: int) -> list[shapes.ShapeSample]:
    meshes: list[shapes.ShapeSample] = []
    index = 0
    with ProcessPoolExecutor(max(workers, 1)) as pool:
        while len(meshes) < n:
            batch = [(seed, index + i, max_faces) for i in range(n - len(meshes) + 8)]
            index += len(batch)
            meshes += [m for m in pool.map(_remesh, batch) if m is not None]
    return meshes[:n]


def score(
    name: str, meshes: list[shapes.ShapeSample], config: StabilityConfig, workers: int, items=None
) -> Run:
    items = items if items is not None else [(m.vertices, m.faces) for m in meshes]
    started = time.perf_counter()
    results = sim.score_meshes(items, config, workers=workers)
    wall = time.perf_counter() - started
    cpu = sum(r.cpu_time_s or 0.0 for r in results) / len(results) * 1e3
    agree = sum(r.stable == m.stable for r, m in zip(results, meshes)) / len(meshes)
    invalid = sum(not r.valid for r in results)
    return Run(name, len(meshes), wall, cpu, agree, invalid, [r.stable for r in results])


def physics_only(meshes: list[shapes.ShapeSample], config: StabilityConfig) -> float:
    """Median engine time per mesh (ms) on prepared meshes, in this process."""
    from sim.mesh import prepare_mesh
    from sim.worker import make_engine

    engine = make_engine(config)
    times = []
    try:
        for i, m in enumerate(meshes):
            prep = prepare_mesh(m.vertices, m.faces, config)
            started = time.perf_counter()
            engine.simulate(prep, config, i, float("inf"))
            times.append(time.perf_counter() - started)
    finally:
        engine.close()
    return statistics.median(times) * 1e3


def executors(meshes: list[shapes.ShapeSample], workers: int) -> None:
    """meshes/s of the process pool and of Ray actors on the same meshes, same protocol and workers."""
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    ray_config = StabilityConfig(executor="ray")
    try:
        pool = score("process pool (executor='process')", meshes, StabilityConfig(), workers)
        on_ray = score("Ray actors (executor='ray')", meshes, ray_config, workers)
        # a batch of one mesh per worker: mostly the fixed cost of a call (workers or actors starting)
        small = meshes[:workers]
        pool_small = score("pool, one mesh per worker", small, StabilityConfig(), workers)
        ray_small = score("Ray, one mesh per worker", small, ray_config, workers)
    finally:
        ray.shutdown()
    same = sum(a == b for a, b in zip(pool.labels, on_ray.labels)) / len(meshes)
    print()
    print(
        f"{'executor':36s} {'meshes':>6s} {'wall s':>7s} {'meshes/s':>9s} {'CPU ms/mesh':>12s} {'invalid':>8s}"
    )
    for r in (pool, on_ray):
        print(f"{r.name:36s} {r.n:6d} {r.wall_s:7.2f} {r.rate:9.1f} {r.cpu_ms:12.1f} {r.invalid:8d}")
    print(
        f"Ray / pool throughput x{on_ray.rate / pool.rate:.2f}; identical labels {100 * same:.1f}%; "
        f"starting the local Ray instance took {ray_start_s:.1f} s (not in the wall times; workers and "
        "actors start inside them)"
    )
    print(
        f"fixed cost of a call (a batch of {len(small)} meshes, one per worker): pool {pool_small.wall_s:.2f} s, "
        f"Ray {ray_small.wall_s:.2f} s; without it: pool "
        f"{(pool.n - pool_small.n) / max(pool.wall_s - pool_small.wall_s, 1e-9):.1f} meshes/s, Ray "
        f"{(on_ray.n - ray_small.n) / max(on_ray.wall_s - ray_small.wall_s, 1e-9):.1f} meshes/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="meshes for the hull and MuJoCo runs")
    parser.add_argument("--decomp-n", type=int, default=24, help="meshes for the VHACD and CoACD runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-faces", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--physics-n", type=int, default=20, help="meshes for the physics-only timing")
    parser.add_argument(
        "--executors",
        action="store_true",
        help="only compare the process pool with Ray (needs the 'ray' extra)",
    )
    args = parser.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    meshes = make_meshes(args.n, args.seed, args.max_faces, args.workers)
    faces = sorted(len(m.faces) for m in meshes)
    n_stable = sum(m.stable for m in meshes)
    print(
        f"meshes: {len(meshes)} marching-cubes meshes from sim.shapes ({n_stable} stable, {len(meshes) - n_stable} "
        f"unstable by analytic ground truth), faces min/median/max {faces[0]}/{faces[len(faces) // 2]}/{faces[-1]} "
        f"(built in {time.perf_counter() - started:.0f} s)"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {args.workers} workers, load average {load:.1f} at start "
        "(other jobs on shared cores lower meshes/s, not CPU ms/mesh)"
    )
    sim.score_meshes([(meshes[0].vertices, meshes[0].faces)] * 2, workers=args.workers)  # warm the forkserver
    if args.executors:
        executors(meshes, args.workers)
        return 0

    subset = meshes[: args.decomp_n]
    runs = [score("pybullet hull 2 s @ 240 Hz (ours, default)", meshes, StabilityConfig(), args.workers)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, m in enumerate(meshes):
            paths.append(os.path.join(tmp, f"mesh_{i:04d}.obj"))
            m.to_trimesh().export(paths[-1])
        runs.append(
            score("pybullet hull, from .obj files", meshes, StabilityConfig(), args.workers, items=paths)
        )
    runs.append(
        score("pybullet VHACD 2 s @ 240 Hz", subset, StabilityConfig(collision="vhacd"), args.workers)
    )
    if find_spec("coacd") is not None:
        runs.append(
            score("pybullet CoACD 2 s @ 240 Hz", subset, StabilityConfig(collision="coacd"), args.workers)
        )
    else:
        print("coacd not installed: CoACD run skipped (pip install coacd)")
    dso = None
    if find_spec("mujoco") is not None:
        dso = score(
            "MuJoCo DSO 10 s @ 1 ms (legacy inertia)", meshes, StabilityConfig(backend="mujoco"), args.workers
        )
        exact = StabilityConfig(backend="mujoco", mujoco_inertia="exact")
        runs += [dso, score("MuJoCo DSO 10 s @ 1 ms (exact inertia)", meshes, exact, args.workers)]
    else:
        print("mujoco not installed: DSO protocol skipped (pip install mujoco)")

    print()
    print(
        f"{'protocol':44s} {'meshes':>6s} {'wall s':>7s} {'meshes/s':>9s} {'CPU ms/mesh':>12s} {'agree truth':>12s} {'invalid':>8s}"
    )
    for r in runs:
        print(
            f"{r.name:44s} {r.n:6d} {r.wall_s:7.2f} {r.rate:9.1f} {r.cpu_ms:12.1f} {100 * r.agreement:11.1f}% {r.invalid:8d}"
        )
    if dso is not None:
        print()
        print("vs the DSO protocol (MuJoCo, legacy inertia), same meshes and workers:")
        for r in runs:
            if r is dso or r.n != dso.n:
                continue
            same = sum(a == b for a, b in zip(r.labels, dso.labels)) / r.n
            print(
                f"  {r.name:44s} throughput x{r.rate / dso.rate:5.1f}   CPU x{dso.cpu_ms / r.cpu_ms:5.1f}   "
                f"label agreement with DSO {100 * same:5.1f}%"
            )
        sample = meshes[: args.physics_n]
        ours = physics_only(sample, StabilityConfig())
        theirs = physics_only(sample, StabilityConfig(backend="mujoco"))
        print(
            f"physics only (engine time per prepared mesh, median of {len(sample)}, one process): "
            f"pybullet hull {ours:.1f} ms, MuJoCo DSO {theirs:.1f} ms, x{theirs / ours:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

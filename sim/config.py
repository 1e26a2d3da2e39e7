"""Typed configuration of the stability test.

Defaults follow the DSO stability protocol (Li et al. 2025, "DSO: Aligning 3D generators with
simulation feedback for physical soundness", arXiv 2503.22677): the object starts upright, touching
the ground, density 1000 kg/m^3, convex-hull collision, score = total rotation from the start pose,
stable if the rotation stays below 20 degrees. DSO runs MuJoCo for 10 s at 1 ms steps; our pybullet
default is 2 s at 240 Hz, which gives the same labels on our validation set at a fraction of the cost
(see ``docs/sim.md``). ``backend="mujoco"`` reproduces DSO's protocol exactly.

Load from YAML with ``key=value`` overrides through :func:`diffdpo.config.load_config`::

    cfg = load_config(StabilityConfig, "sim.yaml", ["collision=vhacd", "duration_s=4"])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

CollisionMode = Literal["hull", "vhacd", "coacd"]
Backend = Literal["pybullet", "mujoco"]
UpAxis = Literal["z", "y"]
MassFallback = Literal["hull", "voxel"]
StartMethod = Literal["forkserver", "spawn", "fork"]
Executor = Literal["process", "ray"]
MujocoInertia = Literal["legacy", "exact", "convex", "shell"]

# The DSO protocol, used by ``backend="mujoco"`` (Li et al. 2025, arXiv 2503.22677).
DSO_DURATION_S = 10.0
DSO_TIMESTEP_S = 0.001
DSO_ANGLE_THRESHOLD_DEG = 20.0
DSO_DENSITY = 1000.0


@dataclass
class StabilityConfig:
    """How a mesh is prepared and simulated. Every field has a ``help`` text; see ``docs/sim.md``."""

    # --- protocol -------------------------------------------------------------------------------
    backend: Backend = field(
        default="pybullet",
        metadata={
            "help": "physics engine: 'pybullet' (fast default) or 'mujoco' (DSO's exact protocol: "
            "10 s at 1 ms, hull collision; needs the 'mujoco' extra; ignores duration_s, hz, "
            "solver_iterations, friction, restitution, gravity, collision, drop_height and perturb_deg)"
        },
    )
    duration_s: float = field(default=2.0, metadata={"help": "simulated time in seconds (pybullet backend)"})
    hz: int = field(default=240, metadata={"help": "physics steps per simulated second (pybullet backend)"})
    solver_iterations: int = field(
        default=10,
        metadata={
            "help": "constraint-solver iterations per step (pybullet backend); Bullet's own default "
            "is 10, pybullet raises it to 50 for articulated robots, which one rigid body on a "
            "plane does not need"
        },
    )
    angle_threshold_deg: float = field(
        default=DSO_ANGLE_THRESHOLD_DEG,
        metadata={"help": "stable iff the total rotation from the start pose is below this (DSO: 20 deg)"},
    )
    density: float = field(
        default=DSO_DENSITY,
        metadata={"help": "uniform density in kg/m^3 used for mass and inertia (DSO: 1000)"},
    )
    friction: float = field(
        default=1.0,
        metadata={
            "help": "Coulomb friction coefficient of the object-ground contact, 1.0 as MuJoCo's "
            "default used by DSO (the ground's own coefficient is set to 1 so that pybullet's "
            "multiplicative combination yields exactly this value); rolling and spinning friction 0"
        },
    )
    restitution: float = field(
        default=0.0,
        metadata={"help": "restitution (bounciness) of the object-ground contact, 0 = no bounce"},
    )
    drop_height: float = field(
        default=0.0,
        metadata={
            "help": "gap in metres (after scale normalisation) between the lowest point and the "
            "ground at the start; 0 = touching the ground (the DSO protocol)"
        },
    )
    perturb_deg: float = field(
        default=0.0,
        metadata={
            "help": "initial tilt in degrees about a random horizontal axis through the centre of "
            "mass (seeded by `seed` and the input index); the angle is still measured from the "
            "upright pose. 0 = no perturbation (the DSO protocol)"
        },
    )
    mujoco_inertia: MujocoInertia = field(
        default="legacy",
        metadata={
            "help": "how MuJoCo infers mass and inertia from the mesh (backend='mujoco'): 'legacy' is "
            "MuJoCo's default and so DSO's (it overcounts the volume of concave meshes), 'exact' "
            "matches the mass properties of the pybullet backend, 'convex' uses the hull"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the perturbation axes"})
    gravity: float = field(default=9.81, metadata={"help": "gravitational acceleration in m/s^2"})

    # --- mesh preparation -----------------------------------------------------------------------
    collision: CollisionMode = field(
        default="hull",
        metadata={
            "help": "collision shape: 'hull' (convex hull, fast, DSO's choice), 'vhacd' (pybullet's "
            "convex decomposition, for concave objects) or 'coacd' (needs the 'coacd' extra)"
        },
    )
    up_axis: UpAxis = field(
        default="z",
        metadata={
            "help": "up axis of the input meshes: 'z' (used as is) or 'y' (glTF/TRELLIS convention, "
            "rotated +90 deg about x so that +y becomes +z)"
        },
    )
    normalize_scale: float | None = field(
        default=1.0,
        metadata={
            "help": "scale each mesh uniformly so that its largest bounding-box side is this many "
            "metres (generated meshes have arbitrary units; TRELLIS outputs fit a unit cube); "
            "null keeps the mesh units as metres"
        },
    )
    mass_fallback: MassFallback = field(
        default="hull",
        metadata={
            "help": "mass properties of a mesh that is not watertight (after hole filling): 'hull' "
            "(convex hull; fast, exact for convex objects) or 'voxel' (filled voxelisation; better "
            "centre of mass for concave objects, slower). The result reports which was used"
        },
    )
    voxel_pitch: float = field(
        default=0.02,
        metadata={"help": "voxel size as a fraction of the largest extent for mass_fallback='voxel'"},
    )
    max_hull_vertices: int = field(
        default=512,
        metadata={
            "help": "cap on collision hull vertices; larger hulls are reduced to their support "
            "points along this many directions (the lowest point is always kept)"
        },
    )
    vhacd_resolution: int = field(
        default=20000, metadata={"help": "voxel resolution of pybullet's VHACD (its own default: 100000)"}
    )
    vhacd_concavity: float = field(
        default=0.0025, metadata={"help": "VHACD maximum concavity per part (its default 0.0025)"}
    )
    coacd_threshold: float = field(
        default=0.1, metadata={"help": "CoACD concavity threshold (smaller = more parts, slower)"}
    )
    coacd_max_hulls: int = field(default=16, metadata={"help": "cap on the number of CoACD parts"})
    min_volume_ratio: float = field(
        default=1e-6,
        metadata={
            "help": "a mesh whose convex-hull volume is below this fraction of the cube of its "
            "largest bounding-box side is rejected as flat (zero volume)"
        },
    )

    # --- execution ------------------------------------------------------------------------------
    timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "per-mesh wall-clock limit in seconds (loading, preparation and simulation); a "
            "mesh over it is reported invalid with reason 'timeout' (worker killed if it hangs)"
        },
    )
    start_method: StartMethod = field(
        default="forkserver",
        metadata={
            "help": "multiprocessing start method of the worker pool; 'forkserver' (Linux) starts "
            "workers cheaply without inheriting the caller's threads; 'spawn' elsewhere"
        },
    )
    executor: Executor = field(
        default="process",
        metadata={
            "help": "where meshes are scored: 'process' (a pool of worker processes on this machine) "
            "or 'ray' (Ray actors on a local Ray instance or a cluster; needs the 'ray' extra); "
            "same results and guarantees"
        },
    )
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "executor='ray': the cluster to join ('auto', 'HOST:6379', 'ray://HOST:10001'); "
            "null = the Ray instance this process already joined, else a local one with one CPU per worker"
        },
    )

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"StabilityConfig.{name} must be a positive number, got {value!r}")

        def non_negative(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"StabilityConfig.{name} must be a number >= 0, got {value!r}")

        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"StabilityConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

        one_of("backend", ("pybullet", "mujoco"))
        one_of("collision", ("hull", "vhacd", "coacd"))
        one_of("up_axis", ("z", "y"))
        one_of("mass_fallback", ("hull", "voxel"))
        one_of("start_method", ("forkserver", "spawn", "fork"))
        one_of("mujoco_inertia", ("legacy", "exact", "convex", "shell"))
        one_of("executor", ("process", "ray"))
        if self.ray_address is not None and not (
            isinstance(self.ray_address, str) and self.ray_address.strip()
        ):
            raise ValueError(
                f"StabilityConfig.ray_address must be null or an address such as 'auto', got {self.ray_address!r}"
            )
        for name in (
            "duration_s",
            "hz",
            "density",
            "gravity",
            "timeout_s",
            "voxel_pitch",
            "vhacd_concavity",
            "coacd_threshold",
        ):
            positive(name)
        for name in ("friction", "restitution", "drop_height", "perturb_deg", "min_volume_ratio"):
            non_negative(name)
        if not 0 < self.angle_threshold_deg <= 180:
            raise ValueError(
                f"StabilityConfig.angle_threshold_deg must be in (0, 180], got {self.angle_threshold_deg!r}"
            )
        if self.restitution > 1:
            raise ValueError(f"StabilityConfig.restitution must be in [0, 1], got {self.restitution!r}")
        if self.perturb_deg >= 90:
            raise ValueError(f"StabilityConfig.perturb_deg must be below 90, got {self.perturb_deg!r}")
        if self.normalize_scale is not None:
            positive("normalize_scale")
        if self.voxel_pitch >= 0.5:
            raise ValueError(f"StabilityConfig.voxel_pitch must be below 0.5, got {self.voxel_pitch!r}")
        for name in ("hz", "solver_iterations", "max_hull_vertices", "vhacd_resolution", "coacd_max_hulls"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StabilityConfig.{name} must be a positive integer, got {value!r}")
        if self.max_hull_vertices < 8:
            raise ValueError(
                f"StabilityConfig.max_hull_vertices must be at least 8, got {self.max_hull_vertices!r}"
            )
        if self.duration_s * self.hz < 1:
            raise ValueError("StabilityConfig: duration_s * hz must give at least one physics step")

    @property
    def n_steps(self) -> int:
        """Number of physics steps of the pybullet drop test."""
        return max(1, round(self.duration_s * self.hz))

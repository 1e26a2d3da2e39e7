"""The pybullet drop test: one DIRECT-mode client, reused for every mesh a worker scores.

Protocol (DSO, Li et al. 2025, arXiv 2503.22677, with our faster default timing): the object starts
in its upright pose with its lowest point touching the ground (optionally raised by
``drop_height`` and tilted by ``perturb_deg``); gravity acts for ``duration_s`` at ``hz`` steps per
second; the score is the total rotation from the upright pose, ``2 * acos(|q_w|)`` of the relative
quaternion, and the horizontal displacement of the centre of mass.

pybullet facts this module relies on (checked with pybullet 3.2.7):

- a dynamic body with a triangle-mesh collision shape is treated as static concave geometry and
  falls through the ground, so the collision shape is a convex hull or a compound of convex parts;
- ``createMultiBody``'s ``basePosition`` is the link frame; we build the collision shape in the
  principal-axis frame centred at the centre of mass, so link frame = inertial frame;
- with ``useMaximalCoordinates=True`` (a plain rigid body, faster for one free body),
  ``changeDynamics(localInertiaDiagonal=...)`` zeroes the mass unless ``mass`` is passed with it;
- ``p.vhacd`` prints to the C-level stdout on every call and ``p.connect`` prints a banner on
  stderr, so file descriptors 1 and 2 are redirected around both.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.config import StabilityConfig
from sim.mesh import MeshError, PreparedMesh


class SimTimeout(Exception):
    """The per-mesh time budget ran out (raised between physics steps)."""


@dataclass
class SimOutcome:
    """Raw outcome of one simulation."""

    angle_deg: float
    displacement: float
    n_collision_parts: int


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Silence C-level writes to file descriptors 1 and 2 (pybullet's banner, VHACD's progress)."""
    sys.stdout.flush()
    sys.stderr.flush()
    _flush_c_stdout()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        _flush_c_stdout()  # C stdio may buffer the text; flush it while it still goes to /dev/null
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _flush_c_stdout() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


def import_pybullet() -> Any:
    """``import pybullet`` with C-level stdout silenced."""
    if "pybullet" in sys.modules:
        return sys.modules["pybullet"]
    with quiet_output():
        import pybullet
    return pybullet


def rotation_angle_deg(q_from: np.ndarray, q_to: np.ndarray) -> float:
    """Total rotation between two orientations, ``2 * acos(|q_w|)`` of ``q_to * q_from^-1``.

    The scalar part of the relative unit quaternion equals the 4D dot product of the two
    quaternions (any component order, as long as both use the same), so no multiplication is needed.
    DSO's score (Li et al. 2025, arXiv 2503.22677).
    """
    dot = abs(float(np.dot(np.asarray(q_from, np.float64), np.asarray(q_to, np.float64))))
    return math.degrees(2.0 * math.acos(min(1.0, dot)))


def start_pose(
    prep: PreparedMesh, config: StabilityConfig, index: int, contact_points: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start rotation (principal frame to world), start COM position, and the upright rotation.

    Upright = the input orientation, lowest point on z = 0. With ``perturb_deg`` the body is tilted
    about a random horizontal axis through its centre of mass (axis drawn from
    ``(config.seed, index)``) and lowered again so that it touches the ground; ``drop_height``
    then lifts it. ``contact_points`` (body frame) are the collision geometry's points that must
    touch the ground, by default the hull's (a decomposition's parts may reach slightly lower).
    """
    upright = prep.rotation
    rotation = upright
    if config.perturb_deg > 0:
        rng = np.random.default_rng([config.seed, index])
        phi = rng.uniform(0.0, 2.0 * np.pi)
        axis = np.array([np.cos(phi), np.sin(phi), 0.0])
        rotation = _axis_angle_matrix(axis, math.radians(config.perturb_deg)) @ upright
    points = prep.body_frame(prep.hull_points) if contact_points is None else contact_points
    lowest = float((points @ rotation.T)[:, 2].min())
    com = np.array([prep.com[0], prep.com[1], config.drop_height - lowest])
    return rotation, com, upright


def _axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def matrix_to_quat_xyzw(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) of a rotation matrix (pybullet's order; Shepperd's method)."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    q_arr = np.asarray(q)
    return q_arr / np.linalg.norm(q_arr)


class PybulletEngine:
    """A DIRECT-mode pybullet client that scores prepared meshes one after another.

    The ground plane persists; each mesh's body is removed after its test. pybullet cannot free a
    collision shape once a body used it, so the world is reset every ``RESET_EVERY`` meshes.
    """

    RESET_EVERY = 200

    def __init__(self) -> None:
        self.p = import_pybullet()
        with quiet_output():  # pybullet prints its build-time banner on the first connect
            self.client = self.p.connect(self.p.DIRECT)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="sim-pybullet-")
        self._counter = 0
        self._since_reset = self.RESET_EVERY

    def close(self) -> None:
        """Disconnect the client and remove temporary files."""
        with contextlib.suppress(Exception):
            self.p.disconnect(physicsClientId=self.client)
        self._tmpdir.cleanup()

    def _prepare_world(self, config: StabilityConfig) -> None:
        p, cid = self.p, self.client
        if self._since_reset >= self.RESET_EVERY:
            p.resetSimulation(physicsClientId=cid)
            ground = p.createMultiBody(
                0, p.createCollisionShape(p.GEOM_PLANE, physicsClientId=cid), physicsClientId=cid
            )
            # pybullet multiplies the two bodies' coefficients: the ground's 1.0 keeps the config's
            p.changeDynamics(ground, -1, lateralFriction=1.0, restitution=1.0, physicsClientId=cid)
            self._since_reset = 0
        self._since_reset += 1
        p.setGravity(0, 0, -config.gravity, physicsClientId=cid)
        p.setPhysicsEngineParameter(
            fixedTimeStep=1.0 / config.hz,
            numSolverIterations=config.solver_iterations,
            physicsClientId=cid,
        )

    def simulate(
        self, prep: PreparedMesh, config: StabilityConfig, index: int, deadline: float
    ) -> SimOutcome:
        """Drop-test one prepared mesh; raise :class:`SimTimeout` past ``deadline`` (perf_counter)."""
        p, cid = self.p, self.client
        self._prepare_world(config)
        shape, n_parts, contact_points = self._collision_shape(prep, config, deadline)
        rotation, com, upright = start_pose(prep, config, index, contact_points)
        body = p.createMultiBody(
            baseMass=prep.mass,
            baseCollisionShapeIndex=shape,
            basePosition=com.tolist(),
            baseOrientation=matrix_to_quat_xyzw(rotation).tolist(),
            useMaximalCoordinates=True,
            physicsClientId=cid,
        )
        try:
            p.changeDynamics(
                body,
                -1,
                mass=prep.mass,  # must accompany localInertiaDiagonal for maximal-coordinate bodies
                localInertiaDiagonal=prep.inertia_diag.tolist(),
                lateralFriction=config.friction,
                restitution=config.restitution,
                rollingFriction=0.0,
                spinningFriction=0.0,
                linearDamping=0.0,
                angularDamping=0.0,
                physicsClientId=cid,
            )
            self._step(config, deadline)
            position, orientation = p.getBasePositionAndOrientation(body, physicsClientId=cid)
        finally:
            p.removeBody(body, physicsClientId=cid)
        if not (np.isfinite(position).all() and np.isfinite(orientation).all()):
            raise FloatingPointError("the simulation diverged (non-finite pose)")
        angle = rotation_angle_deg(matrix_to_quat_xyzw(upright), np.asarray(orientation))
        displacement = float(math.hypot(position[0] - com[0], position[1] - com[1]))
        return SimOutcome(angle, displacement, n_parts)

    def _step(self, config: StabilityConfig, deadline: float) -> None:
        step, cid = self.p.stepSimulation, self.client
        n_steps = config.n_steps
        for start in range(0, n_steps, 120):
            if time.perf_counter() > deadline:
                raise SimTimeout(f"simulation not finished after {start} of {n_steps} steps")
            for _ in range(min(120, n_steps - start)):
                step(physicsClientId=cid)

    # ---------------------------------------------------------------------------------------------

    def _collision_shape(
        self, prep: PreparedMesh, config: StabilityConfig, deadline: float
    ) -> tuple[int, int, np.ndarray]:
        """Collision shape id, number of convex parts, and its points in the body frame."""
        p, cid = self.p, self.client
        if config.collision == "hull":
            points = prep.body_frame(prep.hull_points)
            shape = p.createCollisionShape(p.GEOM_MESH, vertices=points.tolist(), physicsClientId=cid)
            return shape, 1, points
        self._counter += 1
        stem = os.path.join(self._tmpdir.name, f"{os.getpid()}_{self._counter}")
        # decompose in the upright world frame (voxel grids aligned with the object's own axes
        # approximate flat bottoms far better than in the principal-axis frame), then move the
        # parts into the body frame
        if config.collision == "vhacd":
            parts = read_obj_parts(self._vhacd(prep.vertices, prep.faces, stem, config))
        else:
            parts = coacd_parts(prep.vertices, prep.faces, config)
        parts = [(prep.body_frame(v), f) for v, f in parts if len(v) >= 4]
        if not parts:
            raise MeshError("decomposition_error", f"{config.collision} produced no convex parts")
        parts_file = stem + "_parts.obj"
        write_parts_obj(parts_file, parts)
        n_parts, points = len(parts), np.concatenate([v for v, _ in parts])
        if time.perf_counter() > deadline:
            raise SimTimeout(f"{config.collision} decomposition finished after the deadline")
        # an OBJ with several objects loads as a compound of convex hulls, one per object
        shape = p.createCollisionShape(p.GEOM_MESH, fileName=parts_file, physicsClientId=cid)
        if shape < 0:
            raise MeshError("decomposition_error", f"pybullet could not load the {config.collision} parts")
        return shape, n_parts, points

    def _vhacd(self, vertices: np.ndarray, faces: np.ndarray, stem: str, config: StabilityConfig) -> str:
        src, dst, log = stem + ".obj", stem + "_vhacd.obj", stem + "_vhacd.log"
        write_parts_obj(src, [(vertices, faces)])
        with quiet_output():
            self.p.vhacd(
                src,
                dst,
                log,
                resolution=config.vhacd_resolution,
                concavity=config.vhacd_concavity,
                physicsClientId=self.client,
            )
        if not os.path.exists(dst):
            raise MeshError("decomposition_error", "VHACD wrote no output")
        return dst


def coacd_parts(
    vertices: np.ndarray, faces: np.ndarray, config: StabilityConfig
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Convex parts from CoACD (Wei et al. 2022), settings tuned for speed over detail."""
    try:
        import coacd
    except ImportError as exc:  # checked before the batch starts; this is a safety net
        raise MeshError("decomposition_error", "collision='coacd' needs `pip install coacd`") from exc
    coacd.set_log_level("error")
    try:
        parts = coacd.run_coacd(
            coacd.Mesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int64)),
            threshold=config.coacd_threshold,
            max_convex_hull=config.coacd_max_hulls,
            preprocess_mode="off",  # the mesh is already oriented; CoACD's remeshing is slow
            resolution=1000,
            mcts_iterations=50,
            mcts_max_depth=2,
            mcts_nodes=10,
            seed=config.seed,
        )
    except Exception as exc:
        raise MeshError("decomposition_error", f"CoACD failed: {exc}") from exc
    parts = [(np.asarray(v, np.float64), np.asarray(f, np.int64)) for v, f in parts if len(v) >= 4]
    if not parts:
        raise MeshError("decomposition_error", "CoACD produced no convex parts")
    return parts


def write_parts_obj(path: str, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write meshes as the objects (``o part_i``) of one OBJ file."""
    chunks: list[str] = []
    offset = 1
    for i, (vertices, faces) in enumerate(parts):
        chunks.append(f"o part_{i}\n")
        chunks.append("".join(f"v {x:.9g} {y:.9g} {z:.9g}\n" for x, y, z in vertices))
        chunks.append("".join(f"f {a + offset} {b + offset} {c + offset}\n" for a, b, c in faces))
        offset += len(vertices)
    with open(path, "w") as fh:
        fh.write("".join(chunks))


def read_obj_parts(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The objects (``o`` blocks) of an OBJ file as (vertices, faces) with 0-based local indices."""
    parts: list[tuple[list[str], list[list[int]]]] = []
    vertices: list[str] = []
    faces: list[list[int]] = []
    offset = 0  # OBJ indices are global and 1-based
    with open(path) as fh:
        for line in fh:
            if line.startswith("o "):
                if vertices:
                    parts.append((vertices, faces))
                    offset += len(vertices)
                vertices, faces = [], []
            elif line.startswith("v "):
                vertices.append(line[2:])
            elif line.startswith("f "):
                faces.append([int(tok.split("/")[0]) - 1 - offset for tok in line.split()[1:4]])
    if vertices:
        parts.append((vertices, faces))
    return [
        (np.loadtxt(v, dtype=np.float64, ndmin=2)[:, :3], np.asarray(f, dtype=np.int64).reshape(-1, 3))
        for v, f in parts
    ]

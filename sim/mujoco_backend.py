"""DSO's stability protocol in MuJoCo (Li et al. 2025, arXiv 2503.22677), for comparison.

The object is one free body whose single geom is the mesh (MuJoCo collides meshes as their convex
hull), density 1000, placed upright with its lowest point on the ground plane (not dropped);
10 s of simulation at 1 ms steps with MuJoCo's default contact and friction settings; score =
total rotation from the start pose ``2 * acos(|q_w|)``, stable if below 20 degrees. Mass and inertia
are inferred by MuJoCo from the mesh (``config.mujoco_inertia``, by default MuJoCo's own default
``legacy``, which is what DSO's code gets). The model is built in memory: the mesh travels as a
binary MSH asset, no file is written.

Needs the ``mujoco`` extra (``pip install mujoco``).
"""

from __future__ import annotations

import math
import struct
import time
from typing import Any

import numpy as np

from sim.config import DSO_DURATION_S, DSO_TIMESTEP_S, StabilityConfig
from sim.mesh import PreparedMesh
from sim.pybullet_backend import SimOutcome, SimTimeout, rotation_angle_deg


def msh_bytes(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """MuJoCo's binary MSH format: 4 int32 counts (vertices, normals, texcoords, faces), then data."""
    v = np.ascontiguousarray(vertices, dtype="<f4")
    f = np.ascontiguousarray(faces, dtype="<i4")
    return struct.pack("<4i", len(v), 0, 0, len(f)) + v.tobytes() + f.tobytes()


def dso_mjcf(density: float, inertia: str, timestep_s: float = DSO_TIMESTEP_S) -> str:
    """The MJCF of DSO's scene: a ground plane and one free body made of the mesh ``obj.msh``."""
    return f"""<mujoco model="dso_stability">
  <option timestep="{timestep_s}" gravity="0 0 -9.81"/>
  <asset>
    <mesh name="obj" file="obj.msh" inertia="{inertia}"/>
  </asset>
  <worldbody>
    <geom name="ground" type="plane" size="0 0 1"/>
    <body name="obj">
      <freejoint/>
      <geom type="mesh" mesh="obj" density="{density}"/>
    </body>
  </worldbody>
</mujoco>"""


class MujocoEngine:
    """Scores prepared meshes with DSO's MuJoCo protocol."""

    def __init__(self) -> None:
        import mujoco

        self.mujoco: Any = mujoco

    def close(self) -> None:
        """Nothing to release (a model is built per mesh)."""

    def simulate(
        self, prep: PreparedMesh, config: StabilityConfig, index: int, deadline: float
    ) -> SimOutcome:
        """Run the DSO protocol on one prepared mesh (upright, lowest point on z = 0)."""
        mujoco = self.mujoco
        assets = {"obj.msh": msh_bytes(prep.vertices, prep.faces)}
        try:
            model = mujoco.MjModel.from_xml_string(dso_mjcf(config.density, config.mujoco_inertia), assets)
        except ValueError as exc:  # MuJoCo's compiler errors (e.g. mesh volume too small)
            raise RuntimeError(f"MuJoCo could not compile the mesh: {exc}") from exc
        data = mujoco.MjData(model)
        mujoco.mj_forward(model, data)
        body = 1  # world is body 0
        q_start = data.xquat[body].copy()  # (w, x, y, z)
        com_start = data.xipos[body].copy()
        n_steps = round(DSO_DURATION_S / DSO_TIMESTEP_S)
        for start in range(0, n_steps, 500):
            if time.perf_counter() > deadline:
                raise SimTimeout(f"simulation not finished after {start} of {n_steps} steps")
            mujoco.mj_step(model, data, nstep=min(500, n_steps - start))
        q_end = data.xquat[body]
        com_end = data.xipos[body]
        if not (np.isfinite(q_end).all() and np.isfinite(com_end).all()):
            raise FloatingPointError("the simulation diverged (non-finite pose)")
        angle = rotation_angle_deg(q_start, q_end)
        displacement = float(math.hypot(com_end[0] - com_start[0], com_end[1] - com_start[1]))
        return SimOutcome(angle, displacement, n_collision_parts=1)

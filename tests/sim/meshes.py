"""Small meshes built in code for the sim tests (no files shipped)."""

from __future__ import annotations

import numpy as np
import trimesh


def box(extents=(0.4, 0.4, 1.0), center=(0.0, 0.0, 0.5)) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents)
    mesh.apply_translation(center)
    return mesh


def leaning_tower() -> trimesh.Trimesh:
    """A post with a heavy block on top sticking out to +x: centre of mass outside the base."""
    post = box((0.2, 0.2, 1.0), (0.0, 0.0, 0.5))
    block = box((0.9, 0.3, 0.3), (0.5, 0.0, 1.15))
    return trimesh.util.concatenate([post, block])


def torus_arrays(n_u: int, n_v: int, major: float = 1.0, minor: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A closed torus lying flat, built directly as arrays (fast even at a million faces)."""
    u = np.linspace(0, 2 * np.pi, n_u, endpoint=False)
    v = np.linspace(0, 2 * np.pi, n_v, endpoint=False)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    ring = major + minor * np.cos(vv)
    verts = np.stack([ring * np.cos(uu), ring * np.sin(uu), minor * np.sin(vv)], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n_u), np.arange(n_v), indexing="ij")
    a, b = i * n_v + j, ((i + 1) % n_u) * n_v + j
    c, d = ((i + 1) % n_u) * n_v + (j + 1) % n_v, i * n_v + (j + 1) % n_v
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return verts, faces


def faulty_batch() -> list:
    """Three good meshes around one of each fault (segfault, hang, abrupt exit, exception): the batch the
    process-pool and Ray tests score to check isolation; the expected reasons are
    ``[None, "crash", None, "timeout", "crash", "sim_error", None]``."""
    from sim.batch import FaultInjection

    return [box(), FaultInjection("segfault"), leaning_tower(), FaultInjection("hang"), FaultInjection("exit"),
            FaultInjection("raise"), box()]

"""Procedural objects whose static stability is known analytically, to validate the scorer.

An object resting on the ground in its start pose is in stable equilibrium iff the vertical
projection of its centre of mass lies inside the convex hull of its ground contact (the support
polygon). The signed distance ``d`` of the projected centre of mass to the polygon's boundary
(positive inside) and the height ``h`` of the centre of mass give the *tipping margin*
``atan2(d, h)``: for a stable object the tilt it survives, for an unstable one its initial lean.

DSO (Li et al. 2025, arXiv 2503.22677) labels an object unstable when it rotates by 20 degrees or
more, which an unstable object does only if it can fall that far: a one-legged wide table may tip
by 15 degrees and come to rest on the edge of its top. ``fall_angle_deg`` is the rotation about the
tipping edge at which the object first touches the ground again; the validation keeps unstable
objects whose fall angle clears the threshold.

Each generator builds a z-up object from simple solids (boxes, oblique frustums and cones) that
touch but do not overlap, so the centre of mass is exact (volume-weighted mean of the parts' known
centroids) and the triangle mesh is closed. :func:`voxel_remesh` turns any of them into a
marching-cubes mesh of a few thousand faces, like a generator's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

KINDS = ("box", "table", "tower", "l_shape", "cone_base", "cone_tip")


@dataclass
class ShapeSample:
    """A procedural object and its analytic stability."""

    kind: str
    vertices: np.ndarray  # (V, 3), z-up, lowest point on z = 0
    faces: np.ndarray  # (F, 3), outward-facing
    com: np.ndarray  # (3,), exact centre of mass at uniform density
    stable: bool  # static stability of the upright start pose
    margin_deg: float  # signed tipping margin: > 0 tilt survived, < 0 initial lean
    fall_angle_deg: float  # rotation to the next ground contact when tipping (nan if stable)

    def to_trimesh(self):  # noqa: ANN201  (trimesh is imported lazily)
        """The object as a ``trimesh.Trimesh`` (not processed, so vertices stay as built)."""
        import trimesh

        return trimesh.Trimesh(self.vertices, self.faces, process=False)


# --------------------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------------------


def support_distance(point_xy: np.ndarray, footprint_xy: np.ndarray) -> tuple[float, np.ndarray]:
    """Signed distance from a point to the convex hull of footprint points (> 0 inside) and the
    nearest point of the hull's boundary. Handles degenerate footprints (a point, a segment)."""
    from scipy.spatial import ConvexHull, QhullError

    point = np.asarray(point_xy, dtype=np.float64)
    pts = np.unique(np.round(np.asarray(footprint_xy, dtype=np.float64), 12), axis=0)
    try:
        hull = ConvexHull(pts)
        ring = pts[hull.vertices]
        inside = bool((hull.equations[:, :2] @ point + hull.equations[:, 2] <= 0).all())
    except (QhullError, ValueError):  # fewer than 3 points or collinear: point or segment
        inside = False
        if len(pts) == 1:
            ring = pts
        else:
            axis = pts[-1] - pts[0]
            t = pts @ axis
            ring = pts[[int(t.argmin()), int(t.argmax())]]
    best, nearest = math.inf, ring[0]
    for a, b in zip(ring, np.roll(ring, -1, axis=0)):
        ab = b - a
        denom = float(ab @ ab)
        t = 0.0 if denom == 0 else min(1.0, max(0.0, float((point - a) @ ab) / denom))
        q = a + t * ab
        dist = float(np.linalg.norm(point - q))
        if dist < best:
            best, nearest = dist, q
    return (best if inside else -best), nearest


def analyse(vertices: np.ndarray, com: np.ndarray, ground_tol: float = 1e-6) -> tuple[bool, float, float]:
    """``(stable, margin_deg, fall_angle_deg)`` of an object resting on z = min(vertices[:, 2])."""
    vertices = np.asarray(vertices, dtype=np.float64)
    com = np.asarray(com, dtype=np.float64)
    z0 = vertices[:, 2].min()
    extent = float(np.ptp(vertices, axis=0).max())
    footprint = vertices[vertices[:, 2] <= z0 + ground_tol * extent]
    height = float(com[2] - z0)
    distance, nearest = support_distance(com[:2], footprint[:, :2])
    margin = math.degrees(math.atan2(distance, height))
    if distance > 0:
        return True, margin, float("nan")
    lean = com[:2] - nearest
    u = lean / max(float(np.linalg.norm(lean)), 1e-15)
    s = (vertices[:, :2] - nearest) @ u  # horizontal distance beyond the tipping edge
    z = vertices[:, 2] - z0
    beyond = s > 1e-9 * extent
    fall = float(np.degrees(np.arctan2(z[beyond], s[beyond])).min()) if beyond.any() else 90.0
    return False, margin, fall


# --------------------------------------------------------------------------------------------------
# solids
# --------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    vertices: np.ndarray
    faces: np.ndarray
    volume: float
    centroid: np.ndarray


def _box(lo: Sequence[float], hi: Sequence[float]) -> _Part:
    lo_, hi_ = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=np.float64)
    vertices = lo_ + corners * (hi_ - lo_)
    # vertex index = 4x + 2y + z; outward-facing triangles
    faces = np.array(
        [
            [0, 1, 3], [0, 3, 2],  # x = lo
            [4, 6, 7], [4, 7, 5],  # x = hi
            [0, 4, 5], [0, 5, 1],  # y = lo
            [2, 3, 7], [2, 7, 6],  # y = hi
            [0, 2, 6], [0, 6, 4],  # z = lo
            [1, 5, 7], [1, 7, 3],  # z = hi
        ]
    )  # fmt: skip
    return _Part(vertices, faces, float(np.prod(hi_ - lo_)), (lo_ + hi_) / 2)


def _frustum(r0: float, r1: float, top_xy: Sequence[float], height: float, n: int = 24) -> _Part:
    """An oblique frustum: an n-gon of circumradius ``r0`` centred at the origin on z = 0, lofted
    linearly to an n-gon of radius ``r1`` centred at ``(top_xy, height)``; a radius of 0 makes a
    cone apex. Cross-sections are similar n-gons, so the centroid sits at the area-weighted mean
    height fraction ``s_bar`` along the axis from the bottom centre to the top centre."""
    angles = 2 * np.pi * np.arange(n) / n
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    top = np.array([top_xy[0], top_xy[1], height], dtype=np.float64)
    bottom_ring = np.column_stack([r0 * ring, np.zeros(n)]) if r0 > 0 else np.zeros((1, 3))
    top_ring = np.column_stack([r1 * ring, np.zeros(n)]) + top if r1 > 0 else top[None]
    vertices = [bottom_ring, top_ring]
    nb, nt = len(bottom_ring), len(top_ring)
    faces: list[list[int]] = []
    for i in range(n):
        j = (i + 1) % n
        b_i, b_j = (i, j) if nb > 1 else (0, 0)
        t_i, t_j = (nb + i, nb + j) if nt > 1 else (nb, nb)
        if nb > 1:
            faces.append([b_i, b_j, t_j if nt > 1 else t_i])
        if nt > 1:
            faces.append([b_i if nb > 1 else b_j, t_j, t_i])
    centre_index = nb + nt
    if nb > 1:  # bottom cap, facing down
        vertices.append(np.zeros((1, 3)))
        faces += [[centre_index, (i + 1) % n, i] for i in range(n)]
        centre_index += 1
    if nt > 1:  # top cap, facing up
        vertices.append(top[None])
        faces += [[centre_index, nb + i, nb + (i + 1) % n] for i in range(n)]
    a, b = r0, r1 - r0
    area_integral = a * a + a * b + b * b / 3  # integral of r(s)^2 over s in [0, 1]
    moment_integral = a * a / 2 + 2 * a * b / 3 + b * b / 4  # integral of s r(s)^2
    s_bar = moment_integral / area_integral
    polygon_area = 0.5 * n * math.sin(2 * math.pi / n)  # unit-circumradius n-gon
    volume = polygon_area * height * area_integral
    return _Part(np.concatenate(vertices), np.asarray(faces), volume, s_bar * top)


def _assemble(kind: str, parts: list[_Part]) -> ShapeSample:
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    vertices = np.concatenate([p.vertices for p in parts])
    faces = np.concatenate([p.faces + o for p, o in zip(parts, offsets)])
    volumes = np.array([p.volume for p in parts])
    com = (volumes[:, None] * np.stack([p.centroid for p in parts])).sum(axis=0) / volumes.sum()
    stable, margin, fall = analyse(vertices, com)
    return ShapeSample(kind, vertices, faces, com, stable, margin, fall)


# --------------------------------------------------------------------------------------------------
# generators: each takes a numpy Generator and returns a ShapeSample
# --------------------------------------------------------------------------------------------------


def make_box(rng: np.random.Generator) -> ShapeSample:
    """A box on one face: always stable."""
    w, d, h = rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.5)
    return _assemble("box", [_box((-w / 2, -d / 2, 0), (w / 2, d / 2, h))])


def make_table(rng: np.random.Generator) -> ShapeSample:
    """A slab on 1-4 legs at random places under it; the top may overhang the legs' footprint."""
    width, depth = rng.uniform(0.5, 1.5), rng.uniform(0.4, 1.2)
    height, thickness = rng.uniform(0.4, 1.2), rng.uniform(0.05, 0.25)
    leg = rng.uniform(0.05, 0.15)
    n_legs = int(rng.integers(1, 5))
    x_lo, x_hi = -width / 2 + 1e-3, width / 2 - leg - 1e-3
    y_lo, y_hi = -depth / 2 + 1e-3, depth / 2 - leg - 1e-3
    if n_legs == 4 and rng.uniform() < 0.5:  # a regular table, legs near the corners
        inset = rng.uniform(0.0, 0.3)
        xs = [x_lo + inset * (x_hi - x_lo), x_hi - inset * (x_hi - x_lo)]
        ys = [y_lo + inset * (y_hi - y_lo), y_hi - inset * (y_hi - y_lo)]
        corners = [(x, y) for x in xs for y in ys]
    else:
        corners = [(rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)) for _ in range(n_legs)]
    parts = [_box((-width / 2, -depth / 2, height), (width / 2, depth / 2, height + thickness))]
    parts += [_box((x, y, 0.0), (x + leg, y + leg, height)) for x, y in corners]
    return _assemble("table", parts)


def make_tower(rng: np.random.Generator) -> ShapeSample:
    """2-6 stacked blocks, each shifted on the one below (overhangs)."""
    parts: list[_Part] = []
    z, cx, cy = 0.0, 0.0, 0.0
    prev = None
    for _ in range(int(rng.integers(2, 7))):
        w, d, h = rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.4)
        if prev is not None:
            cx += rng.uniform(-0.9, 0.9) * prev[0]
            cy += rng.uniform(-0.9, 0.9) * prev[1]
        parts.append(_box((cx - w / 2, cy - d / 2, z), (cx + w / 2, cy + d / 2, z + h)))
        z += h
        prev = (w, d)
    return _assemble("tower", parts)


def make_l_shape(rng: np.random.Generator) -> ShapeSample:
    """A post with a horizontal arm on one side: a cantilever (arm in the air) or an L lying on
    its long leg (arm on the ground)."""
    w, d, h = rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4), rng.uniform(0.5, 1.5)
    length, thickness = rng.uniform(0.2, 1.2), rng.uniform(0.1, 0.4) * h
    arm_d = d * rng.uniform(0.4, 0.9)
    arm_y = rng.uniform(-(d - arm_d) / 2, (d - arm_d) / 2)
    z_arm = 0.0 if rng.uniform() < 0.2 else rng.uniform(0.0, h - thickness)
    post = _box((-w / 2, -d / 2, 0.0), (w / 2, d / 2, h))
    arm = _box((w / 2, arm_y - arm_d / 2, z_arm), (w / 2 + length, arm_y + arm_d / 2, z_arm + thickness))
    return _assemble("l_shape", [post, arm])


def make_cone_base(rng: np.random.Generator) -> ShapeSample:
    """A cone or frustum standing on its base, with its top shifted sideways (oblique)."""
    r0 = rng.uniform(0.2, 0.5)
    r1 = 0.0 if rng.uniform() < 0.5 else rng.uniform(0.05, r0)
    angle = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.0, 6.0) * r0
    top = (shift * math.cos(angle), shift * math.sin(angle))
    return _assemble("cone_base", [_frustum(r0, r1, top, rng.uniform(0.3, 1.5))])


def make_cone_tip(rng: np.random.Generator) -> ShapeSample:
    """A cone standing on its apex (or on a small flat tip), its top shifted sideways."""
    r0 = 0.0 if rng.uniform() < 0.5 else rng.uniform(0.02, 0.12)
    r1 = rng.uniform(0.2, 0.6)
    angle = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.0, 1.0) * r1
    top = (shift * math.cos(angle), shift * math.sin(angle))
    return _assemble("cone_tip", [_frustum(r0, r1, top, rng.uniform(0.3, 1.2))])


GENERATORS: dict[str, Callable[[np.random.Generator], ShapeSample]] = {
    "box": make_box,
    "table": make_table,
    "tower": make_tower,
    "l_shape": make_l_shape,
    "cone_base": make_cone_base,
    "cone_tip": make_cone_tip,
}


def random_shapes(
    n: int,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    min_margin_deg: float = 0.0,
    min_fall_deg: float = 0.0,
    max_tries: int = 100_000,
) -> list[ShapeSample]:
    """``n`` objects drawn round-robin over ``kinds``, keeping only those at least
    ``min_margin_deg`` away from the stability boundary and, when unstable, falling at least
    ``min_fall_deg`` before touching the ground again."""
    unknown = set(kinds) - set(GENERATORS)
    if unknown:
        raise ValueError(f"unknown shape kinds {sorted(unknown)}; choose from {KINDS}")
    rng = np.random.default_rng(seed)
    samples: list[ShapeSample] = []
    for _ in range(max_tries):
        if len(samples) == n:
            return samples
        sample = GENERATORS[kinds[len(samples) % len(kinds)]](rng)
        if abs(sample.margin_deg) < min_margin_deg:
            continue
        if not sample.stable and sample.fall_angle_deg < min_fall_deg:
            continue
        samples.append(sample)
    if len(samples) == n:
        return samples
    raise RuntimeError(f"only {len(samples)} of {n} shapes pass the filters after {max_tries} tries")


def voxel_remesh(sample: ShapeSample, resolution: int = 40) -> ShapeSample:
    """The object voxelised on a ``resolution``-cell grid along its largest side and re-meshed with
    marching cubes (a watertight mesh of a few thousand faces, like a 3D generator's output).
    Stability is re-derived from the new mesh (its exact centre of mass and footprint)."""
    import trimesh
    from skimage import measure

    mesh = sample.to_trimesh()
    pitch = float(np.ptp(sample.vertices, axis=0).max()) / resolution
    grid = mesh.voxelized(pitch).fill()
    occupancy = np.pad(np.asarray(grid.matrix, dtype=np.float32), 1)
    verts, faces, _, _ = measure.marching_cubes(occupancy, level=0.5)
    verts = (verts - 1.0) * pitch + grid.translation  # grid index -> model coordinates
    out = trimesh.Trimesh(verts, faces, process=True)
    if out.volume < 0:
        out.invert()
    out.apply_translation([0.0, 0.0, -out.bounds[0, 2]])
    com = np.asarray(out.center_mass)
    stable, margin, fall = analyse(np.asarray(out.vertices), com, ground_tol=1e-4)
    return ShapeSample(
        sample.kind, np.asarray(out.vertices), np.asarray(out.faces), com, stable, margin, fall
    )

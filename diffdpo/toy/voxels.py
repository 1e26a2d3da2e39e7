"""The voxel-objects world: procedural furniture on a 16^3 occupancy grid, a fair share unstable.

Five classes (:data:`CLASSES`): table, stool, tower, lamp, shelf. Each object is built from boxes on a
grid indexed ``[z, y, x]`` (z up, the object resting on z = 0), with realistic variety (sizes, leg
counts and positions, pole and arm lengths) and failure modes that make a share of them physically
unstable: missing or clustered legs, overhanging tops, leaning towers, heavy lamp shades on small
bases, shallow top-heavy shelves. Stability of the grid object is known analytically (centre of mass
over the support polygon of the bottom layer, :func:`static_stability`); the learning signal of DSO
comes from the simulator (:func:`sim.score_meshes`) on the decoded mesh, as for any generator.

Decoding (:func:`occupancy_to_mesh`): threshold, keep the largest 26-connected component (floating
specks would otherwise widen the convex collision hull), pad, marching cubes (scikit-image) at level
0.5, z-up coordinates with one voxel = ``1 / GRID``. :func:`decoded_occupancy` is the same object as
a grid resting on z = 0: the one fidelity and size are measured on.

Fidelity and diversity (:class:`ShapeBank`): the cheat a stability reward invites is an object that
stops looking like its class (a solid block, a slab base under everything). We track
``fidelity`` = mean IoU with the nearest training object of the same class, ``recognisability`` =
how often the nearest training object (any class) is of the right class, and ``diversity`` = mean
pairwise ``1 - IoU`` among samples of one class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

GRID = 16
CLASSES: tuple[str, ...] = ("table", "stool", "tower", "lamp", "shelf")


# ------------------------------------------------------------------------------------------------
# building blocks


def _box(occ: np.ndarray, x: tuple[int, int], y: tuple[int, int], z: tuple[int, int]) -> None:
    """Fill the half-open box ``[x0, x1) x [y0, y1) x [z0, z1)`` (clipped to the grid)."""
    occ[max(z[0], 0):min(z[1], GRID), max(y[0], 0):min(y[1], GRID), max(x[0], 0):min(x[1], GRID)] = True


def _ri(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Integer uniform in ``[lo, hi]`` inclusive."""
    return int(rng.integers(lo, hi + 1))


def _centred(size: int) -> tuple[int, int]:
    lo = (GRID - size) // 2
    return lo, lo + size


# ------------------------------------------------------------------------------------------------
# classes: each maker draws a (possibly unstable) object of its class


def make_table(rng: np.random.Generator) -> np.ndarray:
    """A slab top on legs: four legs (2 in 5), legs missing on one side (2 in 5) or clustered under an
    overhang (1 in 5). 44% stand in simulation, within the other classes' 35-61% (the first world drew four
    legs 1 in 4 times: 27% stood, and tables were the weakest class of most DSO runs; docs/results/dso.md)."""
    occ = np.zeros((GRID,) * 3, dtype=bool)
    w, d = _ri(rng, 9, 14), _ri(rng, 6, 11)
    h, t, leg = _ri(rng, 5, 9), _ri(rng, 1, 2), 2
    x0, x1 = _centred(w)
    y0, y1 = _centred(d)
    _box(occ, (x0, x1), (y0, y1), (h, h + t))
    mode = rng.choice(["four", "four", "missing", "missing", "clustered"])
    inset = _ri(rng, 0, 2)
    xs, ys = [x0 + inset, x1 - inset - leg], [y0 + inset, y1 - inset - leg]
    corners = [(x, y) for x in xs for y in ys]
    if mode == "missing":  # only the legs of one side (or a single leg) remain
        side = _ri(rng, 0, 1)
        corners = [c for c in corners if c[0] == xs[side]][: _ri(rng, 1, 2)]
    elif mode == "clustered":  # legs pushed under one end, the top overhangs the other
        shift = _ri(rng, w // 2, w - 2)
        corners = [(min(x + shift, x1 - leg) if x == xs[0] else x, y) for x, y in corners]
    for x, y in corners:
        _box(occ, (x, x + leg), (y, y + leg), (0, h))
    return occ


def make_stool(rng: np.random.Generator) -> np.ndarray:
    """A small seat on three or four splayed legs or on a pillar; the pillar may lack a foot."""
    occ = np.zeros((GRID,) * 3, dtype=bool)
    s, h = _ri(rng, 5, 8), _ri(rng, 6, 11)
    x0, x1 = _centred(s)
    _box(occ, (x0, x1), (x0, x1), (h, h + 1))
    if rng.uniform() < 0.5:  # legs
        xs = [x0, x1 - 1]
        corners = [(x, y) for x in xs for y in xs]
        if rng.uniform() < 0.45:  # broken stool: legs only on one side
            corners = corners[: _ri(rng, 1, 2)]
        for x, y in corners:
            _box(occ, (x, x + 1), (y, y + 1), (0, h))
    else:  # central pillar, with a foot plate or without (then it balances on a thin post)
        p = _ri(rng, 1, 2)
        px = (GRID - p) // 2 + _ri(rng, -2, 2)
        _box(occ, (px, px + p), (px, px + p), (0, h))
        if rng.uniform() < 0.55:
            f = _ri(rng, 4, s)
            fx0, _ = _centred(f)
            _box(occ, (fx0, fx0 + f), (fx0, fx0 + f), (0, 1))
    return occ


def make_tower(rng: np.random.Generator) -> np.ndarray:
    """Stacked blocks; each may be shifted on the one below (a leaning, top-heavy tower falls)."""
    occ = np.zeros((GRID,) * 3, dtype=bool)
    n = _ri(rng, 3, 5)
    lean = rng.choice([0, 2, 3, 3]) * rng.choice([-1, 1])
    cx = cy = GRID // 2
    z = 0
    w = _ri(rng, 4, 8)
    for i in range(n):
        h = _ri(rng, 2, 4)
        if z + h > GRID:
            break
        if i > 0:
            cx += lean + _ri(rng, -1, 1)
            w = max(4, min(9, w + _ri(rng, 0, 2)))
        half = w // 2
        _box(occ, (cx - half, cx - half + w), (cy - half, cy - half + w), (z, z + h))
        z += h
    return occ


def make_lamp(rng: np.random.Generator) -> np.ndarray:
    """A base plate, a pole, an arm to one side and a heavy shade at its end."""
    occ = np.zeros((GRID,) * 3, dtype=bool)
    b = _ri(rng, 3, 7)
    bx0, bx1 = _centred(b)
    _box(occ, (bx0, bx1), (bx0, bx1), (0, 1))
    ph = _ri(rng, 9, 14)
    pole = GRID // 2 - 1
    _box(occ, (pole, pole + 2), (pole, pole + 2), (1, ph))
    arm = _ri(rng, 3, 7)
    _box(occ, (pole, pole + arm + 2), (pole, pole + 2), (ph - 2, ph))
    sw, sh = _ri(rng, 4, 6), _ri(rng, 3, 4)
    sx = pole + arm - sw // 2
    _box(occ, (sx, sx + sw), (pole - sw // 2, pole - sw // 2 + sw), (ph - sh, ph))
    return occ


def make_shelf(rng: np.random.Generator) -> np.ndarray:
    """A tall frame with shelves; shallow ones with a top box overhanging the front tip over."""
    occ = np.zeros((GRID,) * 3, dtype=bool)
    w, d, h = _ri(rng, 6, 12), _ri(rng, 2, 5), _ri(rng, 10, 15)
    x0, x1 = _centred(w)
    y0 = (GRID - d) // 2
    y1 = y0 + d
    _box(occ, (x0, x0 + 1), (y0, y1), (0, h))  # sides
    _box(occ, (x1 - 1, x1), (y0, y1), (0, h))
    _box(occ, (x0, x1), (y1 - 1, y1), (0, h))  # back
    for z in range(0, h, _ri(rng, 3, 4)):  # shelves
        _box(occ, (x0, x1), (y0, y1), (z, z + 1))
    _box(occ, (x0, x1), (y0, y1), (h - 1, h))
    if rng.uniform() < 0.7:  # a solid cabinet on top hanging over the front
        over = _ri(rng, 4, 7)
        _box(occ, (x0, x1), (y0 - over, y1), (h - _ri(rng, 3, 4), h))
    return occ


MAKERS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "table": make_table, "stool": make_stool, "tower": make_tower, "lamp": make_lamp, "shelf": make_shelf,
}


@dataclass
class VoxelObject:
    """One procedural object: its class and occupancy grid ``[z, y, x]`` (bool, GRID^3)."""

    label: int
    occupancy: np.ndarray

    @property
    def name(self) -> str:
        return CLASSES[self.label]


def make_objects(n_per_class: int, seed: int = 0, classes: Sequence[int] | None = None) -> list[VoxelObject]:
    """``n_per_class`` objects of each class (class-major order), seeded by ``(seed, class)``."""
    out = []
    for c in range(len(CLASSES)) if classes is None else classes:
        rng = np.random.default_rng([seed, c])
        out += [VoxelObject(c, MAKERS[CLASSES[c]](rng)) for _ in range(n_per_class)]
    return out


# ------------------------------------------------------------------------------------------------
# analytic stability of a grid object (validation of the world; training uses the simulator)


def static_stability(occ: np.ndarray) -> tuple[bool, float]:
    """``(stable, margin_deg)``: is the centre of mass over the support polygon of the lowest layer?"""
    from sim.shapes import support_distance

    zs, ys, xs = np.nonzero(occ)
    if len(zs) == 0:
        return False, -90.0
    com = np.array([xs.mean(), ys.mean(), zs.mean()]) + 0.5
    z0 = zs.min()
    foot = np.stack([xs[zs == z0], ys[zs == z0]], axis=1).astype(np.float64)
    corners = np.concatenate([foot + [dx, dy] for dx in (0, 1) for dy in (0, 1)])
    dist, _ = support_distance(com[:2], corners)
    return dist > 0, float(np.degrees(np.arctan2(dist, com[2] - z0)))


# ------------------------------------------------------------------------------------------------
# tensors and meshes


def to_tensor(occ: np.ndarray) -> np.ndarray:
    """Bool ``[z, y, x]`` -> float32 in {-1, 1}: the z-slices become channels of a 2D UNet."""
    return occ.astype(np.float32) * 2.0 - 1.0


def to_occupancy(x: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Generator output in [-1, 1] (any leading dims) -> bool occupancy."""
    return np.asarray(x) > threshold


def largest_component(occ: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``occ`` (empty stays empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(occ, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return occ
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(sizes.argmax()) + 1)


def decoded_occupancy(occ: np.ndarray, keep: str = "largest") -> np.ndarray:
    """The object that is simulated: largest component (if ``keep="largest"``) dropped onto z = 0.

    Fidelity and size are measured on this, not on the raw grid: a tabletop whose legs the generator
    dropped floats in the raw grid (and would still match training tops) but lies flat on the ground
    in simulation, where it is trivially stable.
    """
    occ = largest_component(occ) if keep == "largest" else occ
    zs = np.nonzero(occ.any(axis=(1, 2)))[0]
    return np.roll(occ, -int(zs[0]), axis=0) if len(zs) else occ


def occupancy_to_mesh(occ: np.ndarray, keep: str = "largest"):  # noqa: ANN201 (trimesh imported lazily)
    """Marching-cubes mesh (z-up, voxel = 1/GRID) of an occupancy grid; ``None`` if it is empty.

    ``keep="largest"`` drops every component but the largest; ``"all"`` keeps them (the simulator then
    treats the pieces as one rigid body).
    """
    import trimesh
    from skimage import measure

    occ = largest_component(occ) if keep == "largest" else occ
    if occ.sum() == 0:
        return None
    grid = np.pad(occ.astype(np.float32), 1).transpose(2, 1, 0)  # [x, y, z]
    verts, faces, _, _ = measure.marching_cubes(grid, level=0.5)
    mesh = trimesh.Trimesh((verts - 1.0) / GRID, faces, process=True)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


# ------------------------------------------------------------------------------------------------
# fidelity and diversity


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every row of ``a`` (N, V) and of ``b`` (M, V), bool flattened grids."""
    a_f, b_f = a.astype(np.float32), b.astype(np.float32)
    inter = a_f @ b_f.T
    union = a_f.sum(1)[:, None] + b_f.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _align(occ: np.ndarray) -> np.ndarray:
    """Centre the object in x and y (nearest-shape similarity should not punish a shift)."""
    zs, ys, xs = np.nonzero(occ)
    if len(zs) == 0:
        return occ
    dy = GRID // 2 - int(round((ys.min() + ys.max() + 1) / 2))
    dx = GRID // 2 - int(round((xs.min() + xs.max() + 1) / 2))
    return np.roll(occ, (dy, dx), axis=(1, 2))


class ShapeBank:
    """Training objects to measure generated ones against (nearest-training-shape similarity)."""

    def __init__(self, objects: Sequence[VoxelObject]) -> None:
        self.labels = np.array([o.label for o in objects])
        self.grids = np.stack([_align(o.occupancy).ravel() for o in objects])  # (M, V) bool
        self.mean_volume = float(self.grids.sum(1).mean())
        self.class_volume = {c: float(self.grids[self.labels == c].sum(1).mean()) for c in np.unique(self.labels)}

    def measure(self, occupancies: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
        """Per sample: ``fidelity`` (max IoU over same-class training objects), ``recognised`` (the
        nearest training object overall is of the same class) and ``volume_ratio`` (filled voxels over
        the training mean)."""
        labels = np.asarray(labels)
        flat = np.stack([_align(o).ravel() for o in occupancies])  # (N, V)
        iou = _iou_matrix(flat, self.grids)  # (N, M)
        same = self.labels[None, :] == labels[:, None]
        fidelity = np.where(same, iou, -1.0).max(1)
        recognised = self.labels[iou.argmax(1)] == labels
        return {"fidelity": fidelity, "recognised": recognised.astype(np.float32),
                "volume_ratio": flat.sum(1) / self.mean_volume}

    def diversity(self, occupancies: np.ndarray) -> float:
        """:func:`diversity` of the given samples."""
        return diversity(occupancies)


def diversity(occupancies: np.ndarray) -> float:
    """Mean pairwise ``1 - IoU`` among the given samples (one class); 0 for fewer than two."""
    n = len(occupancies)
    if n < 2:
        return 0.0
    iou = _iou_matrix(np.stack([o.ravel() for o in occupancies]), np.stack([o.ravel() for o in occupancies]))
    return float((1.0 - iou)[~np.eye(n, dtype=bool)].mean())

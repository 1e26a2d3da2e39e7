"""Mesh preparation: load, clean, orient, scale, place on the ground, mass properties, collision hull.

Every problem with an input raises :class:`MeshError` with a reason code from
:data:`sim.result.INVALID_REASONS` and a sentence that names the input; the batch layer turns it into
an invalid :class:`~sim.result.StabilityResult`. Repairs and approximations on inputs that can still
be simulated are recorded in ``PreparedMesh.warnings``.

The placement follows the DSO protocol (Li et al. 2025, arXiv 2503.22677): the object keeps the
orientation it was generated in ("upright") and its lowest point touches the ground plane z = 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.config import StabilityConfig

# File types we hand to trimesh (point-cloud formats such as .xyz are excluded: no triangles).
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")

# Above this many faces a result carries a "large mesh" warning (for very large inputs, e.g. 1M+ faces).
LARGE_MESH_FACES = 1_000_000
# Voxel fallback: closing iterations (holes up to about twice this many voxels get bridged).
VOXEL_CLOSING = 3
# Above this many vertices the convex hull is computed from support points, not all vertices.
LARGE_HULL_INPUT = 50_000


class MeshError(Exception):
    """An input that cannot be simulated; ``reason`` is a code from ``INVALID_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class PreparedMesh:
    """A cleaned mesh resting upright on the ground (z = 0), with its mass properties.

    All coordinates are in metres in the world frame of the start pose (before any drop height or
    perturbation). ``rotation``'s columns are the principal axes of inertia; ``inertia_diag`` are the
    principal moments (kg m^2) about the centre of mass ``com``.
    """

    vertices: np.ndarray  # (V, 3) float64
    faces: np.ndarray  # (F, 3) int64, outward-facing
    hull_points: np.ndarray  # (H, 3) float64, vertices of the (possibly reduced) convex hull
    com: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3), det +1
    inertia_diag: np.ndarray  # (3,)
    mass: float
    volume: float
    mass_source: str  # "mesh" | "mesh_repaired" | "convex_hull" | "voxel"
    scale: float
    n_components: int
    warnings: list[str] = field(default_factory=list)

    @property
    def n_faces(self) -> int:
        return int(len(self.faces))

    def body_frame(self, points: np.ndarray) -> np.ndarray:
        """World points expressed in the principal-axis frame centred at the centre of mass."""
        return (np.asarray(points, dtype=np.float64) - self.com) @ self.rotation


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def load_arrays(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a mesh file (scenes are merged with their transforms) into ``(vertices, faces)``."""
    import trimesh

    path = Path(path)
    if not path.exists():
        raise MeshError("missing_file", f"{str(path)!r} does not exist")
    if not path.is_file():
        raise MeshError("missing_file", f"{str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise MeshError(
            "unsupported_type",
            f"{str(path)!r}: unsupported file type {suffix or '(none)'!r}; "
            f"expected one of {', '.join(MESH_SUFFIXES)}",
        )
    try:
        loaded = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for corrupt files
        raise MeshError(
            "read_error", f"{str(path)!r} could not be read as {suffix}: {type(exc).__name__}: {exc}"
        ) from exc
    faces = getattr(loaded, "faces", None)
    if faces is None or len(faces) == 0:
        size = path.stat().st_size
        raise MeshError(
            "empty",
            f"{str(path)!r} contains no triangles ({size} bytes; an empty or invalid {suffix} file)",
        )
    return np.asarray(loaded.vertices, dtype=np.float64), np.asarray(loaded.faces, dtype=np.int64)


def geometry_to_arrays(obj: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices, faces)`` of a ``trimesh.Trimesh``, a ``trimesh.Scene`` or a ``(V, F)`` pair."""
    import trimesh

    if isinstance(obj, trimesh.Scene):
        geometry = [g for g in obj.dump() if isinstance(g, trimesh.Trimesh)]
        if not geometry:
            raise MeshError("empty", "the trimesh.Scene holds no triangle meshes")
        obj = trimesh.util.concatenate(geometry)
    if isinstance(obj, trimesh.Trimesh):
        return np.asarray(obj.vertices, dtype=np.float64), np.asarray(obj.faces, dtype=np.int64)
    if isinstance(obj, tuple | list) and len(obj) == 2:
        try:
            return np.asarray(obj[0], dtype=np.float64), np.asarray(obj[1], dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise MeshError("bad_input", f"(vertices, faces) pair is not numeric: {exc}") from exc
    raise MeshError(
        "bad_input",
        f"cannot score an object of type {type(obj).__name__}; pass a file path, a trimesh.Trimesh, "
        "a trimesh.Scene or a (vertices, faces) pair",
    )


# --------------------------------------------------------------------------------------------------
# preparation
# --------------------------------------------------------------------------------------------------


def prepare_mesh(
    vertices: np.ndarray, faces: np.ndarray, config: StabilityConfig, name: str = "mesh"
) -> PreparedMesh:
    """Clean, orient, scale and place a triangle mesh; compute its mass properties and hull.

    Steps: validate arrays; merge duplicate vertices and drop degenerate triangles; y-up to z-up if
    asked; scale so the largest bounding-box side is ``config.normalize_scale`` metres; reject flat
    meshes; make normals point outwards (per connected piece); mass properties at
    ``config.density`` from the closed mesh, else after filling holes, else from the configured
    fallback (convex hull or voxels); place the lowest point on z = 0 with the bounding-box centre
    above the origin.
    """
    import trimesh

    warnings: list[str] = []
    vertices, faces = _validated_arrays(vertices, faces, name, warnings)
    if config.up_axis == "y":  # +90 degrees about x: y -> z, z -> -y
        vertices = vertices[:, [0, 2, 1]] * np.array([1.0, -1.0, 1.0])

    # scale first, so that vertex merging and degeneracy tolerances are relative to the object
    used = vertices[faces.reshape(-1)]
    lo, hi = used.min(axis=0), used.max(axis=0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise MeshError("flat", f"{name}: all vertices coincide (zero size)")
    scale = 1.0 if config.normalize_scale is None else config.normalize_scale / extent
    mesh = trimesh.Trimesh((vertices - lo) * scale, faces, process=True, validate=False)
    n_in = len(mesh.faces)
    keep = mesh.nondegenerate_faces()
    if not keep.all():
        mesh.update_faces(keep)
        mesh.remove_unreferenced_vertices()
        warnings.append(f"dropped {int((~keep).sum())} degenerate triangles")
    if len(mesh.faces) == 0:
        raise MeshError("empty", f"{name}: all {n_in} triangles are degenerate (zero area)")
    if len(mesh.faces) >= LARGE_MESH_FACES:
        warnings.append(f"large mesh ({len(mesh.faces)} faces)")

    # lowest point on z = 0, bounding-box centre above the origin
    verts = np.array(mesh.vertices, dtype=np.float64)
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    verts -= np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
    faces = np.asarray(mesh.faces, dtype=np.int64)

    hull_input = verts
    if len(verts) > LARGE_HULL_INPUT:  # qhull on 100k+ points takes seconds: pre-select
        hull_input = support_points(verts, config.max_hull_vertices)
        warnings.append(f"convex hull of {len(hull_input)} support points of {len(verts)} vertices")
    hull = _convex_hull(hull_input, float((hi - lo).max()), config, name)
    mesh = trimesh.Trimesh(verts, faces, process=False, validate=False)
    n_components, labels = _components(mesh)
    if n_components > 1:
        warnings.append(f"{n_components} disconnected pieces, simulated as one rigid body")

    volume, com, inertia, source = _mass_properties(mesh, labels, hull, config, warnings)
    rotation, inertia_diag = _principal_axes(inertia)
    return PreparedMesh(
        vertices=np.asarray(mesh.vertices, dtype=np.float64),
        faces=np.asarray(mesh.faces, dtype=np.int64),
        hull_points=_reduce_hull(hull.points, config.max_hull_vertices, warnings),
        com=com,
        rotation=rotation,
        inertia_diag=inertia_diag,
        mass=float(volume * config.density),
        volume=float(volume),
        mass_source=source,
        scale=float(scale),
        n_components=n_components,
        warnings=warnings,
    )


def _validated_arrays(
    vertices: np.ndarray, faces: np.ndarray, name: str, warnings: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.asarray(vertices)
    faces = np.asarray(faces)
    if vertices.size == 0 or faces.size == 0:
        raise MeshError("empty", f"{name}: empty mesh ({len(vertices)} vertices, {len(faces)} faces)")
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise MeshError("bad_faces", f"{name}: vertices must have shape (N, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshError("bad_faces", f"{name}: faces must be triangles of shape (M, 3), got {faces.shape}")
    if not np.issubdtype(faces.dtype, np.integer):
        raise MeshError("bad_faces", f"{name}: face indices must be integers, got {faces.dtype}")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshError(
            "bad_faces",
            f"{name}: face indices must lie in [0, {len(vertices) - 1}], got [{faces.min()}, {faces.max()}]",
        )
    vertices = vertices.astype(np.float64, copy=False)
    finite = np.isfinite(vertices).all(axis=1)
    if not finite.all():
        used = finite[faces].all(axis=1)
        if not used.all():
            raise MeshError(
                "non_finite",
                f"{name}: {int((~finite).sum())} vertices have NaN or infinite coordinates "
                f"(used by {int((~used).sum())} faces); fix the mesh export",
            )
        warnings.append(f"ignored {int((~finite).sum())} unused non-finite vertices")
        vertices = np.where(finite[:, None], vertices, 0.0)
    return vertices, faces.astype(np.int64, copy=False)


@dataclass
class _Hull:
    points: np.ndarray  # (H, 3) hull vertices
    volume: float


def _convex_hull(verts: np.ndarray, extent: float, config: StabilityConfig, name: str) -> _Hull:
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(verts)
    except (QhullError, ValueError) as exc:
        raise MeshError("flat", f"{name}: zero volume (points are coplanar or collinear)") from exc
    if not np.isfinite(hull.volume) or hull.volume < config.min_volume_ratio * extent**3:
        raise MeshError(
            "flat",
            f"{name}: zero volume (convex hull volume {hull.volume:.3g} m^3 for a {extent:.3g} m "
            "object); a flat or line-like mesh cannot stand",
        )
    return _Hull(verts[hull.vertices], float(hull.volume))


def _components(mesh: Any) -> tuple[int, np.ndarray]:
    """Connected pieces (sharing vertices): count and a label per face."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = mesh.faces
    n = len(mesh.vertices)
    edges = faces[:, [0, 1, 1, 2]].reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    count, vertex_labels = connected_components(graph, directed=False)
    return int(count), vertex_labels[faces[:, 0]]


def _orient_outwards(mesh: Any, labels: np.ndarray, warnings: list[str]) -> None:
    """Make a closed mesh's normals point outwards: fix winding, then flip inside-out pieces."""
    import trimesh

    if not mesh.is_winding_consistent:
        trimesh.repair.fix_winding(mesh)
        warnings.append("inconsistent triangle winding repaired")
    _flip_inverted_pieces(mesh, labels, warnings)


def _flip_inverted_pieces(mesh: Any, labels: np.ndarray, warnings: list[str]) -> None:
    """Flip the faces of every closed piece whose signed volume is negative (normals inwards)."""
    tri = mesh.triangles - mesh.vertices.mean(axis=0)
    signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0
    piece_volume = np.bincount(labels, weights=signed)
    inverted = piece_volume < 0
    if inverted.any():
        faces = mesh.faces.copy()
        flip = inverted[labels]
        faces[flip] = faces[flip][:, ::-1]
        mesh.faces = faces
        which = "all" if inverted.all() else f"{int(inverted.sum())} of {len(inverted)}"
        warnings.append(f"inverted normals (negative volume) on {which} pieces: flipped")


def _mass_properties(
    mesh: Any, labels: np.ndarray, hull: _Hull, config: StabilityConfig, warnings: list[str]
) -> tuple[float, np.ndarray, np.ndarray, str]:
    """Volume, centre of mass and inertia tensor (about the COM, at ``config.density``)."""
    import trimesh

    source = "mesh"
    if mesh.is_watertight:
        _orient_outwards(mesh, labels, warnings)
    elif _is_closed_oriented(mesh.faces):
        # pieces touching along edges (edges with 4 faces): still a closed, oriented surface, so
        # the divergence-theorem integrals below are exact
        warnings.append("non-manifold edges (pieces touching): treated as one closed surface")
        _flip_inverted_pieces(mesh, labels, warnings)
    else:
        n_open = _count_boundary_edges(mesh)
        repaired = mesh.copy()
        trimesh.repair.fill_holes(repaired)  # (trimesh's repairs need networkx)
        if not repaired.is_watertight:
            what = "convex hull" if config.mass_fallback == "hull" else "filled voxelisation"
            warnings.append(f"not watertight ({n_open} boundary edges): mass properties from the {what}")
            return _fallback_mass(mesh, hull, config, warnings)
        warnings.append(f"not watertight ({n_open} boundary edges): holes filled")
        mesh.vertices, mesh.faces = repaired.vertices, repaired.faces
        _orient_outwards(mesh, _components(mesh)[1], warnings)
        source = "mesh_repaired"
    with np.errstate(all="ignore"):  # a zero volume divides by zero; caught just below
        props = trimesh.triangles.mass_properties(mesh.triangles, density=config.density)
    volume, com = float(props.volume), np.asarray(props.center_mass, dtype=np.float64)
    lo, hi = mesh.bounds
    tol = 1e-6 * float((hi - lo).max())
    plausible = (
        np.isfinite(volume)
        and volume > 1e-3 * hull.volume
        and np.isfinite(com).all()
        and (com >= lo - tol).all()
        and (com <= hi + tol).all()
    )
    if not plausible:  # e.g. self-intersecting pieces whose signed volumes cancel
        warnings.append(
            f"closed mesh has implausible volume {volume:.3g} m^3 (hull {hull.volume:.3g} m^3): "
            "mass properties from the convex hull"
        )
        return _hull_mass(hull, config) + ("convex_hull",)
    return volume, com, np.asarray(props.inertia, dtype=np.float64), source


def _is_closed_oriented(faces: np.ndarray) -> bool:
    """True if every directed edge (a, b) is matched by as many (b, a): a closed oriented surface,
    possibly non-manifold (pieces sharing edges), for which volume integrals are exact."""
    faces = np.asarray(faces, dtype=np.int64)
    n = int(faces.max()) + 1
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    forward = np.sort(edges[:, 0] * n + edges[:, 1])
    backward = np.sort(edges[:, 1] * n + edges[:, 0])
    return bool(np.array_equal(forward, backward))


def _count_boundary_edges(mesh: Any) -> int:
    import trimesh

    return int(len(trimesh.grouping.group_rows(mesh.edges_sorted, require_count=1)))


def _hull_mass(hull: _Hull, config: StabilityConfig) -> tuple[float, np.ndarray, np.ndarray]:
    import trimesh

    hull_mesh = trimesh.convex.convex_hull(hull.points)
    props = trimesh.triangles.mass_properties(hull_mesh.triangles, density=config.density)
    return (
        float(props.volume),
        np.asarray(props.center_mass, np.float64),
        np.asarray(props.inertia, np.float64),
    )


def _fallback_mass(
    mesh: Any, hull: _Hull, config: StabilityConfig, warnings: list[str]
) -> tuple[float, np.ndarray, np.ndarray, str]:
    if config.mass_fallback == "voxel":
        voxel = _voxel_mass(mesh, config)
        if voxel is not None:
            return voxel + ("voxel",)
        warnings.append(
            "voxel fill leaked through holes wider than a voxel: mass properties from the convex hull"
        )
    return _hull_mass(hull, config) + ("convex_hull",)


def _voxel_mass(mesh: Any, config: StabilityConfig) -> tuple[float, np.ndarray, np.ndarray] | None:
    """Mass properties of the solid voxelisation (cells as small cubes of uniform density).

    The surface is voxelised, morphologically closed (dilate, fill the enclosed interior, erode)
    so that holes up to about ``2 * VOXEL_CLOSING`` voxels wide do not let the fill leak out, and
    the enclosed cells are filled. Returns None when nothing is enclosed even so.
    """
    from scipy import ndimage

    pitch = config.voxel_pitch * float(mesh.extents.max())
    grid = mesh.voxelized(pitch)
    k = VOXEL_CLOSING
    surface = np.pad(np.asarray(grid.matrix, dtype=bool), k + 1)
    dilated = ndimage.binary_dilation(surface, iterations=k)
    solid = ndimage.binary_erosion(ndimage.binary_fill_holes(dilated), iterations=k) | surface
    if solid.sum() < 1.05 * surface.sum():  # no enclosed interior
        return None
    cells = np.argwhere(solid).astype(np.float64) - (k + 1)  # (N, 3) indices in grid.matrix
    points = cells * pitch + np.asarray(grid.translation)  # cell centres (axis-aligned grid)
    cell_mass = config.density * pitch**3
    com = points.mean(axis=0)
    r = points - com
    inertia = cell_mass * (np.eye(3) * (r**2).sum() - r.T @ r)
    inertia += np.eye(3) * len(points) * cell_mass * pitch**2 / 6.0  # each cell's own inertia
    return float(len(points) * pitch**3), com, inertia


def _principal_axes(inertia: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal frame (columns, right-handed) and moments of a symmetric inertia tensor."""
    moments, axes = np.linalg.eigh((inertia + inertia.T) / 2)
    if np.linalg.det(axes) < 0:
        axes[:, 2] = -axes[:, 2]
    # thin objects can have a (numerically) zero moment; the solver needs it positive
    moments = np.maximum(moments, 1e-6 * max(float(moments.max()), 1e-12))
    return axes, moments


def fibonacci_directions(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors on the sphere (golden-angle spiral), shape (n, 3)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def support_points(points: np.ndarray, n_directions: int) -> np.ndarray:
    """The extreme points of ``points`` along the six axis directions and ``n_directions - 6``
    spread ones (unique rows). Their hull is inscribed in the exact hull and keeps its lowest
    point (the ground contact of the start pose)."""
    axes = np.concatenate([np.eye(3), -np.eye(3)])
    dirs = np.concatenate([axes, fibonacci_directions(max(n_directions - 6, 1))]).astype(np.float32)
    pts32 = np.ascontiguousarray(points, dtype=np.float32)
    best = np.full(len(dirs), -np.inf, dtype=np.float32)
    best_idx = np.zeros(len(dirs), dtype=np.int64)
    rows = np.arange(len(dirs))
    for start in range(0, len(points), 32768):  # chunks keep the (dirs, chunk) matrix small
        proj = dirs @ pts32[start : start + 32768].T  # (D, chunk)
        idx = proj.argmax(axis=1)
        val = proj[rows, idx]
        better = val > best
        best[better] = val[better]
        best_idx[better] = idx[better] + start
    return points[np.unique(best_idx)]


def _reduce_hull(points: np.ndarray, max_vertices: int, warnings: list[str]) -> np.ndarray:
    """Keep at most ``max_vertices`` hull vertices (support points, see :func:`support_points`)."""
    if len(points) <= max_vertices:
        return points
    reduced = support_points(points, max_vertices)
    warnings.append(f"collision hull reduced from {len(points)} to {len(reduced)} vertices")
    return reduced

"""The per-mesh result of a stability test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Short machine-readable codes in ``StabilityResult.reason`` for invalid results (the summary of the
# CLI groups by them); ``StabilityResult.error`` carries the sentence for people.
INVALID_REASONS: dict[str, str] = {
    "missing_file": "the path does not exist",
    "unsupported_type": "the file extension is not a mesh format trimesh reads",
    "read_error": "the file exists but could not be parsed as a mesh",
    "bad_input": "the input is neither a path, a trimesh.Trimesh/Scene, nor a (vertices, faces) pair",
    "empty": "no (non-degenerate) triangles",
    "non_finite": "NaN or infinite vertex coordinates",
    "bad_faces": "face indices out of range or not triangles",
    "flat": "zero volume: all points (nearly) on a plane or a line",
    "decomposition_error": "the convex decomposition (VHACD/CoACD) failed",
    "sim_error": "the physics engine raised an error",
    "timeout": "the mesh took longer than the per-mesh timeout",
    "crash": "the worker process died (e.g. a segfault in the physics engine)",
}


@dataclass
class StabilityResult:
    """Outcome of the DSO-style stability test for one input (Li et al. 2025, arXiv 2503.22677).

    ``angle_deg`` is the total rotation between the upright start pose and the final pose,
    ``2 * acos(|q_w|)`` of the relative quaternion, in degrees. ``displacement`` is the horizontal
    (x-y plane) distance travelled by the centre of mass, in metres after scale normalisation.
    ``stable`` is ``angle_deg < angle_threshold_deg``. All three are ``None`` when ``valid`` is
    ``False``; then ``reason`` is a code from :data:`INVALID_REASONS` and ``error`` says what went
    wrong. ``warnings`` lists repairs and approximations made on a valid input (non-watertight mesh,
    flipped normals, disconnected pieces, reduced hull, ...).
    """

    index: int
    source: str
    valid: bool
    stable: bool | None = None
    angle_deg: float | None = None
    displacement: float | None = None
    error: str | None = None
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    backend: str | None = None
    collision: str | None = None
    mass_source: str | None = None
    n_faces: int | None = None
    n_components: int | None = None
    n_collision_parts: int | None = None
    volume: float | None = None
    mass: float | None = None
    scale: float | None = None
    wall_time_s: float | None = None  # wall-clock time spent on this input in its worker
    cpu_time_s: float | None = None  # CPU time of the worker process on this input

    def to_record(self) -> dict[str, Any]:
        """A flat dict for a table row (``warnings`` joined with ``"; "``)."""
        record = asdict(self)
        record["warnings"] = "; ".join(self.warnings)
        return record

    @classmethod
    def invalid(cls, index: int, source: str, reason: str, error: str, **extra: Any) -> StabilityResult:
        """A result for an input that could not be simulated."""
        if reason not in INVALID_REASONS:
            raise ValueError(f"unknown invalid reason {reason!r}")
        return cls(index=index, source=source, valid=False, reason=reason, error=error, **extra)

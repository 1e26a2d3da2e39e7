"""sim: physical-stability scorer for generated 3D meshes (the feedback signal of DSO).

DSO (Li et al. 2025, "DSO: Aligning 3D generators with simulation feedback for physical
soundness", arXiv 2503.22677) puts each generated object upright on the ground, lets physics act
and calls it stable if it rotates by less than 20 degrees. This package does that for batches of
meshes, fast (pybullet, a process pool) and robustly (every bad input gives a labelled result)::

    import sim

    results = sim.score_meshes(["chair.glb", "table.obj"], sim.StabilityConfig(collision="hull"))
    for r in results:
        print(r.source, r.valid, r.stable, r.angle_deg, r.reason)

``python -m sim score PATH... --out scores.parquet`` does the same from the shell. pybullet,
trimesh and the optional MuJoCo/CoACD backends are imported only when scoring starts.
"""

from sim.batch import score_meshes
from sim.config import StabilityConfig
from sim.result import INVALID_REASONS, StabilityResult

__all__ = ["INVALID_REASONS", "StabilityConfig", "StabilityResult", "score_meshes"]

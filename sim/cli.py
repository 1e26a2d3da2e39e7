"""``python -m sim score PATH... --out scores.parquet`` (also ``diffdpo sim score ...``).

PATH may be mesh files or directories (searched recursively for mesh files). Arguments of the
form ``key=value`` that are not existing paths override fields of :class:`sim.StabilityConfig`,
after the optional ``--config`` YAML; ``--collision``/``--backend`` win over both.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from sim.config import StabilityConfig
from sim.mesh import MESH_SUFFIXES
from sim.result import StabilityResult

OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim",
        description="Physical-stability scoring of 3D meshes with DSO's protocol "
        "(upright on the ground, stable if it rotates by less than 20 degrees).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    score = sub.add_parser(
        "score",
        help="score mesh files and write one row per mesh",
        description="Score mesh files (obj, glb/gltf, ply, stl, off) and write one row per input. "
        "Config fields (see docs/sim.md) can be given as key=value, e.g. duration_s=4 perturb_deg=2.",
    )
    score.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH|key=value",
        help="mesh files or directories, and key=value config overrides",
    )
    score.add_argument(
        "--out", "-o", default="scores.parquet", help=f"output table ({', '.join(OUTPUT_SUFFIXES)})"
    )
    score.add_argument(
        "--workers", "-j", type=int, default=None, help="worker processes (default: CPUs; 0 = in-process)"
    )
    score.add_argument(
        "--collision", choices=["hull", "vhacd", "coacd"], default=None, help="collision shape"
    )
    score.add_argument("--backend", choices=["pybullet", "mujoco"], default=None, help="physics engine")
    score.add_argument("--config", "-c", default=None, help="YAML file with StabilityConfig fields")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 also when some meshes are invalid)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return _score(args)


def split_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate config overrides (``key=value`` that is not an existing path) from paths."""
    paths, overrides = [], []
    for item in inputs:
        if "=" in item and not Path(item).exists() and not item.startswith("="):
            overrides.append(item)
        else:
            paths.append(item)
    return paths, overrides


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files as given (even missing ones: they get an invalid row); directories searched
    recursively for mesh files, sorted."""
    files: list[str] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
            files.extend(str(p) for p in found)
        else:
            files.append(item)
    return files


def _score(args: argparse.Namespace) -> int:
    from diffdpo.config import ConfigError, load_config
    from sim.batch import score_meshes

    paths, overrides = split_inputs(args.inputs)
    for flag in ("collision", "backend"):
        if getattr(args, flag) is not None:
            overrides.append(f"{flag}={getattr(args, flag)}")
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        print(
            f"sim score: --out must end with one of {', '.join(OUTPUT_SUFFIXES)}, got {str(out)!r}",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(StabilityConfig, args.config, overrides)
    except (ConfigError, ValueError) as exc:
        print(f"sim score: {exc}", file=sys.stderr)
        return 2
    files = expand_paths(paths)
    if not files:
        print(
            f"sim score: no mesh files found in {', '.join(paths)} ({', '.join(MESH_SUFFIXES)})",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    try:
        results = score_meshes(files, config, workers=args.workers, progress=not args.no_progress)
    except (ImportError, ValueError) as exc:
        print(f"sim score: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    write_results(results, out)
    print(summary(results, elapsed, config))
    print(f"wrote {len(results)} rows to {out}")
    return 0


def write_results(results: Sequence[StabilityResult], out: Path) -> None:
    """One row per result, as parquet, csv or JSON lines (by the file's suffix)."""
    import pandas as pd

    frame = pd.DataFrame([r.to_record() for r in results])
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        frame.to_parquet(out, index=False)
    elif suffix == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_json(out, orient="records", lines=True)


def summary(results: Sequence[StabilityResult], elapsed_s: float, config: StabilityConfig) -> str:
    """Counts for people: stable share of valid meshes, invalid share and their reasons."""
    n = len(results)
    valid = [r for r in results if r.valid]
    stable = sum(bool(r.stable) for r in valid)
    invalid = n - len(valid)
    collision = "hull" if config.backend == "mujoco" else config.collision
    lines = [
        f"scored {n} meshes in {elapsed_s:.1f} s ({n / max(elapsed_s, 1e-9):.1f} meshes/s; "
        f"backend {config.backend}, collision {collision})",
        f"stable:  {stable}/{len(valid)} valid meshes ({_pct(stable, len(valid))})",
        f"invalid: {invalid}/{n} ({_pct(invalid, n)})",
    ]
    if valid:
        angles = sorted(float(r.angle_deg or 0.0) for r in valid)
        lines.append(f"rotation: median {angles[len(angles) // 2]:.1f} deg, max {angles[-1]:.1f} deg")
    if invalid:
        reasons = Counter(r.reason for r in results if not r.valid)
        lines.append("invalid by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"

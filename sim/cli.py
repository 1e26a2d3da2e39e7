"""``python -m sim score PATH... --out scores.parquet`` (also ``diffdpo sim score ...``).

PATH may be mesh files or directories (searched recursively for mesh files); every PATH gives at
least one row (an empty or unreadable folder gives an invalid one). Arguments of the form
``key=value`` that are not existing paths override fields of :class:`sim.StabilityConfig`, after the
optional ``--config`` YAML; ``--collision``/``--backend``/``--executor``/``--address`` win over both.
``--executor ray`` scores on Ray actors (a local Ray instance, or the cluster named by ``--address``).

``--out`` is checked before any mesh is scored; finished rows are kept in ``OUT.partial.jsonl`` while
the batch runs, and the same command run again after an interruption resumes from them
(:mod:`sim.output`).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from sim.batch import score_meshes
from sim.config import StabilityConfig
from sim.mesh import MESH_SUFFIXES
from sim.output import (
    OUTPUT_SUFFIXES,
    OutputError,
    PartialFile,
    check_output,
    partial_path,
    write_table,
)
from sim.result import StabilityResult


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
    score.add_argument(
        "--executor",
        choices=["process", "ray"],
        default=None,
        help="where meshes are scored: local worker processes (default) or Ray actors",
    )
    score.add_argument(
        "--address", default=None, help="with --executor ray: the Ray cluster to join (e.g. auto)"
    )
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


def expand_paths(
    paths: Sequence[str], backend: str = "pybullet"
) -> tuple[list[str], dict[int, StabilityResult]]:
    """One entry per table row: files as given (even missing ones: the worker labels them),
    directories replaced by the mesh files inside them (recursively, sorted).

    Returns ``(sources, known)``: ``known`` holds, by position in ``sources``, the invalid results of
    inputs judged here: a directory without mesh files, a folder or path that cannot be read.
    """
    sources: list[str] = []
    known: dict[int, StabilityResult] = {}
    for item in paths:
        try:
            is_dir = stat.S_ISDIR(os.stat(item).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            is_dir = False  # the worker reports it as missing
        except (OSError, ValueError) as exc:  # name too long, no permission on the way, NUL byte, ...
            known[len(sources)] = _unreadable(len(sources), item, exc, backend)
            sources.append(item)
            continue
        if not is_dir:
            sources.append(item)
            continue
        found, unreadable = _walk(item)
        if not found and not unreadable:
            known[len(sources)] = StabilityResult.invalid(
                len(sources),
                item,
                "missing_file",
                f"{item!r} is a folder with no mesh files in it (searched recursively for "
                f"{', '.join(MESH_SUFFIXES)}); give mesh files or a folder that holds some",
                backend=backend,
            )
            sources.append(item)
            continue
        for path in sorted([*found, *unreadable]):
            if path in unreadable:
                known[len(sources)] = _unreadable(len(sources), str(path), unreadable[path], backend)
            sources.append(str(path))
    return sources, known


def _walk(folder: str) -> tuple[list[Path], dict[Path, OSError]]:
    """Mesh files under ``folder`` (including broken links with a mesh suffix: they get a row too)
    and the sub-folders that could not be listed, with the error."""
    found: list[Path] = []
    unreadable: dict[Path, OSError] = {}

    def remember(exc: OSError) -> None:
        unreadable[Path(exc.filename if exc.filename is not None else folder)] = exc

    for root, _dirs, names in os.walk(folder, onerror=remember):
        found.extend(Path(root, n) for n in names if Path(n).suffix.lower() in MESH_SUFFIXES)
    return found, unreadable


def _unreadable(index: int, path: str, exc: Exception, backend: str) -> StabilityResult:
    why = getattr(exc, "strerror", None) or str(exc)
    return StabilityResult.invalid(
        index,
        path,
        "read_error",
        f"{path!r} cannot be read ({why}); fix its permissions or name, or leave it out",
        backend=backend,
    )


def _score(args: argparse.Namespace) -> int:
    from diffdpo.config import ConfigError, load_config

    paths, overrides = split_inputs(args.inputs)
    for flag, key in (
        ("collision", "collision"),
        ("backend", "backend"),
        ("executor", "executor"),
        ("address", "ray_address"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if not paths:
        return _fail("no mesh files or folders given (only key=value settings)")
    try:
        config = load_config(StabilityConfig, args.config, overrides)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    out = Path(args.out)
    try:
        check_output(out)  # before any work: a bad --out must not throw the scores away
        partial = PartialFile(partial_path(out), config)
        sources, known = expand_paths(paths, config.backend)
        partial.open(sources)
    except OSError as exc:
        return _fail(f"cannot write {str(partial_path(out))!r} ({exc.strerror or exc}); choose another --out")
    except OutputError as exc:
        return _fail(str(exc))
    with partial:
        if partial.n_dropped:
            print(f"dropped {partial.n_dropped} rows of {partial.path} that are for other inputs", flush=True)
        if partial.resumed:
            print(
                f"resuming from {partial.path}: {len(partial.resumed)} of {len(sources)} inputs already "
                f"scored, scoring the other {len(sources) - len(partial.resumed)}",
                flush=True,
            )
        started = time.perf_counter()
        try:
            results = score_meshes(
                sources,
                config,
                workers=args.workers,
                progress=not args.no_progress,
                on_result=partial.append,
                known_results={**partial.resumed, **known},
            )
        except (ImportError, ValueError, ConnectionError) as exc:
            return _fail(str(exc))
        except KeyboardInterrupt:
            return _fail(
                f"interrupted: {partial.n_rows} finished rows are kept in {partial.path}; "
                "run the same command again to continue",
                code=130,
            )
        elapsed = time.perf_counter() - started
    try:
        write_table(results, out)
    except OSError as exc:
        return _fail(
            f"cannot write {str(out)!r} ({exc.strerror or exc}); the {len(results)} rows are kept in "
            f"{partial.path}: fix the problem and run the same command again"
        )
    partial.remove()
    print(summary(results, elapsed, config, n_resumed=len(partial.resumed)))
    print(f"wrote {len(results)} rows to {out}")
    return 0


def _fail(message: str, code: int = 2) -> int:
    print(f"sim score: {message}", file=sys.stderr)
    return code


def summary(
    results: Sequence[StabilityResult], elapsed_s: float, config: StabilityConfig, n_resumed: int = 0
) -> str:
    """Counts for people: stable share of valid meshes, invalid share and their reasons.
    ``n_resumed`` rows came from an interrupted run's partial file (not timed here)."""
    n = len(results)
    valid = [r for r in results if r.valid]
    stable = sum(bool(r.stable) for r in valid)
    invalid = n - len(valid)
    collision = "hull" if config.backend == "mujoco" else config.collision
    n_now = n - n_resumed
    resumed = f", {n_resumed} more from the partial file" if n_resumed else ""
    lines = [
        f"scored {n_now} meshes in {elapsed_s:.1f} s ({n_now / max(elapsed_s, 1e-9):.1f} meshes/s; "
        f"backend {config.backend}, collision {collision}{resumed})",
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

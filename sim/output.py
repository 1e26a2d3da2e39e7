"""The result table of ``sim score``: checked before scoring, kept row by row, written atomically.

While a batch runs, every finished result is appended (and flushed) to ``OUT.partial.jsonl`` next to
``--out``; the table itself is written to a temporary file in the same folder and renamed onto
``--out`` at the end, after which the partial file is removed. A batch that is killed keeps its
finished rows in the partial file; the same command run again resumes from them (the partial file
starts with the config it was made with, and a row is reused only for the same input at the same
position, so the final table is the one an uninterrupted run would have written).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import IO, Any

from sim.config import StabilityConfig
from sim.result import StabilityResult

OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")
PARTIAL_SUFFIX = ".partial.jsonl"
PARTIAL_FORMAT = 1  # version of the partial file's header line
_RESULT_FIELDS = {f.name for f in fields(StabilityResult)}


class OutputError(ValueError):
    """``--out`` (or its partial file) cannot be used; the message says which path and what to do."""


def partial_path(out: Path) -> Path:
    """Where the finished rows of a batch writing ``out`` are kept until the table is written."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def check_output(out: Path) -> None:
    """Make sure ``out`` can be written before any mesh is scored; create its folder if missing.

    Raises OutputError naming the path and the fix: a wrong suffix, an existing folder of that name,
    a folder that cannot be created or written to, a read-only file.
    """
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputError(f"--out must end with one of {', '.join(OUTPUT_SUFFIXES)}, got {str(out)!r}")
    if out.is_dir():
        raise OutputError(
            f"--out {str(out)!r} is an existing folder; name a file, e.g. {str(out / ('scores' + out.suffix))!r}"
        )
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the folder {str(folder)!r} for --out ({_why(exc)}); "
            "create it yourself or choose another --out"
        ) from exc
    try:  # the table is written to a temporary file in this folder and renamed
        with tempfile.TemporaryFile(dir=folder, prefix=f".{out.name}."):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write to the folder {str(folder)!r} of --out ({_why(exc)}); "
            "make it writable or choose another --out"
        ) from exc
    for path in (out, partial_path(out)):
        if path.is_dir():
            raise OutputError(f"{str(path)!r} is a folder; remove it or choose another --out")
        if path.exists() and not os.access(path, os.W_OK):
            raise OutputError(
                f"{str(path)!r} exists and is read-only; make it writable (chmod u+w) or choose another --out"
            )


def write_table(results: Sequence[StabilityResult], out: Path) -> None:
    """One row per result, as parquet, csv or JSON lines (by the suffix of ``out``), written to a
    temporary file in the same folder and renamed, so that ``out`` is never half written."""
    import pandas as pd

    frame = pd.DataFrame([r.to_record() for r in results])
    suffix = out.suffix.lower()
    tmp_name = _temporary_name(out)
    try:
        if suffix == ".parquet":
            frame.to_parquet(tmp_name, index=False)
        elif suffix == ".csv":
            frame.to_csv(tmp_name, index=False)
        else:
            frame.to_json(tmp_name, orient="records", lines=True)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class PartialFile:
    """The rows finished so far, one JSON line each after a header line with the config.

    ``open`` reads an existing file (the rows matching ``sources``), rewrites it with just those rows
    (dropping a line torn by a kill) and keeps it open for appending; ``append`` writes and flushes
    one row, so that a killed batch loses at most the meshes in flight.
    """

    def __init__(self, path: Path, config: StabilityConfig) -> None:
        self.path = path
        self.config_record = _config_record(config)
        self.resumed: dict[int, StabilityResult] = {}
        self.n_dropped = 0  # rows of the file that belong to other inputs
        self.n_appended = 0
        self._file: IO[str] | None = None

    def open(self, sources: Sequence[str]) -> PartialFile:
        """Load the rows of an earlier run of these ``sources`` and get ready to append.

        Raises OutputError when the file was made with other settings or is not a partial file.
        """
        if self.path.exists():
            self.resumed = self._read(sources)
        self._rewrite(self.resumed)
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def append(self, result: StabilityResult) -> None:
        assert self._file is not None, "PartialFile.open() first"
        self._file.write(_row_line(result))
        self._file.flush()
        self.n_appended += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_rows(self) -> int:
        return len(self.resumed) + self.n_appended

    def _read(self, sources: Sequence[str]) -> dict[int, StabilityResult]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise OutputError(
                f"cannot read the partial file {str(self.path)!r} ({_why(exc)}); delete it to start over"
            ) from exc
        if not lines:
            return {}  # killed before the header was written
        header = _parse(lines[0])
        if not isinstance(header, dict) or header.get("sim_partial") != PARTIAL_FORMAT:
            raise OutputError(
                f"{str(self.path)!r} is not a partial file of this sim version; delete it to start over"
            )
        saved = header.get("config", {})
        differ = sorted(
            k for k in set(saved) | set(self.config_record) if saved.get(k) != self.config_record.get(k)
        )
        if differ:
            raise OutputError(
                f"{str(self.path)!r} holds results scored with other settings ({', '.join(differ)} differ); "
                "rerun with the same settings to continue it, or delete it to start over"
            )
        rows: dict[int, StabilityResult] = {}
        for line in lines[1:]:
            result = _result_from(_parse(line))
            if result is None:
                continue  # torn by a kill mid-write
            # a row counts only for the same input at the same position (the perturbation seed
            # depends on the position); anything else is from another command and is dropped
            if 0 <= result.index < len(sources) and sources[result.index] == result.source:
                rows[result.index] = result
            else:
                self.n_dropped += 1
        return rows

    def _rewrite(self, rows: Mapping[int, StabilityResult]) -> None:
        tmp_name = _temporary_name(self.path)
        try:
            with open(tmp_name, "w", encoding="utf-8") as tmp:
                tmp.write(json.dumps({"sim_partial": PARTIAL_FORMAT, "config": self.config_record}) + "\n")
                for index in sorted(rows):
                    tmp.write(_row_line(rows[index]))
            os.replace(tmp_name, self.path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


# where a batch runs changes no result: a batch interrupted on the pool may resume on Ray
_PLACEMENT_FIELDS = ("executor", "ray_address")


def _config_record(config: StabilityConfig) -> dict[str, Any]:
    """The config as JSON would give it back (tuples become lists), without the placement fields."""
    record = json.loads(json.dumps(asdict(config)))
    for name in _PLACEMENT_FIELDS:
        record.pop(name, None)
    return record


def _row_line(result: StabilityResult) -> str:
    return json.dumps(asdict(result), default=_plain) + "\n"


def _plain(value: Any) -> Any:
    """numpy scalars (mesh statistics) as Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the partial file")


def _parse(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None  # a line torn by a kill


def _result_from(row: Any) -> StabilityResult | None:
    if not isinstance(row, dict) or not _RESULT_FIELDS.issuperset(row) or "index" not in row:
        return None
    try:
        return StabilityResult(**row)
    except TypeError:
        return None


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _temporary_name(path: Path) -> str:
    """A hidden file beside ``path`` (same file system, so the final rename is atomic)."""
    return str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))

"""Sources of Pick-a-Pic rows behind one small interface: a parquet shard (image bytes read by row group)
or a ``datasets.Dataset`` (memory-mapped Arrow), and the resolution of a file, directory, glob, list or
dataset into those units."""

from __future__ import annotations

import glob as _glob
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffdpo.data.schema import _IMAGE_COLUMNS

_SPLIT_PREFIX = re.compile(r"^(train|validation_unique|test_unique|validation|test)[-_]")


class _ParquetUnit:
    """One parquet shard; image bytes are read by row group, one cached group per process."""

    def __init__(self, path: Path, name: str):
        self.path = path
        self.name = name
        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # ArrowInvalid, OSError, ...: a truncated download, not parquet, ...
            raise ValueError(
                f"{path}: cannot be read as parquet ({type(err).__name__}: {err}); re-download the shard "
                f"or remove it from the source"
            ) from err
        md = pf.metadata
        self.num_rows = md.num_rows
        self.schema = pf.schema_arrow
        self._rg_starts = np.cumsum([0] + [md.row_group(k).num_rows for k in range(md.num_row_groups)])
        self.max_row_group_bytes = max((md.row_group(k).total_byte_size for k in range(md.num_row_groups)),
                                       default=0)
        self._pf: pq.ParquetFile | None = None
        self._pid: int | None = None
        self._cache: tuple[int, pa.Table] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pf=None, _pid=None, _cache=None)  # file handles and cached bytes stay per process
        return state

    def _file(self) -> pq.ParquetFile:
        if self._pf is None or self._pid != os.getpid():
            self._pf = pq.ParquetFile(self.path, memory_map=True)
            self._pid = os.getpid()
            self._cache = None
        return self._pf

    def identity(self) -> str:
        # Size plus the footer region: changes whenever the content does, survives copies (no mtime).
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            fh.seek(max(0, size - 65536))
            tail = fh.read()
        return f"{self.name}:{size}:{hashlib.sha256(tail).hexdigest()}"

    def read_columns(self, columns: list[str]) -> pa.Table:
        return self._file().read(columns=columns)

    def images(self, row: int) -> tuple[Any, Any]:
        group = int(np.searchsorted(self._rg_starts, row, side="right") - 1)
        if self._cache is None or self._cache[0] != group or self._pid != os.getpid():
            table = self._file().read_row_group(group, columns=list(_IMAGE_COLUMNS))
            self._cache = (group, table)
        table = self._cache[1]
        j = row - int(self._rg_starts[group])
        return table.column("jpg_0")[j].as_py(), table.column("jpg_1")[j].as_py()

    def iter_tables(self, chunk_rows: int) -> Iterator[pa.Table]:
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=chunk_rows):
            yield pa.Table.from_batches([batch])


class _DatasetUnit:
    """A ``datasets.Dataset`` (memory-mapped Arrow, true random access)."""

    def __init__(self, ds: Any, name: str = "dataset"):
        self.ds = ds
        self.name = name
        self.num_rows = len(ds)
        self.schema = ds.with_format("arrow")[0:0].schema
        self.max_row_group_bytes = 0
        self._images: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def identity(self) -> str:
        fingerprint = getattr(self.ds, "_fingerprint", None)
        if fingerprint is None:  # not a datasets version we know: fall back to a content-free identity
            fingerprint = f"{self.num_rows}:{','.join(self.ds.column_names)}"
        return f"{self.name}:{fingerprint}"

    def read_columns(self, columns: list[str]) -> pa.Table:
        return self.ds.select_columns(columns).with_format("arrow")[0 : self.num_rows]

    def images(self, row: int) -> tuple[Any, Any]:
        if self._images is None:
            self._images = self.ds.select_columns(list(_IMAGE_COLUMNS)).with_format("arrow")
        table = self._images[row]
        return table.column("jpg_0")[0].as_py(), table.column("jpg_1")[0].as_py()

    def iter_tables(self, chunk_rows: int) -> Iterator[pa.Table]:
        yield from self.ds.with_format("arrow").iter(batch_size=chunk_rows)


_Unit = _ParquetUnit | _DatasetUnit
SourceLike = Any  # str | Path | Sequence[str | Path] | datasets.Dataset | PickAPicPairs


def _expand_path(item: str | Path) -> list[Path]:
    text = str(item)
    if any(ch in text for ch in "*?["):
        found = sorted(Path(p) for p in _glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"the pattern {text!r} matches no parquet file")
        return found
    path = Path(item)
    if path.is_dir():
        found = sorted(path.rglob("*.parquet"))
        if not found:
            raise FileNotFoundError(f"{path}: directory contains no *.parquet file")
        splits = {m.group(1) for p in found if (m := _SPLIT_PREFIX.match(p.name))}
        if len(splits) > 1:
            raise ValueError(
                f"{path}: holds shards of several splits ({', '.join(sorted(splits))}); point at one split, "
                f"e.g. '{path}/train-*.parquet'"
            )
        return found
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: no such parquet file or directory")


def _resolve_units(source: SourceLike) -> list[_Unit]:
    """The units of a parquet file, directory, glob, list of files or ``datasets.Dataset``
    (a :class:`~diffdpo.data.pairs.PickAPicPairs` is handled by ``diffdpo.data.pairs._units_of``)."""
    if isinstance(source, str | os.PathLike):
        base = Path(source)
        paths = _expand_path(source)
        if base.is_dir():
            return [_ParquetUnit(p, p.relative_to(base).as_posix()) for p in paths]
        return _name_paths(paths)
    if isinstance(source, list | tuple):
        if not source:
            raise ValueError("the source list is empty; give at least one parquet file")
        paths = [p for item in source for p in _expand_path(item)]
        return _name_paths(paths)
    module = type(source).__module__
    if module.startswith("datasets"):
        kind = type(source).__name__
        if kind == "DatasetDict":
            raise TypeError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. ds['train']")
        if kind == "IterableDataset":
            raise TypeError(
                "a streaming IterableDataset has no random access; load it with streaming=False (Arrow files "
                "are memory-mapped, not held in RAM) or download the parquet shards and pass their directory"
            )
        if hasattr(source, "select_columns") and hasattr(source, "with_format"):
            split = getattr(source, "split", None)
            return [_DatasetUnit(source, f"dataset[{split}]" if split else "dataset")]
    raise TypeError(
        f"unsupported source {type(source).__name__}: pass a parquet file, a directory or glob of parquet "
        f"shards, a list of parquet files, or a datasets.Dataset with the Pick-a-Pic v2 columns"
    )


def _name_paths(paths: list[Path]) -> list[_Unit]:
    names = [p.name for p in paths]
    if len(set(names)) < len(names):  # same file name in different folders: keep the names distinguishable
        names = [str(p) for p in paths]
    return [_ParquetUnit(p, n) for p, n in zip(paths, names)]

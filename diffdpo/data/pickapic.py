"""Pick-a-Pic v2 preference pairs for Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908).

Pick-a-Pic v2 (Kirstain et al. 2023) stores one human comparison per row: a caption, two images as
encoded bytes (``jpg_0``, ``jpg_1``) and labels ``label_0``/``label_1`` (1/0, 0/1, or 0.5/0.5 for a
tie). Diffusion-DPO trains on the decided pairs only, with the preferred image first:

- rows without a label (``has_label`` False) or with two identical images (``are_different`` False)
  are dropped;
- ties are dropped (about 12% of the train split), as in the official training script;
- if ``label_0 < label_1`` the pair is swapped, so item ``pixel_values[0]`` is always the winner;
- both images of a pair get the **same** crop and flip, so the pair differs only in content.

:class:`PickAPicPairs` reads only the small metadata columns up front; image bytes are read per row
(by parquet row group, or from the memory-mapped Arrow table of a ``datasets.Dataset``). Images that
do not decode make the item ``None`` (``collate_pairs`` drops it), are counted in ``stats`` and are
named in a capped warning; they never stop an epoch.

:func:`relabel_pairs` is the AI-feedback variant of the paper (relabel every pair with a reward model
such as PickScore), done in batches of pairs instead of one pair at a time.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import glob as _glob
import hashlib
import io
import json
import logging
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "PICKAPIC_V2_COLUMNS",
    "PairStats",
    "PickAPicPairs",
    "RelabelResult",
    "collate_pairs",
    "pickapic_v2_schema",
    "relabel_pairs",
    "write_pickapic_parquet",
]

#: Columns of ``yuvalkirstain/pickapic_v2`` in their stored order, with their Arrow types
#: (from the dataset card's ``dataset_info.features``).
PICKAPIC_V2_COLUMNS: tuple[tuple[str, str], ...] = (
    ("are_different", "bool"),
    ("best_image_uid", "string"),
    ("caption", "string"),
    ("created_at", "timestamp[ns]"),
    ("has_label", "bool"),
    ("image_0_uid", "string"),
    ("image_0_url", "string"),
    ("image_1_uid", "string"),
    ("image_1_url", "string"),
    ("jpg_0", "binary"),
    ("jpg_1", "binary"),
    ("label_0", "float64"),
    ("label_1", "float64"),
    ("model_0", "string"),
    ("model_1", "string"),
    ("ranking_id", "int64"),
    ("user_id", "int64"),
    ("num_example_per_prompt", "int64"),
    ("__index_level_0__", "int64"),
)

_ARROW_TYPES = {
    "bool": pa.bool_(),
    "string": pa.string(),
    "timestamp[ns]": pa.timestamp("ns"),
    "binary": pa.binary(),
    "float64": pa.float64(),
    "int64": pa.int64(),
}
_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
_LABEL_COLUMNS = ("label_0", "label_1")
_SPLIT_PREFIX = re.compile(r"^(train|validation_unique|test_unique|validation|test)[-_]")
# Per-process cap on "corrupt row" log lines; the rest are only counted in ``stats``.
_WARN_CAP = 5
_FINGERPRINT_VERSION = "pickapic-pairs-v1"


def pickapic_v2_schema() -> pa.Schema:
    """The Arrow schema of Pick-a-Pic v2 parquet shards, with Hugging Face ``datasets`` feature metadata."""
    fields = [pa.field(name, _ARROW_TYPES[kind]) for name, kind in PICKAPIC_V2_COLUMNS]
    hf_dtype = {"string": "string", "bool": "bool", "timestamp[ns]": "timestamp[ns]", "binary": "binary",
                "float64": "float64", "int64": "int64"}
    features = {name: {"dtype": hf_dtype[kind], "_type": "Value"} for name, kind in PICKAPIC_V2_COLUMNS}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(fields, metadata=meta)


# --------------------------------------------------------------------------------------------------
# Writing Pick-a-Pic-shaped parquet files (tests, demos, relabelled copies)
# --------------------------------------------------------------------------------------------------


def _uid_for(data: bytes) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, hashlib.sha256(data).hexdigest()))


def _encode_image_value(value: Any, where: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    raise TypeError(f"{where}: expected encoded image bytes or a PIL.Image, got {type(value).__name__}")


def write_pickapic_parquet(
    path: str | Path, rows: Sequence[dict[str, Any]], *, row_group_size: int | None = None
) -> Path:
    """Write ``rows`` as a parquet file with the exact Pick-a-Pic v2 schema; returns the path.

    Each row needs ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes, or a ``PIL.Image`` which is
    stored as JPEG quality 95), ``label_0`` and ``label_1``. Any other Pick-a-Pic column may be given;
    missing ones are filled: ``are_different`` (the two byte strings differ), ``has_label`` (True),
    content-derived image uids, placeholder urls, ``best_image_uid`` (the winner's uid, "" for a tie),
    ``created_at`` (2023-01-01 plus the row number in seconds), ``model_0``/``model_1``
    ("synthetic"), ``ranking_id`` and ``__index_level_0__`` (row number), ``user_id`` (0) and
    ``num_example_per_prompt`` (1).
    """
    path = Path(path)
    known = {name for name, _ in PICKAPIC_V2_COLUMNS}
    required = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
    columns: dict[str, list[Any]] = {name: [] for name, _ in PICKAPIC_V2_COLUMNS}
    base_time = _dt.datetime(2023, 1, 1)
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        unknown = sorted(set(row) - known)
        if missing or unknown:
            raise ValueError(
                f"row {i}: missing {missing} / unknown {unknown} column(s); a row needs {list(required)} and may "
                f"set any of the Pick-a-Pic v2 columns {sorted(known)}"
            )
        jpg_0 = _encode_image_value(row["jpg_0"], f"row {i} jpg_0")
        jpg_1 = _encode_image_value(row["jpg_1"], f"row {i} jpg_1")
        label_0, label_1 = float(row["label_0"]), float(row["label_1"])
        uid_0 = row.get("image_0_uid", _uid_for(jpg_0))
        uid_1 = row.get("image_1_uid", _uid_for(jpg_1))
        best = uid_0 if label_0 > label_1 else uid_1 if label_1 > label_0 else ""
        url = "https://text-to-image-human-preferences.s3.us-east-2.amazonaws.com/images/{}.png"
        filled = {
            "are_different": jpg_0 != jpg_1,
            "best_image_uid": best,
            "created_at": base_time + _dt.timedelta(seconds=i),
            "has_label": True,
            "image_0_uid": uid_0,
            "image_0_url": url.format(uid_0),
            "image_1_uid": uid_1,
            "image_1_url": url.format(uid_1),
            "model_0": "synthetic",
            "model_1": "synthetic",
            "ranking_id": i,
            "user_id": 0,
            "num_example_per_prompt": 1,
            "__index_level_0__": i,
        }
        filled.update(row)
        filled.update(jpg_0=jpg_0, jpg_1=jpg_1, label_0=label_0, label_1=label_1)
        for name in columns:
            columns[name].append(filled[name])
    schema = pickapic_v2_schema()
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# --------------------------------------------------------------------------------------------------
# Sources: parquet shards or a datasets.Dataset, behind one small interface
# --------------------------------------------------------------------------------------------------


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
    if isinstance(source, PickAPicPairs):
        return list(source._units)
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


# --------------------------------------------------------------------------------------------------
# Decoding and the paired transform
# --------------------------------------------------------------------------------------------------


class _CorruptImage(Exception):
    pass


def _image_bytes(value: Any) -> Any:
    if isinstance(value, dict):  # a datasets Image() feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        return None
    return value


def _decode(value: Any, column: str) -> Image.Image:
    try:
        data = _image_bytes(value)
        if isinstance(data, Image.Image):
            img = data
        else:
            if data is None or len(data) == 0:
                raise _CorruptImage(f"{column}: no image bytes (null or empty)")
            img = Image.open(io.BytesIO(data))
            img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except _CorruptImage:
        raise
    except Image.UnidentifiedImageError as err:
        head = bytes(data[:8]) if isinstance(data, bytes | bytearray) else b""
        raise _CorruptImage(f"{column}: not a recognised image format (starts with {head!r})") from err
    except Exception as err:  # OSError (truncated), DecompressionBombError, SyntaxError, ValueError, ...
        raise _CorruptImage(f"{column}: {type(err).__name__}: {err}") from err


@dataclasses.dataclass(frozen=True)
class _PairGeometry:
    flip: bool
    u_top: float
    u_left: float


def _resize_crop(img: Image.Image, resolution: int, geometry: _PairGeometry, mode: str) -> tuple[
    Image.Image, tuple[int, int], tuple[int, int]
]:
    """Resize the shorter side to ``resolution``, flip (optional), crop a square; returns the crop,
    the original (height, width) and the crop's (top, left) in the resized (and flipped) image."""
    width, height = img.size
    if width <= height:
        new_w, new_h = resolution, max(resolution, int(resolution * height / width))
    else:
        new_w, new_h = max(resolution, int(resolution * width / height)), resolution
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if geometry.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if mode == "random":
        # A relative position, so two images of different sizes get the "same" crop; equal sizes → equal crops.
        top = min(int(geometry.u_top * (new_h - resolution + 1)), new_h - resolution)
        left = min(int(geometry.u_left * (new_w - resolution + 1)), new_w - resolution)
    elif mode == "center":
        top = int(round((new_h - resolution) / 2.0))
        left = int(round((new_w - resolution) / 2.0))
    else:
        top = left = 0
    img = img.crop((left, top, left + resolution, top + resolution))
    return img, (height, width), (top, left)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    array = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W) in [-1, 1]


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PairStats:
    """What :class:`PickAPicPairs` read, dropped and kept.

    ``rows_read == unlabelled_dropped + identical_dropped + ties_dropped + filtered + kept`` (+ ``corrupt``
    when the images were validated up front). A row is counted once, under the first reason that applies
    in this order: unlabelled (``has_label`` False or a missing label), identical images
    (``are_different`` False), tie, ``model_filter``. ``max_rows`` stops reading, it does not filter.

    Corrupt images found while iterating are counted per process: counts from DataLoader worker processes
    do not flow back to the main process. Use ``validate_images=True`` / ``scan_corrupt()`` for exact counts.
    """

    rows_read: int = 0
    unlabelled_dropped: int = 0
    identical_dropped: int = 0
    ties_dropped: int = 0
    filtered: int = 0
    corrupt: int = 0
    kept: int = 0
    corrupt_rows: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"Pick-a-Pic pairs: {self.kept} kept of {self.rows_read} rows read",
            f"  dropped: {self.ties_dropped} ties, {self.unlabelled_dropped} unlabelled, "
            f"{self.identical_dropped} identical images, {self.filtered} by model_filter",
            f"  corrupt images: {self.corrupt} (found so far in this process)",
        ]
        for row_id, reason in self.corrupt_rows[:10]:
            lines.append(f"    {row_id}: {reason}")
        if len(self.corrupt_rows) > 10:
            lines.append(f"    ... and {len(self.corrupt_rows) - 10} more (see stats.corrupt_rows)")
        return "\n".join(lines)


class PickAPicPairs(torch.utils.data.Dataset):
    """Decided Pick-a-Pic pairs, winner first, with the same crop and flip for both images.

    Diffusion-DPO data pipeline (Wallace et al. 2023, arXiv 2311.12908): drop ties, put the
    preferred image first, resize the shorter side to ``resolution`` and crop a square.

    Args:
        source: a parquet file, a directory or glob pattern of parquet shards, a list of parquet files, or a
            ``datasets.Dataset`` (one split) with the Pick-a-Pic v2 columns.
        resolution: output side length R; items hold ``pixel_values`` of shape (2, 3, R, R) in [-1, 1].
        random_crop: crop at a random position (takes precedence over ``center_crop``).
        random_flip: flip both images horizontally with probability 0.5.
        center_crop: crop the centre; with both crops off the crop is at the top-left corner.
        seed: crop/flip randomness is a function of (seed, epoch, index) only; see :meth:`set_epoch`.
        drop_ties: drop 0.5/0.5 rows (kept ties stay in stored order).
        model_filter: ``model_filter(model_0, model_1) -> bool`` (stored, unswapped order); False drops the row.
        max_rows: stop after this many kept pairs (in source order), e.g. for a quick run.
        caption_column: the column holding the prompt.
        validate_images: decode every image once now, in this process, so ``stats`` is exact and corrupt
            rows are excluded up front (costs one full pass over the images).

    Corrupt images are never fatal: the item is ``None`` (use :func:`collate_pairs`), the row is named in
    ``stats.corrupt_rows`` and in a warning (capped at a few lines per process).
    """

    def __init__(
        self,
        source: SourceLike,
        resolution: int,
        *,
        random_crop: bool = False,
        random_flip: bool = False,
        center_crop: bool = True,
        seed: int = 0,
        drop_ties: bool = True,
        model_filter: Callable[[str, str], bool] | None = None,
        max_rows: int | None = None,
        caption_column: str = "caption",
        validate_images: bool = False,
    ):
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if max_rows is not None and max_rows <= 0:
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.center_crop = center_crop
        self.seed = int(seed)
        self.drop_ties = drop_ties
        self.caption_column = caption_column
        self.epoch = 0
        self.stats = PairStats()
        self._units = _resolve_units(source)
        self._read_metadata(model_filter, max_rows)
        self._fingerprint_base = self._compute_fingerprint_base()
        self._warned = 0
        big = max((u.max_row_group_bytes for u in self._units), default=0)
        if big > 256 * 2**20:
            logger.info(
                "parquet row groups of up to %.0f MiB: each random access reads a whole row group; for "
                "shuffled training build the latent cache (build_cache) or pass a datasets.Dataset",
                big / 2**20,
            )
        if validate_images:
            self.scan_corrupt(exclude=True)

    # ---- construction ------------------------------------------------------------------------------

    def _read_metadata(self, model_filter: Callable[[str, str], bool] | None, max_rows: int | None) -> None:
        wanted = [self.caption_column, *_LABEL_COLUMNS]
        if model_filter is not None:
            wanted += ["model_0", "model_1"]
        unit_ids, rows, swaps, captions = [], [], [], []
        stats = self.stats
        remaining = max_rows
        used_units: list[_Unit] = []
        for unit in self._units:
            if remaining is not None and remaining <= 0:
                break
            present = set(unit.schema.names)
            missing = [c for c in [*wanted, *_IMAGE_COLUMNS] if c not in present]
            if missing:
                hint = " (pass caption_column=... if the prompt has another name)" if self.caption_column in missing else ""
                raise ValueError(
                    f"{unit.name}: missing column(s) {missing}{hint}; Pick-a-Pic v2 needs "
                    f"{[self.caption_column, *_IMAGE_COLUMNS, *_LABEL_COLUMNS]}; found {sorted(present)}"
                )
            optional = [c for c in ("has_label", "are_different") if c in present]
            table = unit.read_columns(wanted + optional)
            n = table.num_rows
            if n == 0:
                used_units.append(unit)
                continue
            label_0 = _float_column(table, "label_0", unit.name)
            label_1 = _float_column(table, "label_1", unit.name)
            has_label = _bool_column(table, "has_label", n)
            are_different = _bool_column(table, "are_different", n)
            unlabelled = ~has_label | ~np.isfinite(label_0) | ~np.isfinite(label_1)
            identical = ~unlabelled & ~are_different
            tie = ~unlabelled & ~identical & (label_0 == label_1)
            candidate = ~unlabelled & ~identical & ~(tie & self.drop_ties)
            filtered = np.zeros(n, dtype=bool)
            if model_filter is not None:
                filtered = candidate & ~_apply_model_filter(table, candidate, model_filter, unit.name)
            kept = candidate & ~filtered
            stop = n
            if remaining is not None:
                kept_positions = np.flatnonzero(kept)
                if len(kept_positions) >= remaining:
                    stop = int(kept_positions[remaining - 1]) + 1
                    remaining = 0
                else:
                    remaining -= len(kept_positions)
            sl = slice(0, stop)
            stats.rows_read += stop
            stats.unlabelled_dropped += int(unlabelled[sl].sum())
            stats.identical_dropped += int(identical[sl].sum())
            stats.ties_dropped += int((tie & self.drop_ties)[sl].sum())
            stats.filtered += int(filtered[sl].sum())
            idx = np.flatnonzero(kept[sl])
            unit_ids.append(np.full(len(idx), len(used_units), dtype=np.int32))
            used_units.append(unit)
            rows.append(idx.astype(np.int64))
            swaps.append(label_1[idx] > label_0[idx])
            column = table.column(self.caption_column)
            if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
                raise ValueError(f"{unit.name}: column {self.caption_column!r} has type {column.type}, expected string")
            captions.append(column.take(pa.array(idx)).cast(pa.string()))
        self._units = used_units
        self._unit_ids = np.concatenate(unit_ids) if unit_ids else np.zeros(0, np.int32)
        self._rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self._swap = np.concatenate(swaps) if swaps else np.zeros(0, bool)
        chunks = [c for chunked in captions for c in chunked.chunks]
        self._captions = pa.chunked_array(chunks, type=pa.string()).combine_chunks() if chunks else pa.array(
            [], pa.string())
        stats.kept = len(self._rows)

    def _compute_fingerprint_base(self) -> str:
        h = hashlib.sha256()
        settings = dict(version=_FINGERPRINT_VERSION, resolution=self.resolution, random_crop=self.random_crop,
                        random_flip=self.random_flip, center_crop=self.center_crop, seed=self.seed,
                        drop_ties=self.drop_ties, caption_column=self.caption_column)
        h.update(json.dumps(settings, sort_keys=True).encode())
        for unit in self._units:
            h.update(unit.identity().encode())
        for array in (self._unit_ids, self._rows, self._swap):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    # ---- public accessors --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the crop/flip draw of ``epoch``. DataLoader workers hold a copy of the dataset taken when
        the iterator starts: call this before ``iter(loader)`` (not with ``persistent_workers=True``)."""
        self.epoch = int(epoch)

    def fingerprint(self) -> str:
        """A hash of the source files, the kept rows (after filters) and the transform settings. It does
        not change when corrupt rows are excluded later, and includes the epoch only if crop/flip are random."""
        if self.random_crop or self.random_flip:
            return hashlib.sha256(f"{self._fingerprint_base}:epoch={self.epoch}".encode()).hexdigest()[:32]
        return self._fingerprint_base[:32]

    def caption(self, index: int) -> str:
        """The prompt of pair ``index`` (no image decoding). Prompt dropout is the training side's job."""
        value = self._captions[self._check_index(index)].as_py()
        return value if value is not None else ""

    def captions(self) -> list[str]:
        """All prompts, index-aligned with the pairs."""
        return [c if c is not None else "" for c in self._captions.to_pylist()]

    def row_id(self, index: int) -> str:
        """Where pair ``index`` comes from, as ``"<shard>:<row in shard>"`` (e.g. ``"train-00001.parquet:17"``)."""
        index = self._check_index(index)
        return f"{self._units[self._unit_ids[index]].name}:{int(self._rows[index])}"

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = self._check_index(index)
        item, reason = self._load(index)
        if item is None:
            self._record_corrupt(self.row_id(index), reason or "unknown error")
        return item

    # ---- internals ---------------------------------------------------------------------------------

    def _check_index(self, index: int) -> int:
        n = len(self._rows)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"pair index {index} out of range for {n} pairs")
        return index

    def _read_pair(self, index: int) -> tuple[Image.Image, Image.Image]:
        unit = self._units[self._unit_ids[index]]
        try:
            raw_0, raw_1 = unit.images(int(self._rows[index]))
        except Exception as err:  # a damaged row group: count it like a corrupt image, don't stop the epoch
            raise _CorruptImage(f"cannot read image bytes: {type(err).__name__}: {err}") from err
        return _decode(raw_0, "jpg_0"), _decode(raw_1, "jpg_1")

    def _geometry(self, index: int) -> _PairGeometry:
        rng = np.random.default_rng([self.seed % 2**63, self.epoch % 2**63, index])
        u_top, u_left, u_flip = rng.random(3)
        return _PairGeometry(flip=bool(self.random_flip and u_flip < 0.5), u_top=float(u_top), u_left=float(u_left))

    def _load(self, index: int) -> tuple[dict[str, Any] | None, str | None]:
        """The item for ``index``, or ``(None, reason)`` if an image does not decode."""
        try:
            img_0, img_1 = self._read_pair(index)
        except _CorruptImage as err:
            return None, str(err)
        if self._swap[index]:
            img_0, img_1 = img_1, img_0  # winner first
        geometry = self._geometry(index)
        mode = "random" if self.random_crop else "center" if self.center_crop else "top_left"
        pixels, sizes, corners = [], [], []
        for img in (img_0, img_1):
            crop, size, corner = _resize_crop(img, self.resolution, geometry, mode)
            pixels.append(_to_tensor(crop))
            sizes.append(size)
            corners.append(corner)
        return {
            "pixel_values": torch.stack(pixels),  # (2, 3, R, R), winner first
            "caption": self.caption(index),
            "original_sizes": torch.tensor(sizes, dtype=torch.long),  # (2, 2) (height, width)
            "crop_top_lefts": torch.tensor(corners, dtype=torch.long),  # (2, 2) (top, left)
            "row_id": self.row_id(index),
        }, None

    def _record_corrupt(self, row_id: str, reason: str) -> None:
        self.stats.corrupt += 1
        self.stats.corrupt_rows.append((row_id, reason))
        self._warned += 1
        if self._warned <= _WARN_CAP:
            tail = ("; further corrupt rows in this process are only counted (see dataset.stats)"
                    if self._warned == _WARN_CAP else "")
            logger.warning("skipping corrupt Pick-a-Pic pair %s: %s%s", row_id, reason, tail)

    def scan_corrupt(self, *, exclude: bool = True, progress: bool = True) -> list[tuple[str, str]]:
        """Decode every image once, in this process (storage order, so each row group is read once).

        Returns ``(row_id, reason)`` for every pair with an undecodable image, adds the newly found ones to
        ``stats`` and, with ``exclude``, removes them from the dataset so that iteration never meets them.
        Emits one warning naming the first rows found.
        """
        from tqdm.auto import tqdm

        found: list[tuple[int, str, str]] = []
        for index in tqdm(range(len(self)), desc="checking images", unit="pair", disable=not progress):
            try:
                self._read_pair(index)
            except _CorruptImage as err:
                found.append((index, self.row_id(index), str(err)))
        known = {row_id for row_id, _ in self.stats.corrupt_rows}
        for _, row_id, reason in found:
            if row_id not in known:
                self.stats.corrupt += 1
                self.stats.corrupt_rows.append((row_id, reason))
        if found:
            names = ", ".join(f"{row_id} ({reason})" for _, row_id, reason in found[:5])
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            action = "excluded" if exclude else "found (still in the dataset; they load as None)"
            warnings.warn(f"{len(found)} corrupt Pick-a-Pic pair(s) {action}: {names}{more}", RuntimeWarning,
                          stacklevel=2)
        if exclude and found:
            keep = np.ones(len(self), dtype=bool)
            keep[[index for index, _, _ in found]] = False
            self._unit_ids, self._rows, self._swap = self._unit_ids[keep], self._rows[keep], self._swap[keep]
            self._captions = self._captions.filter(pa.array(keep))
            self.stats.kept = len(self._rows)
        return [(row_id, reason) for _, row_id, reason in found]


def _float_column(table: pa.Table, name: str, where: str) -> np.ndarray:
    column = table.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise ValueError(f"{where}: column {name!r} has type {column.type}; expected numbers (1, 0 or 0.5)")
    return column.cast(pa.float64()).fill_null(float("nan")).to_numpy()


def _bool_column(table: pa.Table, name: str, n: int) -> np.ndarray:
    if name not in table.column_names:
        return np.ones(n, dtype=bool)
    return table.column(name).cast(pa.bool_()).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def _apply_model_filter(
    table: pa.Table, candidate: np.ndarray, model_filter: Callable[[str, str], bool], where: str
) -> np.ndarray:
    model_0 = table.column("model_0").to_pylist()
    model_1 = table.column("model_1").to_pylist()
    decisions: dict[tuple[Any, Any], bool] = {}
    keep = np.zeros(len(model_0), dtype=bool)
    for i in np.flatnonzero(candidate):
        pair = (model_0[i], model_1[i])
        if pair not in decisions:
            try:
                decisions[pair] = bool(model_filter(*pair))
            except Exception as err:
                raise RuntimeError(f"{where}:{i}: model_filter{pair!r} raised {type(err).__name__}: {err}") from err
        keep[i] = decisions[pair]
    return keep


def collate_pairs(items: Sequence[dict[str, Any] | None], resolution: int | None = None) -> dict[str, Any]:
    """Batch :class:`PickAPicPairs` items, dropping ``None`` (corrupt) ones.

    Returns ``pixel_values`` (B, 2, 3, R, R) winner first, ``captions``, ``original_sizes`` (B, 2, 2),
    ``crop_top_lefts`` (B, 2, 2) and ``row_ids``. A batch with no valid item has B = 0 (skip it); its
    ``pixel_values`` is (0, 2, 3, R, R) if ``resolution`` is given (e.g. via ``functools.partial``), else
    (0, 2, 3, 0, 0).
    """
    kept = [item for item in items if item is not None]
    if not kept:
        side = resolution or 0
        return {
            "pixel_values": torch.zeros(0, 2, 3, side, side),
            "captions": [],
            "original_sizes": torch.zeros(0, 2, 2, dtype=torch.long),
            "crop_top_lefts": torch.zeros(0, 2, 2, dtype=torch.long),
            "row_ids": [],
        }
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]),  # (B, 2, 3, R, R)
        "captions": [item["caption"] for item in kept],
        "original_sizes": torch.stack([item["original_sizes"] for item in kept]),  # (B, 2, 2)
        "crop_top_lefts": torch.stack([item["crop_top_lefts"] for item in kept]),  # (B, 2, 2)
        "row_ids": [item["row_id"] for item in kept],
    }


# --------------------------------------------------------------------------------------------------
# AI-feedback relabelling
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RelabelResult:
    """Outcome of :func:`relabel_pairs`; every input row is in exactly one of the five counts."""

    flipped: int = 0  #: decided before, now the other image wins
    ties: int = 0  #: now a tie (|s0 - s1| <= tie_margin)
    unchanged: int = 0  #: decided before, same winner now
    decided: int = 0  #: a tie or unlabelled before, decided now
    skipped: int = 0  #: an image did not decode: the row is copied unchanged
    skipped_rows: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    out_paths: list[Path] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.flipped + self.ties + self.unchanged + self.decided + self.skipped


class _PendingChunk:
    """A slice of source rows waiting for its scores before it can be written, in source order."""

    def __init__(self, table: pa.Table, writer_key: int):
        self.table = table
        self.writer_key = writer_key
        n = table.num_rows
        self.label_0 = np.zeros(n)
        self.label_1 = np.zeros(n)
        self.best: list[str | None] = [None] * n
        self.scored = np.zeros(n, dtype=bool)
        self.waiting = 0  # rows queued for scoring and not scored yet
        self.all_queued = False  # every decodable row has been queued: it may be written once waiting == 0

    def finished_table(self) -> pa.Table:
        """The source rows with scored rows' labels replaced; unscored rows stay byte-identical."""
        import pyarrow.compute as pc

        table = self.table
        mask = pa.array(self.scored)
        updates = {"label_0": pa.array(self.label_0), "label_1": pa.array(self.label_1),
                   "has_label": pa.array(np.ones(table.num_rows, dtype=bool)),
                   "best_image_uid": pa.array(self.best, pa.string())}
        for name, new in updates.items():
            if name not in table.column_names:
                continue
            i = table.schema.get_field_index(name)
            field = table.schema.field(i)
            old = table.column(i).combine_chunks()
            keep_old = pc.is_null(new) if name == "best_image_uid" else pa.array(np.zeros(table.num_rows, bool))
            choose_new = pc.and_(mask, pc.invert(keep_old))
            table = table.set_column(i, field, pc.if_else(choose_new, new.cast(field.type), old))
        return table


def relabel_pairs(
    source_or_dataset: SourceLike,
    scorer: Callable[[list[Image.Image], list[str]], Sequence[float]],
    *,
    batch_size: int = 32,
    tie_margin: float = 0.0,
    out_path: str | Path | None = None,
    caption_column: str = "caption",
    progress: bool = True,
) -> RelabelResult:
    """Relabel every pair with a reward model: the AI-feedback variant of Diffusion-DPO (Wallace et al.
    2023, arXiv 2311.12908, where PickScore relabelling helped).

    ``scorer(images, captions)`` gets ``2 * n`` images for ``n <= batch_size`` pairs (first the ``n`` images
    of column ``jpg_0``, then the ``n`` images of ``jpg_1``) and the matching captions, and returns one score
    per image. Every call has exactly ``batch_size`` pairs except the last. A pair becomes 1/0 if
    ``s0 - s1 > tie_margin``, 0/1 if ``s1 - s0 > tie_margin``, else 0.5/0.5; ``has_label`` becomes True and
    ``best_image_uid`` names the winner (unchanged for a tie). All rows are scored, including former ties and
    unlabelled rows; rows whose images do not decode are copied unchanged and counted as ``skipped``.

    The output keeps the input schema and row order: one parquet per input shard in the directory
    ``out_path`` (default ``<source dir>_relabelled``) when the source has several shards, else the file
    ``out_path`` (default ``<stem>.relabelled.parquet`` next to the source). A ``datasets.Dataset`` source
    needs ``out_path``. Files appear only when complete (written to a temporary name, then renamed).
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(source_or_dataset, PickAPicPairs):
        caption_column = source_or_dataset.caption_column
    units = _resolve_units(source_or_dataset)
    for unit in units:
        missing = [c for c in (caption_column, *_IMAGE_COLUMNS, *_LABEL_COLUMNS) if c not in unit.schema.names]
        if missing:
            raise ValueError(f"{unit.name}: missing column(s) {missing} needed for relabelling")
    targets = _relabel_targets(source_or_dataset, units, out_path)
    result = RelabelResult(out_paths=list(targets))
    queue: list[tuple[_PendingChunk, int, Image.Image, Image.Image, str]] = []
    pending: list[_PendingChunk] = []
    writers: dict[int, pq.ParquetWriter] = {}
    tmp_paths = {k: t.with_name(f".{t.name}.tmp") for k, t in enumerate(targets)}

    def score_queue() -> None:
        if not queue:
            return
        images = [q[2] for q in queue] + [q[3] for q in queue]
        prompts = [q[4] for q in queue] * 2
        scores = [float(s) for s in scorer(images, prompts)]
        if len(scores) != len(images):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(images)} images; it must return "
                             f"one score per image")
        n = len(queue)
        for (chunk, j, _, _, _), s0, s1 in zip(queue, scores[:n], scores[n:]):
            new = (1.0, 0.0) if s0 - s1 > tie_margin else (0.0, 1.0) if s1 - s0 > tie_margin else (0.5, 0.5)
            result_key = _relabel_outcome(chunk.table, j, new)
            setattr(result, result_key, getattr(result, result_key) + 1)
            chunk.label_0[j], chunk.label_1[j] = new
            chunk.scored[j] = True
            if new[0] != new[1]:
                uid_column = "image_0_uid" if new[0] > new[1] else "image_1_uid"
                if uid_column in chunk.table.column_names:
                    chunk.best[j] = chunk.table.column(uid_column)[j].as_py()
            chunk.waiting -= 1
        queue.clear()

    def flush() -> None:
        while pending and pending[0].all_queued and pending[0].waiting == 0:
            chunk = pending.pop(0)
            writers[chunk.writer_key].write_table(chunk.finished_table())

    try:
        with tqdm(total=sum(u.num_rows for u in units), desc="relabelling", unit="pair",
                  disable=not progress) as bar:
            for key, unit in enumerate(units):
                writers[key] = pq.ParquetWriter(tmp_paths[key], unit.schema)
                offset = 0
                for table in unit.iter_tables(max(batch_size, 256)):
                    chunk = _PendingChunk(table, key)
                    pending.append(chunk)
                    captions = table.column(caption_column).to_pylist()
                    images_0, images_1 = table.column("jpg_0"), table.column("jpg_1")
                    for j in range(table.num_rows):
                        try:
                            img_0 = _decode(images_0[j].as_py(), "jpg_0")
                            img_1 = _decode(images_1[j].as_py(), "jpg_1")
                        except _CorruptImage as err:
                            result.skipped += 1
                            result.skipped_rows.append((f"{unit.name}:{offset + j}", str(err)))
                            continue
                        chunk.waiting += 1
                        queue.append((chunk, j, img_0, img_1, captions[j] or ""))
                        if len(queue) == batch_size:
                            score_queue()
                            flush()
                    chunk.all_queued = True
                    offset += table.num_rows
                    bar.update(table.num_rows)
                    flush()
            score_queue()
            flush()
        for writer in writers.values():
            writer.close()
        for key, target in enumerate(targets):
            os.replace(tmp_paths[key], target)
    finally:
        for key, writer in writers.items():
            if writer.is_open:
                writer.close()
            tmp_paths[key].unlink(missing_ok=True)
    if result.skipped:
        names = ", ".join(f"{r} ({why})" for r, why in result.skipped_rows[:5])
        warnings.warn(f"relabel_pairs: {result.skipped} row(s) with undecodable images copied unchanged: {names}",
                      RuntimeWarning, stacklevel=2)
    return result


def _relabel_outcome(table: pa.Table, j: int, new: tuple[float, float]) -> str:
    """Which :class:`RelabelResult` count the new label of row ``j`` falls in."""
    if new[0] == new[1]:
        return "ties"
    old_0, old_1 = table.column("label_0")[j].as_py(), table.column("label_1")[j].as_py()
    has_label = table.column("has_label")[j].as_py() if "has_label" in table.column_names else True
    if not has_label or old_0 is None or old_1 is None or old_0 == old_1 or np.isnan([old_0, old_1]).any():
        return "decided"
    return "unchanged" if (old_0 > old_1) == (new[0] > new[1]) else "flipped"


def _relabel_targets(source: SourceLike, units: list[_Unit], out_path: str | Path | None) -> list[Path]:
    if isinstance(units[0], _DatasetUnit):
        if out_path is None:
            raise ValueError("relabelling a datasets.Dataset needs out_path=... (the .parquet file to write)")
        targets = [Path(out_path)]
    elif len(units) == 1:
        src = units[0].path
        out = Path(out_path) if out_path is not None else src.with_name(f"{src.stem}.relabelled.parquet")
        targets = [out / src.name if out.is_dir() else out]
    else:
        if out_path is not None:
            out_dir = Path(out_path)
        elif isinstance(source, str | os.PathLike) and Path(source).is_dir():
            out_dir = Path(source).with_name(Path(source).name + "_relabelled")
        else:
            raise ValueError("relabelling several shards needs out_path=... (a directory to write them into)")
        targets = []
        for k, unit in enumerate(units):
            name = Path(unit.name)
            relative = not name.is_absolute() and ".." not in name.parts
            targets.append(out_dir / name if relative else out_dir / f"{k:05d}-{unit.path.name}")
    for unit, target in zip(units, targets):
        if isinstance(unit, _ParquetUnit) and target.resolve() == unit.path.resolve():
            raise ValueError(f"out_path {target} is the source shard itself; choose another path")
        target.parent.mkdir(parents=True, exist_ok=True)
    return targets

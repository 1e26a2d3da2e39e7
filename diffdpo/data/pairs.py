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
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from diffdpo.data.images import _CorruptImage, _decode, _PairGeometry, _resize_crop, _to_tensor
from diffdpo.data.schema import _IMAGE_COLUMNS, _LABEL_COLUMNS
from diffdpo.data.selection import PairStats, _apply_model_filter, _bool_column, _float_column
from diffdpo.data.sources import SourceLike, _resolve_units, _Unit

logger = logging.getLogger(__name__)

__all__ = ["PickAPicPairs"]

# Per-process cap on "corrupt row" log lines; the rest are only counted in ``stats``.
_WARN_CAP = 5
_FINGERPRINT_VERSION = "pickapic-pairs-v1"


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
        self._units = _units_of(source)
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



def _units_of(source: SourceLike) -> list[_Unit]:
    """The units of ``source``; a :class:`PickAPicPairs` gives the units it kept rows from."""
    if isinstance(source, PickAPicPairs):
        return list(source._units)
    return _resolve_units(source)

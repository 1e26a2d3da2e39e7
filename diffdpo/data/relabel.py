"""AI-feedback relabelling of Pick-a-Pic pairs (Diffusion-DPO, Wallace et al. 2023, arXiv 2311.12908):
:func:`relabel_pairs` scores every pair with a reward model such as PickScore, in batches of pairs
instead of one pair at a time, and writes relabelled copies with the input schema and row order."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffdpo.data.images import _CorruptImage, _decode
from diffdpo.data.pairs import PickAPicPairs, _units_of
from diffdpo.data.schema import _IMAGE_COLUMNS, _LABEL_COLUMNS
from diffdpo.data.sources import SourceLike, _DatasetUnit, _ParquetUnit, _Unit

__all__ = ["RelabelResult", "relabel_pairs"]


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

    @property
    def agreement(self) -> float | None:
        """Share of the rows decided both before (human labels) and now whose winner is unchanged."""
        both = self.unchanged + self.flipped
        return self.unchanged / both if both else None

    def summary(self) -> str:
        agree = "n/a" if self.agreement is None else f"{100 * self.agreement:.1f}%"
        return (f"{self.total} rows: {self.unchanged} unchanged, {self.flipped} flipped, {self.decided} newly decided, "
                f"{self.ties} ties, {self.skipped} skipped (undecodable); agreement with the earlier labels "
                f"{agree} (of {self.unchanged + self.flipped} rows decided before and after)")


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
    units = _units_of(source_or_dataset)
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

"""Which rows become pairs: :class:`PairStats` (what was read, dropped and kept) and the column readers
behind the unlabelled / identical / tie / ``model_filter`` decisions of :class:`~diffdpo.data.pairs.PickAPicPairs`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["PairStats"]


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

"""Batching :class:`~diffdpo.data.pairs.PickAPicPairs` items: :func:`collate_pairs` drops corrupt (``None``)
items and stacks the rest, winner first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate_pairs"]


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

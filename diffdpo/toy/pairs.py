"""Pieces of the shapes world's AI-feedback pairs: the caption split, the JPEG encoding of a sample,
and the summary of a pairs file. The pairs themselves (sample k images, judge, best vs worst, Pick-a-Pic
parquet) are :func:`diffdpo.recipes.online_t2i.sample_pairs`, which the demo and the online rounds share;
the Pick-a-Pic reader (:class:`diffdpo.data.PickAPicPairs`) drops the ties and puts the winner first.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffdpo.toy.shapes import all_captions


@dataclass
class PairSummary:
    rows: int
    ties: int
    decided: int
    path: str
    train_captions: list[str]
    heldout_captions: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


def split_captions(n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Partition the world's captions into (train, held-out); held-out captions never appear in pairs."""
    captions = all_captions()
    if not 0 <= n_heldout < len(captions):
        raise ValueError(f"n_heldout must be in [0, {len(captions)}), got {n_heldout}")
    order = np.random.default_rng(seed).permutation(len(captions))
    heldout = sorted(captions[i] for i in order[:n_heldout])
    return [c for c in captions if c not in heldout], heldout


def jpeg_bytes(image: np.ndarray) -> bytes:
    """Lossless-chroma JPEG (quality 95, no 4:2:0 subsampling, which would smear 16 px colour edges)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()

"""AI-feedback preference pairs for the shapes world, written in the exact Pick-a-Pic v2 schema.

Two images per prompt are sampled from the base model (different seeds), the programmatic judge
scores both, and the pair is labelled (1, 0), (0, 1) or (0.5, 0.5) for a tie, exactly as Pick-a-Pic
stores human votes. With ``images_per_prompt = k > 2`` the judge scores k samples and the pair is
the best and the worst of them (best-of-k pairing, common with AI feedback: one judge call per
image buys a more decisive pair). The parquet file then flows through the same reader as real data
(:class:`diffdpo.data.PickAPicPairs`), which drops the ties and puts the winner first.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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


def make_pairs(
    pipe: Any,
    judge: Any,
    captions: Sequence[str],
    pairs_per_caption: int,
    out_path: str | Path,
    *,
    seed: int = 0,
    steps: int = 15,
    guidance_scale: float = 3.0,
    progress: bool = True,
    images_per_prompt: int = 2,
) -> PairSummary:
    """Sample ``images_per_prompt`` images per (caption, repeat) from ``pipe``, score them with ``judge``,
    keep the best and the worst as the pair (for 2: both, in sampling order), write Pick-a-Pic parquet."""
    from diffdpo.data import write_pickapic_parquet
    from diffdpo.toy.t2i import sample_images

    k = images_per_prompt
    if k < 2:
        raise ValueError(f"images_per_prompt must be >= 2, got {k}")
    caps = [c for c in captions for _ in range(pairs_per_caption)]
    n = len(caps)
    base_seed = 1_000_000 * (seed + 1)
    # image j of prompt i uses seed base + k*i + j: all k*n images in one sampling pass
    images = sample_images(
        pipe, [c for c in caps for _ in range(k)], [base_seed + m for m in range(k * n)],
        steps=steps, guidance_scale=guidance_scale, progress=progress, desc="sampling pairs",
    )
    scores = np.asarray(judge(images, [c for c in caps for _ in range(k)]), dtype=np.float64).reshape(n, k)
    rows, ties = [], 0
    for i, cap in enumerate(caps):
        # best and worst (first occurrence on equal scores); for k = 2 that is the two samples
        a, b = (0, 1) if k == 2 else (int(np.argmax(scores[i])), int(np.argmin(scores[i])))
        if a == b:
            a, b = 0, 1
        label_0, label_1 = judge.label(scores[i, a], scores[i, b])
        ties += label_0 == 0.5
        rows.append({
            "caption": cap, "jpg_0": jpeg_bytes(images[k * i + a]), "jpg_1": jpeg_bytes(images[k * i + b]),
            "label_0": label_0, "label_1": label_1, "model_0": "toy_t2i_base", "model_1": "toy_t2i_base",
        })
    path = write_pickapic_parquet(out_path, rows)
    return PairSummary(n, ties, n - ties, str(path), list(captions), [])

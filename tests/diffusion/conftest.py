"""Tiny seeded SD1.5/SDXL pipelines on disk and a hand-built Pick-a-Pic v2 parquet (CPU, no downloads)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffdpo.data import write_pickapic_parquet
from diffdpo.diffusion.tiny import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle", "a blue square", "two green dots", "a yellow star", "a big cat", "an old tree"]


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd15", "sd15", seed=0)


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl", seed=0)


def jpeg(seed: int, size_hw: tuple[int, int]) -> bytes:
    """A seeded random RGB JPEG of (height, width) ``size_hw``."""
    array = np.random.default_rng(seed).integers(0, 255, (*size_hw, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pickapic_rows(n_pairs: int = 8, *, ties: int = 0, corrupt: int = 0) -> list[dict]:
    """``n_pairs`` decided rows (half of them with the winner in column 1) plus ties and corrupt rows.

    Images are 20x28 (h x w), so resizing to 16 keeps the height at 16 and center-crops the width.
    """
    rows = []
    for i in range(n_pairs):
        swap = i % 2 == 1
        rows.append(dict(caption=CAPTIONS[i % len(CAPTIONS)], jpg_0=jpeg(2 * i, (20, 28)), jpg_1=jpeg(2 * i + 1, (20, 28)),
                         label_0=0.0 if swap else 1.0, label_1=1.0 if swap else 0.0))
    for i in range(ties):
        rows.append(dict(caption="a tie", jpg_0=jpeg(1000 + i, (20, 28)), jpg_1=jpeg(2000 + i, (20, 28)),
                         label_0=0.5, label_1=0.5))
    for i in range(corrupt):
        rows.append(dict(caption="a corrupt row", jpg_0=jpeg(3000 + i, (20, 28)), jpg_1=b"\xff\xd8 not a jpeg",
                         label_0=1.0, label_1=0.0))
    return rows


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory) -> Path:
    """Eight clean decided pairs in the exact Pick-a-Pic v2 schema."""
    return write_pickapic_parquet(tmp_path_factory.mktemp("pickapic") / "train-00000.parquet", pickapic_rows(8))


@pytest.fixture(scope="session")
def messy_parquet(tmp_path_factory) -> Path:
    """Eight decided pairs, two ties and one corrupt image, shuffled into one shard."""
    rows = pickapic_rows(8, ties=2, corrupt=1)
    order = np.random.default_rng(0).permutation(len(rows))
    return write_pickapic_parquet(tmp_path_factory.mktemp("messy") / "train-00000.parquet", [rows[i] for i in order])


def tiny_overrides(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that point ``configs/tiny_sd15_dpo.yaml`` at the test's model, data and output."""
    return [f"diffusion.model.pretrained={model_dir}", f"diffusion.data.source={data}", f"output_dir={out}", *extra]

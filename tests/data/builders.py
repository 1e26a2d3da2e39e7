"""Builders for hand-made Pick-a-Pic v2 files: red images always deserve to win, blue ones to lose."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

RED = (220, 20, 20)
BLUE = (20, 20, 220)


def image_bytes(color=RED, size_hw=(24, 24), fmt="PNG", noise_seed=None) -> bytes:
    """An encoded solid image of (height, width) ``size_hw``; ``noise_seed`` makes the bytes unique."""
    array = np.zeros((*size_hw, 3), dtype=np.uint8) + np.array(color, dtype=np.uint8)
    if noise_seed is not None:
        array[0, 0] = np.random.default_rng(noise_seed).integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    full = image_bytes(RED, (64, 64), fmt="JPEG", noise_seed=3)
    return full[: len(full) // 2]


def standard_rows() -> list[dict]:
    """Nine rows, one per case. Kept (in order): rows 0, 1, 3, 4, 7; rows 3 and 4 are corrupt."""
    red, blue = image_bytes(RED, noise_seed=0), image_bytes(BLUE, noise_seed=1)
    return [
        dict(caption="plain", jpg_0=red, jpg_1=blue, label_0=1.0, label_1=0.0, model_0="m-a", model_1="m-b"),
        dict(caption="swapped", jpg_0=blue, jpg_1=red, label_0=0.0, label_1=1.0, model_0="m-b", model_1="m-a"),
        dict(caption="tie", jpg_0=red, jpg_1=blue, label_0=0.5, label_1=0.5),
        dict(caption="garbage", jpg_0=red, jpg_1=b"this is not an image", label_0=1.0, label_1=0.0),
        dict(caption="truncated", jpg_0=truncated_jpeg(), jpg_1=red, label_0=0.0, label_1=1.0),
        dict(caption="unlabelled", jpg_0=red, jpg_1=blue, label_0=1.0, label_1=0.0, has_label=False),
        dict(caption="identical", jpg_0=red, jpg_1=red, label_0=1.0, label_1=0.0),
        dict(caption="non-square", jpg_0=image_bytes(RED, (24, 40)), jpg_1=image_bytes(BLUE, (40, 24)),
             label_0=1.0, label_1=0.0, model_0="m-a", model_1="m-c"),
        dict(caption="tie 2", jpg_0=blue, jpg_1=red, label_0=0.5, label_1=0.5),
    ]


def mean_color(pixels) -> tuple[float, float, float]:
    """Mean (r, g, b) of a (3, H, W) tensor in [-1, 1], back in 0..255."""
    return tuple(float(((c + 1) * 127.5).mean()) for c in pixels)


def is_red(pixels) -> bool:
    r, _, b = mean_color(pixels)
    return r > 150 and b < 80


def is_blue(pixels) -> bool:
    r, _, b = mean_color(pixels)
    return b > 150 and r < 80

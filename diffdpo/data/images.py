"""Decoding stored image bytes (``_decode`` turns any failure into ``_CorruptImage``) and the
paired transform: resize, flip and crop both images of a pair the same way, then to a tensor in [-1, 1]."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


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

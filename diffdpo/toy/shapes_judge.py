"""A programmatic judge for the shapes world: it plays the human (or AI) labeller.

For an image and its caption it measures, from pixels only:

* **colour**: the mean chroma of the foreground, matched to the nearest palette colour;
* **shape**: which template (circle, square, triangle), placed at the foreground's centroid and
  scaled to its area, overlaps the foreground best (soft IoU);
* **position**: which region anchor the shape's centre is nearest to;
* **aesthetic** in [0, 1]: *fill* times *cleanliness*. Fill is the house style the labeller likes,
  a bold subject that fills the frame: the shape's size (side or diameter, estimated from its area)
  mapped linearly from 0 at 0.30 of the image width to 1 at 0.55 and above. Training renders have
  sizes in [0.34, 0.50], so the base model is not already there (its mean fill is about 0.4).
  Cleanliness is the share of foreground mass inside the best template, so a smear or stray blob
  does not count as filling the frame.

score = colour_ok + shape_ok + position_ok + 0.5 * aesthetic, so faithfulness dominates and the
aesthetic term breaks ties among faithful images. Two images whose scores differ by at most
``tie_margin`` are a tie (label 0.5/0.5), as near-equal pairs are for human raters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffdpo.toy.shapes import ANCHORS, COLOURS, POSITIONS, SHAPES, parse_caption, shape_mask

FILL_FROM, FILL_TO = 0.30, 0.55  # size (fraction of the image width) at which fill is 0 and 1
FOREGROUND_THRESHOLD = 0.35  # a pixel is foreground when its brightest channel exceeds this (of 255)
_AREA_PER_SIZE2 = {"circle": np.pi / 4, "square": 0.886**2, "triangle": 0.5 * 1.2 * 1.1}
_CENTROID_BELOW_CENTRE = {"circle": 0.0, "square": 0.0, "triangle": 1.1 / 6}  # of size: triangle's centroid is lower


@dataclass(frozen=True)
class Judgement:
    colour: str | None
    shape: str | None
    position: str | None
    colour_ok: bool
    shape_ok: bool
    position_ok: bool
    size: float  # estimated side / diameter as a fraction of the image width
    cleanliness: float

    @property
    def fill(self) -> float:
        return float(np.clip((self.size - FILL_FROM) / (FILL_TO - FILL_FROM), 0.0, 1.0))

    @property
    def aesthetic(self) -> float:
        return self.fill * self.cleanliness

    @property
    def score(self) -> float:
        return float(self.colour_ok) + float(self.shape_ok) + float(self.position_ok) + 0.5 * self.aesthetic


def _palette_chroma() -> tuple[list[str], np.ndarray]:
    names = list(COLOURS)
    rgb = np.asarray([COLOURS[n] for n in names], dtype=np.float64)
    return names, rgb / np.linalg.norm(rgb, axis=1, keepdims=True)


def judge_image(image: np.ndarray, caption: str) -> Judgement:
    """Judge one (H, W, 3) uint8 RGB image against its caption."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) RGB image, got shape {image.shape}")
    want = parse_caption(caption)
    res = image.shape[0]
    img = image.astype(np.float64) / 255.0
    weight = img.max(axis=2)  # (H, W) foreground strength (background is black)
    fg = weight > FOREGROUND_THRESHOLD
    if fg.sum() < 2:
        return Judgement(None, None, None, False, False, False, 0.0, 0.0)

    names, chroma = _palette_chroma()
    mean_rgb = (img * weight[..., None])[fg].sum(axis=0)
    colour = names[int(np.argmax(chroma @ (mean_rgb / (np.linalg.norm(mean_rgb) + 1e-12))))]

    ys, xs = np.mgrid[0:res, 0:res].astype(np.float64) + 0.5
    # coverage estimate: brightness relative to the shape's own full brightness (colours differ in it)
    w = np.where(fg, np.clip(weight / weight[fg].max(), 0.0, 1.0), 0.0)
    mass = w.sum()
    cx, cy = (w * xs).sum() / mass, (w * ys).sum() / mass
    area = mass  # in pixels, anti-aliased coverage counts fractionally

    best_shape, best_iou, best_cover, best_centre, best_size = None, -1.0, None, (cx, cy), 0.0
    for shape in SHAPES:
        size = float(np.sqrt(area / _AREA_PER_SIZE2[shape]))
        centre = (cx, cy - _CENTROID_BELOW_CENTRE[shape] * size)
        cover = shape_mask(shape, centre[0], centre[1], size, res)
        iou = np.minimum(cover, w).sum() / max(np.maximum(cover, w).sum(), 1e-12)
        if iou > best_iou:
            best_shape, best_iou, best_cover, best_centre, best_size = shape, float(iou), cover, centre, size

    anchors = {p: (ANCHORS[p][0] * res, ANCHORS[p][1] * res) for p in POSITIONS}
    position = min(POSITIONS, key=lambda p: (best_centre[0] - anchors[p][0]) ** 2 + (best_centre[1] - anchors[p][1]) ** 2)
    cleanliness = float((weight * (best_cover > 0.0)).sum() / max(weight.sum(), 1e-12))
    return Judgement(
        colour, best_shape, position,
        colour == want.colour, best_shape == want.shape, position == want.position,
        best_size / res, cleanliness,
    )


class ShapesJudge:
    """Callable scorer ``judge(images, captions) -> scores`` (the relabelling-hook signature).

    Images may be PIL images, (H, W, 3) uint8 arrays, or one (N, H, W, 3) array.
    """

    def __init__(self, tie_margin: float = 0.1) -> None:
        if tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
        self.tie_margin = tie_margin

    def judge(self, images: Sequence | np.ndarray, captions: Sequence[str]) -> list[Judgement]:
        arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
        if len(arrays) != len(captions):
            raise ValueError(f"got {len(arrays)} images but {len(captions)} captions")
        return [judge_image(a, c) for a, c in zip(arrays, captions)]

    def __call__(self, images: Sequence | np.ndarray, captions: Sequence[str]) -> list[float]:
        return [j.score for j in self.judge(images, captions)]

    def label(self, score_0: float, score_1: float) -> tuple[float, float]:
        """Pick-a-Pic labels ``(label_0, label_1)``: (1, 0), (0, 1), or (0.5, 0.5) for a tie."""
        if abs(score_0 - score_1) <= self.tie_margin:
            return 0.5, 0.5
        return (1.0, 0.0) if score_0 > score_1 else (0.0, 1.0)


def attribute_accuracy(judgements: Sequence[Judgement]) -> dict[str, float]:
    """Fraction of images with the right colour, shape, position, all three, and the mean score."""
    n = max(len(judgements), 1)
    return {
        "colour": sum(j.colour_ok for j in judgements) / n,
        "shape": sum(j.shape_ok for j in judgements) / n,
        "position": sum(j.position_ok for j in judgements) / n,
        "all": sum(j.colour_ok and j.shape_ok and j.position_ok for j in judgements) / n,
        "aesthetic": sum(j.aesthetic for j in judgements) / n,
        "score": sum(j.score for j in judgements) / n,
        "n": len(judgements),
    }

"""The shapes text-to-image world: small RGB images of one coloured shape, with captions.

A caption names a colour, a shape and a position ("a red triangle on the left"), so a model must
read all three words to be right. Images are rendered with 4x supersampling and box-downsampled, so
edges are anti-aliased like a real (if tiny) photo. The same geometry (palette, region anchors) is
what :mod:`diffdpo.toy.shapes_judge` measures from pixels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
#: Where each position puts the shape's centre, as fractions of (x, y) of the image.
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
BACKGROUND = (0, 0, 0)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    size: float = 0.42  # side / diameter as a fraction of the image width
    dx: float = 0.0  # offset of the centre from the anchor, fraction of the image width
    dy: float = 0.0

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"a {self.colour} {self.shape} {where}"


def all_captions() -> list[str]:
    """Every caption of the world (4 colours x 3 shapes x 5 positions = 60), in a fixed order."""
    return [Scene(c, s, p).caption for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]


def parse_caption(caption: str) -> Scene:
    """Inverse of :attr:`Scene.caption`; raises ``ValueError`` naming the caption if it is not of the world."""
    words = caption.strip().lower().split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    position = next((w for w in words if w in POSITIONS), None)
    if colour is None or shape is None or position is None:
        raise ValueError(f"caption {caption!r} does not name a colour, a shape and a position of the shapes world")
    return Scene(colour, shape, position)


def vocabulary() -> list[str]:
    """All words used by captions (for the word-level tokenizer)."""
    words = {w for cap in all_captions() for w in cap.split()}
    return sorted(words)


def random_scene(rng: np.random.Generator, caption: str | None = None, *, jitter: float = 0.06) -> Scene:
    """A scene with random (or the caption's) content, random size in [0.34, 0.5] and a small offset."""
    base = parse_caption(caption) if caption is not None else Scene(
        rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS)
    )
    return Scene(
        base.colour,
        base.shape,
        base.position,
        size=float(rng.uniform(0.34, 0.5)),
        dx=float(rng.uniform(-jitter, jitter)),
        dy=float(rng.uniform(-jitter, jitter)),
    )


def shape_mask(shape: str, cx: float, cy: float, size: float, resolution: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` centred at (cx, cy) (pixels), side/diameter ``size`` (pixels)."""
    n = resolution * SUPERSAMPLE
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    xs = (xs + 0.5) / SUPERSAMPLE - cx
    ys = (ys + 0.5) / SUPERSAMPLE - cy
    half = size / 2.0
    if shape == "circle":
        inside = xs**2 + ys**2 <= half**2
    elif shape == "square":
        side = size * 0.886  # equal area to the circle, so size alone does not give the shape away
        inside = (np.abs(xs) <= side / 2) & (np.abs(ys) <= side / 2)
    elif shape == "triangle":
        # upward isosceles triangle, base 1.2 * size wide, height 1.1 * size, centred on its bbox
        h, w = 1.1 * size, 1.2 * size
        top, bottom = -h / 2, h / 2
        rel = (ys - top) / h  # 0 at the apex, 1 at the base
        inside = (ys >= top) & (ys <= bottom) & (np.abs(xs) <= rel * w / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cover = inside.astype(np.float32).reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE)
    return cover.mean(axis=(1, 3))


def render(scene: Scene, resolution: int = 16) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 RGB image on a black background."""
    ax, ay = ANCHORS[scene.position]
    cx, cy = (ax + scene.dx) * resolution, (ay + scene.dy) * resolution
    cover = shape_mask(scene.shape, cx, cy, scene.size * resolution, resolution)[..., None]  # (H, W, 1)
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    background = np.asarray(BACKGROUND, dtype=np.float32)
    img = cover * colour + (1.0 - cover) * background
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene], resolution: int = 16) -> np.ndarray:
    """(N, H, W, 3) uint8."""
    return np.stack([render(s, resolution) for s in scenes])

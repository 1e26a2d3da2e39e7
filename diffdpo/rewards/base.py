"""What every text-to-image scorer shares: the batched call ``scorer(images, prompts) -> scores``, image
conversion, device and dtype, and the one-line error for a weights file that does not fit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffdpo.adapters import resolve_dtype

ImageLike = Any  # a PIL image or a uint8 array (H, W) / (H, W, 3) / (H, W, 4)


class WeightsError(ValueError):
    """A weights file that is missing or does not fit the architecture it is loaded into."""


def weights_error(scorer: str, expected: str, path: str | Path, err: BaseException | str,
                  hint: str = "set arch= to the architecture the weights were saved from") -> WeightsError:
    """One line naming the scorer, the expected architecture, the path, the gist of the cause and what to do."""
    return WeightsError(f"{scorer}: {path} does not hold {expected} weights ({_gist(err)}); {hint}")


def _gist(err: BaseException | str) -> str:
    """The informative line of a (often multi-line) loading error, at most 200 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Weights only load failed"):
        detail = [line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))]
        gist = "torch.load(weights_only=True) cannot read it" + (f": {detail[0]}" if detail else "")
    elif lines[0].endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for CLIP:" + first detail
        gist = f"{lines[0]} {lines[1]}"
    else:
        gist = lines[0]
    return gist if len(gist) <= 200 else gist[:197] + "..."


def check_local_file(scorer: str, expected: str, path: str | Path) -> None:
    """Missing local weights are a one-line error instead of an attempted download."""
    if not Path(path).is_file():
        raise WeightsError(f"{scorer}: weights file {path} not found (expected {expected} weights)")


def to_pil(image: ImageLike, index: int) -> Image.Image:
    """A PIL image or a uint8 array as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image {index}: expected a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), "
                             f"got {image.dtype} array of shape {image.shape}")
        return Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")
    raise ValueError(f"image {index}: expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


def resolve_device_dtype(device: str | torch.device, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype]:
    return torch.device(device), dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)


class Scorer:
    """``scorer(images, prompts) -> torch.Tensor`` of shape ``(N,)``, float32 on the CPU: one score per image,
    image ``i`` scored against ``prompts[i]``. Images go through the model ``batch_size`` at a time; the
    scores do not depend on ``batch_size`` or on the order of the pairs (up to float rounding)."""

    name = "scorer"
    uses_prompts = True

    def __init__(self, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 batch_size: int = 32):
        if batch_size <= 0:
            raise ValueError(f"{self.name}: batch_size must be positive, got {batch_size}")
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.batch_size = batch_size

    def __call__(self, images: Sequence[ImageLike], prompts: Sequence[str] | None = None) -> torch.Tensor:
        images = list(images)
        if self.uses_prompts or prompts is not None:
            if prompts is None or isinstance(prompts, str):
                raise ValueError(f"{self.name}: pass one prompt per image as a list of strings")
            prompts = list(prompts)
            if len(prompts) != len(images):
                raise ValueError(f"{self.name}: got {len(images)} images and {len(prompts)} prompts; "
                                 f"pass one prompt per image")
            bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
            if bad is not None:
                raise ValueError(f"{self.name}: prompt {bad} is a {type(prompts[bad]).__name__}, not a string")
        pil = [to_pil(image, i) for i, image in enumerate(images)]
        scores = []
        with torch.inference_mode():
            for start in range(0, len(pil), self.batch_size):
                batch_prompts = None if prompts is None else prompts[start:start + self.batch_size]
                scores.append(self.score_batch(pil[start:start + self.batch_size], batch_prompts).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        """Scores ``(B,)`` of one batch of RGB images; subclasses implement it."""
        raise NotImplementedError

"""Scorers on open_clip models: CLIP score, HPSv2 and the LAION aesthetic predictor v2.

Each loads an open_clip architecture (a name open_clip knows, or one registered with
``open_clip.add_model_config``) and a weights file through ``open_clip.create_model_and_transforms(arch,
pretrained=PATH)``, or a hub model given as ``path="hf-hub:org/repo"``; nothing is downloaded unless you pass a
hub id. open_clip is imported only when a scorer is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from diffdpo.rewards.base import Scorer, WeightsError, check_local_file, weights_error


def load_open_clip(scorer: str, arch: str, path: str | Path, device: torch.device,
                   dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)`` of open_clip architecture ``arch`` with the weights in ``path`` (a
    file: safetensors, or a .pt/.pth/.bin read with ``weights_only=True``; a ``{"state_dict": ...}`` checkpoint
    such as HPSv2's works too), in eval mode on ``device`` in ``dtype``."""
    import open_clip

    path = str(path)
    if path.startswith("hf-hub:"):
        model_name, pretrained, expected = path, None, path
    else:
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"{scorer}: unknown open_clip architecture {arch!r}; open_clip.list_models() lists "
                             f"the known ones and open_clip.add_model_config(PATH) registers a config JSON")
        check_local_file(scorer, f"open_clip {arch}", path)
        model_name, pretrained, expected = arch, path, f"open_clip {arch}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                     device="cpu", weights_only=True)
    except Exception as err:  # any failure to read or fit the file is the user's file, not our bug
        raise weights_error(scorer, expected, path, err) from err
    tokenizer = open_clip.get_tokenizer(model_name)
    return model.to(device=device, dtype=dtype).eval(), preprocess, tokenizer


class _OpenClipScorer(Scorer):
    default_arch = "ViT-B-32"

    def __init__(self, path: str | Path, *, arch: str | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", batch_size: int = 32):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.arch = arch or self.default_arch
        self.path = path
        self.model, self.preprocess, self.tokenizer = load_open_clip(self.name, self.arch, path, self.device,
                                                                     self.dtype)

    def embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 image and text embeddings, ``(B, D)`` each, row ``i`` for pair ``i``."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)  # (B, 3, H, W)
        tokens = self.tokenizer(prompts).to(self.device)  # (B, L)
        image_embs = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_embs = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return image_embs, text_embs


class ClipScore(_OpenClipScorer):
    """CLIP score (Hessel et al. 2021, arXiv 2104.08718; the torchmetrics ``CLIPScore`` convention):
    ``100 * max(cos(image_emb, text_emb), 0)`` for any open_clip architecture ``arch`` and weights file ``path``.
    OpenAI CLIP weights need a ``-quickgelu`` architecture (``ViT-L-14-quickgelu``)."""

    name = "clip"
    default_arch = "ViT-L-14-quickgelu"

    def score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        image_embs, text_embs = self.embed(images, prompts or [])
        return 100 * (image_embs * text_embs).sum(-1).clamp(min=0)  # (B,)


class HPSv2(_OpenClipScorer):
    """Human Preference Score v2 (Wu et al. 2023, arXiv 2306.09341; github.com/tgxs002/HPSv2 ``score.py``):
    open_clip ViT-H-14 with the HPS weights (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``), score =
    normalised image embedding . normalised text embedding (no logit scale; typically 0.2-0.3)."""

    name = "hpsv2"
    default_arch = "ViT-H-14"

    def score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        image_embs, text_embs = self.embed(images, prompts or [])
        return (image_embs * text_embs).sum(-1)  # (B,)


class AestheticMLP(torch.nn.Module):
    """The LAION aesthetic predictor v2 head (github.com/christophschuhmann/improved-aesthetic-predictor,
    ``simple_inference.py``): linear layers ``input_size -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts
    0.2, 0.2, 0.1 between and no activations, so ``layers.{0,2,4,6,7}`` are the linear layers' state-dict keys."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embs: torch.Tensor) -> torch.Tensor:
        return self.layers(embs)  # (B, input_size) -> (B, 1)


def load_aesthetic_head(path: str | Path, input_size: int, *, scorer: str = "aesthetic") -> AestheticMLP:
    """An :class:`AestheticMLP` for ``input_size``-d embeddings with the weights in ``path``: a safetensors file,
    or a .pth/.pt/.bin state dict read with ``torch.load(weights_only=True)``."""
    expected = f"aesthetic MLP head ({input_size} -> 1024 -> 128 -> 64 -> 16 -> 1)"
    check_local_file(scorer, expected, path)
    head = AestheticMLP(input_size)
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        head.load_state_dict(state, strict=True)
    except Exception as err:
        raise weights_error(scorer, expected, path, err,
                            "pass the predictor head trained on this CLIP's embeddings (set arch= if that is "
                            "not the CLIP)") from err
    return head.eval()


class LaionAesthetic(_OpenClipScorer):
    """LAION aesthetic predictor v2 (Schuhmann, github.com/christophschuhmann/improved-aesthetic-predictor):
    :class:`AestheticMLP` on the L2-normalised image embedding of CLIP ViT-L/14 (OpenAI weights: open_clip
    ``ViT-L-14-quickgelu``); roughly 1-10. The prompt is not used. ``head_path`` holds the head
    (``sac+logos+ava1-l14-linearMSE.pth`` or a safetensors copy), ``clip_path`` the CLIP weights; the head's
    input size is the CLIP embedding size."""

    name = "aesthetic"
    default_arch = "ViT-L-14-quickgelu"
    uses_prompts = False

    def __init__(self, head_path: str | Path, clip_path: str | Path, *, arch: str | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", batch_size: int = 32):
        check_local_file(self.name, "aesthetic MLP head", head_path)  # before the (large) CLIP loads
        super().__init__(clip_path, arch=arch, device=device, dtype=dtype, batch_size=batch_size)
        self.head_path = head_path
        embed_dim = getattr(self.model.visual, "output_dim", None)
        if embed_dim is None:
            raise WeightsError(f"aesthetic: cannot tell the image embedding size of {self.arch}")
        self.head = load_aesthetic_head(head_path, int(embed_dim)).to(self.device)

    def score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)  # (B, 3, H, W)
        image_embs = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (B, D)
        return self.head(image_embs).squeeze(-1)  # (B,)


__all__ = ["AestheticMLP", "ClipScore", "HPSv2", "LaionAesthetic", "load_aesthetic_head", "load_open_clip"]

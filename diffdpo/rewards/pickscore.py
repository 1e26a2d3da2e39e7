"""PickScore (Kirstain et al. 2023, arXiv 2305.01569; github.com/yuvalkirstain/PickScore): a CLIP-H/14
fine-tuned on Pick-a-Pic, in transformers ``CLIPModel`` format. transformers is imported only when a scorer
is built."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from diffdpo.rewards.base import Scorer, WeightsError, weights_error


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5.x a ``BaseModelOutputWithPooling`` holding them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _looks_local(path: str) -> bool:
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


class PickScore(Scorer):
    """``logit_scale.exp() * text_emb_norm . image_emb_norm`` per pair, as the PickScore reference code
    (around 20-23 for the released model); softmax over one prompt's candidates gives preference probabilities.

    ``path`` is a folder saved with ``CLIPModel.save_pretrained`` or a hub id you choose
    (``yuvalkirstain/PickScore_v1``); ``processor_path`` (default ``path``) holds the ``CLIPProcessor``
    (image processor + tokenizer; for the released model ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""

    name = "pickscore"

    def __init__(self, path: str | Path, *, processor_path: str | Path | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", batch_size: int = 32):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from transformers import AutoConfig, AutoProcessor, CLIPModel

        self.path, self.processor_path = str(path), str(processor_path or path)
        expected = "transformers CLIPModel (PickScore)"
        for what, where in (("model", self.path), ("processor", self.processor_path)):
            if _looks_local(where) and not Path(where).is_dir():
                raise WeightsError(f"pickscore: {what} folder {where} not found (expected a {expected} saved "
                                   f"with save_pretrained)")
        try:
            model_type = AutoConfig.from_pretrained(self.path).model_type
            if model_type != "clip":
                raise ValueError(f"its config is a {model_type!r} model, not 'clip'")
            model, info = CLIPModel.from_pretrained(self.path, output_loading_info=True)
            bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
            if bad:
                raise ValueError("; ".join(f"{k}: {sorted(map(str, v))[:3]}" for k, v in bad.items()))
        except Exception as err:
            raise weights_error(self.name, expected, self.path, err,
                                "pass a folder saved with CLIPModel.save_pretrained or its hub id") from err
        try:
            self.processor = AutoProcessor.from_pretrained(self.processor_path)
        except Exception as err:
            raise weights_error(self.name, "CLIPProcessor (image processor + tokenizer)", self.processor_path,
                                err, "pass processor_path= (for PickScore_v1: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
                                ) from err
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.max_length = int(model.config.text_config.max_position_embeddings)  # 77 for PickScore

    def score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        image_inputs = self.processor(images=images, return_tensors="pt")
        pixels = image_inputs["pixel_values"].to(self.device, self.dtype)  # (B, 3, H, W)
        text_inputs = self.processor(text=prompts or [], padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
        image_embs = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        text_embs = F.normalize(_features(self.model.get_text_features(
            input_ids=text_inputs["input_ids"].to(self.device),
            attention_mask=text_inputs["attention_mask"].to(self.device))).float(), dim=-1)
        return self.model.logit_scale.float().exp() * (text_embs * image_embs).sum(-1)  # (B,)


__all__ = ["PickScore"]

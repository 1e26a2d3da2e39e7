"""Tiny seeded CLIP models saved to disk, loaded back through the same paths a user passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

TINY_ARCH = "diffdpo-tiny-clip"
OTHER_ARCH = "diffdpo-tiny-clip-wide"  # same family, other embedding size: a wrong-architecture checkpoint


def _tiny_config(embed_dim: int, width: int) -> dict:
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """Registers two tiny open_clip architectures and saves seeded weights: ``{"arch", "safetensors",
    "pt_state_dict" (HPSv2's {"state_dict": ...} format), "other_arch_weights", "garbage"}``."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    for name, cfg in ((TINY_ARCH, _tiny_config(16, 32)), (OTHER_ARCH, _tiny_config(24, 32))):
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "tiny.safetensors")
    torch.save({"state_dict": state, "epoch": 1}, root / "tiny_hps.pt")
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in open_clip.create_model(OTHER_ARCH).state_dict().items()},
              root / "other.safetensors")
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    return {"arch": TINY_ARCH, "safetensors": root / "tiny.safetensors", "pt_state_dict": root / "tiny_hps.pt",
            "other_arch_weights": root / "other.safetensors", "garbage": root / "garbage.pt", "root": root}


@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory):
    """A tiny transformers CLIPModel and CLIPProcessor (byte-level vocabulary, no merges) saved with
    save_pretrained into one folder."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("pickscore")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, **ids},
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def images_and_prompts():
    """Five distinct seeded images (PIL, one as a uint8 array) of varied sizes, and five prompts."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in
              ((32, 32), (40, 48), (64, 32), (32, 32), (50, 50))]
    images = [Image.fromarray(a) for a in arrays]
    prompts = ["a red circle", "a blue square on the left", "two green triangles", "a photo of a cat",
               "an astronaut riding a horse, oil painting"]
    return images, arrays, prompts

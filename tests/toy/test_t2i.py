"""The tiny text-to-image model of the shapes world: real diffusers parts, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffdpo.diffusion.models import load_components, unet_class
from diffdpo.toy.t2i import (
    build_components,
    build_tokenizer,
    load_pipeline,
    make_pipeline,
    sample_images,
    save_pipeline,
)


def test_word_level_tokenizer():
    tok = build_tokenizer()
    ids = tok(["a red circle on the left", "a red circle on the right"], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (2, 8)
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    assert (ids[0] != ids[1]).sum() == 1  # one word differs -> one token differs
    assert tok.unk_token_id not in ids


def test_coordinate_channels_break_translation_symmetry():
    """The same input shifted by one latent pixel gives a prediction that is not just shifted."""
    c = build_components(0, coord_channels=True)
    x = torch.zeros(1, 4, 8, 8)
    cond = torch.zeros(1, 8, 64)
    with torch.no_grad():
        out = c.unet(x, torch.tensor([500]), cond).sample
    assert out.shape == (1, 4, 8, 8)
    assert not torch.allclose(out[..., :4], out[..., 4:].flip(-1))  # left and right halves differ


@pytest.mark.parametrize(("coord", "cls"), [(False, "UNet2DConditionModel"), (True, "CoordUNet2DConditionModel")])
def test_save_load_round_trip_and_training_loader(tmp_path, coord, cls):
    c = build_components(0, coord_channels=coord)
    folder = save_pipeline(make_pipeline(c), tmp_path / "toy")
    pipe = load_pipeline(folder)
    assert type(pipe.unet).__name__ == cls
    images = sample_images(pipe, ["a red circle on the left", "a blue square on the top"], [1, 2], steps=2)
    again = sample_images(pipe, ["a blue square on the top"], [2], steps=2)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images[1], again[0])  # an image depends only on its caption and seed
    comps = load_components(str(folder), "sd15")  # what the training task loads
    assert type(comps.unet).__name__ == cls
    for a, b in zip(comps.unet.parameters(), c.unet.parameters()):
        assert torch.equal(a, b)
    assert unet_class(str(tmp_path / "missing")).__name__ == "UNet2DConditionModel"

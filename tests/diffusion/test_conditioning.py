"""SD1.5/SDXL conditioning: SDXL text stack, per-image time ids from the real size and crop, prompt dropout."""

from __future__ import annotations

import torch

from diffdpo.data import collate_pairs, write_pickapic_parquet
from diffdpo.diffusion.conditioning import (
    apply_prompt_dropout,
    dropout_mask,
    encode_prompts_sdxl,
    sdxl_time_ids,
    unet_forward,
)
from diffdpo.diffusion.schedule import pair_generators
from diffdpo.diffusion.tiny import tiny_components
from tests.diffusion.conftest import jpeg


def test_sdxl_prompt_encoding_concatenates_penultimate_states_and_pools_the_second_encoder():
    c = tiny_components("sdxl")
    captions = ["a red circle", ""]
    out = encode_prompts_sdxl(c.tokenizers, c.text_encoders, captions)
    ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in c.tokenizers]
    with torch.no_grad():
        h1 = c.text_encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
        o2 = c.text_encoders[1](ids[1], output_hidden_states=True)
    torch.testing.assert_close(out["encoder_hidden_states"], torch.cat([h1, o2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(out["text_embeds"], o2.text_embeds)
    assert out["encoder_hidden_states"].shape == (2, 16, 64) and out["text_embeds"].shape == (2, 32)


def test_sdxl_time_ids_layout():
    ids = sdxl_time_ids(torch.tensor([[20, 28]]), torch.tensor([[0, 3]]), (16, 16))
    assert ids.tolist() == [[20.0, 28.0, 0.0, 3.0, 16.0, 16.0]]


def test_sdxl_time_ids_reflect_each_images_real_size_and_crop(sdxl_dir, tmp_path):
    """Pair 0: winner 20x28, loser 24x24 (both at the same relative crop); pair 1: 32x16 portrait.

    Resizing the short side to 16 and center-cropping gives (h, w, top, left):
    20x28 -> 16x22, left (22-16)//2 = 3; 24x24 -> 16x16, no crop; 32x16 -> 32x16, top (32-16)//2 = 8.
    """
    from accelerate import Accelerator

    from diffdpo.diffusion.config import DiffusionConfig
    from diffdpo.diffusion.task import DiffusionPreferenceTask

    rows = [dict(caption="a", jpg_0=jpeg(1, (20, 28)), jpg_1=jpeg(2, (24, 24)), label_0=1.0, label_1=0.0),
            dict(caption="b", jpg_0=jpeg(3, (32, 16)), jpg_1=jpeg(4, (32, 16)), label_0=0.0, label_1=1.0)]
    data = write_pickapic_parquet(tmp_path / "sizes.parquet", rows)
    cfg = DiffusionConfig()
    cfg.model.pretrained, cfg.model.kind = str(sdxl_dir), "sdxl"
    cfg.data.source, cfg.data.resolution, cfg.data.random_flip = str(data), 16, False
    task = DiffusionPreferenceTask(cfg, accelerator=Accelerator(cpu=True))
    batch = collate_pairs([task.dataset()[0], task.dataset()[1]])
    _, cond = task.inputs(batch, torch.tensor([0, 1]))
    # rows: winners of pairs 0 and 1, then losers of pairs 0 and 1
    assert cond["time_ids"].tolist() == [
        [20.0, 28.0, 0.0, 3.0, 16.0, 16.0],
        [32.0, 16.0, 8.0, 0.0, 16.0, 16.0],
        [24.0, 24.0, 0.0, 0.0, 16.0, 16.0],
        [32.0, 16.0, 8.0, 0.0, 16.0, 16.0],
    ]
    # and the UNet uses them: changing the original size changes its prediction
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 10, 10, 10])
    moved = dict(cond, time_ids=cond["time_ids"] + torch.tensor([100.0, 0, 0, 0, 0, 0]))
    with torch.no_grad():
        assert not torch.allclose(unet_forward(task.unet, x, t, cond), unet_forward(task.unet, x, t, moved))


def test_prompt_dropout_swaps_rows_for_the_empty_prompt_encoding():
    cond = {"encoder_hidden_states": torch.arange(24.0).reshape(3, 4, 2), "text_embeds": torch.ones(3, 5),
            "time_ids": torch.zeros(6, 6)}
    empty = {"encoder_hidden_states": torch.full((4, 2), -1.0), "text_embeds": torch.zeros(5)}
    out = apply_prompt_dropout(cond, empty, torch.tensor([False, True, False]))
    assert torch.equal(out["encoder_hidden_states"][1], empty["encoder_hidden_states"])
    assert torch.equal(out["encoder_hidden_states"][[0, 2]], cond["encoder_hidden_states"][[0, 2]])
    assert torch.equal(out["text_embeds"][1], torch.zeros(5)) and torch.equal(out["text_embeds"][0], torch.ones(5))
    assert out["time_ids"] is cond["time_ids"]


def test_dropout_mask_is_per_pair_and_has_the_right_rate():
    gens = lambda: pair_generators(0, range(4000), stream=1)  # noqa: E731
    mask = dropout_mask(gens(), 0.2)
    assert abs(mask.float().mean().item() - 0.2) < 0.03
    assert torch.equal(mask, dropout_mask(gens(), 0.2))  # a function of (seed, key) only
    assert not dropout_mask(gens()[:10], 0.0).any()

"""Loading through from_pretrained, LoRA, and the reference model (adapters disabled == frozen copy)."""

from __future__ import annotations

import copy

import torch

from diffdpo.adapters import adapters_disabled, add_lora_from, fold_adapters
from diffdpo.diffusion.conditioning import unet_forward
from diffdpo.diffusion.config import DiffusionLoraConfig
from diffdpo.diffusion.models import Reference, load_components
from diffdpo.diffusion.tiny import tiny_components


def _inputs(kind: str = "sd15", n: int = 4):
    g = torch.Generator().manual_seed(0)
    d = 32 if kind == "sd15" else 64
    cond = {"encoder_hidden_states": torch.randn(n, 16, d, generator=g)}
    if kind == "sdxl":
        cond.update(text_embeds=torch.randn(n, 32, generator=g), time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]] * n))
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([1, 200, 500, 999])[:n], cond


def test_from_pretrained_round_trip(sd15_dir, sdxl_dir):
    for kind, path in (("sd15", sd15_dir), ("sdxl", sdxl_dir)):
        loaded = load_components(str(path), kind, unet_dtype=torch.bfloat16)
        fresh = tiny_components(kind, seed=0)
        assert loaded.unet.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float32
        for a, b in zip(loaded.vae.state_dict().values(), fresh.vae.state_dict().values()):
            assert torch.equal(a, b)
        assert len(loaded.text_encoders) == (2 if kind == "sdxl" else 1)
        assert not any(p.requires_grad for p in loaded.vae.parameters())
        assert loaded.tokenizers[0]("a cat").input_ids == fresh.tokenizers[0]("a cat").input_ids
        assert loaded.scheduler.config.num_train_timesteps == 1000


def test_adapter_disabled_reference_equals_a_frozen_copy_exactly():
    for kind in ("sd15", "sdxl"):
        unet = tiny_components(kind).unet
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        params = add_lora_from(unet, DiffusionLoraConfig(enabled=True, rank=4))
        assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
        with torch.no_grad():  # make the adapter matter (B starts at zero)
            for p in params:
                p.normal_(0, 0.5)
        x, t, cond = _inputs(kind)
        ref = Reference.for_policy(unet)
        assert ref.frozen is None  # no second copy with LoRA
        with torch.no_grad():
            expected = unet_forward(frozen, x, t, cond)
            assert torch.equal(ref(x, t, cond), expected)
            assert not torch.allclose(unet_forward(unet, x, t, cond), expected)  # adapters back on afterwards
        assert ref(x, t, cond).grad_fn is None


def test_full_finetune_reference_is_a_frozen_copy():
    unet = tiny_components("sd15").unet.requires_grad_(True)
    ref = Reference.for_policy(unet)
    assert ref.frozen is not None and ref.frozen is not unet
    assert not any(p.requires_grad for p in ref.frozen.parameters())
    x, t, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(ref(x, t, cond), unet_forward(unet, x, t, cond))
        next(unet.parameters()).add_(1.0)  # training the policy leaves the reference alone
        assert not torch.equal(ref(x, t, cond), unet_forward(unet, x, t, cond))


def test_folding_adapters_makes_the_adapted_unet_the_reference():
    """After fold_adapters the UNet computes the same (adapters on) and the adapter-disabled
    reference equals it; the folded update is exactly the LoRA delta B @ A * alpha / r."""
    unet = tiny_components("sd15").unet
    params = add_lora_from(unet, DiffusionLoraConfig(enabled=True, rank=4))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # a trained adapter's scale; 0.5 amplifies fp32 rounding
    x, t, cond = _inputs()
    name, q = next((n, m) for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
    w0 = q.get_base_layer().weight.clone()
    delta = q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"]
    with torch.no_grad():
        adapted = unet_forward(unet, x, t, cond)
        with adapters_disabled(unet):
            assert not torch.allclose(unet_forward(unet, x, t, cond), adapted, atol=1e-3)  # the adapter matters
        assert fold_adapters(unet) == sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
        torch.testing.assert_close(unet_forward(unet, x, t, cond), adapted, rtol=1e-4, atol=1e-5)
        with adapters_disabled(unet):
            torch.testing.assert_close(unet_forward(unet, x, t, cond), adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.get_base_layer().weight, w0 + delta)
    assert all(torch.count_nonzero(m.weight) == 0 for n, m in unet.named_modules() if n.endswith("lora_B.default"))

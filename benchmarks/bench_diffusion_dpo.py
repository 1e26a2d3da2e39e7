"""Diffusion-DPO training step: the public reference recipe vs ours, side by side, in one process.

(a) reference recipe, as in the official Diffusion-DPO script (Wallace et al. 2023, arXiv 2311.12908):
    VAE encode and text encoder(s) every step, a separate frozen reference UNet, full fine-tuning of the UNet
    (AdamW for SD1.5, Adafactor for SDXL), the loss written inline.
(b) ours: latents and text embeddings from the cache (encoded once, before timing; the one-time cost per pair
    is printed too), LoRA on the UNet, reference = the same UNet with adapters disabled under no_grad, the
    loss from diffdpo.losses, t/noise from diffdpo.diffusion.schedule.

Both run the same UNet architecture on the same batch. CPU (default): tiny SD- and SDXL-style models (the
VAE sized so that its cost relative to the UNet matches SD1.5's, see ``_sd_style_components``);
throughput in pairs per CPU-second of the (single) training thread, so that other processes on shared cores do
not distort it, and peak memory as the increase of the process RSS over its value just before the
recipe is built (models, optimizer state, activations), sampled every millisecond by a thread; freed heap is
returned to the OS (malloc_trim) between recipes. torch runs on one thread (the CPUs here are shared).

    python -m benchmarks.bench_diffusion_dpo                        # CPU, tiny models
    python -m benchmarks.bench_diffusion_dpo --device cuda --sdxl-real --steps 3 --warmup 1 --rounds 2
        # real SDXL architecture (random weights), bf16, 128x128 latents, 1/2/4 pairs, checkpointing off/on
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BETA = 5000.0


# ------------------------------------------------------------------------------------------------
# memory


class PeakRSS:
    """Peak resident set size of this process, sampled by a background thread (CPU)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        import psutil

        self.proc, self.interval_s, self.peak, self._stop = psutil.Process(), interval_s, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that receives ``peak_mib`` on exit: CUDA max allocated, or the CPU RSS increase."""
    out: dict[str, float] = {}
    _release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    with PeakRSS() as rss:
        yield out
    out["peak_mib"] = rss.delta_mib


def _fix_mmap_threshold() -> None:
    """Make glibc serve every allocation >= 64 KiB by mmap and unmap it on free (no dynamic threshold), so the
    process RSS follows live tensor memory instead of keeping freed heap arenas."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ------------------------------------------------------------------------------------------------
# the two recipes


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 2, 3, R, R) winner first
    captions: list[str]
    original_sizes: torch.Tensor  # (B, 2, 2)
    crop_top_lefts: torch.Tensor  # (B, 2, 2)


def make_batch(pairs: int, resolution: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[resolution, resolution]] * 2).expand(pairs, 2, 2).clone()
    return Batch(torch.rand(pairs, 2, 3, resolution, resolution, generator=g) * 2 - 1,
                 [f"a photo of object {i}" for i in range(pairs)], sizes, torch.zeros(pairs, 2, 2, dtype=torch.long))


def reference_recipe(c: Any, batch: Batch, device: torch.device, dtype: torch.dtype, checkpointing: bool,
                     make_ref: Callable[[], Any] | None = None) -> Callable[[], float]:
    """The official script's step: encoders every step, frozen UNet copy, full fine-tune, inline loss.

    ``make_ref`` builds the frozen reference UNet (default: a copy of the policy in ``dtype``)."""
    import copy

    unet = c.unet.to(device).train().requires_grad_(True)
    ref_unet = make_ref() if make_ref is not None else copy.deepcopy(unet).to(dtype)
    ref_unet.requires_grad_(False).eval()
    vae, encoders = c.vae.to(device), [e.to(device, dtype) for e in c.text_encoders]
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if c.kind == "sdxl":
        from transformers.optimization import Adafactor

        opt = Adafactor(unet.parameters(), lr=2.048e-5, scale_parameter=False, relative_step=False,
                        warmup_init=False, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(unet.parameters(), lr=2.048e-5, weight_decay=1e-2, foreach=True)
    sched = c.scheduler
    b = batch.pixels.shape[0]
    res = batch.pixels.shape[-1]

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            px = torch.cat(batch.pixels.to(device).unbind(1))  # (2B, 3, R, R) winners then losers
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                latents = vae.encode(px.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
                cond = _encode_text_official(c, encoders, batch.captions, device)
            noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)
            t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device).repeat(2)
            noisy = sched.add_noise(latents, noise, t)
            added = None
            if c.kind == "sdxl":
                ids = torch.tensor([res, res, 0, 0, res, res], device=device, dtype=torch.float32)
                added = {"text_embeds": cond["text_embeds"], "time_ids": ids.repeat(2 * b, 1)}
            pred = unet(noisy, t, cond["encoder_hidden_states"], added_cond_kwargs=added).sample
            mse = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
            m_w, m_l = mse.chunk(2)
            with torch.no_grad():
                ref = ref_unet(noisy, t, cond["encoder_hidden_states"], added_cond_kwargs=added).sample
                r = (ref.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
            r_w, r_l = r.chunk(2)
            loss = -F.logsigmoid(-0.5 * BETA * ((m_w - m_l) - (r_w - r_l))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _encode_text_official(c: Any, encoders: list[Any], captions: list[str], device: torch.device
                          ) -> dict[str, torch.Tensor]:
    from diffdpo.diffusion.conditioning import Conditioner

    cond = Conditioner(c.kind, None, c.tokenizers, encoders).encode_prompts(captions)  # same math as the script
    return {k: torch.cat([v, v]) for k, v in cond.items()}  # (2B, ...)


@dataclass
class Cache:
    """What our cache holds for the batch: latents (B, 2, C, h, w) and text conditioning {k: (B, ...)}."""

    latents: torch.Tensor
    text: dict[str, torch.Tensor]
    seconds_per_pair: float


def build_cache(c: Any, batch: Batch, device: torch.device, dtype: torch.dtype) -> Cache:
    """Encode the batch once with the frozen VAE and text encoder(s) (outside the timed/measured window)."""
    from diffdpo.diffusion.conditioning import Conditioner

    b = batch.pixels.shape[0]
    t0 = time.perf_counter()
    conditioner = Conditioner(c.kind, c.vae.to(device), c.tokenizers, [e.to(device, dtype) for e in c.text_encoders])
    px = batch.pixels.to(device)
    flat = conditioner.encode_images(px.transpose(0, 1).reshape(2 * b, *px.shape[2:]))  # (2B, C, h, w)
    latents = flat.reshape(2, b, *flat.shape[1:]).transpose(0, 1).contiguous()  # (B, 2, C, h, w)
    text = conditioner.encode_prompts(batch.captions)
    _sync(device)
    return Cache(latents, text, (time.perf_counter() - t0) / b)


def our_recipe(unet: Any, scheduler: Any, kind: str, cache: Cache, batch: Batch, device: torch.device,
               dtype: torch.dtype, checkpointing: bool, lora_rank: int = 8) -> Callable[[], float]:
    """Cached latents/embeddings, LoRA, adapter-disabled reference, diffdpo.losses; no VAE or text encoder."""
    from diffdpo.adapters import add_lora_from
    from diffdpo.diffusion.conditioning import sdxl_time_ids, unet_forward
    from diffdpo.diffusion.config import DiffusionLoraConfig
    from diffdpo.diffusion.models import Reference
    from diffdpo.diffusion.schedule import (
        build_schedule,
        mse_to_logp,
        noise_pairs,
        pair_generators,
        per_sample_mse,
    )
    from diffdpo.losses import preference_loss

    b, res = batch.pixels.shape[0], batch.pixels.shape[-1]
    latents = cache.latents.to(device)
    cond = {k: torch.cat([v, v]).to(device, dtype) for k, v in cache.text.items()}  # (2B, ...)
    if kind == "sdxl":
        sizes = batch.original_sizes.transpose(0, 1).reshape(-1, 2)  # (2B, 2)
        crops = batch.crop_top_lefts.transpose(0, 1).reshape(-1, 2)
        cond["time_ids"] = sdxl_time_ids(sizes, crops, (res, res)).to(device)
    unet = unet.to(device, dtype)
    params = add_lora_from(unet, DiffusionLoraConfig(enabled=True, rank=lora_rank))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    ref = Reference.for_policy(unet)
    schedule = build_schedule(scheduler)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True)  # same Adam code path as (a)
    counter = iter(range(10**9))

    def step() -> float:
        keys = [next(counter) * b + i for i in range(b)]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            nz = noise_pairs(schedule, latents, pair_generators(0, keys))
            mse = per_sample_mse(unet_forward(unet, nz.x_t, nz.timesteps, cond), nz.target)  # (2B,)
            r = per_sample_mse(ref(nz.x_t, nz.timesteps, cond), nz.target)  # (2B,), no grad
            logp, ref_logp = mse_to_logp(mse), mse_to_logp(r)
            out = preference_loss(logp[:b], logp[b:], ref_logp[:b], ref_logp[b:], beta=BETA)
        loss = out.losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# ------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Result:
    pairs_per_s: float
    peak_mib: float
    cache_s_per_pair: float | None = None


def _time(step: Callable[[], float], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` steps: CUDA wall time, or on CPU this thread's CPU time (torch runs on one thread,
    forward and backward in the calling thread), which other processes on the shared cores do not inflate."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    _sync(device)
    t0 = clock()
    for _ in range(steps):
        step()
    _sync(device)
    return clock() - t0


def compare(build_ours: Callable[[], Callable[[], float]], build_ref: Callable[[], Callable[[], float]],
            pairs: int, steps: int, warmup: int, rounds: int, device: torch.device) -> tuple[Result, Result]:
    """Peak memory of each recipe over its build, warm-up and first timed round; throughput from the best of
    ``rounds`` alternating timed rounds (the CPUs are shared, so the minimum time is the least disturbed)."""
    recipes: dict[str, Callable[[], float]] = {}
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    peaks: dict[str, float] = {}
    for name, build in (("ours", build_ours), ("ref", build_ref)):  # ours first: one-time growth counts against us
        with peak_memory(device) as mem:
            recipes[name] = build()
            for _ in range(warmup):
                recipes[name]()
            times[name].append(_time(recipes[name], steps, device))
        peaks[name] = mem["peak_mib"]
    for _ in range(rounds - 1):
        for name in ("ours", "ref"):
            times[name].append(_time(recipes[name], steps, device))
    ours, ref = (Result(pairs * steps / min(times[n]), peaks[n]) for n in ("ours", "ref"))
    return ours, ref


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print_pair(label: str, ref: Result, ours: Result) -> None:
    speed = ours.pairs_per_s / ref.pairs_per_s
    mem = ours.peak_mib / ref.peak_mib if ref.peak_mib > 0 else float("nan")
    print(f"{label:<34} reference {ref.pairs_per_s:8.2f} pairs/s {ref.peak_mib:9.1f} MiB | ours "
          f"{ours.pairs_per_s:8.2f} pairs/s {ours.peak_mib:9.1f} MiB | speed x{speed:.2f}, memory x{mem:.2f}"
          + (f" | cache build {ours.cache_s_per_pair * 1e3:.1f} ms/pair, once" if ours.cache_s_per_pair else ""),
          flush=True)


# ------------------------------------------------------------------------------------------------
# CPU: tiny models


def bench_tiny(args: argparse.Namespace) -> None:
    from diffdpo.diffusion.tiny import tiny_scheduler

    device = torch.device(args.device)
    batch = make_batch(args.pairs, args.resolution)
    print(f"device {device}, torch threads {torch.get_num_threads()}, pairs/s per CPU-second of the training thread, "
          f"{args.pairs} pairs/step, images "
          f"{args.resolution}px, best of {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up; memory = "
          + ("CUDA max allocated" if device.type == "cuda" else "peak process RSS increase (psutil, 1 ms sampling)"))
    _fix_mmap_threshold()
    # one unmeasured round of both recipes: lazy imports (peft, Adafactor) and kernel set-up happen here
    warm = build_cache(_sd_style_components("sd15"), batch, device, torch.float32)
    our_recipe(_tiny_unet("sd15"), tiny_scheduler(), "sd15", warm, batch, device, torch.float32, False)()
    reference_recipe(_sd_style_components("sdxl"), batch, device, torch.float32, False)()
    del warm
    for kind in ("sd15", "sdxl"):
        comps = _sd_style_components(kind)
        build_cache(comps, batch, device, torch.float32)
        cache = build_cache(comps, batch, device, torch.float32)  # timed warm
        del comps
        _release_memory()
        for ckpt in (False, True) if args.checkpointing == "both" else (args.checkpointing == "on",):
            label = f"tiny {kind}{' +grad ckpt' if ckpt else ''}"
            # ours builds only what a cached run loads (UNet + scheduler: tiny_components seeds, then builds
            # the UNet first, so the weights are identical); the reference builds every component
            ours, ref = compare(
                lambda k=kind, g=ckpt, c=cache: our_recipe(_tiny_unet(k), tiny_scheduler(), k, c, batch, device,
                                                           torch.float32, g),
                lambda k=kind, g=ckpt: reference_recipe(_sd_style_components(k), batch, device, torch.float32, g),
                args.pairs, args.steps, args.warmup, args.rounds, device)
            ours.cache_s_per_pair = cache.seconds_per_pair
            _print_pair(label, ref, ours)


def _sd_style_components(kind: str) -> Any:
    """Tiny components whose VAE has SD's shape (4 blocks, 8x downsampling, 2 layers per block) and SD1.5's cost
    ratio: VAE encode / UNet forward = 1.32 FLOPs per image here (64 px images, 8x8 latents) vs 1.39 for SD1.5
    at 512 px (both counted with torch.utils.flop_counter), so the reference recipe's per-step VAE is neither
    cheaper nor dearer than in a real run."""
    from diffusers import AutoencoderKL

    from diffdpo.diffusion.tiny import tiny_components

    c = tiny_components(kind, seed=0)
    torch.manual_seed(1)
    c.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 32),
                          layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8).requires_grad_(False).eval()
    return c


def _tiny_unet(kind: str) -> Any:
    from diffdpo.diffusion.tiny import tiny_unet

    torch.manual_seed(0)
    return tiny_unet(kind)


# ------------------------------------------------------------------------------------------------
# GPU: the real SDXL architecture with random weights


SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.13025, force_upcast=True,
)


def _random_unet_on(device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """The SDXL UNet allocated directly on ``device`` in ``dtype`` (no CPU init, no fp32 transient), N(0, 0.02)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet = unet.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return unet


def sdxl_real_components(device: torch.device, dtype: torch.dtype, unet_dtype: torch.dtype) -> Any:
    """SDXL-base architecture (UNet, VAE, CLIP-L and OpenCLIP-bigG text towers) with random weights, on ``device``.

    Weight values do not change speed or memory, so each recipe gets its own random draw.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffdpo.diffusion.models import DiffusionComponents
    from diffdpo.diffusion.tiny import tiny_scheduler, tiny_tokenizer

    tok = tiny_tokenizer(max_length=77)  # the vocabulary does not matter for speed; sequence length does
    common = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_act="quick_gelu")
    with torch.device(device):
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, **common))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, **common))
        vae = AutoencoderKL(**SDXL_VAE)
    for m in (clip_l, clip_g, vae):
        m.requires_grad_(False).eval()
    encoders = [clip_l.to(dtype), clip_g.to(dtype)]
    unet = _random_unet_on(device, unet_dtype)
    return DiffusionComponents("sdxl", unet, vae, [tok, tiny_tokenizer(77)], encoders, tiny_scheduler())


def bench_sdxl_real(args: argparse.Namespace) -> None:
    from diffdpo.diffusion.tiny import tiny_scheduler

    device, dtype = torch.device(args.device), torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"SDXL-base architecture, random weights, {dtype} autocast, 1024px images = 128x128 latents, "
          f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}; memory = CUDA max "
          f"allocated above the pre-recipe level; "
          f"best of {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up", flush=True)
    for pairs in args.sdxl_pairs:
        batch = make_batch(pairs, 1024)
        comps = sdxl_real_components(device, dtype, dtype)
        cache = build_cache(comps, batch, device, dtype)
        cache = build_cache(comps, batch, device, dtype)  # timed warm
        cache = Cache(cache.latents.cpu(), {k: v.cpu() for k, v in cache.text.items()}, cache.seconds_per_pair)
        del comps
        _release_memory()
        for ckpt in (False, True):
            label = f"sdxl-real {pairs} pairs{' +grad ckpt' if ckpt else ''}"
            try:
                ours, ref = compare(
                    lambda g=ckpt, bt=batch, c=cache: our_recipe(_random_unet_on(device, dtype), tiny_scheduler(),
                                                                  "sdxl", c, bt, device, dtype, g),
                    lambda g=ckpt, bt=batch: reference_recipe(
                        sdxl_real_components(device, dtype, torch.float32), bt, device, dtype, g,
                        make_ref=lambda: _random_unet_on(device, dtype, seed=1)),
                    pairs, args.steps, args.warmup, args.rounds, device)
                ours.cache_s_per_pair = cache.seconds_per_pair
            except torch.cuda.OutOfMemoryError as exc:
                print(f"{label}: out of memory ({str(exc).splitlines()[0]})", flush=True)
                _release_memory()
                continue
            _print_pair(label, ref, ours)
            _release_memory()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (tiny models)")
    p.add_argument("--resolution", type=int, default=64, help="image side for the tiny models (latents: /8)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds; the fastest counts")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    p.add_argument("--sdxl-real", action="store_true", help="real SDXL UNet architecture (needs a GPU)")
    p.add_argument("--sdxl-pairs", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    if args.sdxl_real:
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            raise SystemExit("--sdxl-real needs --device cuda and a visible GPU")
        bench_sdxl_real(args)
    else:
        bench_tiny(args)


if __name__ == "__main__":
    main()

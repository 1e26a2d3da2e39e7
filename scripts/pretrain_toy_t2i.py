"""Pretrain the tiny text-to-image base of the shapes world and write it to data/toy_t2i/.

    python scripts/pretrain_toy_t2i.py                 # the shipped checkpoint's settings
    python scripts/pretrain_toy_t2i.py unet_steps=500 out=/tmp/toy_t2i   # a quick one

Seeded: the same settings on the same torch version reproduce the checkpoint. Writes a diffusers
pipeline folder (safetensors) plus ``base_report.json`` with the base model's colour, shape and
position accuracy as judged from pixels on fresh samples (all 60 captions, fixed seeds).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffdpo.config import load_config
from diffdpo.toy.shapes import all_captions
from diffdpo.toy.shapes_judge import ShapesJudge, attribute_accuracy
from diffdpo.toy.t2i import (
    ToyT2IConfig,
    build_components,
    make_pipeline,
    pretrain_unet,
    pretrain_vae,
    sample_images,
    save_pipeline,
)


def evaluate_base(pipe, n: int) -> dict:
    """Colour, shape and position accuracy (and the judge's aesthetic) on ``n`` samples over all captions."""
    captions = all_captions()
    caps = [captions[i % len(captions)] for i in range(n)]
    images = sample_images(pipe, caps, [10_000 + i for i in range(n)], progress=True, desc="base eval")
    return attribute_accuracy(ShapesJudge().judge(images, caps))


def main(argv: list[str]) -> int:
    cfg = load_config(ToyT2IConfig, None, argv)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    components = build_components(cfg.seed, cfg.coord_channels)
    std = pretrain_vae(components.vae, cfg, rng)
    print(f"vae latent std {std:.4f} -> scaling_factor {1 / std:.4f} ({time.time() - t0:.0f}s)")
    pretrain_unet(components, cfg, rng)
    train_s = time.time() - t0

    pipe = make_pipeline(components)
    out = Path(cfg.out)
    save_pipeline(pipe, out)

    acc = evaluate_base(pipe, cfg.eval_samples)
    report = {"config": vars(cfg), "train_seconds": round(train_s, 1), "torch": torch.__version__, "base_accuracy": acc}
    (out / "base_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["base_accuracy"], indent=2))
    print(f"wrote {out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Pretrain the tiny class-conditional voxel diffusion model and write it to data/toy_voxels/.

    python scripts/pretrain_toy_voxels.py                    # the shipped checkpoint's settings
    python scripts/pretrain_toy_voxels.py steps=200 out=/tmp/toy_voxels   # a quick one

Seeded: the same settings on the same torch version reproduce the checkpoint. Writes ``unet/``
(diffusers, safetensors), ``voxel_model.json`` and ``base_report.json`` with the base model's stable
rate (pybullet, DSO protocol), fidelity and size on held-out seeds, and the training set's own
stable rate for comparison.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from diffdpo.config import load_config
from diffdpo.toy.voxel_model import (
    ToyVoxelsConfig,
    VoxelGenerator,
    build_unet,
    config_dict,
    pretrain,
    save_generator,
)


def main(argv: list[str]) -> int:
    cfg = load_config(ToyVoxelsConfig, None, argv)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    gen = VoxelGenerator(build_unet(cfg.seed), cfg.objective)  # type: ignore[arg-type]
    stats = pretrain(gen, cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_generator(gen, out, {"pretrain": config_dict(cfg), **stats})

    from diffdpo.dso.evaluate import evaluate_generator

    bank = gen.reference_bank()
    report = {"config": config_dict(cfg), **stats, "torch": torch.__version__,
              "base": evaluate_generator(gen, bank, cfg.eval_per_class).summary}
    (out / "base_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["base"], indent=2))
    print(f"wrote {out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

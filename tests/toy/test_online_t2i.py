"""Online Diffusion-DPO rounds (``diffdpo online-t2i``): pairs from samples, chunking, and a two-round run on a
tiny SD1.5 pipeline folder scored by a tiny PickScore model (the real-pipeline path), CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from diffdpo.cli import main
from diffdpo.config import load_config
from diffdpo.recipes.online_t2i import (
    OnlineT2IConfig,
    _chunk_pairs,
    label_pair,
    run_online_t2i,
    sample_pairs,
    split_prompts,
)
from tests.diffusion.conftest import sd15_dir  # noqa: F401  (fixture)
from tests.rewards.conftest import tiny_pickscore  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]


def test_label_pair_by_hand():
    assert label_pair(0.9, 0.2, 0.1) == (1.0, 0.0)
    assert label_pair(0.2, 0.9, 0.1) == (0.0, 1.0)
    assert label_pair(0.5, 0.45, 0.1) == (0.5, 0.5)  # within the margin
    assert label_pair(0.5, 0.5, 0.0) == (0.5, 0.5)


def test_chunks_are_whole_batches_and_whole_pairs():
    for k, batch in ((6, 128), (4, 8), (5, 8), (2, 1), (3, 32)):
        chunk = _chunk_pairs(k, batch)
        assert chunk >= 1 and (chunk * k) % batch == 0 and chunk * k >= min(256, np.lcm(k, batch))


def _seeded_images(caps: list[str], seeds: list[int]) -> np.ndarray:
    """A deterministic stand-in generator: each image is a function of its seed alone."""
    return np.stack([np.random.default_rng(s).integers(0, 256, (16, 16, 3), dtype=np.uint8) for s in seeds])


def _brightness(images, prompts) -> list[float]:
    return [float(np.asarray(im).mean()) / 255 for im in images]


def test_pairs_do_not_depend_on_the_chunking(tmp_path):
    """Batch 1 (chunks of 256 images) and batch 256 (one chunk) give the same rows; image j of pair i has seed
    1e6 * (seed + 1) + k * i + j, and the best and worst by the scorer are kept."""
    prompts = [f"prompt {i}" for i in range(40)]
    a = sample_pairs(_seeded_images, _brightness, prompts, 2, tmp_path / "a.parquet", images_per_prompt=4, batch_size=1,
                     seed=3)
    b = sample_pairs(_seeded_images, _brightness, prompts, 2, tmp_path / "b.parquet", images_per_prompt=4,
                     batch_size=256, seed=3)
    da, db = pd.read_parquet(a.path), pd.read_parquet(b.path)
    assert a.rows == 80 and da.drop(columns=[]).equals(db)
    # pair 5: its four images and the kept best/worst, recomputed by hand
    seeds = [4_000_000 + 4 * 5 + j for j in range(4)]
    scores = _brightness(_seeded_images([], seeds), [])
    from diffdpo.toy.pairs import jpeg_bytes

    imgs = _seeded_images([], seeds)
    assert da.loc[5, "jpg_0"] == jpeg_bytes(imgs[int(np.argmax(scores))])
    assert da.loc[5, "jpg_1"] == jpeg_bytes(imgs[int(np.argmin(scores))])
    assert (da.loc[5, "label_0"], da.loc[5, "label_1"]) == (1.0, 0.0)


def test_split_prompts_is_a_seeded_partition():
    prompts = [f"p{i}" for i in range(10)]
    train, held = split_prompts(prompts, 3, seed=1)
    assert len(held) == 3 and sorted(train + held) == sorted(prompts) and split_prompts(prompts, 3, 1) == (train, held)
    with pytest.raises(ValueError, match="heldout_prompts"):
        split_prompts(prompts, 10, 0)


def test_shipped_online_configs_load():
    paths = sorted((REPO / "configs").glob("online_*.yaml"))
    assert {p.name for p in paths} >= {"online_t2i_toy.yaml", "online_sd15_pickscore.yaml"}
    for path in paths:
        cfg = load_config(OnlineT2IConfig, path)
        assert (REPO / cfg.train_config).is_file()
        assert yaml.safe_load((REPO / cfg.train_config).read_text())["task"] == "diffusion"
    toy = load_config(OnlineT2IConfig, REPO / "configs" / "online_t2i_toy.yaml")
    assert (REPO / toy.prompts).is_file() and (REPO / toy.base / "model_index.json").is_file()


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_bad_config_is_a_one_line_error(capsys):
    assert _exit_code(["online-t2i", "--config", str(REPO / "configs" / "online_t2i_toy.yaml"),
                       "images_per_prompt=1"]) == 2
    assert "images_per_prompt" in capsys.readouterr().err
    assert _exit_code(["online-t2i", "base=data/toy_t2i", "prompts=data/shapes_prompts.txt"]) == 2
    assert "train_config" in capsys.readouterr().err


def test_two_rounds_on_a_tiny_sd15_pipeline_with_pickscore(sd15_dir, tiny_pickscore, tmp_path):  # noqa: F811
    """The real-pipeline path: a diffusers SD1.5 folder, a PickScore model by path, LoRA training per round;
    round 2 samples from round 1's tuned model and trains on both rounds' pairs; then tuned vs base."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green dots\nan orange star\n")
    out = tmp_path / "online"
    cfg = OnlineT2IConfig(
        base=str(sd15_dir), prompts=str(prompts), heldout_prompts=1,
        scorer=f"pickscore={tiny_pickscore}", train_config=str(REPO / "configs" / "tiny_sd15_dpo.yaml"),
        train_overrides=["max_steps=2", "diffusion.data.resolution=32"], out_dir=str(out), rounds=2,
        pairs_per_prompt=2, images_per_prompt=3, steps=2, guidance_scale=3.0, resolution=32, batch_size=4,
        eval_seeds=2,
    )
    report = run_online_t2i(cfg)
    assert [r["new_pairs"] for r in report["rounds"]] == [6, 6] and [r["trained_on"] for r in report["rounds"]] == [6, 12]
    assert report["prompts"]["train"] == 3 and len(report["prompts"]["heldout"]) == 1
    round2 = pd.read_parquet(out / "pairs_round2.parquet")
    assert set(round2["model_0"]) == {"round1"} and not set(round2["caption"]) & set(report["prompts"]["heldout"])
    assert (Path(report["final_dir"]) / "pytorch_lora_weights.safetensors").is_file()
    wr = report["scorers"]["pickscore"]["win_rate"]
    assert wr["n"] == 4 * 2 and report["heldout_scorers"]["pickscore"]["win_rate"]["n"] == 1 * 2
    assert json.loads((out / "report.json").read_text())["rounds"] == report["rounds"]
    assert (out / "grid.png").is_file()

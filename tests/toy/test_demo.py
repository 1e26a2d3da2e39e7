"""The shapes-world demo: pairs in the Pick-a-Pic schema, and a shortened end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffdpo.recipes.demo import REPO_ROOT, DemoConfig, format_summary, run_demo, tuned_pipeline
from diffdpo.recipes.online_t2i import sample_pairs
from diffdpo.toy.pairs import split_captions
from diffdpo.toy.shapes import Scene, all_captions, render
from diffdpo.toy.t2i import load_pipeline

BASE = REPO_ROOT / "data" / "toy_t2i"




def test_split_captions_is_a_seeded_partition():
    train, held = split_captions(12, seed=0)
    assert len(held) == 12 and len(train) == 48 and not set(train) & set(held)
    assert sorted(train + held) == sorted(all_captions())
    assert split_captions(12, seed=0) == (train, held)
    with pytest.raises(ValueError, match="n_heldout"):
        split_captions(60, seed=0)


def _caption_scene(cap: str, **kw) -> Scene:
    return Scene(*[w for w in cap.split() if w not in ("a", "on", "the", "in")], **kw)


def test_pairs_round_trip_through_the_pickapic_reader(tmp_path):
    """Known renders stand in for the generator: image 0 right, image 1 wrong colour (-> label 1/0); equal ones tie."""
    from diffdpo.data import PickAPicPairs
    from diffdpo.toy.shapes_judge import ShapesJudge

    captions = ["a red circle on the left", "a blue square on the top"]

    def render_samples(caps, seeds):
        out = []
        for k, cap in enumerate(caps):
            scene = _caption_scene(cap)
            if k % 4 == 1:  # pair 0: image 1 has the wrong colour; pair 1 (k = 2, 3): identical -> tie
                scene = Scene("green", scene.shape, scene.position)
            out.append(render(scene, 16))
        return np.stack(out)

    summary = sample_pairs(render_samples, ShapesJudge(), captions, 2, tmp_path / "pairs.parquet", tie_margin=0.1)
    assert (summary.rows, summary.ties, summary.decided) == (4, 2, 2)
    ds = PickAPicPairs(tmp_path / "pairs.parquet", 16)
    # the tied pair holds two identical renders: the reader drops it as identical (are_different False)
    assert len(ds) == 2 and ds.stats.identical_dropped + ds.stats.ties_dropped == 2
    item = ds[0]
    winner = ((item["pixel_values"][0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert winner[8, 4, 0] > 200 and winner[8, 4, 1] < 80  # the red circle (winner) comes first


def test_best_of_k_pairs_keep_the_best_and_the_worst(tmp_path):
    """k = 4 known renders per prompt: right but small (fill 0.24), wrong colour and position, right and
    large (fill 1), wrong shape. The pair is (large right, wrong colour + position), labelled 1/0."""
    from diffdpo.data import PickAPicPairs
    from diffdpo.toy.shapes_judge import ShapesJudge

    variants = [Scene("red", "circle", "left", size=0.36), Scene("blue", "circle", "right"),
                Scene("red", "circle", "left", size=0.56), Scene("red", "square", "left")]
    seen = []

    def render_samples(caps, seeds):
        seen.append(list(seeds))
        return np.stack([render(variants[k % 4], 16) for k in range(len(caps))])

    summary = sample_pairs(render_samples, ShapesJudge(), ["a red circle on the left"], 1, tmp_path / "p.parquet",
                           images_per_prompt=4)
    assert (summary.rows, summary.decided) == (1, 1) and len(set(seen[0])) == 4
    item = PickAPicPairs(tmp_path / "p.parquet", 16)[0]
    win, lose = (((item["pixel_values"][i].permute(1, 2, 0).numpy() + 1) * 127.5).round() for i in (0, 1))
    big, small = (render(variants[i], 16).astype(np.float64) for i in (2, 0))
    assert np.abs(win - big).max() <= 40 < np.abs(win - small).max()  # the large red circle, through JPEG
    assert lose[8, 12, 2] > 200  # the blue circle on the right
    with pytest.raises(ValueError, match="images_per_prompt"):
        sample_pairs(render_samples, ShapesJudge(), ["a red circle on the left"], 1, tmp_path / "q.parquet",
                     images_per_prompt=1)


def test_reused_pairs_are_counted_and_must_not_leak_held_out_captions(tmp_path):
    from diffdpo.data import write_pickapic_parquet
    from diffdpo.recipes.demo import reuse_pairs
    from diffdpo.toy.pairs import jpeg_bytes

    train, held = split_captions(12, seed=0)
    img = jpeg_bytes(render(Scene("red", "circle", "left"), 16))
    row = {"jpg_0": img, "jpg_1": img, "model_0": "m", "model_1": "m"}
    rows = [{**row, "caption": train[0], "label_0": 1.0, "label_1": 0.0},
            {**row, "caption": train[1], "label_0": 0.5, "label_1": 0.5},
            {**row, "caption": train[0], "label_0": 0.0, "label_1": 1.0}]
    path = write_pickapic_parquet(tmp_path / "pairs.parquet", rows)
    summary = reuse_pairs(str(path), train, held)
    assert (summary.rows, summary.ties, summary.decided) == (3, 1, 2)
    assert summary.train_captions == [train[0], train[1]]  # in split order, only those present
    leaky = write_pickapic_parquet(tmp_path / "leaky.parquet", rows + [{**row, "caption": held[3], "label_0": 1.0,
                                                                         "label_1": 0.0}])
    with pytest.raises(ValueError, match="held-out captions"):
        reuse_pairs(str(leaky), train, held)
    with pytest.raises(FileNotFoundError, match="no such file"):
        reuse_pairs(str(tmp_path / "missing.parquet"), train, held)


@pytest.mark.slow
@pytest.mark.skipif(not (BASE / "model_index.json").is_file(), reason="shipped base checkpoint missing")
def test_shortened_demo_runs_and_writes_its_report(tmp_path):
    cfg = DemoConfig(
        out_dir=str(tmp_path / "demo"), pairs_per_caption=1, rounds=1, eval_comparisons=8, eval_heldout_comparisons=4,
        sample_steps=4, pair_steps=3, threads=1,
        train_overrides=["max_steps=2", "per_device_batch_size=4", "log_every=1", "progress_bar=false", "tensorboard=false"],
    )
    result = run_demo(cfg)
    report = json.loads(result.report_path.read_text())
    assert report["train"]["steps"] == 2
    assert report["win_rate"]["n"] == 8 and report["heldout_win_rate"]["n"] == 4
    assert report["pairs"]["rows"] == 48 and report["pairs"]["decided"] + report["pairs"]["ties"] == 48
    for key in ("colour", "shape", "position"):
        assert 0.0 <= report["accuracy_tuned"][key] <= 1.0
    from PIL import Image

    grid, curves = Image.open(result.grid_path), Image.open(result.curves_path)
    assert grid.format == curves.format == "PNG" and grid.width > grid.height  # 2 rows of 8 comparisons
    assert curves.width > 2 * curves.height  # three metric panels side by side
    assert "win rate tuned vs base" in format_summary(report)
    assert set(report["seconds_by_phase"]) == {"sampling_and_judging_pairs", "training", "evaluation"}
    assert sum(report["seconds_by_phase"].values()) <= report["seconds"]
    # the fused adapter (what the demo samples and evaluates with) predicts what the unfused one does
    base, unfused = load_pipeline(BASE), load_pipeline(BASE)
    unfused.load_lora_weights(report["train"]["final_dir"])
    fused = tuned_pipeline(str(BASE), report["train"]["final_dir"])
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, base.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        out = [p.unet(x, torch.tensor([500, 100]), emb).sample for p in (base, unfused, fused)]
    moved = (out[1] - out[0]).abs().max()
    assert moved > 1e-6 and (out[2] - out[1]).abs().max() < 1e-2 * moved  # fusing twice would be off by 1x
    # a second run reuses the first run's pairs for round 1, then samples round 2 from its own tuned
    # model and trains a fresh adapter on both rounds' pairs
    again = run_demo(DemoConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "again"),
                                   "pairs": report["pairs"]["path"], "rounds": 2})).report
    assert not (tmp_path / "again" / "pairs.parquet").exists()  # round 1 sampled nothing
    assert [r["new_pairs"] for r in again["rounds"]] == [48, 48] and again["pairs"]["rows"] == 96
    assert [r["trained_on"] for r in again["rounds"]] == [48, 96]
    merged = pd.read_parquet(again["pairs"]["path"])
    assert len(merged) == 96 and set(merged["caption"]) <= set(split_captions(12, 0)[0])
    assert again["rounds"][0]["final_dir"] != again["rounds"][1]["final_dir"]
    assert "over 2 rounds" in format_summary(again)
    with pytest.raises(ValueError, match="rounds"):
        DemoConfig(rounds=0)
    with pytest.raises(ValueError, match="pair_steps"):
        DemoConfig(pair_steps=0)

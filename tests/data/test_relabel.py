"""relabel_pairs: AI-feedback labels in batches, same schema, exact counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffdpo.data import PickAPicPairs, relabel_pairs, write_pickapic_parquet
from tests.data.builders import BLUE, RED, image_bytes, is_blue, is_red, standard_rows

GRAY_A = image_bytes((128, 128, 128), noise_seed=5)
GRAY_B = image_bytes((129, 128, 128), noise_seed=6)  # scores within a small margin of GRAY_A


class RedScorer:
    """Score = mean red minus mean blue; records every call's size."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, images, captions):
        self.calls.append((len(images), len(captions)))
        return [float(np.asarray(im, dtype=float)[..., 0].mean() - np.asarray(im, dtype=float)[..., 2].mean())
                for im in images]


def test_relabel_flips_ties_and_batches(pairs_file: Path, tmp_path: Path):
    rows = standard_rows()
    # Human labels that disagree with the scorer, a near-tie for the scorer, a former tie decided.
    rows.append(dict(caption="wrong", jpg_0=image_bytes(RED, noise_seed=9), jpg_1=image_bytes(BLUE, noise_seed=8),
                     label_0=0.0, label_1=1.0))
    rows.append(dict(caption="gray", jpg_0=GRAY_A, jpg_1=GRAY_B, label_0=1.0, label_1=0.0))
    source = write_pickapic_parquet(tmp_path / "in.parquet", rows, row_group_size=3)
    scorer = RedScorer()
    out = tmp_path / "out.parquet"
    with pytest.warns(RuntimeWarning, match="2 row.*copied unchanged: in.parquet:3"):
        result = relabel_pairs(source, scorer, batch_size=3, tie_margin=2.0, out_path=out, progress=False)
    # 11 rows; 2 corrupt ("garbage", "truncated") are copied unchanged; 9 scored in batches of 3 pairs.
    assert scorer.calls == [(6, 6), (6, 6), (6, 6)]
    assert result.skipped == 2 and {r for r, _ in result.skipped_rows} == {"in.parquet:3", "in.parquet:4"}
    # plain, swapped, non-square: unchanged; identical (red/red): tie; "wrong": flipped; "gray": tie;
    # tie, tie 2: decided; unlabelled: decided.
    assert (result.unchanged, result.flipped, result.ties, result.decided) == (3, 1, 2, 3)
    assert result.total == 11 and result.out_paths == [out]

    before, after = pq.read_table(source), pq.read_table(out)
    assert after.schema.equals(before.schema, check_metadata=True)
    assert after.num_rows == before.num_rows
    for name in ("caption", "jpg_0", "jpg_1", "created_at", "image_0_uid", "ranking_id"):
        assert after.column(name).equals(before.column(name)), name
    labels = list(zip(after.column("label_0").to_pylist(), after.column("label_1").to_pylist()))
    captions = after.column("caption").to_pylist()
    by_caption = dict(zip(captions, labels))
    assert by_caption["wrong"] == (1.0, 0.0) and by_caption["gray"] == (0.5, 0.5)
    assert by_caption["tie 2"] == (0.0, 1.0)  # jpg_1 is the red one
    assert by_caption["garbage"] == (1.0, 0.0)  # skipped: unchanged
    best = after.column("best_image_uid").to_pylist()[captions.index("wrong")]
    assert best == after.column("image_0_uid").to_pylist()[captions.index("wrong")]
    assert all(after.column("has_label").to_pylist()[i] for i, c in enumerate(captions) if c != "garbage"
               and c != "truncated")

    # The relabelled file trains: every kept, decodable pair has the red image first.
    ds = PickAPicPairs(out, 8, validate_images=False)
    for i in range(len(ds)):
        item = ds[i]
        if item is not None:
            assert is_red(item["pixel_values"][0]) and is_blue(item["pixel_values"][1])


def test_relabel_shards_keep_names_and_batches_span_shards(tmp_path: Path):
    good = [r for r in standard_rows() if r["caption"] in ("plain", "swapped", "non-square", "tie")]
    shards = tmp_path / "shards"
    write_pickapic_parquet(shards / "train-0.parquet", good[:3])
    write_pickapic_parquet(shards / "train-1.parquet", good[3:] * 2)
    scorer = RedScorer()
    result = relabel_pairs(shards, scorer, batch_size=4, progress=False)
    assert scorer.calls == [(8, 8), (2, 2)]  # 5 pairs: a full batch across both shards, then the rest
    out_dir = tmp_path / "shards_relabelled"
    assert result.out_paths == [out_dir / "train-0.parquet", out_dir / "train-1.parquet"]
    assert [pq.read_metadata(p).num_rows for p in result.out_paths] == [3, 2]
    assert not list(out_dir.glob(".*.tmp"))


@pytest.mark.filterwarnings("ignore:relabel_pairs")
def test_relabel_checks_its_inputs(pairs_file: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="one score per image"):
        relabel_pairs(pairs_file, lambda images, captions: [0.0], out_path=tmp_path / "x.parquet", progress=False)
    assert not (tmp_path / "x.parquet").exists()
    with pytest.raises(ValueError, match="is the source shard itself"):
        relabel_pairs(pairs_file, RedScorer(), out_path=pairs_file, progress=False)
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_parquet(str(pairs_file), cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="needs out_path"):
        relabel_pairs(hf, RedScorer(), progress=False)
    result = relabel_pairs(hf, RedScorer(), batch_size=2, out_path=tmp_path / "hf.parquet", progress=False)
    assert result.total == 9 and pq.read_metadata(tmp_path / "hf.parquet").num_rows == 9

"""PickAPicPairs: what is dropped and counted, winner first, paired geometry, sources, corrupt rows."""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffdpo.data import (
    PICKAPIC_V2_COLUMNS,
    PickAPicPairs,
    collate_pairs,
    pickapic_v2_schema,
    write_pickapic_parquet,
)
from tests.data.builders import BLUE, RED, image_bytes, is_blue, is_red, standard_rows

# Kept rows of standard_rows(), in order, and the corrupt ones among them.
KEPT = ["plain", "swapped", "garbage", "truncated", "non-square"]
CORRUPT = {"pairs.parquet:3", "pairs.parquet:4"}


def test_written_file_has_the_exact_pickapic_v2_schema(pairs_file: Path):
    schema = pq.read_schema(pairs_file)
    assert [(f.name, str(f.type)) for f in schema] == [
        (name, {"string": "string", "binary": "binary", "bool": "bool", "float64": "double",
                "int64": "int64", "timestamp[ns]": "timestamp[ns]"}[kind])
        for name, kind in PICKAPIC_V2_COLUMNS
    ]
    assert schema.equals(pickapic_v2_schema(), check_metadata=False)
    table = pq.read_table(pairs_file)
    row = table.slice(1, 1).to_pylist()[0]
    assert row["best_image_uid"] == row["image_1_uid"]  # label_1 == 1: image 1 is best
    assert table.column("are_different").to_pylist()[6] is False  # the identical pair
    assert table.column("has_label").to_pylist()[5] is False


def test_counts_are_exact(pairs_file: Path):
    ds = PickAPicPairs(pairs_file, 16)
    s = ds.stats
    assert (s.rows_read, s.ties_dropped, s.unlabelled_dropped, s.identical_dropped, s.filtered, s.kept) == (
        9, 2, 1, 1, 0, 5)
    assert s.rows_read == s.ties_dropped + s.unlabelled_dropped + s.identical_dropped + s.filtered + s.kept
    assert len(ds) == 5 and ds.captions() == KEPT
    assert "5 kept of 9 rows read" in s.summary() and "2 ties" in s.summary()


def test_winner_first_by_pixel_content(pairs_file: Path):
    ds = PickAPicPairs(pairs_file, 16)
    for i in (0, 1, 4):  # plain, swapped (label_0 == 0), non-square
        item = ds[i]
        assert item["pixel_values"].shape == (2, 3, 16, 16)
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
        assert is_red(item["pixel_values"][0]) and is_blue(item["pixel_values"][1]), item["caption"]
    assert ds[1]["caption"] == "swapped" and ds[1]["row_id"] == "pairs.parquet:1"


def test_corrupt_rows_give_none_and_are_named(pairs_file: Path, caplog):
    ds = PickAPicPairs(pairs_file, 16)
    with caplog.at_level(logging.WARNING, logger="diffdpo.data.pairs"):
        items = [ds[i] for i in range(len(ds))]
    assert [it is None for it in items] == [False, False, True, True, False]
    assert ds.stats.corrupt == 2
    reasons = dict(ds.stats.corrupt_rows)
    assert set(reasons) == CORRUPT
    assert reasons["pairs.parquet:3"].startswith("jpg_1: not a recognised image format")
    assert reasons["pairs.parquet:4"].startswith("jpg_0:")  # truncated JPEG
    assert "pairs.parquet:3" in caplog.text and "pairs.parquet:4" in caplog.text
    assert "pairs.parquet:3" in ds.stats.summary()


def test_corrupt_warnings_are_capped(tmp_path: Path, caplog):
    rows = [dict(caption=f"bad {i}", jpg_0=b"junk", jpg_1=b"junk2", label_0=1.0, label_1=0.0) for i in range(12)]
    ds = PickAPicPairs(write_pickapic_parquet(tmp_path / "bad.parquet", rows), 8)
    with caplog.at_level(logging.WARNING, logger="diffdpo.data.pairs"):
        assert all(ds[i] is None for i in range(12))
    assert ds.stats.corrupt == 12 and len(ds.stats.corrupt_rows) == 12
    assert len(caplog.records) == 5 and "only counted" in caplog.records[-1].getMessage()


def test_validate_images_excludes_corrupt_rows_up_front(pairs_file: Path):
    with pytest.warns(RuntimeWarning, match=r"2 corrupt Pick-a-Pic pair\(s\) excluded: pairs.parquet:3"):
        ds = PickAPicPairs(pairs_file, 16, validate_images=True)
    s = ds.stats
    assert len(ds) == s.kept == 3 and s.corrupt == 2
    assert s.rows_read == s.ties_dropped + s.unlabelled_dropped + s.identical_dropped + s.filtered + s.kept + s.corrupt
    assert ds.captions() == ["plain", "swapped", "non-square"]
    assert all(ds[i] is not None for i in range(len(ds)))
    # The fingerprint names the data, not the validation: a cache built either way is the same.
    assert ds.fingerprint() == PickAPicPairs(pairs_file, 16).fingerprint()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_skips_corrupt_rows(pairs_file: Path, num_workers: int):
    ds = PickAPicPairs(pairs_file, 16)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=num_workers,
                                         collate_fn=functools.partial(collate_pairs, resolution=16))
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 0, 1]  # the all-corrupt batch is empty
    assert batches[1]["pixel_values"].shape == (0, 2, 3, 16, 16)
    row_ids = [r for b in batches for r in b["row_ids"]]
    assert row_ids == ["pairs.parquet:0", "pairs.parquet:1", "pairs.parquet:7"]
    assert batches[0]["captions"] == ["plain", "swapped"]
    full = batches[0]
    assert full["original_sizes"].shape == (2, 2, 2) and full["crop_top_lefts"].dtype == torch.long
    assert all(is_red(p[0]) and is_blue(p[1]) for b in batches for p in b["pixel_values"])


def test_collate_all_none_without_resolution():
    out = collate_pairs([None, None])
    assert out["pixel_values"].shape[0] == 0 and out["captions"] == [] and out["row_ids"] == []


def test_original_sizes_and_center_crop_for_non_square_images(pairs_file: Path):
    item = PickAPicPairs(pairs_file, 16)[4]  # winner 24x40 (h x w), loser 40x24
    # Shorter side -> 16: 24x40 -> 16x26, 40x24 -> 26x16; centre crops at left (26-16)/2 = 5, top 5.
    assert item["original_sizes"].tolist() == [[24, 40], [40, 24]]
    assert item["crop_top_lefts"].tolist() == [[0, 5], [5, 0]]


def _gradient_png(height: int, width: int, blue: int) -> bytes:
    """Red = 4 * column, green = 4 * row: every pixel says where it came from."""
    ys, xs = np.mgrid[0:height, 0:width]
    array = np.stack([xs * 4, ys * 4, np.full_like(xs, blue)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels + 1) * 127.5).round().to(torch.uint8).numpy()


def test_same_random_crop_and_flip_for_both_images(tmp_path: Path):
    """Sources already at the target height (no resampling): the crop's pixels must be exactly the source
    columns ``left .. left+R-1`` (or, flipped, of the mirrored image), identical for winner and loser."""
    res, height, width = 16, 16, 48
    rows = [dict(caption=f"p{i}", jpg_0=_gradient_png(height, width, 0), jpg_1=_gradient_png(height, width, 200),
                 label_0=0.0, label_1=1.0) for i in range(12)]
    path = write_pickapic_parquet(tmp_path / "grad.parquet", rows)
    ds = PickAPicPairs(path, res, random_crop=True, random_flip=True, seed=7)
    lefts, flips = set(), set()
    for i in range(len(ds)):
        item = ds[i]
        px = _to_uint8(item["pixel_values"])  # (2, 3, R, R)
        assert (px[0, 2] == 200).all() and (px[1, 2] == 0).all()  # winner (label_1) is the blue-200 image
        np.testing.assert_array_equal(px[0, :2], px[1, :2])  # same crop and flip
        (top, left), (top_l, left_l) = item["crop_top_lefts"].tolist()
        assert (top, left) == (top_l, left_l) and top == 0
        columns = px[0, 0, 0] // 4  # source column of each output column
        flipped = bool(columns[0] > columns[-1])
        # Crop coordinates are in the (flipped) resized image, as SDXL's micro-conditioning expects.
        expected = np.arange(left, left + res)
        np.testing.assert_array_equal(columns, width - 1 - expected if flipped else expected)
        lefts.add(left)
        flips.add(flipped)
    assert len(lefts) > 3 and flips == {True, False}
    assert item["original_sizes"].tolist() == [[height, width]] * 2


def test_crop_is_deterministic_per_seed_index_and_epoch(tmp_path: Path):
    rows = [dict(caption="p", jpg_0=_gradient_png(16, 48, 0), jpg_1=_gradient_png(16, 48, 9),
                 label_0=1.0, label_1=0.0)] * 8
    path = write_pickapic_parquet(tmp_path / "grad.parquet", rows)

    def corners(ds):
        return [tuple(ds[i]["crop_top_lefts"][0].tolist()) for i in range(len(ds))]

    a = PickAPicPairs(path, 16, random_crop=True, seed=1)
    b = PickAPicPairs(path, 16, random_crop=True, seed=1)
    assert corners(a) == corners(b)
    first = corners(a)
    a.set_epoch(1)
    assert corners(a) != first
    a.set_epoch(0)
    assert corners(a) == first
    assert corners(PickAPicPairs(path, 16, random_crop=True, seed=2)) != first


def test_random_crop_of_different_sizes_is_the_same_relative_crop(tmp_path: Path):
    rows = [dict(caption=f"p{i}", jpg_0=_gradient_png(16, 48, 0), jpg_1=_gradient_png(32, 96, 0),
                 label_0=1.0, label_1=0.0) for i in range(6)]
    ds = PickAPicPairs(write_pickapic_parquet(tmp_path / "g.parquet", rows), 16, random_crop=True)
    for i in range(len(ds)):
        item = ds[i]
        # 32x96 resizes to 16x48, the same as the winner: same crop position.
        assert item["original_sizes"].tolist() == [[16, 48], [32, 96]]
        assert item["crop_top_lefts"][0].tolist() == item["crop_top_lefts"][1].tolist()


def test_top_left_crop_when_no_crop_mode(tmp_path: Path):
    rows = [dict(caption="p", jpg_0=_gradient_png(16, 48, 0), jpg_1=_gradient_png(16, 48, 9),
                 label_0=1.0, label_1=0.0)]
    item = PickAPicPairs(write_pickapic_parquet(tmp_path / "g.parquet", rows), 16, center_crop=False)[0]
    assert item["crop_top_lefts"].tolist() == [[0, 0], [0, 0]]
    assert (_to_uint8(item["pixel_values"])[0, 0, 0] // 4).tolist() == list(range(16))


def test_datasets_dataset_source(pairs_file: Path, tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_parquet(str(pairs_file), cache_dir=str(tmp_path / "hf"))
    ds = PickAPicPairs(hf, 16)
    assert ds.captions() == KEPT and ds.stats.ties_dropped == 2
    assert ds.row_id(1) == "dataset[train]:1"
    # A shuffled/selected view (indices mapping): rows must still match their own images.
    view = hf.shuffle(seed=3).select(range(9))
    shuffled = PickAPicPairs(view, 16)
    assert sorted(shuffled.captions()) == sorted(KEPT)
    for i in range(len(shuffled)):
        item = shuffled[i]
        if item is None:
            continue
        assert is_red(item["pixel_values"][0]) and is_blue(item["pixel_values"][1])
    assert {r for r, _ in shuffled.stats.corrupt_rows} == {  # row ids are positions in the view
        shuffled.row_id(i) for i, c in enumerate(shuffled.captions()) if c in ("garbage", "truncated")
    }
    assert shuffled.stats.corrupt == 2


def test_shard_directory_glob_and_list_sources(tmp_path: Path):
    rows = standard_rows()
    shards = tmp_path / "shards"
    write_pickapic_parquet(shards / "train-00000-of-00002.parquet", rows[:4])
    write_pickapic_parquet(shards / "train-00001-of-00002.parquet", rows[4:])
    by_dir = PickAPicPairs(shards, 8)
    assert by_dir.captions() == KEPT and by_dir.stats.rows_read == 9
    assert by_dir.row_id(4) == "train-00001-of-00002.parquet:3"  # "non-square" is row 7 = shard 2 row 3
    by_glob = PickAPicPairs(str(shards / "train-*.parquet"), 8)
    by_list = PickAPicPairs(sorted(shards.glob("*.parquet")), 8)
    assert by_glob.captions() == by_list.captions() == KEPT
    assert by_dir.fingerprint() == by_glob.fingerprint() == by_list.fingerprint()
    write_pickapic_parquet(shards / "test-00000-of-00001.parquet", rows[:2])
    with pytest.raises(ValueError, match="several splits.*train-\\*.parquet"):
        PickAPicPairs(shards, 8)


def test_model_filter_and_max_rows(pairs_file: Path):
    seen = []

    def no_model_c(model_0: str, model_1: str) -> bool:
        seen.append((model_0, model_1))
        return "m-c" not in (model_0, model_1)

    ds = PickAPicPairs(pairs_file, 8, model_filter=no_model_c)
    assert ds.stats.filtered == 1 and "non-square" not in ds.captions()
    assert len(seen) == len(set(seen))  # evaluated once per distinct pair of models
    short = PickAPicPairs(pairs_file, 8, max_rows=2)
    assert short.captions() == ["plain", "swapped"] and short.stats.rows_read == 2 and short.stats.kept == 2


def test_keep_ties_in_stored_order(pairs_file: Path):
    ds = PickAPicPairs(pairs_file, 8, drop_ties=False)
    assert ds.stats.ties_dropped == 0 and ds.captions() == ["plain", "swapped", "tie", *KEPT[2:], "tie 2"]
    tie = ds[2]
    assert is_red(tie["pixel_values"][0]) and is_blue(tie["pixel_values"][1])  # not swapped


def test_errors_name_the_file_and_what_to_do(tmp_path: Path, pairs_file: Path):
    table = pq.read_table(pairs_file).drop_columns(["label_1"])
    pq.write_table(table, tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match=r"broken.parquet: missing column\(s\) \['label_1'\]"):
        PickAPicPairs(tmp_path / "broken.parquet", 8)
    with pytest.raises(ValueError, match="caption_column"):
        PickAPicPairs(pairs_file, 8, caption_column="prompt")
    (tmp_path / "notparquet.parquet").write_bytes(b"nope")
    with pytest.raises(ValueError, match="notparquet.parquet: cannot be read as parquet"):
        PickAPicPairs(tmp_path / "notparquet.parquet", 8)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        PickAPicPairs(tmp_path / "missing.parquet", 8)
    with pytest.raises(IndexError):
        PickAPicPairs(pairs_file, 8)[5]


def test_images_of_other_modes_and_formats_are_converted(tmp_path: Path):
    gray = io.BytesIO()
    Image.new("L", (20, 20), 90).save(gray, format="PNG")
    rgba = io.BytesIO()
    Image.new("RGBA", (20, 20), (*RED, 128)).save(rgba, format="PNG")
    rows = [dict(caption="modes", jpg_0=rgba.getvalue(), jpg_1=gray.getvalue(), label_0=1.0, label_1=0.0),
            dict(caption="jpeg", jpg_0=image_bytes(RED, fmt="JPEG"), jpg_1=image_bytes(BLUE, fmt="JPEG"),
                 label_0=1.0, label_1=0.0)]
    ds = PickAPicPairs(write_pickapic_parquet(tmp_path / "m.parquet", rows), 8)
    assert ds[0]["pixel_values"].shape == (2, 3, 8, 8)
    assert is_red(ds[1]["pixel_values"][0]) and is_blue(ds[1]["pixel_values"][1])

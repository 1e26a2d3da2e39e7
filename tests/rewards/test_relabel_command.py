"""`diffdpo relabel`: AI-feedback relabelling of Pick-a-Pic pairs with a real scorer class (tiny PickScore)."""

from __future__ import annotations

import pyarrow.parquet as pq

from diffdpo.cli import main
from diffdpo.data import write_pickapic_parquet
from tests.diffusion.conftest import pickapic_rows


def test_relabel_writes_the_scorers_labels_and_prints_the_counts(tiny_pickscore, tmp_path, capsys):
    from PIL import Image

    from diffdpo.rewards import build_scorer

    rows = pickapic_rows(6, ties=2, corrupt=1)
    source = write_pickapic_parquet(tmp_path / "train.parquet", rows)
    out = tmp_path / "relabelled.parquet"
    assert main(["relabel", str(source), str(out), "--scorer", "pickscore", "--scorer-path", str(tiny_pickscore),
                 "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "9 rows:" in printed and "1 skipped" in printed and "agreement with the earlier labels" in printed
    table = pq.read_table(out).to_pylist()
    assert len(table) == len(rows)
    # the labels are the scorer's: recompute them independently, image by image
    import io

    scorer = build_scorer("pickscore", tiny_pickscore)
    for row, new in zip(rows[:8], table[:8]):
        images = [Image.open(io.BytesIO(row[k])).convert("RGB") for k in ("jpg_0", "jpg_1")]
        s0, s1 = scorer(images, [row["caption"]] * 2).tolist()
        assert (new["label_0"], new["label_1"]) == ((1.0, 0.0) if s0 > s1 else (0.0, 1.0) if s1 > s0 else (0.5, 0.5))
    assert (table[8]["label_0"], table[8]["label_1"]) == (rows[8]["label_0"], rows[8]["label_1"])  # corrupt: copied


def test_relabel_with_a_wrong_scorer_path_is_one_line(tmp_path, capsys):
    import pytest

    source = write_pickapic_parquet(tmp_path / "train.parquet", pickapic_rows(2))
    with pytest.raises(SystemExit) as exc:
        main(["relabel", str(source), "--scorer", "pickscore", "--scorer-path", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and "nothing" in err

"""The benchmarks run (tiny settings, CPU): what they print and write is checked, never how fast it was."""

from __future__ import annotations

import json


def test_scorer_benchmark_runs_and_batching_does_not_change_scores(tmp_path, capsys):
    from benchmarks.bench_scorers import REAL_ARCHS, main

    out = tmp_path / "scorers.json"
    assert main(["--n", "4", "--repeats", "1", "--scorers", "clip,pickscore", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scorer"] for r in rows] == ["clip", "pickscore"]
    for row in rows:
        assert row["batch1_images_per_s"] > 0 and row["batch32_images_per_s"] > 0
        assert row["max_abs_diff"] < 1e-3  # batch 1 and batch 32 score the same images the same
    assert "pickscore" in capsys.readouterr().out
    assert set(REAL_ARCHS) == {"clip", "hpsv2", "aesthetic", "pickscore"}

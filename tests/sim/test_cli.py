"""``python -m sim score`` and ``diffdpo sim score``."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from sim.cli import main, split_inputs
from tests.sim.meshes import box, leaning_tower


@pytest.fixture
def mesh_dir(tmp_path):
    folder = tmp_path / "meshes"
    (folder / "sub").mkdir(parents=True)
    box().export(folder / "box.obj")
    leaning_tower().export(folder / "sub" / "tower.stl")
    (folder / "notes.txt").write_text("not a mesh")  # skipped when scanning a directory
    return folder


def test_score_directory_and_files_to_parquet(mesh_dir, tmp_path, capsys):
    out = tmp_path / "out" / "scores.parquet"
    missing = str(tmp_path / "missing.glb")
    code = main(
        [
            "score",
            str(mesh_dir),
            missing,
            "duration_s=1.5",
            "--out",
            str(out),
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    table = pd.read_parquet(out)
    assert list(table["source"]) == [str(mesh_dir / "box.obj"), str(mesh_dir / "sub" / "tower.stl"), missing]
    assert list(table["valid"]) == [True, True, False]
    assert list(table["stable"][:2]) == [True, False]
    assert table["reason"][2] == "missing_file"
    printed = capsys.readouterr().out
    assert "scored 3 meshes" in printed
    assert "stable:  1/2 valid meshes (50.0%)" in printed
    assert "invalid: 1/3 (33.3%)" in printed
    assert "invalid by reason: missing_file 1" in printed


def test_csv_output_and_config_errors(mesh_dir, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert (
        main(["score", str(mesh_dir / "box.obj"), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    )
    assert pd.read_csv(out)["stable"].tolist() == [True]
    assert main(["score", str(mesh_dir), "colision=hull", "--out", str(out)]) == 2
    assert "colision" in capsys.readouterr().err
    assert main(["score", str(mesh_dir), "--out", str(tmp_path / "scores.xlsx")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["score", str(empty), "--out", str(out)]) == 2
    assert "no mesh files" in capsys.readouterr().err


def test_split_inputs(tmp_path):
    odd = tmp_path / "a=b.obj"
    odd.write_text("")
    paths, overrides = split_inputs(["x.obj", "duration_s=3", str(odd)])
    assert paths == ["x.obj", str(odd)] and overrides == ["duration_s=3"]


def test_diffdpo_forwards_to_sim(mesh_dir, tmp_path):
    from diffdpo.cli import main as diffdpo_main

    out = tmp_path / "scores.jsonl"
    code = diffdpo_main(
        ["sim", "score", str(mesh_dir / "box.obj"), "--out", str(out), "--workers", "0", "--no-progress"]
    )
    assert code == 0
    assert pd.read_json(out, lines=True)["stable"].tolist() == [True]


def test_python_dash_m_sim(mesh_dir, tmp_path):
    out = tmp_path / "scores.parquet"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sim",
            "score",
            str(mesh_dir),
            "--out",
            str(out),
            "--workers",
            "1",
            "--collision",
            "hull",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pybullet build time" not in proc.stdout + proc.stderr  # the engine's banner is silenced
    assert "wrote 2 rows" in proc.stdout
    assert len(pd.read_parquet(out)) == 2

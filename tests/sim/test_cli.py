"""``python -m sim score`` and ``diffdpo sim score``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sim.cli import main, split_inputs
from sim.output import partial_path
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
    assert main(["score", "duration_s=3", "--out", str(out)]) == 2  # settings but no paths
    assert "no mesh files or folders given" in capsys.readouterr().err


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


# --------------------------------------------------------------------------------------------------
# --out is checked before scoring; rows are kept while the batch runs; every input gets a row
# --------------------------------------------------------------------------------------------------


def _refuse_to_score(*args, **kwargs):
    raise AssertionError("scored although --out cannot be written")


def _bad_outputs(tmp_path):
    folder = tmp_path / "scores.parquet"
    folder.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    cases = {
        "existing folder": (folder, "is an existing folder"),
        "parent is a file": (blocker / "sub" / "scores.parquet", "cannot create the folder"),
    }
    if os.path.isdir("/proc/self"):  # read-only for root too
        cases["read-only folder"] = (Path("/proc/scores.parquet"), "cannot write to the folder")
    return cases


def test_bad_out_is_refused_before_scoring(mesh_dir, tmp_path, capsys, monkeypatch):
    """Before: every mesh was scored, then writing --out raised (IsADirectoryError, ...) and the
    scores were lost. Now --out is checked first: exit 2, one line naming the path and the fix."""
    import sim.cli

    monkeypatch.setattr(sim.cli, "score_meshes", _refuse_to_score)
    for name, (out, expected) in _bad_outputs(tmp_path).items():
        code = main(["score", str(mesh_dir), "--out", str(out), "--workers", "0", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert len(err.strip().splitlines()) == 1 and expected in err and "--out" in err, (name, err)
    read_only = tmp_path / "old.csv"
    read_only.write_text("x\n")
    read_only.chmod(0o444)
    if not os.access(read_only, os.W_OK):  # root may write anyway
        assert main(["score", str(mesh_dir), "--out", str(read_only), "--no-progress"]) == 2
        assert "read-only" in capsys.readouterr().err
    monkeypatch.undo()
    out = tmp_path / "new" / "deeper" / "scores.csv"  # a missing folder is created
    assert (
        main(["score", str(mesh_dir / "box.obj"), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    )
    assert len(pd.read_csv(out)) == 1
    assert not partial_path(out).exists()  # removed once the table is written
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def _timeless(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=["wall_time_s", "cpu_time_s"])


def test_interrupted_batch_resumes(tmp_path, capsys, monkeypatch):
    """A batch interrupted after two meshes keeps them in OUT.partial.jsonl; the same command again
    scores only the other two and writes the table an uninterrupted run writes (a perturbation
    makes each result depend on its position, so rows must go back to the right place)."""
    import sim.worker

    folder = tmp_path / "meshes"
    folder.mkdir()
    for i in range(4):
        (box() if i % 2 else leaning_tower()).export(folder / f"m{i}.obj")
    args = ["score", str(folder), "perturb_deg=3", "--workers", "0", "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "fresh.parquet")]) == 0
    fresh = pd.read_parquet(tmp_path / "fresh.parquet")

    out = tmp_path / "scores.parquet"
    real_score_task = sim.worker.score_task
    scored: list[str] = []

    def interrupt_third(task, config, engine):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(task[1])
        return real_score_task(task, config, engine)

    monkeypatch.setattr(sim.worker, "score_task", interrupt_third)
    assert main([*args, str(out)]) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert not out.exists()
    lines = partial_path(out).read_text().splitlines()
    assert len(lines) == 1 + 2  # header and two rows
    with partial_path(out).open("a") as torn:
        torn.write('{"index": 2, "source": "cut off by a ki')  # a kill mid-write

    def count(task, config, engine):
        scored.append(task[1])
        return real_score_task(task, config, engine)

    scored.clear()
    monkeypatch.setattr(sim.worker, "score_task", count)
    assert main([*args, str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {partial_path(out)}: 2 of 4 inputs already scored" in printed
    assert "2 more from the partial file" in printed
    assert scored == [str(folder / "m2.obj"), str(folder / "m3.obj")]
    pd.testing.assert_frame_equal(_timeless(pd.read_parquet(out)), _timeless(fresh))
    assert not partial_path(out).exists()


def test_partial_file_of_other_settings_is_not_mixed(mesh_dir, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    partial = partial_path(out)
    partial.write_text(json.dumps({"sim_partial": 1, "config": {"duration_s": 9.0}}) + "\n")
    assert main(["score", str(mesh_dir), "--out", str(out), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(partial) in err and "duration_s" in err and "delete it to start over" in err
    partial.write_text("not json\n")
    assert main(["score", str(mesh_dir), "--out", str(out), "--workers", "0", "--no-progress"]) == 2
    assert "not a partial file" in capsys.readouterr().err


def test_every_input_path_gets_a_row(tmp_path, monkeypatch):
    """Before: folders that held no mesh files (empty, or named like a mesh file) and folders
    that could not be listed gave no row at all, so N inputs gave fewer than N rows."""
    good = tmp_path / "box.obj"
    box().export(good)
    empty = tmp_path / "empty"
    empty.mkdir()
    named_like_mesh = tmp_path / "model.obj"  # a folder
    named_like_mesh.mkdir()
    no_meshes = tmp_path / "notes"
    no_meshes.mkdir()
    (no_meshes / "readme.txt").write_text("no meshes here")
    mixed = tmp_path / "mixed"
    (mixed / "locked").mkdir(parents=True)
    box().export(mixed / "a.obj")
    (mixed / "dangling.obj").symlink_to(tmp_path / "gone.obj")
    too_long = str(tmp_path / ("x" * 300 + ".obj"))
    missing = str(tmp_path / "missing.obj")

    real_scandir = os.scandir

    def scandir(path="."):  # a folder we may not list (chmod does not stop root)
        if not isinstance(path, int) and os.fspath(path) == str(mixed / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "scores.csv"
    inputs = [good, empty, named_like_mesh, no_meshes, mixed, too_long, missing]
    code = main(["score", *map(str, inputs), "--out", str(out), "--workers", "0", "--no-progress"])
    assert code == 0
    table = pd.read_csv(out)
    expected = [
        (str(good), None),
        (str(empty), "missing_file"),
        (str(named_like_mesh), "missing_file"),
        (str(no_meshes), "missing_file"),
        (str(mixed / "a.obj"), None),
        (str(mixed / "dangling.obj"), "missing_file"),
        (str(mixed / "locked"), "read_error"),
        (too_long, "read_error"),
        (missing, "missing_file"),
    ]
    reasons = [None if pd.isna(r) else r for r in table["reason"]]
    assert list(zip(table["source"], reasons, strict=True)) == expected
    assert list(table["index"]) == list(range(len(expected)))
    errors = dict(zip(table["source"], table["error"], strict=True))
    assert "no mesh files" in errors[str(empty)]
    assert "Permission denied" in errors[str(mixed / "locked")]
    assert "File name too long" in errors[too_long]


def test_kill_9_leaves_no_workers_and_keeps_finished_rows(tmp_path):
    """``kill -9`` of ``python -m sim score --workers 2`` mid-batch: the workers (busy with long
    simulations) and the fork server exit within seconds, and the rows finished before the kill
    are in the partial file. Before, workers simulated on until their mesh was done."""
    psutil = pytest.importorskip("psutil")
    inputs = []
    for i in range(4):  # quick rows: empty files, labelled by the workers
        (tmp_path / f"a{i}.obj").write_text("")
        inputs.append(str(tmp_path / f"a{i}.obj"))
    box().export(tmp_path / "box.obj")
    inputs += [str(tmp_path / "box.obj")] * 4  # minutes of simulation each
    out = tmp_path / "scores.parquet"
    partial = partial_path(out)
    command = [sys.executable, "-m", "sim", "score", *inputs, "duration_s=100000", "timeout_s=900"]
    proc = subprocess.Popen(
        [*command, "--out", str(out), "--workers", "2", "--no-progress"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    children = []
    try:
        deadline = time.monotonic() + 60
        while _rows(partial) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no rows within 60 s"
            time.sleep(0.05)
        time.sleep(0.5)  # both workers are now inside a box's simulation
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # fork server and two workers (plus the resource tracker)
        proc.kill()
        proc.wait(timeout=10)
        gone_by = time.monotonic() + 5
        while [c for c in children if _running(psutil, c)] and time.monotonic() < gone_by:
            time.sleep(0.05)
        survivors = [c.pid for c in children if _running(psutil, c)]
        assert not survivors, f"processes survived kill -9 of their parent: {survivors}"
    finally:
        proc.kill()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
    rows = [json.loads(line) for line in partial.read_text().splitlines()[1:]]
    assert sorted((r["source"], r["reason"]) for r in rows) == [(s, "empty") for s in inputs[:4]]
    assert not out.exists()


def _rows(partial: Path) -> int:
    return max(len(partial.read_text().splitlines()) - 1, 0) if partial.exists() else 0


def _running(psutil, process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

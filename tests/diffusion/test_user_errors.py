"""`diffdpo train` on bad inputs: one line on stderr naming the file or key, exit status 2, no traceback;
and no run silently overwrites or mixes with another."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffdpo.cli import main
from diffdpo.data import write_pickapic_parquet
from tests.diffusion.conftest import REPO, pickapic_rows, tiny_overrides

TINY = str(REPO / "configs" / "tiny_sd15_dpo.yaml")
QUIET = ["progress_bar=false", "tensorboard=false", "checkpoint_every=0"]


def _fails(capsys, *args: str) -> str:
    """Run the CLI, expect exit 2, return the error (its first line; a second line points at --debug)."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", TINY, *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in err, err
    assert lines[0].startswith("diffdpo train: error: ")
    return lines[0]


def test_data_errors_name_the_file(sd15_dir, tmp_path, capsys):
    empty = tmp_path / "empty.parquet"
    write_pickapic_parquet(empty, [])
    line = _fails(capsys, *tiny_overrides(sd15_dir, empty, tmp_path / "a"), *QUIET)
    assert "no usable pair" in line and "empty.parquet" in line and "0 kept of 0 rows read" in line

    no_columns = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"caption": ["x"], "image": [b"y"]}), no_columns)
    assert "wrong.parquet" in _fails(capsys, *tiny_overrides(sd15_dir, no_columns, tmp_path / "b"), *QUIET)

    folder = tmp_path / "nothing_here"
    folder.mkdir()
    assert "nothing_here" in _fails(capsys, *tiny_overrides(sd15_dir, folder, tmp_path / "c"), *QUIET)


def test_every_image_corrupt_is_an_error_not_a_finished_run(sd15_dir, tmp_path, capsys):
    rows = [dict(r, jpg_1=b"\xff\xd8 broken") for r in pickapic_rows(4)]
    data = write_pickapic_parquet(tmp_path / "corrupt.parquet", rows)
    line = _fails(capsys, *tiny_overrides(sd15_dir, data, tmp_path / "run"), *QUIET)
    assert "no usable example" in line
    assert not (tmp_path / "run" / "final").exists()


def test_model_paths_are_checked_before_any_hub_lookup(sd15_dir, sdxl_dir, pairs_parquet, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no_such_model"
    assert "no such local folder" in _fails(capsys, *tiny_overrides(missing, pairs_parquet, tmp_path / "a"), *QUIET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _fails(capsys, *tiny_overrides("someorg/somemodel", pairs_parquet, tmp_path / "b"), *QUIET)
    assert "offline" in line and "someorg/somemodel" in line
    line = _fails(capsys, *tiny_overrides(sdxl_dir, pairs_parquet, tmp_path / "c"), *QUIET)
    assert "StableDiffusionXLPipeline" in line and "diffusion.model.kind=sdxl" in line
    line = _fails(capsys, *tiny_overrides(sd15_dir, pairs_parquet, tmp_path / "d"), "diffusion.model.kind=sdxl", *QUIET)
    assert "diffusion.model.kind=sd15" in line


def test_values_are_checked_before_loading(sd15_dir, pairs_parquet, tmp_path, capsys):
    base = [*tiny_overrides(sd15_dir, pairs_parquet, tmp_path / "a"), *QUIET]
    assert "loss.beta" in _fails(capsys, *base, "loss.beta=nan")
    assert "lr" in _fails(capsys, *base, "optim.lr=inf")
    line = _fails(capsys, *base, "diffusion.lora.r=3")
    assert "command line" in line and "diffusion.lora.r" in line
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("task: diffusion\nmax_steps: [1\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(bad_yaml)])
    assert exc.value.code == 2 and "not valid YAML" in capsys.readouterr().err


def test_a_second_run_into_the_same_folder_is_refused_then_overwrites_or_resumes(sd15_dir, pairs_parquet, tmp_path,
                                                                                  capsys):
    out = tmp_path / "run"
    args = [*tiny_overrides(sd15_dir, pairs_parquet, out), "progress_bar=false", "tensorboard=false",
            "checkpoint_every=1", "max_steps=2", "mixed_precision=no"]  # `no` is the string, not YAML's False
    assert main(["train", "--config", TINY, *args]) == 0
    line = _fails(capsys, *args)
    assert "already holds a run" in line and "resume_from=latest" in line and "overwrite=true" in line
    assert main(["train", "--config", TINY, *args, "max_steps=3", "resume_from=latest"]) == 0
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one run per metrics file, resumed where it stopped
    assert main(["train", "--config", TINY, *args, "max_steps=1", "overwrite=true"]) == 0
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1] and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]


def test_resuming_with_another_lora_rank_names_the_tensor(sd15_dir, pairs_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*tiny_overrides(sd15_dir, pairs_parquet, out), "progress_bar=false", "tensorboard=false",
            "checkpoint_every=1", "max_steps=1", "diffusion.lora.enabled=true", "diffusion.lora.rank=4"]
    assert main(["train", "--config", TINY, *args]) == 0
    line = _fails(capsys, *args, "diffusion.lora.rank=2", "max_steps=2", "resume_from=latest")
    assert "another model shape" in line and "lora" in line


def test_training_from_the_cache_prints_the_data_summary(sd15_dir, tmp_path, capsys):
    from tests.diffusion.conftest import pickapic_rows as rows

    data = write_pickapic_parquet(tmp_path / "messy.parquet", rows(4, ties=2))
    args = [*tiny_overrides(sd15_dir, data, tmp_path / "run"), *QUIET, "max_steps=1",
            f"diffusion.data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "--config", TINY, *args]) == 0
    out = capsys.readouterr()
    assert "4 kept of 6 rows read" in out.out + out.err and "2 ties" in out.out + out.err


def test_a_missing_data_source_fails_before_the_model_loads(tmp_path, capsys):
    """The model path does not exist either: the data error comes first, so nothing was loaded."""
    line = _fails(capsys, *tiny_overrides(tmp_path / "no_model", tmp_path / "no_data.parquet", tmp_path / "a"), *QUIET)
    assert "diffusion.data.source" in line and "no_data.parquet" in line


def test_a_pipeline_folder_missing_a_component_is_one_line(sd15_dir, pairs_parquet, tmp_path, capsys):
    import shutil

    broken = tmp_path / "no_vae"
    shutil.copytree(sd15_dir, broken)
    shutil.rmtree(broken / "vae")
    line = _fails(capsys, *tiny_overrides(broken, pairs_parquet, tmp_path / "a"), *QUIET)
    assert "diffusion.model.pretrained=" in line and "could not be loaded" in line


def test_max_rows_help_says_what_the_code_does(tmp_path):
    """The reader keeps at most max_rows pairs (it reads on until then), as docs/data.md says."""
    import dataclasses

    from diffdpo.data import PickAPicPairs
    from diffdpo.diffusion.config import PickAPicConfig

    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(PickAPicConfig)}["max_rows"]
    assert "pairs" in help_text and "at most" in help_text
    rows = pickapic_rows(0, ties=2) + pickapic_rows(3)  # two ties first, then three decided pairs
    data = write_pickapic_parquet(tmp_path / "ties_first.parquet", rows)
    pairs = PickAPicPairs(str(data), 16, max_rows=2)
    assert len(pairs) == 2 and pairs.stats.rows_read == 4 and pairs.stats.ties_dropped == 2

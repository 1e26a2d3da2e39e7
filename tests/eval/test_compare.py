"""``diffdpo eval`` end to end on a tiny SD1.5 pipeline and a tiny PickScore (CPU, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffdpo.cli import main
from diffdpo.eval.compare import parse_scorer_spec, read_prompts
from tests.diffusion.conftest import sd15_dir, sdxl_dir  # noqa: F401  (fixtures)
from tests.rewards.conftest import tiny_pickscore  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "a blue square", "two green dots"]


@pytest.fixture(scope="module")
def prompts_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def tuned_unet(sd15_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny pipeline's UNet with every weight perturbed by seeded noise, saved as a UNet folder."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(sd15_dir), subfolder="unet")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.2 * param.abs().mean() * torch.randn(param.shape, generator=gen))
    out = tmp_path_factory.mktemp("tuned") / "tuned-unet"
    unet.save_pretrained(out)
    return out


def _eval_args(base, unet, prompts, scorer, out, *extra: str) -> list[str]:
    return ["eval", str(base), "--unet", str(unet), "--prompts", str(prompts), "--scorer", f"pickscore={scorer}",
            "--out", str(out), "--steps", "2", "--guidance-scale", "3", "--seeds", "2", *extra]


def test_eval_counts_every_prompt_and_seed_and_writes_report_and_grid(sd15_dir, tuned_unet, prompts_txt,  # noqa: F811
                                                                      tiny_pickscore, tmp_path, capsys):  # noqa: F811
    assert main(_eval_args(sd15_dir, tuned_unet, prompts_txt, tiny_pickscore, tmp_path, "--grid", "4")) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    wr = report["scorers"]["pickscore"]["win_rate"]
    assert report["n"] == wr["n"] == len(PROMPTS) * 2 == len(report["comparisons"])
    assert wr["wins"] + wr["losses"] > 0  # the perturbed UNet draws other images
    assert 0 <= wr["ci_low"] <= wr["rate"] <= wr["ci_high"] <= 1
    assert [(c["prompt"], c["seed"]) for c in report["comparisons"][:3]] == [
        ("a red circle", 0), ("a red circle", 1), ("a blue square", 0)]
    change = report["scorers"]["pickscore"]["mean_change"]
    mean_diff = sum(c["pickscore_tuned"] - c["pickscore_base"] for c in report["comparisons"]) / report["n"]
    assert change == pytest.approx(mean_diff, abs=1e-5)
    assert report["grid"] == {"path": "grid.png", "rows": ["base", "tuned"], "columns": 4}
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > grid.height  # 2 rows of 4 images
    printed = capsys.readouterr().out
    assert "pickscore" in printed and "6 comparisons (3 prompts x 2 seeds)" in printed


def test_identical_base_and_tuned_give_only_ties(sd15_dir, prompts_txt, tiny_pickscore, tmp_path):  # noqa: F811
    """Tuned = the base's own UNet: same seeds, same images, so 0 wins, 0 losses, mean change 0."""
    assert main(_eval_args(sd15_dir, sd15_dir, prompts_txt, tiny_pickscore, tmp_path)) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    pick = report["scorers"]["pickscore"]
    assert (pick["win_rate"]["wins"], pick["win_rate"]["ties"], pick["win_rate"]["losses"]) == (0, 6, 0)
    assert pick["mean_change"] == 0.0


def test_eval_with_a_lora_adapter(sd15_dir, prompts_txt, tiny_pickscore, tmp_path):  # noqa: F811
    """Tuned = base + a saved LoRA (random non-zero B, so the images change) through --lora."""
    from diffusers import UNet2DConditionModel

    from diffdpo.adapters import add_lora
    from diffdpo.diffusion.models import save_lora

    unet = UNet2DConditionModel.from_pretrained(str(sd15_dir), subfolder="unet")
    torch.manual_seed(2)
    for param in add_lora(unet, rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]):
        param.data.normal_(0, 0.5)
    save_lora(unet, tmp_path / "lora", "sd15")
    args = ["eval", str(sd15_dir), "--lora", str(tmp_path / "lora"), "--prompts", str(prompts_txt), "--scorer",
            f"pickscore={tiny_pickscore}", "--out", str(tmp_path / "out"), "--steps", "2", "--guidance-scale", "3"]
    assert main(args) == 0
    wr = json.loads((tmp_path / "out" / "report.json").read_text())["scorers"]["pickscore"]["win_rate"]
    assert wr["n"] == len(PROMPTS) and wr["wins"] + wr["losses"] > 0


def test_missing_prompt_column_is_a_one_line_exit_2(sd15_dir, tuned_unet, tiny_pickscore, tmp_path, capsys):  # noqa: F811
    import pandas as pd

    table = tmp_path / "prompts.parquet"
    pd.DataFrame({"caption": PROMPTS}).to_parquet(table)
    with pytest.raises(SystemExit) as exc:
        main(_eval_args(sd15_dir, tuned_unet, table, tiny_pickscore, tmp_path / "out", "--prompt-column", "text"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "has no column 'text' (columns: caption)" in err[0] and len(err) == 2  # the message + the --debug hint
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_missing_tuned_unet_is_an_error_before_anything_loads(sd15_dir, prompts_txt, tiny_pickscore, tmp_path,  # noqa: F811
                                                                capsys):
    with pytest.raises(SystemExit) as exc:
        main(_eval_args(sd15_dir, tmp_path / "no-such-unet", prompts_txt, tiny_pickscore, tmp_path / "out"))
    assert exc.value.code == 2
    assert "--unet" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_read_prompts_formats(tmp_path):
    import pandas as pd

    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": ["b", "a", "b"], "caption": ["x", "y", "z"]}).to_csv(csv, index=False)
    assert read_prompts(csv) == ["b", "a"]  # "prompt" first, unique, in order
    assert read_prompts(csv, "caption", max_prompts=2) == ["x", "y"]
    tsv = tmp_path / "PartiPrompts.tsv"  # PartiPrompts' own format: tab-separated, column "Prompt"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\nbond, james bond\tPeople\tBasic\t\na red cube\tIllustrations\tColor\t\n")
    assert read_prompts(tsv, "Prompt") == ["bond, james bond", "a red cube"]
    txt = tmp_path / "p.txt"
    txt.write_text(" one \n\ntwo\n")
    assert read_prompts(txt) == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_scorer_specs():
    assert parse_scorer_spec("pickscore=yuvalkirstain/PickScore_v1,processor_path=laion/x,batch_size=4") == (
        "pickscore", "yuvalkirstain/PickScore_v1", {"processor_path": "laion/x", "batch_size": 4})
    assert parse_scorer_spec("clip=hf-hub:org/repo,arch=ViT-B-32") == ("clip", "hf-hub:org/repo", {"arch": "ViT-B-32"})
    for bad in ("pickscore", "imagereward=x", "clip=x,arch"):
        with pytest.raises(ValueError, match="--scorer"):
            parse_scorer_spec(bad)


@pytest.mark.skipif(not (REPO / "data" / "toy_t2i" / "model_index.json").is_file(), reason="no toy checkpoint")
def test_eval_runs_on_the_shipped_toy_model(prompts_txt, tiny_pickscore, tmp_path):  # noqa: F811
    """The toy pipeline loads through diffusers like any other; its own UNet folder as tuned gives all ties."""
    toy = REPO / "data" / "toy_t2i"
    assert main(["eval", str(toy), "--unet", str(toy / "unet"), "--prompts", str(prompts_txt), "--scorer",
                 f"pickscore={tiny_pickscore}", "--out", str(tmp_path), "--steps", "2", "--guidance-scale", "3"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == len(PROMPTS) and report["scorers"]["pickscore"]["win_rate"]["ties"] == len(PROMPTS)


def test_eval_runs_on_a_tiny_sdxl_pipeline(sdxl_dir, prompts_txt, tiny_pickscore, tmp_path):  # noqa: F811
    """An SDXL folder (two text encoders, size conditioning) samples through the same seeded sampler; its own
    UNet as the tuned one gives all ties, a perturbed one does not."""
    from diffusers import UNet2DConditionModel

    assert main(_eval_args(sdxl_dir, sdxl_dir, prompts_txt, tiny_pickscore, tmp_path / "same")) == 0
    same = json.loads((tmp_path / "same" / "report.json").read_text())["scorers"]["pickscore"]["win_rate"]
    assert (same["wins"], same["ties"], same["losses"]) == (0, 6, 0)
    unet = UNet2DConditionModel.from_pretrained(str(sdxl_dir), subfolder="unet")
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.2 * param.abs().mean() * torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    unet.save_pretrained(tmp_path / "unet")
    assert main(_eval_args(sdxl_dir, tmp_path / "unet", prompts_txt, tiny_pickscore, tmp_path / "moved")) == 0
    moved = json.loads((tmp_path / "moved" / "report.json").read_text())["scorers"]["pickscore"]["win_rate"]
    assert moved["wins"] + moved["losses"] > 0

"""The reward scorers on tiny seeded CLIP models (CPU): batching and pair order do not change scores, the
score formulas hold on hand-set embeddings and against an independent computation, and a wrong weights file
is a one-line ValueError naming the expected architecture and the path."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffdpo.rewards import (
    SCORER_NAMES,
    AestheticMLP,
    ClipScore,
    HPSv2,
    LaionAesthetic,
    PickScore,
    WeightsError,
    build_scorer,
    load_aesthetic_head,
)

KINDS = ["clip", "hpsv2", "pickscore", "aesthetic"]


@pytest.fixture(scope="session")
def aesthetic_head_files(tiny_open_clip):
    """A seeded 16-d aesthetic head saved as safetensors and as a .pth state dict."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    head = AestheticMLP(16)
    root = tiny_open_clip["root"]
    save_file(head.state_dict(), root / "head.safetensors")
    torch.save(head.state_dict(), root / "head.pth")
    torch.save(AestheticMLP(768).state_dict(), root / "head_768.pth")
    return {"safetensors": root / "head.safetensors", "pth": root / "head.pth", "pth_768": root / "head_768.pth"}


@pytest.fixture(scope="session")
def scorers(tiny_open_clip, tiny_pickscore, aesthetic_head_files):
    """One scorer of each kind, built through build_scorer as a user would."""
    arch, weights = tiny_open_clip["arch"], tiny_open_clip["safetensors"]
    return {
        "clip": build_scorer("clip", weights, arch=arch, batch_size=2),
        "hpsv2": build_scorer("hpsv2", tiny_open_clip["pt_state_dict"], arch=arch, batch_size=2),
        "pickscore": build_scorer("pickscore", tiny_pickscore, batch_size=2),
        "aesthetic": build_scorer("aesthetic", aesthetic_head_files["safetensors"], clip_path=weights, arch=arch,
                                  batch_size=2),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_scores_of_a_batch_equal_scores_one_by_one(scorers, images_and_prompts, kind):
    images, _, prompts = images_and_prompts
    scorer = scorers[kind]
    batched = scorer(images, prompts)  # batches of 2, 2, 1
    alone = torch.cat([scorer([image], [prompt]) for image, prompt in zip(images, prompts)])
    assert batched.shape == (len(images),) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert len(set(batched.tolist())) == len(images)  # distinct pairs, distinct scores: not a constant


@pytest.mark.parametrize("kind", KINDS)
def test_permuting_the_pairs_permutes_the_scores(scorers, images_and_prompts, kind):
    images, _, prompts = images_and_prompts
    perm = [3, 0, 4, 2, 1]
    scores = scorers[kind](images, prompts)
    permuted = scorers[kind]([images[i] for i in perm], [prompts[i] for i in perm])
    torch.testing.assert_close(permuted, scores[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "hpsv2", "pickscore"])
def test_the_prompt_matters_and_is_paired_with_its_image(scorers, images_and_prompts, kind):
    images, _, prompts = images_and_prompts
    same_image = [images[0]] * 3
    scores = scorers[kind](same_image, prompts[:3])
    assert len(set(scores.tolist())) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_uint8_arrays_score_like_the_same_pil_images(scorers, images_and_prompts, kind):
    images, arrays, prompts = images_and_prompts
    torch.testing.assert_close(scorers[kind](arrays, prompts), scorers[kind](images, prompts))


def test_inputs_are_checked(scorers, images_and_prompts):
    images, arrays, prompts = images_and_prompts
    with pytest.raises(ValueError, match="5 images and 4 prompts"):
        scorers["clip"](images, prompts[:4])
    with pytest.raises(ValueError, match="image 0: expected a uint8 array"):
        scorers["clip"]([arrays[0].astype("float32")], prompts[:1])
    with pytest.raises(ValueError, match="one prompt per image"):
        scorers["pickscore"](images[:1], "a red circle")
    assert scorers["clip"]([], []).shape == (0,)
    assert scorers["aesthetic"](images[:2]).shape == (2,)  # the aesthetic score needs no prompt


def _fake_encoder(vectors):
    return lambda *args, **kwargs: torch.tensor(vectors, dtype=torch.float32)


IMAGE_EMBS = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]
TEXT_EMBS = [[4.0, 3.0], [1.0, 0.0], [0.0, -5.0]]  # cosines with IMAGE_EMBS row by row: 24/25, 1, -1


def test_clip_score_on_hand_set_embeddings(scorers, images_and_prompts, monkeypatch):
    """cos = (12 + 12) / (5 * 5) = 0.96, 1, -1 -> 100 * max(cos, 0) = 96, 100, 0."""
    images, _, prompts = images_and_prompts
    scorer = ClipScore(scorers["clip"].path, arch=scorers["clip"].arch, batch_size=8)
    monkeypatch.setattr(scorer.model, "encode_image", _fake_encoder(IMAGE_EMBS))
    monkeypatch.setattr(scorer.model, "encode_text", _fake_encoder(TEXT_EMBS))
    torch.testing.assert_close(scorer(images[:3], prompts[:3]), torch.tensor([96.0, 100.0, 0.0]))


def test_hpsv2_on_hand_set_embeddings(tiny_open_clip, images_and_prompts, monkeypatch):
    """Plain cosine, no scale and no clamp: 0.96, 1, -1."""
    images, _, prompts = images_and_prompts
    scorer = HPSv2(tiny_open_clip["pt_state_dict"], arch=tiny_open_clip["arch"], batch_size=8)
    monkeypatch.setattr(scorer.model, "encode_image", _fake_encoder(IMAGE_EMBS))
    monkeypatch.setattr(scorer.model, "encode_text", _fake_encoder(TEXT_EMBS))
    torch.testing.assert_close(scorer(images[:3], prompts[:3]), torch.tensor([0.96, 1.0, -1.0]))


def test_pickscore_on_hand_set_embeddings(tiny_pickscore, images_and_prompts, monkeypatch):
    """logit_scale = ln 50: 50 * (0.96, 1, -1) = 48, 50, -50 (no clamp)."""
    images, _, prompts = images_and_prompts
    scorer = PickScore(tiny_pickscore, batch_size=8)
    monkeypatch.setattr(scorer.model, "get_image_features", _fake_encoder(IMAGE_EMBS))
    monkeypatch.setattr(scorer.model, "get_text_features", _fake_encoder(TEXT_EMBS))
    scorer.model.logit_scale.data.fill_(math.log(50.0))
    torch.testing.assert_close(scorer(images[:3], prompts[:3]), torch.tensor([48.0, 50.0, -50.0]))


def test_open_clip_scores_match_the_models_own_embeddings(scorers, tiny_open_clip, images_and_prompts):
    """Recomputed without the scorer: open_clip's own transforms, tokenizer and ``normalize=True`` encoders."""
    import open_clip

    images, _, prompts = images_and_prompts
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_open_clip["arch"],
                                                                 pretrained=str(tiny_open_clip["safetensors"]))
    model.eval()
    tokenizer = open_clip.get_tokenizer(tiny_open_clip["arch"])
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text_features = model.encode_text(tokenizer(prompts), normalize=True)
    cosine = torch.diagonal(image_features @ text_features.T)  # HPSv2 score.py
    torch.testing.assert_close(scorers["hpsv2"](images, prompts), cosine, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorers["clip"](images, prompts), 100 * cosine.clamp(min=0), atol=1e-4, rtol=1e-5)


def test_pickscore_matches_the_reference_recipe(scorers, tiny_pickscore, images_and_prompts):
    """PickScore's README recipe, one prompt against all candidate images: scores = logit_scale.exp() *
    (text_embs @ image_embs.T)[0]; our per-pair score for (image j, prompt) is entry j."""
    from transformers import AutoProcessor, CLIPModel

    images, _, prompts = images_and_prompts
    processor = AutoProcessor.from_pretrained(tiny_pickscore)
    model = CLIPModel.from_pretrained(tiny_pickscore).eval()
    with torch.no_grad():
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(text=[prompts[1]], padding=True, truncation=True, max_length=16, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        image_embs = getattr(image_embs, "pooler_output", image_embs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    got = scorers["pickscore"](images, [prompts[1]] * len(images))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert 3.0 < model.logit_scale.exp().item() < 200  # a real scale was applied, not 1


def test_aesthetic_mlp_shapes_and_state_dict_keys():
    """The reference predictor's linear layers sit at layers.0, 2, 4, 6, 7 (dropouts at 1, 3, 5)."""
    head = AestheticMLP(768)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}
    assert [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    assert head(torch.randn(5, 768)).shape == (5, 1)
    assert AestheticMLP(16)(torch.randn(3, 16)).shape == (3, 1)


def test_aesthetic_reads_l2_normalised_embeddings(scorers, aesthetic_head_files, images_and_prompts, monkeypatch):
    """Embeddings (3, 4, 0...) and (6, 8, 0...) both normalise to (0.6, 0.8, 0...): equal scores, = head(that)."""
    images, _, _ = images_and_prompts
    base = scorers["aesthetic"]
    scorer = LaionAesthetic(aesthetic_head_files["safetensors"], base.path, arch=base.arch, batch_size=8)
    assert scorer.head.input_size == 16  # follows the tiny CLIP's embedding size
    embs = torch.zeros(2, 16)
    embs[0, :2] = torch.tensor([3.0, 4.0])
    embs[1, :2] = torch.tensor([6.0, 8.0])
    monkeypatch.setattr(scorer.model, "encode_image", lambda *a, **k: embs)
    unit = torch.zeros(1, 16)
    unit[0, :2] = torch.tensor([0.6, 0.8])
    with torch.no_grad():
        expected = scorer.head(unit).squeeze(-1).expand(2)
    torch.testing.assert_close(scorer(images[:2]), expected)


def test_aesthetic_head_reads_safetensors_and_pth_alike(scorers, aesthetic_head_files, images_and_prompts):
    images, _, prompts = images_and_prompts
    base = scorers["aesthetic"]
    from_pth = LaionAesthetic(aesthetic_head_files["pth"], base.path, arch=base.arch)
    torch.testing.assert_close(from_pth(images, prompts), base(images, prompts))
    with torch.no_grad():
        pixels = torch.stack([base.preprocess(i) for i in images])
        expected = base.head(F.normalize(base.model.encode_image(pixels), dim=-1)).squeeze(-1)
    torch.testing.assert_close(base(images), expected, atol=1e-5, rtol=1e-5)


def _one_line_value_error(excinfo, *needles):
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, WeightsError)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("cls", [ClipScore, HPSv2])
@pytest.mark.parametrize("which", ["other_arch_weights", "garbage", "missing"])
def test_a_wrong_open_clip_weights_file_is_a_one_line_error(tiny_open_clip, cls, which):
    path = tiny_open_clip["root"] / "nope.safetensors" if which == "missing" else tiny_open_clip[which]
    with pytest.raises(ValueError) as excinfo:
        cls(path, arch=tiny_open_clip["arch"])
    _one_line_value_error(excinfo, tiny_open_clip["arch"], path)


def test_an_unknown_architecture_names_the_registry(tiny_open_clip):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Nope'.*add_model_config"):
        ClipScore(tiny_open_clip["safetensors"], arch="ViT-Nope")


def test_a_wrong_aesthetic_head_is_a_one_line_error(tiny_open_clip, aesthetic_head_files):
    """A 768-d head (the real one) on a 16-d CLIP: the error names the expected head shape and the path."""
    arch, clip = tiny_open_clip["arch"], tiny_open_clip["safetensors"]
    for path in (aesthetic_head_files["pth_768"], tiny_open_clip["garbage"], tiny_open_clip["root"] / "none.pth"):
        with pytest.raises(ValueError) as excinfo:
            LaionAesthetic(path, clip, arch=arch)
        _one_line_value_error(excinfo, "aesthetic MLP head", path)
        if path == aesthetic_head_files["pth_768"]:
            _one_line_value_error(excinfo, "16 -> 1024 -> 128 -> 64 -> 16 -> 1", "size mismatch")
    with pytest.raises(ValueError) as excinfo:
        load_aesthetic_head(tiny_open_clip["safetensors"], 16)  # a CLIP file, not a head
    _one_line_value_error(excinfo, "aesthetic MLP head", tiny_open_clip["safetensors"])


def test_a_wrong_pickscore_folder_is_a_one_line_error(tiny_open_clip, tiny_pickscore, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError) as excinfo:
        PickScore(missing)
    _one_line_value_error(excinfo, "CLIPModel", missing)
    with pytest.raises(ValueError) as excinfo:
        PickScore(tiny_open_clip["root"])  # a folder, but no transformers model in it
    _one_line_value_error(excinfo, "CLIPModel", tiny_open_clip["root"])
    # a CLIP checkpoint whose shapes do not fit its config
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(tiny_pickscore)
    config.projection_dim = 8
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "small")
    config.projection_dim = 16
    config.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError) as excinfo:
        PickScore(tmp_path / "small", processor_path=tiny_pickscore)
    _one_line_value_error(excinfo, "CLIPModel", tmp_path / "small")


def test_device_and_dtype(tiny_open_clip, images_and_prompts):
    images, _, prompts = images_and_prompts
    fp32 = ClipScore(tiny_open_clip["safetensors"], arch=tiny_open_clip["arch"])
    bf16 = ClipScore(tiny_open_clip["safetensors"], arch=tiny_open_clip["arch"], dtype="bfloat16", device="cpu")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    scores = bf16(images, prompts)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, fp32(images, prompts), atol=3.0, rtol=0.05)  # bf16 keeps ~3 digits
    with pytest.raises(ValueError, match="unknown dtype"):
        ClipScore(tiny_open_clip["safetensors"], arch=tiny_open_clip["arch"], dtype="float8")


def test_build_scorer_names(tiny_open_clip):
    assert SCORER_NAMES == ("clip", "pickscore", "hpsv2", "aesthetic")
    assert isinstance(build_scorer("hpsv2", tiny_open_clip["safetensors"], arch=tiny_open_clip["arch"]), HPSv2)
    with pytest.raises(ValueError, match="unknown scorer 'imagereward'; use one of clip, pickscore"):
        build_scorer("imagereward", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_path"):
        build_scorer("aesthetic", "head.pth")


def test_rewards_is_a_light_library_package():
    """No recipe or toy import anywhere in diffdpo/rewards, and importing it loads neither open_clip nor
    transformers."""
    root = Path(__file__).resolve().parents[2] / "diffdpo" / "rewards"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad = [n for n in names if n.startswith(("diffdpo.recipes", "diffdpo.toy"))]
            assert not bad, f"{path.name} imports {bad}"
    code = "import sys, diffdpo.rewards\nprint(','.join(m for m in ('open_clip', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""

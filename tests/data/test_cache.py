"""build_cache / CachedPairs: cached equals uncached, reuse, resume, rebuild, corrupt rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffdpo.data import (
    CachedPairs,
    PickAPicPairs,
    build_cache,
    cache_key,
    collate_cached,
    write_pickapic_parquet,
)
from tests.data.builders import BLUE, RED, image_bytes

RES = 16
# The fixture file has one corrupt pair; tests that are not about it need not see the warning.
pytestmark = pytest.mark.filterwarnings("ignore:build_cache skipped 1 corrupt pair")


class ToyVAE:
    """A fixed random strided conv: (N, 3, R, R) -> (N, 4, R/4, R/4). Counts images seen."""

    def __init__(self):
        self.weight = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        self.images = 0
        self.fail_after: int | None = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.images >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.images += pixels.shape[0]
        return F.conv2d(pixels, self.weight, stride=4)


class ToyTextEncoder:
    """Hashed byte embeddings: prompt_embeds (N, 8, 6) and pooled_prompt_embeds (N, 6), SDXL-style."""

    def __init__(self):
        self.table = torch.randn(256, 6, generator=torch.Generator().manual_seed(1))
        self.captions: list[str] = []

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.captions += captions
        ids = torch.tensor([list(hashlib.sha256(c.encode()).digest()[:8]) for c in captions])  # (N, 8)
        embeds = self.table[ids]  # (N, 8, 6)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": embeds.mean(1)}


def _rows(n: int, corrupt_at: tuple[int, ...] = ()) -> list[dict]:
    rows = []
    for i in range(n):
        red = image_bytes(RED, (RES + 4 * (i % 3), RES + 8), noise_seed=i)
        blue = image_bytes(BLUE, (RES + 8, RES), noise_seed=100 + i)
        if i in corrupt_at:
            blue = b"\x00garbage"
        swap = i % 2 == 1
        rows.append(dict(caption=f"prompt {i % 4}", jpg_0=blue if swap else red, jpg_1=red if swap else blue,
                         label_0=0.0 if swap else 1.0, label_1=1.0 if swap else 0.0))
    return rows


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_pickapic_parquet(tmp_path / "train.parquet", _rows(11, corrupt_at=(5,)), row_group_size=4)


def test_cache_key_is_stable_and_distinguishing():
    key = cache_key("runwayml/stable-diffusion-v1-5", 512)
    assert key == cache_key("runwayml/stable-diffusion-v1-5", 512)
    assert key.startswith("runwayml-stable-diffusion-v1-5-512-")
    assert len({key, cache_key("runwayml/stable-diffusion-v1-5", 1024),
                cache_key("runwayml/stable-diffusion-v1-5", 512, extra="vae-fp16")}) == 3


def test_cached_pairs_equal_uncached_encoding(data_file: Path, tmp_path: Path):
    ds = PickAPicPairs(data_file, RES)
    vae, text = ToyVAE(), ToyTextEncoder()
    with pytest.warns(RuntimeWarning, match=r"skipped 1 corrupt pair\(s\): train.parquet:5"):
        path = build_cache(ds, tmp_path / "cache", encode_images=vae, encode_prompts=text, key="toy",
                           batch_size=3, shard_size=4, progress=False)
    assert path == tmp_path / "cache" / "toy"
    cached = CachedPairs(path)
    assert len(cached) == 10 and cached.key == "toy" and cached.resolution == RES
    manifest = cached.manifest
    assert manifest["corrupt"] == 1 and manifest["corrupt_rows"][0][0] == "train.parquet:5"
    assert manifest["shapes"]["latents"] == [2, 4, RES // 4, RES // 4]
    assert manifest["shapes"]["cond"] == {"prompt_embeds": [8, 6], "pooled_prompt_embeds": [6]}
    assert manifest["fingerprint"] == ds.fingerprint() and manifest["n_captions"] == 4
    # Each unique caption is encoded once (plus the empty caption).
    assert sorted(text.captions) == sorted([f"prompt {k}" for k in range(4)] + [""])

    uncached = {ds.row_id(i): ds[i] for i in range(len(ds)) if ds[i] is not None}
    for j in range(len(cached)):
        item = cached[j]
        ref = uncached[item["row_id"]]
        assert item["caption"] == ref["caption"]
        expected = vae(ref["pixel_values"])  # (2, C, h, w), winner first
        assert torch.equal(item["latents"], expected)  # bitwise: the cache changes nothing
        for name, value in text([ref["caption"]]).items():
            torch.testing.assert_close(item["cond"][name], value[0], rtol=0, atol=0)
        assert torch.equal(item["original_sizes"], ref["original_sizes"])
        assert torch.equal(item["crop_top_lefts"], ref["crop_top_lefts"])
    for name, value in text([""]).items():
        assert torch.equal(cached.empty_cond[name], value[0])

    batch = collate_cached([cached[0], cached[1], cached[2]])
    assert batch["latents"].shape == (3, 2, 4, RES // 4, RES // 4)
    assert batch["cond"]["prompt_embeds"].shape == (3, 8, 6) and batch["cond"]["pooled_prompt_embeds"].shape == (3, 6)
    assert batch["original_sizes"].shape == (3, 2, 2) and len(batch["captions"]) == len(batch["row_ids"]) == 3
    loader = torch.utils.data.DataLoader(cached, batch_size=4, shuffle=True, collate_fn=collate_cached,
                                         generator=torch.Generator().manual_seed(0))
    assert sorted(r for b in loader for r in b["row_ids"]) == sorted(uncached)


def test_complete_cache_is_reused_without_encoding(data_file: Path, tmp_path: Path):
    ds = PickAPicPairs(data_file, RES)
    build_cache(ds, tmp_path, encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(), key="k", progress=False)
    vae, text = ToyVAE(), ToyTextEncoder()
    again = PickAPicPairs(data_file, RES)  # a new process would rebuild the dataset object
    build_cache(again, tmp_path, encode_images=vae, encode_prompts=text, key="k", progress=False)
    assert vae.images == 0 and text.captions == []


def test_interrupted_build_resumes_and_is_never_read_half_written(data_file: Path, tmp_path: Path):
    ds = PickAPicPairs(data_file, RES)
    fresh = build_cache(ds, tmp_path / "fresh", encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(), key="k",
                        batch_size=2, shard_size=4, progress=False)
    vae = ToyVAE()
    vae.fail_after = 8  # dies inside the second shard of pairs (4 pairs = 8 images per shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(ds, tmp_path / "c", encode_images=vae, encode_prompts=ToyTextEncoder(), key="k",
                    batch_size=2, shard_size=4, progress=False)
    partial = tmp_path / "c" / "k"
    assert not (partial / "manifest.json").exists() and (partial / "pairs-00000.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no complete cache"):
        CachedPairs(partial)
    resumed_vae = ToyVAE()
    build_cache(ds, tmp_path / "c", encode_images=resumed_vae, encode_prompts=ToyTextEncoder(), key="k",
                batch_size=2, shard_size=4, progress=False)
    # 11 pairs, shard 0 (4 pairs) was complete: only shards 1 and 2 are encoded, minus the corrupt pair.
    assert resumed_vae.images == 2 * (11 - 4 - 1)
    a, b = CachedPairs(fresh), CachedPairs(partial)
    assert len(a) == len(b)
    for j in range(len(a)):
        assert torch.equal(a[j]["latents"], b[j]["latents"]) and a[j]["row_id"] == b[j]["row_id"]


def test_stray_files_without_build_record_are_rebuilt(data_file: Path, tmp_path: Path):
    ds = PickAPicPairs(data_file, RES)
    stale = tmp_path / "k"
    stale.mkdir()
    (stale / "pairs-00000.safetensors").write_bytes(b"half a file")
    (stale / ".pairs-00001.safetensors.tmp").write_bytes(b"leftover")
    vae = ToyVAE()
    build_cache(ds, tmp_path, encode_images=vae, encode_prompts=ToyTextEncoder(), key="k", shard_size=4,
                progress=False)
    assert vae.images == 2 * 10
    assert len(CachedPairs(stale)) == 10 and not list(stale.glob(".*.tmp"))


def test_other_data_under_the_same_key_is_an_error_unless_overwrite(data_file: Path, tmp_path: Path):
    build_cache(PickAPicPairs(data_file, RES), tmp_path, encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(),
                key="k", progress=False)
    other = PickAPicPairs(write_pickapic_parquet(tmp_path / "other.parquet", _rows(3)), RES)
    with pytest.raises(ValueError, match="other data.*overwrite=True"):
        build_cache(other, tmp_path, encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(), key="k",
                    progress=False)
    build_cache(other, tmp_path, encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(), key="k",
                progress=False, overwrite=True)
    assert len(CachedPairs(tmp_path / "k")) == 3
    assert json.loads((tmp_path / "k" / "manifest.json").read_text())["fingerprint"] == other.fingerprint()


def test_build_with_worker_processes_matches(data_file: Path, tmp_path: Path):
    ds = PickAPicPairs(data_file, RES)
    a = build_cache(ds, tmp_path / "a", encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(), key="k",
                    batch_size=3, shard_size=5, progress=False)
    with pytest.warns(RuntimeWarning, match="train.parquet:5"):
        b = build_cache(ds, tmp_path / "b", encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(), key="k",
                        batch_size=3, shard_size=5, num_workers=2, progress=False)
    ca, cb = CachedPairs(a), CachedPairs(b)
    assert [ca[j]["row_id"] for j in range(len(ca))] == [cb[j]["row_id"] for j in range(len(cb))]
    assert all(torch.equal(ca[j]["latents"], cb[j]["latents"]) for j in range(len(ca)))


def test_encoder_contract_errors_are_explained(data_file: Path, tmp_path: Path):
    ds = PickAPicPairs(data_file, RES)
    with pytest.raises(TypeError, match="dict of tensors"):
        build_cache(ds, tmp_path, encode_images=ToyVAE(), encode_prompts=lambda c: torch.zeros(len(c), 3),
                    key="a", progress=False)
    with pytest.raises(ValueError, match="one latent per image"):
        build_cache(ds, tmp_path, encode_images=lambda x: x[:1], encode_prompts=ToyTextEncoder(), key="b",
                    progress=False)
    with pytest.raises(FileNotFoundError, match=r"contains the cache\(s\) \['c'\]"):
        build_cache(ds, tmp_path, encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(), key="c", progress=False)
        CachedPairs(tmp_path)


def test_random_augmentation_warns_that_the_cache_freezes_it(data_file: Path, tmp_path: Path):
    ds = PickAPicPairs(data_file, RES, random_flip=True)
    with pytest.warns(UserWarning, match="epoch 0 only"):
        build_cache(ds, tmp_path, encode_images=ToyVAE(), encode_prompts=ToyTextEncoder(), key="k", progress=False)

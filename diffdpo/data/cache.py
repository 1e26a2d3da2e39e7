"""Encode every pair once: VAE latents and text embeddings on disk, so training steps run neither.

Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908) trains the denoiser only; the VAE and the text
encoders are frozen, so their outputs for a fixed crop are constants. :func:`build_cache` computes them once
and :class:`CachedPairs` serves them. Layout of ``<cache_dir>/<key>/``::

    manifest.json             written last (atomic rename): its presence means the cache is complete
    pairs-00000.safetensors   latents (n, 2, C, h, w) winner first, original_sizes (n, 2, 2),
                              crop_top_lefts (n, 2, 2), index (n,) = dataset indices; metadata: corrupt rows
    cond-00000.safetensors    one entry per unique caption: {name: (m, ...)} as returned by encode_prompts
    empty_cond.safetensors    encode_prompts([""]) per sample, for prompt dropout
    rows.parquet              row_id, caption_index, shard, offset for every cached pair
    captions.parquet          the unique captions, in caption_index order
    build.json                only while building: what is being built (lets an interrupted build resume)

A crashed build leaves complete shards (each written to a temporary name, then renamed) and ``build.json``;
rerunning with the same dataset resumes after the last complete shard. A directory without ``manifest.json``
is never read as a cache.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from diffdpo.data.pairs import PickAPicPairs

logger = logging.getLogger(__name__)

__all__ = ["CachedPairs", "build_cache", "cache_key", "collate_cached"]

CACHE_FORMAT = "diffdpo-pair-cache"
CACHE_VERSION = 1
_OUR_FILES = re.compile(
    r"^(manifest\.json|build\.json|rows\.parquet|captions\.parquet|empty_cond\.safetensors|"
    r"(pairs|cond)-\d{5}\.safetensors|\..*\.tmp)$"
)


def cache_key(model_id: str, resolution: int, extra: str = "") -> str:
    """A stable, readable directory name for the cache of ``model_id`` at ``resolution``.

    ``extra`` distinguishes anything else that changes the encoders' outputs (VAE dtype, a LoRA on the
    text encoder, latent sampling vs mean, ...). Example: ``"runwayml-stable-diffusion-v1-5-512-3f9c0a1b2c4d"``.
    """
    digest = hashlib.sha256(json.dumps([model_id, int(resolution), extra]).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(model_id)).strip("-")[-48:].strip("-") or "model"
    return f"{slug}-{int(resolution)}-{digest}"


# --------------------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _clear(directory: Path) -> None:
    """Remove the files a cache build writes (and nothing else)."""
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_file() and _OUR_FILES.match(entry.name):
                entry.unlink()


def _spec(tensor: torch.Tensor) -> tuple[list[int], str]:
    return list(tensor.shape[1:]), str(tensor.dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


class _LoadWithReason(torch.utils.data.Dataset):
    """Wraps a PickAPicPairs so that DataLoader workers hand back the corrupt-row reason too."""

    def __init__(self, dataset: PickAPicPairs):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any] | None, str | None]:
        item, reason = self.dataset._load(index)
        return index, item, reason


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _check_prompt_output(out: Any, n: int, spec: dict[str, tuple[list[int], str]] | None) -> dict[str, torch.Tensor]:
    if not isinstance(out, dict) or not out or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise TypeError(
            "encode_prompts must return a non-empty dict of tensors, e.g. {'prompt_embeds': (B, L, D)} or for "
            f"SDXL {{'prompt_embeds': ..., 'pooled_prompt_embeds': ...}}; got {type(out).__name__}"
        )
    for name, value in out.items():
        if value.ndim == 0 or value.shape[0] != n:
            raise ValueError(f"encode_prompts returned {name!r} of shape {tuple(value.shape)} for {n} captions; "
                             f"the first dimension must be the number of captions")
    if spec is not None:
        got = {name: _spec(value) for name, value in out.items()}
        if got != spec:
            raise ValueError(f"encode_prompts outputs changed between batches: {spec} then {got}; pad text to a "
                             f"fixed length (e.g. padding='max_length')")
    return {name: value.detach().to("cpu").contiguous() for name, value in out.items()}


def _encode_images_checked(encode_images: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                           spec: tuple[list[int], str] | None) -> torch.Tensor:
    """pixels (B, 2, 3, R, R) -> latents (B, 2, C, h, w); the encoder sees (2B, 3, R, R), winners first."""
    b = pixels.shape[0]
    flat = torch.cat([pixels[:, 0], pixels[:, 1]])  # (2B, 3, R, R): winners, then losers
    with torch.no_grad():
        latents = encode_images(flat)
    if not isinstance(latents, torch.Tensor) or latents.ndim < 2 or latents.shape[0] != 2 * b:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"encode_images got {tuple(flat.shape)} and returned {shape}; it must return one latent "
                         f"per image, e.g. (2B, C, h, w)")
    latents = latents.detach().to("cpu")
    out = torch.stack([latents[:b], latents[b:]], dim=1).contiguous()  # (B, 2, C, h, w)
    if spec is not None and _spec(out) != spec:
        raise ValueError(f"encode_images output changed between batches: {spec} then {_spec(out)}")
    return out


def build_cache(
    dataset: PickAPicPairs,
    cache_dir: str | Path,
    *,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
    key: str,
    batch_size: int = 16,
    progress: bool = True,
    shard_size: int = 1024,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Run the frozen encoders once over every pair of ``dataset``; returns ``cache_dir/key``.

    ``encode_images`` maps pixels (2B, 3, R, R) in [-1, 1] (the B winners, then the B losers) to latents
    (2B, C, h, w), already scaled as the denoiser expects. Return ``latent_dist.parameters`` (mean and log-variance)
    instead if the training side samples latents each step, as the official Diffusion-DPO script does.
    ``encode_prompts`` maps captions to a dict of per-caption tensors; each unique caption is encoded once.
    Both run under ``torch.no_grad()`` and may return tensors on any device and dtype (stored as returned).

    An existing complete cache with the same key and dataset fingerprint is reused without calling the
    encoders. A complete cache built from different data raises unless ``overwrite=True``. An interrupted build
    of the same dataset resumes after its last complete shard. Corrupt rows are skipped and listed in the
    manifest. ``num_workers`` decodes images in DataLoader workers. With several processes (``accelerate
    launch``), build on the main process and let the others wait (``accelerator.wait_for_everyone()``).
    """
    if len(dataset) == 0:
        raise ValueError(f"nothing to cache: the dataset has no pairs.\n{dataset.stats.summary()}")
    if batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    out = Path(cache_dir) / key
    fingerprint = dataset.fingerprint()
    manifest = _read_json(out / "manifest.json")
    if manifest is not None:
        same = (manifest.get("format") == CACHE_FORMAT and manifest.get("version") == CACHE_VERSION
                and manifest.get("key") == key and manifest.get("fingerprint") == fingerprint)
        if same:
            logger.info("reusing the complete cache at %s (%d pairs)", out, manifest.get("n", 0))
            return out
        if not overwrite:
            raise ValueError(
                f"{out} holds a complete cache of other data (fingerprint {manifest.get('fingerprint')}, this "
                f"dataset {fingerprint}); use another key (cache_key(..., extra=...)), delete the directory, or "
                f"pass overwrite=True"
            )
    plan = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "fingerprint": fingerprint,
            "n": len(dataset), "shard_size": shard_size, "resolution": dataset.resolution}
    out.mkdir(parents=True, exist_ok=True)
    if _read_json(out / "build.json") == plan and manifest is None:
        logger.info("resuming the interrupted cache build in %s", out)
    else:
        _clear(out)
        _atomic_write_bytes(out / "build.json", json.dumps(plan, indent=1).encode())
    if dataset.random_crop or dataset.random_flip:
        warnings.warn(
            f"caching a dataset with random crop/flip stores the draw of epoch {dataset.epoch} only: every epoch "
            "will see the same crop and flip", UserWarning, stacklevel=2
        )
    captions = dataset.captions()
    unique = list(dict.fromkeys(captions))
    cond_spec = _write_cond_shards(out, unique, encode_prompts, batch_size, shard_size, progress)
    if not (out / "empty_cond.safetensors").exists():
        empty = _check_prompt_output(encode_prompts([""]), 1, cond_spec)
        _atomic_save_tensors(out / "empty_cond.safetensors", {k: v[0] for k, v in empty.items()})
    _write_pair_shards(out, dataset, encode_images, batch_size, shard_size, num_workers, progress)
    _finalize(out, dataset, plan, unique, captions, cond_spec)
    return out


def _write_cond_shards(out: Path, unique: list[str], encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
                       batch_size: int, shard_size: int, progress: bool) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    spec: dict[str, tuple[list[int], str]] | None = None
    n_shards = -(-len(unique) // shard_size)
    with tqdm(total=len(unique), desc="encoding captions", unit="caption", disable=not progress) as bar:
        for k in range(n_shards):
            path = out / f"cond-{k:05d}.safetensors"
            chunk = unique[k * shard_size : (k + 1) * shard_size]
            if path.exists():
                with safe_open(str(path), "pt") as f:
                    got = {name: (f.get_slice(name).get_shape()[1:], _dtype_name(f.get_slice(name).get_dtype()))
                           for name in f.keys()}
                spec = spec or got
                bar.update(len(chunk))
                continue
            parts: dict[str, list[torch.Tensor]] = {}
            for start in range(0, len(chunk), batch_size):
                batch = chunk[start : start + batch_size]
                encoded = _check_prompt_output(encode_prompts(batch), len(batch), spec)
                spec = spec or {name: _spec(v) for name, v in encoded.items()}
                for name, value in encoded.items():
                    parts.setdefault(name, []).append(value)
                bar.update(len(batch))
            _atomic_save_tensors(path, {name: torch.cat(values) for name, values in parts.items()})
    assert spec is not None
    return spec


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _dtype_name(safetensors_dtype: str) -> str:
    return _SAFETENSORS_DTYPES.get(safetensors_dtype, safetensors_dtype.lower())


def _write_pair_shards(out: Path, dataset: PickAPicPairs, encode_images: Callable[[torch.Tensor], torch.Tensor],
                       batch_size: int, shard_size: int, num_workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    n = len(dataset)
    n_shards = -(-n // shard_size)
    todo = [k for k in range(n_shards) if not (out / f"pairs-{k:05d}.safetensors").exists()]
    batches: list[list[int]] = []
    batches_per_shard: dict[int, int] = {}
    for k in todo:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        shard_batches = [list(range(s, min(hi, s + batch_size))) for s in range(lo, hi, batch_size)]
        batches += shard_batches
        batches_per_shard[k] = len(shard_batches)
    bar = tqdm(total=n, initial=n - sum(min(n, (k + 1) * shard_size) - k * shard_size for k in todo),
               desc="encoding images", unit="pair", disable=not progress)
    loader = torch.utils.data.DataLoader(_LoadWithReason(dataset), batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=_as_list)
    spec: tuple[list[int], str] | None = None
    shard_iter = iter(todo)
    current, seen = None, 0
    acc: dict[str, list[torch.Tensor]] = {"latents": [], "original_sizes": [], "crop_top_lefts": [], "index": []}
    corrupt: list[tuple[str, str]] = []
    try:
        for results in loader:
            if current is None:
                current, seen = next(shard_iter), 0
            good = [(i, item) for i, item, _ in results if item is not None]
            corrupt += [(dataset.row_id(i), reason or "unknown error") for i, item, reason in results if item is None]
            if good:
                pixels = torch.stack([item["pixel_values"] for _, item in good])  # (B, 2, 3, R, R)
                latents = _encode_images_checked(encode_images, pixels, spec)  # (B, 2, C, h, w)
                spec = spec or _spec(latents)
                acc["latents"].append(latents)
                acc["original_sizes"].append(torch.stack([item["original_sizes"] for _, item in good]))
                acc["crop_top_lefts"].append(torch.stack([item["crop_top_lefts"] for _, item in good]))
                acc["index"].append(torch.tensor([i for i, _ in good], dtype=torch.long))
            bar.update(len(results))
            seen += 1
            if seen == batches_per_shard[current]:
                tensors = {name: torch.cat(values) for name, values in acc.items() if values}
                tensors.setdefault("index", torch.zeros(0, dtype=torch.long))
                _atomic_save_tensors(out / f"pairs-{current:05d}.safetensors", tensors,
                                     metadata={"corrupt": json.dumps(corrupt)})
                current = None
                acc = {name: [] for name in acc}
                corrupt = []
    finally:
        bar.close()


def _finalize(out: Path, dataset: PickAPicPairs, plan: dict[str, Any], unique: list[str], captions: list[str],
              cond_spec: dict[str, tuple[list[int], str]]) -> None:
    from safetensors import safe_open

    size = plan["shard_size"]
    n_shards = -(-plan["n"] // size)
    caption_index = {c: i for i, c in enumerate(unique)}
    row_ids, cap_idx, shard_ids, offsets, pair_shards = [], [], [], [], []
    corrupt: list[tuple[str, str]] = []
    latent_spec: tuple[list[int], str] | None = None
    for k in range(n_shards):
        name = f"pairs-{k:05d}.safetensors"
        with safe_open(str(out / name), "pt") as f:
            index = f.get_tensor("index").tolist()
            corrupt += [tuple(x) for x in json.loads(f.metadata().get("corrupt", "[]"))]
            if "latents" in f.keys() and latent_spec is None:
                s = f.get_slice("latents")
                latent_spec = (s.get_shape()[1:], _dtype_name(s.get_dtype()))
        pair_shards.append({"file": name, "n": len(index)})
        for offset, i in enumerate(index):
            row_ids.append(dataset.row_id(i))
            cap_idx.append(caption_index[captions[i]])
            shard_ids.append(k)
            offsets.append(offset)
    if not row_ids:
        raise ValueError(f"every pair was corrupt; nothing cached in {out}. First rows: {corrupt[:5]}")
    assert latent_spec is not None
    _atomic_write_parquet(out / "rows.parquet", pa.table({
        "row_id": pa.array(row_ids, pa.string()), "caption_index": pa.array(cap_idx, pa.int64()),
        "shard": pa.array(shard_ids, pa.int32()), "offset": pa.array(offsets, pa.int32())}))
    _atomic_write_parquet(out / "captions.parquet", pa.table({"caption": pa.array(unique, pa.string())}))
    stats = dataclasses.asdict(dataset.stats)
    stats.pop("corrupt_rows")
    manifest = {
        **plan,
        "n": len(row_ids),
        "n_dataset": plan["n"],
        "n_captions": len(unique),
        "source": [u.name for u in dataset._units],
        "random_crop": dataset.random_crop,
        "random_flip": dataset.random_flip,
        "center_crop": dataset.center_crop,
        "epoch": dataset.epoch,
        "shapes": {"latents": latent_spec[0], "original_sizes": [2, 2], "crop_top_lefts": [2, 2],
                   "cond": {name: s[0] for name, s in cond_spec.items()}},
        "dtypes": {"latents": latent_spec[1], "original_sizes": "int64", "crop_top_lefts": "int64",
                   "cond": {name: s[1] for name, s in cond_spec.items()}},
        "pair_shards": pair_shards,
        "cond_shards": [{"file": f"cond-{k:05d}.safetensors", "n": min(size, len(unique) - k * size)}
                        for k in range(-(-len(unique) // size))],
        "corrupt": len(corrupt),
        "corrupt_rows": corrupt,
        "dataset_stats": stats,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    (out / "build.json").unlink(missing_ok=True)
    if corrupt:
        names = ", ".join(f"{r} ({why})" for r, why in corrupt[:5])
        more = f" and {len(corrupt) - 5} more" if len(corrupt) > 5 else ""
        warnings.warn(f"build_cache skipped {len(corrupt)} corrupt pair(s): {names}{more}", RuntimeWarning,
                      stacklevel=3)
    logger.info("cached %d pairs and %d captions in %s", len(row_ids), len(unique), out)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _stats_from_manifest(manifest: dict[str, Any]) -> Any:
    """The :class:`PairStats` of the build (``corrupt_rows`` are not kept in the manifest), or ``None``."""
    from diffdpo.data.selection import PairStats

    saved = manifest.get("dataset_stats")
    if not isinstance(saved, dict):
        return None
    known = {f.name for f in dataclasses.fields(PairStats)}
    return PairStats(**{k: v for k, v in saved.items() if k in known})


class CachedPairs(torch.utils.data.Dataset):
    """Pairs from a complete cache written by :func:`build_cache` (``cache_dir/key``).

    Items: ``latents`` (2, C, h, w) winner first, ``cond`` {name: per-sample tensor}, ``original_sizes`` (2, 2),
    ``crop_top_lefts`` (2, 2), ``caption`` and ``row_id``. ``empty_cond`` holds ``encode_prompts([""])`` with
    per-sample shapes (no batch dimension), for prompt dropout on the training side.
    """

    _MAX_OPEN = 64  # open shard handles per process (an LRU), to stay far from file-descriptor limits

    def __init__(self, cache_dir_with_key: str | Path):
        from safetensors.torch import load_file

        self.path = Path(cache_dir_with_key)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            inside = sorted(p.parent.name for p in self.path.glob("*/manifest.json")) if self.path.is_dir() else []
            hint = (f"; it contains the cache(s) {inside}: pass {self.path / inside[0]}" if inside else
                    "; build it with diffdpo.data.build_cache(...) (an interrupted build has no manifest)")
            raise FileNotFoundError(f"{self.path}: no complete cache (manifest.json missing){hint}")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
            raise ValueError(f"{manifest_path}: not a {CACHE_FORMAT} v{CACHE_VERSION} manifest; rebuild the cache")
        self.manifest: dict[str, Any] = manifest
        self.stats = _stats_from_manifest(manifest)  # what the reader kept and dropped when the cache was built
        rows = pq.read_table(self.path / "rows.parquet")
        self._row_ids = rows.column("row_id").combine_chunks()
        self._caption_index = rows.column("caption_index").to_numpy()
        self._shard = rows.column("shard").to_numpy()
        self._offset = rows.column("offset").to_numpy()
        self._captions = pq.read_table(self.path / "captions.parquet").column("caption").combine_chunks()
        self.empty_cond: dict[str, torch.Tensor] = load_file(str(self.path / "empty_cond.safetensors"))
        self._cond_names = sorted(manifest["shapes"]["cond"])
        self._shard_size = int(manifest["shard_size"])
        self._pair_files = [self.path / s["file"] for s in manifest["pair_shards"]]
        self._cond_files = [self.path / s["file"] for s in manifest["cond_shards"]]
        missing = [p.name for p in self._pair_files + self._cond_files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path}: shard file(s) {missing[:5]} listed in manifest.json are missing; "
                                    f"delete the directory and rebuild the cache")
        self._handles: OrderedDict[Path, Any] = OrderedDict()
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handles=OrderedDict(), _pid=None)
        return state

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return len(self._shard)

    def _open(self, path: Path) -> Any:
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(path)
        if handle is None:
            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
            if len(self._handles) > self._MAX_OPEN:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(path)
        return handle

    def caption(self, index: int) -> str:
        return self._captions[int(self._caption_index[index])].as_py()

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        index = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= index < n:
            raise IndexError(f"pair index {index} out of range for {n} cached pairs")
        pairs = self._open(self._pair_files[self._shard[index]])
        j = int(self._offset[index])
        caption_index = int(self._caption_index[index])
        cond_file = self._open(self._cond_files[caption_index // self._shard_size])
        c = caption_index % self._shard_size
        return {
            "latents": pairs.get_slice("latents")[j : j + 1][0],  # (2, C, h, w), winner first
            "cond": {name: cond_file.get_slice(name)[c : c + 1][0] for name in self._cond_names},
            "original_sizes": pairs.get_slice("original_sizes")[j : j + 1][0],  # (2, 2)
            "crop_top_lefts": pairs.get_slice("crop_top_lefts")[j : j + 1][0],  # (2, 2)
            "caption": self._captions[caption_index].as_py(),
            "row_id": self._row_ids[index].as_py(),
        }


def collate_cached(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch :class:`CachedPairs` items: ``latents`` (B, 2, C, h, w), ``cond`` {name: (B, ...)},
    ``original_sizes`` / ``crop_top_lefts`` (B, 2, 2), ``captions``, ``row_ids``."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise ValueError("collate_cached got an empty batch")
    return {
        "latents": torch.stack([item["latents"] for item in kept]),  # (B, 2, C, h, w)
        "cond": {name: torch.stack([item["cond"][name] for item in kept]) for name in kept[0]["cond"]},
        "original_sizes": torch.stack([item["original_sizes"] for item in kept]),  # (B, 2, 2)
        "crop_top_lefts": torch.stack([item["crop_top_lefts"] for item in kept]),  # (B, 2, 2)
        "captions": [item["caption"] for item in kept],
        "row_ids": [item["row_id"] for item in kept],
    }

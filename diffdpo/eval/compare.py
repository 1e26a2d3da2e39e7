"""Tuned vs base text-to-image model, judged by reward models: the ``diffdpo eval`` command.

Both models draw each image from the same prompt and seed (image ``j`` of a prompt uses seed
``seed + j`` for its initial noise, drawn per image so batching changes nothing), every scorer scores
both images, and each (prompt, seed) is a paired comparison: a win, tie or loss of the tuned model
(:func:`diffdpo.eval.winrate.win_rate`, 95% Wilson interval). The base is any diffusers pipeline folder
or hub id (SD1.5, SDXL, the shipped toy model); the tuned model is the base with a LoRA adapter
(``load_lora_weights`` then ``fuse_lora``) or with its UNet replaced. See docs/eval.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.diffusion.sampling import sample_images
from diffdpo.eval.winrate import WinRate, save_grid, win_rate

#: Extra ``--scorer`` options that are numbers; all others stay strings.
_INT_SCORER_OPTIONS = ("batch_size",)


# --------------------------------------------------------------------------------------------
# inputs


def read_prompts(path: str | Path, column: str | None = None, *, max_prompts: int | None = None) -> list[str]:
    """Unique prompts, in file order: a parquet, CSV or TSV file's ``column`` (default ``prompt``, else
    ``caption``; PartiPrompts' TSV names it ``Prompt``), or any other file as plain text, one prompt per line
    (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv", ".tsv"):
        import pandas as pd

        df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        if column is None:
            column = next((c for c in ("prompt", "caption") if c in df.columns), None)
            if column is None:
                raise ValueError(f"{path} has neither a 'prompt' nor a 'caption' column (columns: "
                                 f"{', '.join(map(str, df.columns))}); pass --prompt-column NAME")
        elif column not in df.columns:
            raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(map(str, df.columns))}); "
                             "pass --prompt-column with one of them")
        prompts = [str(p).strip() for p in df[column].dropna()]
    else:
        if column is not None:
            raise ValueError(f"--prompt-column {column!r} needs a .parquet, .csv or .tsv file; {path} is read as "
                             "plain text, one prompt per line")
        prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = list(dict.fromkeys(p for p in prompts if p))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts[:max_prompts] if max_prompts else prompts


def parse_scorer_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``NAME=PATH[,KEY=VALUE...]`` -> ``(name, path, kwargs)``, e.g.
    ``pickscore=yuvalkirstain/PickScore_v1,processor_path=laion/CLIP-ViT-H-14-laion2B-s32B-b79K``."""
    from diffdpo.rewards import SCORER_NAMES

    head, *options = spec.split(",")
    name, sep, path = head.partition("=")
    if not sep or not path:
        raise ValueError(f"--scorer {spec!r}: expected NAME=PATH[,KEY=VALUE...] with NAME one of "
                         f"{', '.join(SCORER_NAMES)}")
    if name not in SCORER_NAMES:
        raise ValueError(f"--scorer {spec!r}: unknown scorer {name!r}; use one of {', '.join(SCORER_NAMES)}")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"--scorer {spec!r}: option {option!r} is not KEY=VALUE")
        kwargs[key] = int(value) if key in _INT_SCORER_OPTIONS else value
    return name, path, kwargs


# --------------------------------------------------------------------------------------------
# models


def _is_local(path: str | Path, what: str) -> bool:
    """True for an existing local path, False for a hub id (``org/name``); anything else is a one-line error."""
    from diffdpo.config import check_model_source

    return check_model_source(str(path), what, allow_file=True)


def load_base_pipeline(path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> Any:
    """A diffusers text-to-image pipeline from a folder or hub id (``DiffusionPipeline.from_pretrained``);
    a local folder's UNet loads with the class its config names (:func:`diffdpo.diffusion.models.unet_class`)."""
    from diffusers import DiffusionPipeline

    from diffdpo.adapters import resolve_dtype
    from diffdpo.diffusion.models import unet_class

    torch_dtype = resolve_dtype(dtype)
    local = Path(path)
    kw: dict[str, Any] = {"torch_dtype": torch_dtype}
    if _is_local(path, "base"):
        if not (local / "model_index.json").is_file():
            raise ValueError(f"base {path} is not a diffusers pipeline folder (no model_index.json)")
        index = json.loads((local / "model_index.json").read_text())
        if "safety_checker" in index:
            kw.update(safety_checker=None, requires_safety_checker=False)
        if (local / "unet" / "config.json").is_file():
            kw["unet"] = unet_class(str(local)).from_pretrained(str(local), subfolder="unet", torch_dtype=torch_dtype)
    pipe = DiffusionPipeline.from_pretrained(str(path), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def apply_tuning(pipe: Any, *, lora: str | Path | None = None, unet: str | Path | None = None) -> Any:
    """The base pipeline made into the tuned one, in place: LoRA weights fused into it, or its UNet replaced
    by the one in ``unet`` (a UNet folder, a pipeline folder with a ``unet/`` subfolder, or a hub id)."""
    from diffusers.utils import logging as diffusers_logging

    from diffdpo.diffusion.models import unet_class

    if (lora is None) == (unet is None):
        raise ValueError("pass exactly one of --lora PATH and --unet FOLDER")
    if lora is not None:
        _is_local(lora, "--lora")
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" when only the UNet was tuned
        try:
            pipe.load_lora_weights(str(lora))
        finally:
            diffusers_logging.set_verbosity(verbosity)
        pipe.fuse_lora()
        return pipe
    folder = Path(unet)
    if not _is_local(unet, "--unet"):  # a hub id: its unet/ subfolder (e.g. mhdang/dpo-sd1.5-text2image-v1), else its root
        cls = type(pipe.unet)
        try:
            new = cls.from_pretrained(str(unet), subfolder="unet", torch_dtype=pipe.unet.dtype)
        except OSError:
            new = cls.from_pretrained(str(unet), torch_dtype=pipe.unet.dtype)
    elif (folder / "unet" / "config.json").is_file():  # a pipeline folder
        new = unet_class(str(folder)).from_pretrained(str(folder), subfolder="unet", torch_dtype=pipe.unet.dtype)
    elif (folder / "config.json").is_file():  # a UNet folder (saved with save_pretrained)
        cls = unet_class(str(folder.parent)) if folder.name == "unet" else type(pipe.unet)
        new = cls.from_pretrained(str(folder), torch_dtype=pipe.unet.dtype)
    else:
        raise ValueError(f"--unet {unet}: neither a UNet folder (config.json) nor a pipeline folder (unet/config.json)")
    pipe.unet = new.to(pipe.unet.device)
    return pipe


# --------------------------------------------------------------------------------------------
# the comparison


@dataclass
class ScorerResult:
    name: str
    win_rate: WinRate
    base_mean: float
    tuned_mean: float

    @property
    def mean_change(self) -> float:
        return self.tuned_mean - self.base_mean

    def to_dict(self) -> dict:
        return {"win_rate": self.win_rate.to_dict(), "base_mean": self.base_mean, "tuned_mean": self.tuned_mean,
                "mean_change": self.mean_change}


@dataclass
class CompareResult:
    n: int
    prompts: int
    seeds_per_prompt: int
    scorers: list[ScorerResult]
    report_path: Path
    grid_path: Path
    settings: dict = field(default_factory=dict)

    def summary(self) -> str:
        head = f"{'scorer':<12} {'win rate [95% CI]':<22} {'W/T/L':<14} {'base':>9} {'tuned':>9} {'change':>9}"
        lines = [f"tuned vs base: {self.n} comparisons ({self.prompts} prompts x {self.seeds_per_prompt} seeds)",
                 head, "-" * len(head)]
        for s in self.scorers:
            wr = s.win_rate
            lines.append(f"{s.name:<12} {f'{100 * wr.rate:.1f}% [{100 * wr.ci_low:.1f}-{100 * wr.ci_high:.1f}]':<22} "
                         f"{f'{wr.wins}/{wr.ties}/{wr.losses}':<14} {s.base_mean:>9.4f} {s.tuned_mean:>9.4f} "
                         f"{s.mean_change:>+9.4f}")
        return "\n".join(lines)


def score_comparisons(
    base_images: Sequence[Any], tuned_images: Sequence[Any], prompts: Sequence[str],
    scorers: Sequence[tuple[str, Callable[[], Any]]], *, tie_margin: float = 0.0,
) -> tuple[list[ScorerResult], dict[str, tuple[list[float], list[float]]]]:
    """Score paired images (``base_images[i]`` and ``tuned_images[i]``, both drawn for ``prompts[i]`` from one
    seed) with each scorer, built one at a time by its factory and dropped after use (real scorers are large);
    returns per-scorer win rates of tuned over base (ties within ``tie_margin``) and the per-image scores.
    ``diffdpo eval`` and the demo's evaluation both come through here."""
    import torch

    if not len(base_images) == len(tuned_images) == len(prompts):
        raise ValueError(f"got {len(base_images)} base images, {len(tuned_images)} tuned images and "
                         f"{len(prompts)} prompts; they must pair up")
    results, per_image = [], {}
    for name, factory in scorers:
        scorer = factory()
        base_s = torch.as_tensor(scorer(list(base_images), list(prompts)), dtype=torch.float64).cpu()
        tuned_s = torch.as_tensor(scorer(list(tuned_images), list(prompts)), dtype=torch.float64).cpu()
        del scorer
        per_image[name] = (base_s.tolist(), tuned_s.tolist())
        results.append(ScorerResult(name, win_rate(tuned_s.tolist(), base_s.tolist(), tie_margin=tie_margin),
                                    float(base_s.mean()), float(tuned_s.mean())))
    return results, per_image


def compare(
    base: str,
    prompts_path: str | Path,
    scorer_specs: Sequence[str],
    out_dir: str | Path,
    *,
    lora: str | None = None,
    unet: str | None = None,
    prompt_column: str | None = None,
    max_prompts: int | None = None,
    seeds: int = 1,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    batch_size: int = 8,
    tie_margin: float = 0.0,
    grid: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
) -> CompareResult:
    """Sample base and tuned images for every (prompt, seed), score both with every scorer, write
    ``report.json`` and ``grid.png`` (base row over tuned row, the first ``grid`` comparisons) in ``out_dir``."""
    import torch

    from diffdpo.rewards import build_scorer

    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    specs = [parse_scorer_spec(s) for s in scorer_specs]  # bad specs fail before anything loads
    if not specs:
        raise ValueError("pass at least one --scorer NAME=PATH")
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--scorer names repeat ({', '.join(names)}); pass each scorer once")
    prompt_list = read_prompts(prompts_path, prompt_column, max_prompts=max_prompts)
    if (lora is None) == (unet is None):
        raise ValueError("pass exactly one of --lora PATH and --unet FOLDER")
    for what, path in (("base", base), ("--lora", lora), ("--unet", unet)):
        if path is not None:
            _is_local(path, what)  # a mistyped path fails here, before anything loads
    caps = [p for p in prompt_list for _ in range(seeds)]  # (N,) with N = prompts x seeds
    seed_list = [seed + j for _ in prompt_list for j in range(seeds)]
    t0 = time.time()

    pipe = load_base_pipeline(base, device=device, dtype=dtype)
    kw = dict(steps=steps, guidance_scale=guidance_scale, resolution=resolution, batch_size=batch_size)
    base_imgs = sample_images(pipe, caps, seed_list, desc="base", **kw)
    apply_tuning(pipe, lora=lora, unet=unet)
    tuned_imgs = sample_images(pipe, caps, seed_list, desc="tuned", **kw)
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    factories = [(name, lambda name=name, path=path, options=options: build_scorer(
        name, path, **{"device": device, "dtype": dtype, **options}))  # type: ignore[arg-type]
        for name, path, options in specs]
    results, per_image = score_comparisons(base_imgs, tuned_imgs, caps, factories, tie_margin=tie_margin)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = min(grid, len(caps))
    scale = max(1, 64 // base_imgs.shape[1])  # small (toy) images enlarged; real ones shown as they are
    grid_path = save_grid(out / "grid.png", [base_imgs[:k], tuned_imgs[:k]], ["base", "tuned"],
                          [f"{c[:24]} (seed {s})" for c, s in zip(caps[:k], seed_list[:k])], scale=scale)
    settings = dict(base=str(base), lora=lora, unet=unet, prompts=str(prompts_path), prompt_column=prompt_column,
                    seeds=seeds, seed=seed, steps=steps, guidance_scale=guidance_scale, resolution=resolution,
                    tie_margin=tie_margin, device=device, dtype=dtype, scorers=list(scorer_specs))
    report = {
        "n": len(caps), "prompts": len(prompt_list), "seeds_per_prompt": seeds, "settings": settings,
        "scorers": {r.name: r.to_dict() for r in results},
        "grid": {"path": grid_path.name, "rows": ["base", "tuned"], "columns": k},
        "comparisons": [
            {"prompt": c, "seed": s, **{f"{name}_base": per_image[name][0][i] for name in names},
             **{f"{name}_tuned": per_image[name][1][i] for name in names}}
            for i, (c, s) in enumerate(zip(caps, seed_list))
        ],
        "seconds": round(time.time() - t0, 1),
    }
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    return CompareResult(len(caps), len(prompt_list), seeds, results, report_path, grid_path, settings)

"""Online Diffusion-DPO with AI feedback: rounds of generate -> score -> best/worst pairs -> train -> repeat.

The paper's AI-feedback variant (Wallace et al. 2023, sec. 6) relabels existing pairs; this is its online
form: each round samples ``images_per_prompt`` images per (prompt, repeat) from the current model, a
scorer (PickScore, HPSv2, CLIP score, LAION aesthetics, or the shapes judge) scores them, the best and the
worst form a Pick-a-Pic pair (a tie when their scores are within ``tie_margin``), and a fresh adapter
trains with the shared loop (:mod:`diffdpo.train`) on all pairs so far, the base as the reference. Round
``r > 1`` samples from round ``r - 1``'s model (its LoRA fused into the UNet, or its UNet).

:func:`run_rounds` is the machinery; ``diffdpo demo`` (:mod:`diffdpo.recipes.demo`) and
``diffdpo online-t2i --config ...`` (:func:`run_online_t2i`, any diffusers SD1.5/SDXL pipeline) both
call it, and both evaluate through :func:`diffdpo.eval.compare.score_comparisons`. See docs/online_t2i.md.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffdpo.config import help_meta
from diffdpo.toy.pairs import PairSummary, jpeg_bytes

#: Scorer spec of the shapes world's programmatic judge (no weights); any other spec is ``NAME=PATH[,K=V]``.
SHAPES_SCORER = "shapes"


# --------------------------------------------------------------------------------------------
# pairs from samples


def label_pair(score_0: float, score_1: float, tie_margin: float) -> tuple[float, float]:
    """Pick-a-Pic labels ``(label_0, label_1)``: (1, 0), (0, 1), or (0.5, 0.5) when within ``tie_margin``."""
    if abs(score_0 - score_1) <= tie_margin:
        return 0.5, 0.5
    return (1.0, 0.0) if score_0 > score_1 else (0.0, 1.0)


def _as_float64(scores: Any) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch tensor
        return scores.detach().double().cpu().numpy()
    return np.asarray(scores, dtype=np.float64)


def _chunk_pairs(images_per_prompt: int, batch_size: int, target_images: int = 256) -> int:
    """Pairs per sampling chunk: a whole number of sampling batches (so chunking never changes a batch's
    composition) and of pairs, about ``target_images`` images (bounded memory at any resolution)."""
    unit = math.lcm(images_per_prompt, batch_size)  # images
    return unit * max(1, target_images // unit) // images_per_prompt


def sample_pairs(
    sample_fn: Callable[[list[str], list[int]], np.ndarray],
    scorer: Callable[[Any, list[str]], Any],
    prompts: Sequence[str],
    pairs_per_prompt: int,
    out_path: str | Path,
    *,
    seed: int = 0,
    images_per_prompt: int = 2,
    tie_margin: float = 0.0,
    batch_size: int = 128,
    model_name: str = "base",
) -> PairSummary:
    """Best-vs-worst pairs in the Pick-a-Pic v2 schema, written to ``out_path``.

    For each (prompt, repeat) ``i``, ``sample_fn(prompts, seeds)`` draws ``k = images_per_prompt`` images
    with seeds ``1e6 * (seed + 1) + k * i + j``; ``scorer(images, prompts)`` scores them; the best and the
    worst (first occurrence on equal scores; for k = 2 both samples in sampling order) become ``jpg_0`` and
    ``jpg_1`` with :func:`label_pair` labels. Images are sampled and scored in chunks of whole batches, so
    memory stays bounded and only the two kept JPEGs per pair are held."""
    from tqdm.auto import tqdm

    from diffdpo.data import write_pickapic_parquet

    k = images_per_prompt
    if k < 2:
        raise ValueError(f"images_per_prompt must be >= 2, got {k}")
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    caps = [c for c in prompts for _ in range(pairs_per_prompt)]
    base_seed = 1_000_000 * (seed + 1)
    chunk = _chunk_pairs(k, batch_size)
    rows, ties = [], 0
    for start in tqdm(range(0, len(caps), chunk), desc=f"pairs ({len(caps)} x {k} images)", unit="chunk"):
        part = caps[start : start + chunk]
        expanded = [c for c in part for _ in range(k)]
        seeds = [base_seed + k * start + m for m in range(k * len(part))]
        images = sample_fn(expanded, seeds)
        scores = _as_float64(scorer(images, expanded)).reshape(len(part), k)
        for i, cap in enumerate(part):
            a, b = (0, 1) if k == 2 else (int(np.argmax(scores[i])), int(np.argmin(scores[i])))
            if a == b:
                a, b = 0, 1
            label_0, label_1 = label_pair(scores[i, a], scores[i, b], tie_margin)
            ties += label_0 == 0.5
            rows.append({"caption": cap, "jpg_0": jpeg_bytes(images[k * i + a]), "jpg_1": jpeg_bytes(images[k * i + b]),
                         "label_0": label_0, "label_1": label_1, "model_0": model_name, "model_1": model_name})
    path = write_pickapic_parquet(out_path, rows)
    return PairSummary(len(caps), ties, len(caps) - ties, str(path), list(prompts), [])


def merge_pairs(parts: list[PairSummary], path: Path) -> PairSummary:
    """One Pick-a-Pic parquet with the rows of every part (the pairs of all rounds so far)."""
    import pandas as pd

    pd.concat([pd.read_parquet(p.path) for p in parts], ignore_index=True).to_parquet(path, index=False)
    rows, ties = sum(p.rows for p in parts), sum(p.ties for p in parts)
    return PairSummary(rows, ties, rows - ties, str(path), parts[0].train_captions, [])


# --------------------------------------------------------------------------------------------
# models


def load_tuned(load_pipeline: Callable[[str], Any], base: str, final_dir: str | Path) -> Any:
    """The base pipeline with a training run's result: its LoRA fused into the UNet
    (``pytorch_lora_weights.safetensors``), or its full UNet (``unet/``), as ``diffdpo eval`` applies them."""
    from diffdpo.eval.compare import apply_tuning

    final = Path(final_dir)
    if (final / "pytorch_lora_weights.safetensors").is_file():
        return apply_tuning(load_pipeline(base), lora=final)
    return apply_tuning(load_pipeline(base), unet=final)


def build_image_scorer(spec: str, *, tie_margin: float = 0.0, device: str = "cpu", dtype: str = "float32") -> Any:
    """``shapes`` (the shapes world's judge) or a ``NAME=PATH[,KEY=VALUE...]`` reward model (``diffdpo eval``'s
    ``--scorer`` syntax); scorers are callables ``scorer(images, prompts) -> scores``."""
    if spec == SHAPES_SCORER:
        from diffdpo.toy.shapes_judge import ShapesJudge

        return ShapesJudge(tie_margin=tie_margin)
    from diffdpo.eval.compare import parse_scorer_spec
    from diffdpo.rewards import build_scorer

    name, path, options = parse_scorer_spec(spec)
    return build_scorer(name, path, **{"device": device, "dtype": dtype, **options})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the rounds


@dataclass
class RoundsResult:
    pairs: PairSummary  # all pairs the last round trained on
    rounds: list[dict[str, Any]]
    final_dir: Path
    train_output_dir: str
    pairs_seconds: float
    train_seconds: float


def run_rounds(
    *,
    base: str,
    base_pipe: Any,
    load_pipeline: Callable[[str], Any],
    scorer: Callable[[Any, list[str]], Any],
    prompts: Sequence[str],
    out: Path,
    rounds: int,
    pairs_per_prompt: int,
    images_per_prompt: int,
    sample_kw: dict[str, Any],
    train_config: str,
    train_overrides: Sequence[str] = (),
    seed: int = 0,
    tie_margin: float = 0.0,
    first_round_pairs: PairSummary | None = None,
) -> RoundsResult:
    """``rounds`` rounds of sample -> score -> pairs -> train; round ``r`` samples from round ``r - 1``'s model
    with seed ``seed + 1000 * (r - 1)`` and trains a fresh adapter on the pairs of rounds 1..r
    (``first_round_pairs`` replaces round 1's sampling). ``sample_kw`` goes to
    :func:`diffdpo.diffusion.sampling.sample_images` (steps, guidance_scale, resolution, batch_size)."""
    from diffdpo.diffusion.sampling import sample_images
    from diffdpo.train import load_train_config, train

    sampler, sampled, log = base_pipe, [], []
    pairs_s = train_s = 0.0
    batch_size = int(sample_kw.get("batch_size", 8))
    for r in range(1, rounds + 1):
        tag = f"round {r}/{rounds}: " if rounds > 1 else ""
        round_seed = seed + 1000 * (r - 1)
        if r == 1 and first_round_pairs is not None:
            print(f"[1/4] {tag}reusing the pairs in {first_round_pairs.path} (no sampling)")
            new = first_round_pairs
        else:
            print(f"[1/4] {tag}sampling and scoring pairs from the {'base' if r == 1 else f'round-{r - 1}'} model")
            t0 = time.time()

            def sample_fn(caps: list[str], seeds: list[int], pipe: Any = sampler) -> np.ndarray:
                return sample_images(pipe, caps, seeds, progress=False, **sample_kw)

            new = sample_pairs(sample_fn, scorer, prompts, pairs_per_prompt,
                               out / ("pairs.parquet" if rounds == 1 else f"pairs_round{r}.parquet"), seed=round_seed,
                               images_per_prompt=images_per_prompt, tie_margin=tie_margin, batch_size=batch_size,
                               model_name="base" if r == 1 else f"round{r - 1}")
            pairs_s += time.time() - t0
        sampled.append(new)
        print(f"      {new.rows} pairs, {new.ties} ties (dropped by the reader)")
        pairs = new if r == 1 else merge_pairs(sampled, out / f"pairs_rounds_1-{r}.parquet")

        print(f"[2/4] {tag}Diffusion-DPO on {pairs.rows} pairs (reference = the base)")
        train_cfg = load_train_config(train_config, [
            f"diffusion.model.pretrained={base}", f"diffusion.data.source={pairs.path}",
            f"output_dir={out / ('train' if r == rounds else f'train_round{r}')}",
            f"diffusion.data.cache_dir={out / 'cache'}", f"seed={round_seed}",
            "overwrite=true", *train_overrides])  # the recipe's own folder: a rerun replaces it
        shutil.rmtree(out / "cache", ignore_errors=True)  # the pairs were just (re-)sampled: encode them afresh
        t0 = time.time()
        result = train(train_cfg)
        train_s += time.time() - t0
        log.append({"round": r, "new_pairs": new.rows, "new_ties": new.ties, "trained_on": pairs.rows,
                    "steps": result.steps, "final_dir": str(result.final_dir),
                    "nonfinite_steps": result.nonfinite_total})
        if r < rounds:
            sampler = load_tuned(load_pipeline, base, result.final_dir)
    return RoundsResult(pairs, log, Path(result.final_dir), train_cfg.output_dir, pairs_s, train_s)


# --------------------------------------------------------------------------------------------
# the command: any diffusers pipeline, any scorer


@dataclass
class OnlineT2IConfig:
    """``diffdpo online-t2i --config ...``: online AI-feedback rounds on a diffusers text-to-image pipeline."""

    base: str = field(default="", metadata=help_meta("pipeline folder or hub id (SD1.5, SDXL, data/toy_t2i)"))
    prompts: str = field(default="", metadata=help_meta("prompt file: text (one per line), or parquet/CSV column"))
    prompt_column: str | None = field(default=None, metadata=help_meta("column of a parquet/CSV prompt file"))
    max_prompts: int = field(default=0, metadata=help_meta("use the first N prompts (0 = all)"))
    heldout_prompts: int = field(default=0, metadata=help_meta("prompts (seeded pick) never used in pairs, evaluated apart"))
    scorer: str = field(default=SHAPES_SCORER, metadata=help_meta(
        "pair scorer: NAME=PATH[,KEY=VALUE] (clip, pickscore, hpsv2, aesthetic) or 'shapes' (toy judge)"))
    eval_scorers: list[str] = field(default_factory=list, metadata=help_meta("evaluation scorers (default: scorer)"))
    train_config: str = field(default="", metadata=help_meta("training config (TrainConfig YAML, task diffusion)"))
    train_overrides: list[str] = field(default_factory=list, metadata=help_meta("key=value overrides of it"))
    out_dir: str = field(default="outputs/online_t2i", metadata=help_meta("pairs, adapters, report and grid"))
    seed: int = field(default=0, metadata=help_meta("seed of the held-out split, the pairs and the training"))
    rounds: int = field(default=2, metadata=help_meta("rounds of sample -> score -> train"))
    pairs_per_prompt: int = field(default=4, metadata=help_meta("pairs per training prompt and round"))
    images_per_prompt: int = field(default=4, metadata=help_meta("images scored per pair (best vs worst)"))
    steps: int = field(default=30, metadata=help_meta("sampler steps per image"))
    guidance_scale: float = field(default=7.5, metadata=help_meta("classifier-free guidance scale"))
    resolution: int = field(default=0, metadata=help_meta("image side in px (0 = the pipeline's native)"))
    batch_size: int = field(default=8, metadata=help_meta("images per sampling batch"))
    tie_margin: float = field(default=0.0, metadata=help_meta("score difference at or below which a pair ties"))
    eval_seeds: int = field(default=2, metadata=help_meta("evaluation seeds per prompt (same for base and tuned)"))
    device: str = field(default="cpu", metadata=help_meta("torch device for sampling and scoring"))
    dtype: str = field(default="float32", metadata=help_meta("float32 | bfloat16 | float16 for sampling and scoring"))

    def __post_init__(self) -> None:
        for key in ("base", "prompts", "train_config"):
            if not getattr(self, key):
                raise ValueError(f"{key}: required (see configs/online_t2i_toy.yaml)")
        if self.rounds < 1 or self.pairs_per_prompt < 1 or self.eval_seeds < 1:
            raise ValueError("rounds, pairs_per_prompt and eval_seeds must be >= 1")
        if self.images_per_prompt < 2:
            raise ValueError(f"images_per_prompt must be >= 2, got {self.images_per_prompt}")
        if self.heldout_prompts < 0 or self.max_prompts < 0 or self.tie_margin < 0:
            raise ValueError("heldout_prompts, max_prompts and tie_margin must be >= 0")


def split_prompts(prompts: list[str], n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out): ``n_heldout`` prompts picked by a seeded permutation never go into pairs."""
    if not 0 <= n_heldout < len(prompts):
        raise ValueError(f"heldout_prompts must be in [0, {len(prompts)}) for {len(prompts)} prompts, got {n_heldout}")
    held = set(np.random.default_rng(seed).permutation(len(prompts))[:n_heldout].tolist())
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]


def _evaluate(base_pipe: Any, tuned_pipe: Any, prompts: list[str], cfg: OnlineT2IConfig, seed_base: int,
              desc: str) -> tuple[list[Any], dict, np.ndarray, np.ndarray, list[str]]:
    from diffdpo.diffusion.sampling import sample_images
    from diffdpo.eval.compare import score_comparisons

    caps = [p for p in prompts for _ in range(cfg.eval_seeds)]
    seeds = [seed_base + j for _ in prompts for j in range(cfg.eval_seeds)]
    kw = dict(steps=cfg.steps, guidance_scale=cfg.guidance_scale, resolution=cfg.resolution or None,
              batch_size=cfg.batch_size)
    base_imgs = sample_images(base_pipe, caps, seeds, desc=f"{desc}: base", **kw)
    tuned_imgs = sample_images(tuned_pipe, caps, seeds, desc=f"{desc}: tuned", **kw)
    specs = cfg.eval_scorers or [cfg.scorer]
    factories = [(spec.partition("=")[0], lambda spec=spec: build_image_scorer(
        spec, tie_margin=cfg.tie_margin, device=cfg.device, dtype=cfg.dtype)) for spec in specs]
    results, per_image = score_comparisons(base_imgs, tuned_imgs, caps, factories, tie_margin=cfg.tie_margin)
    return results, per_image, base_imgs, tuned_imgs, caps


def run_online_t2i(cfg: OnlineT2IConfig) -> dict[str, Any]:
    """Rounds on ``cfg.base``, then tuned vs base on all prompts (and the held-out ones apart); writes
    ``report.json`` and ``grid.png`` under ``cfg.out_dir`` and returns the report."""
    from diffdpo.eval.compare import load_base_pipeline, read_prompts
    from diffdpo.eval.winrate import save_grid

    t0 = time.time()
    prompts = read_prompts(cfg.prompts, cfg.prompt_column, max_prompts=cfg.max_prompts or None)
    train_prompts, heldout = split_prompts(prompts, cfg.heldout_prompts, cfg.seed)
    scorer = build_image_scorer(cfg.scorer, tie_margin=cfg.tie_margin, device=cfg.device, dtype=cfg.dtype)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def load(path: str) -> Any:
        return load_base_pipeline(path, device=cfg.device, dtype=cfg.dtype)

    base_pipe = load(cfg.base)
    sample_kw = dict(steps=cfg.steps, guidance_scale=cfg.guidance_scale, resolution=cfg.resolution or None,
                     batch_size=cfg.batch_size)
    rr = run_rounds(base=cfg.base, base_pipe=base_pipe, load_pipeline=load, scorer=scorer, prompts=train_prompts,
                    out=out, rounds=cfg.rounds, pairs_per_prompt=cfg.pairs_per_prompt,
                    images_per_prompt=cfg.images_per_prompt, sample_kw=sample_kw, train_config=cfg.train_config,
                    train_overrides=cfg.train_overrides, seed=cfg.seed, tie_margin=cfg.tie_margin)
    del scorer

    print("[3/4] evaluating tuned vs base (same prompt and seed for both)")
    tuned_pipe = load_tuned(load, cfg.base, rr.final_dir)
    results, per_image, base_imgs, tuned_imgs, caps = _evaluate(base_pipe, tuned_pipe, prompts, cfg, 2_000_000_000,
                                                                "all prompts")
    held_results = []
    if heldout:
        held_results = _evaluate(base_pipe, tuned_pipe, heldout, cfg, 2_100_000_000, "held-out prompts")[0]

    print("[4/4] writing the report")
    k = min(8, len(caps))
    grid = save_grid(out / "grid.png", [base_imgs[:k], tuned_imgs[:k]], ["base", "tuned"], [c[:24] for c in caps[:k]],
                     scale=max(1, 64 // base_imgs.shape[1]))
    report = {
        "config": asdict(cfg),
        "prompts": {"train": len(train_prompts), "heldout": heldout},
        "pairs": rr.pairs.to_dict(),
        "rounds": rr.rounds,
        "final_dir": str(rr.final_dir),
        "scorers": {r.name: r.to_dict() for r in results},
        "heldout_scorers": {r.name: r.to_dict() for r in held_results},
        "comparisons": [{"prompt": c, **{f"{n}_base": v[0][i] for n, v in per_image.items()},
                         **{f"{n}_tuned": v[1][i] for n, v in per_image.items()}} for i, c in enumerate(caps)],
        "grid": grid.name,
        "seconds_by_phase": {"pairs": round(rr.pairs_seconds, 1), "training": round(rr.train_seconds, 1)},
        "seconds": round(time.time() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_online_summary(report))
    print(f"report: {out / 'report.json'}\ngrid:   {grid}")
    return report


def format_online_summary(report: dict[str, Any]) -> str:
    """The table ``diffdpo online-t2i`` prints: per scorer, the win rate of tuned over base with its 95% CI."""
    p = report["pairs"]
    lines = [f"\n{p['decided']} decided pairs of {p['rows']} ({p['ties']} ties) over {len(report['rounds'])} round(s)",
             f"{'scorer':<12} {'prompts':<9} {'win rate [95% CI]':<22} {'W/T/L':<12} {'change':>9}"]
    for which, key in (("all", "scorers"), ("held-out", "heldout_scorers")):
        for name, r in report[key].items():
            wr = r["win_rate"]
            rate = f"{100 * wr['rate']:.1f}% [{100 * wr['ci_low']:.1f}, {100 * wr['ci_high']:.1f}]"
            wtl = f"{wr['wins']}/{wr['ties']}/{wr['losses']}"
            lines.append(f"{name:<12} {which:<9} {rate:<22} {wtl:<12} {r['mean_change']:>+9.4f}")
    return "\n".join(lines)

"""`diffdpo demo`: Diffusion-DPO end to end on the shapes world, on a CPU, with no downloads.

1. load the shipped base text-to-image model (``data/toy_t2i``, a diffusers pipeline folder);
2. sample k images per prompt (best and worst form the pair), label them with the programmatic judge (AI feedback), write the
   pairs in the exact Pick-a-Pic v2 schema; some captions are held out of the pairs entirely;
3. Diffusion-DPO with LoRA through the one training loop (:mod:`diffdpo.train`), reading the pairs
   with the same Pick-a-Pic reader as real data; with ``rounds > 1`` (online AI feedback) the tuned
   model samples the next round's pairs and a fresh adapter trains on all pairs so far;
4. evaluate tuned vs base on held-out seeds (same prompt and seed for both): win rate with a 95%
   Wilson interval and the tie rate, per-attribute accuracies before/after, and the win rate on the
   captions never seen in pairs; write a JSON report, an image grid and training curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffdpo.config import help_meta
from diffdpo.toy.pairs import PairSummary

REPO_ROOT = Path(__file__).resolve().parents[2]



@dataclass
class DemoConfig:
    base: str = field(default=str(REPO_ROOT / "data" / "toy_t2i"), metadata=help_meta("base pipeline folder"))
    train_config: str = field(
        default=str(REPO_ROOT / "configs" / "demo_toy_dpo.yaml"), metadata=help_meta("training config (TrainConfig YAML)")
    )
    train_overrides: list[str] = field(default_factory=list, metadata=help_meta("key=value overrides of the training config"))
    out_dir: str = field(default="outputs/demo", metadata=help_meta("where pairs, weights, report and plots go"))
    seed: int = field(default=0, metadata=help_meta("seed of the caption split and of every sample"))
    heldout_captions: int = field(default=12, metadata=help_meta("captions (of 60) never used in pairs"))
    pairs: str = field(default="", metadata=help_meta(
        "reuse this pairs parquet (same seed and heldout_captions) instead of sampling round 1's pairs"))
    pairs_per_caption: int = field(default=16, metadata=help_meta("pairs sampled per training caption (per round)"))
    rounds: int = field(default=2, metadata=help_meta(
        "rounds of online AI feedback: round r > 1 samples pairs from round r-1's model, trains on all pairs"))
    images_per_prompt: int = field(default=6, metadata=help_meta(
        "images judged per pair; the best and the worst form the pair (2 = Pick-a-Pic's two images)"))
    eval_comparisons: int = field(default=200, metadata=help_meta("same-seed comparisons over all captions"))
    eval_heldout_comparisons: int = field(default=96, metadata=help_meta("same-seed comparisons on held-out captions"))
    sample_steps: int = field(default=15, metadata=help_meta("DDIM steps per evaluation sample"))
    pair_steps: int = field(default=15, metadata=help_meta("DDIM steps per pair sample (most of the demo's time)"))
    guidance_scale: float = field(default=3.0, metadata=help_meta("classifier-free guidance scale"))
    tie_margin: float = field(default=0.1, metadata=help_meta("judge score difference at or below which a pair is a tie"))
    threads: int = field(default=2, metadata=help_meta("torch CPU threads"))

    def __post_init__(self) -> None:
        if self.images_per_prompt < 2:
            raise ValueError(f"images_per_prompt must be >= 2, got {self.images_per_prompt}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.sample_steps < 1 or self.pair_steps < 1:
            raise ValueError(f"sample_steps and pair_steps must be >= 1, got {self.sample_steps}, {self.pair_steps}")
        if self.pairs_per_caption < 1 or self.eval_comparisons < 1 or self.eval_heldout_comparisons < 0:
            raise ValueError("pairs_per_caption and eval_comparisons must be >= 1, eval_heldout_comparisons >= 0")


@dataclass
class DemoResult:
    report: dict[str, Any]
    report_path: Path
    grid_path: Path
    curves_path: Path


def _eval_set(captions: list[str], n: int, seed_base: int) -> tuple[list[str], list[int]]:
    caps = [captions[i % len(captions)] for i in range(n)]
    return caps, [seed_base + i for i in range(n)]


def _evaluate(base_pipe: Any, tuned_pipe: Any, judge: Any, caps: list[str], seeds: list[int], cfg: DemoConfig, desc: str):
    """Same-seed samples of both models judged through :func:`diffdpo.eval.compare.score_comparisons` (what
    ``diffdpo eval`` runs), plus the shapes world's per-attribute accuracies."""
    from diffdpo.eval.compare import score_comparisons
    from diffdpo.toy.shapes_judge import attribute_accuracy
    from diffdpo.toy.t2i import sample_images

    kw = dict(steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, progress=True)
    base_imgs = sample_images(base_pipe, caps, seeds, desc=f"{desc}: base", **kw)
    tuned_imgs = sample_images(tuned_pipe, caps, seeds, desc=f"{desc}: tuned", **kw)
    [result], _ = score_comparisons(base_imgs, tuned_imgs, caps, [("judge", lambda: judge)], tie_margin=cfg.tie_margin)
    acc_base, acc_tuned = attribute_accuracy(judge.judge(base_imgs, caps)), attribute_accuracy(judge.judge(tuned_imgs, caps))
    return result.win_rate, acc_base, acc_tuned, base_imgs, tuned_imgs


def reuse_pairs(path: str, train_caps: list[str], heldout_caps: list[str]) -> PairSummary:
    """Summary of an existing pairs parquet; refuses one that contains a held-out caption."""
    import pandas as pd

    if not Path(path).is_file():
        raise FileNotFoundError(f"pairs={path!r}: no such file (run the demo once without pairs= to write one)")
    df = pd.read_parquet(path, columns=["caption", "label_0"])
    leaked = sorted(set(df["caption"]) & set(heldout_caps))
    if leaked:
        raise ValueError(f"pairs={path!r} contains held-out captions {leaked}: it was written with another seed or "
                         "heldout_captions; use the same ones or sample new pairs")
    ties = int((df["label_0"] == 0.5).sum())
    used = set(df["caption"])
    return PairSummary(len(df), ties, len(df) - ties, str(path), [c for c in train_caps if c in used], [])


def tuned_pipeline(base: str, lora_dir: str | Path) -> Any:
    """The base pipeline with the LoRA weights in ``lora_dir`` fused into the UNet: the same images as
    the unfused adapter (to rounding: 1e-5 of the pixels differ by one level) without its extra matmuls."""
    from diffdpo.recipes.online_t2i import load_tuned
    from diffdpo.toy.t2i import load_pipeline

    return load_tuned(load_pipeline, base, lora_dir)  # the adapter fused in, as `diffdpo eval --lora`


def run_demo(cfg: DemoConfig) -> DemoResult:
    import torch

    from diffdpo.eval.winrate import read_metrics_jsonl, save_grid, save_training_curves
    from diffdpo.recipes.online_t2i import run_rounds
    from diffdpo.toy.pairs import split_captions
    from diffdpo.toy.shapes_judge import ShapesJudge
    from diffdpo.toy.t2i import RESOLUTION, load_pipeline

    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge = ShapesJudge(tie_margin=cfg.tie_margin)
    base_pipe = load_pipeline(cfg.base)

    train_caps, heldout_caps = split_captions(cfg.heldout_captions, cfg.seed)
    print(f"      {len(heldout_caps)} of {len(train_caps) + len(heldout_caps)} captions held out of the pairs")
    rr = run_rounds(
        base=cfg.base, base_pipe=base_pipe, load_pipeline=load_pipeline, scorer=judge, prompts=train_caps, out=out,
        rounds=cfg.rounds, pairs_per_prompt=cfg.pairs_per_caption, images_per_prompt=cfg.images_per_prompt,
        sample_kw=dict(steps=cfg.pair_steps, guidance_scale=cfg.guidance_scale, resolution=RESOLUTION, batch_size=128),
        train_config=cfg.train_config, train_overrides=cfg.train_overrides, seed=cfg.seed, tie_margin=cfg.tie_margin,
        first_round_pairs=reuse_pairs(cfg.pairs, train_caps, heldout_caps) if cfg.pairs else None,
    )
    pairs, result_dir = rr.pairs, rr.final_dir

    print("[3/4] evaluating tuned vs base on held-out seeds (same prompt and seed for both)")
    t_eval = time.time()
    tuned_pipe = tuned_pipeline(cfg.base, result_dir)
    caps, seeds = _eval_set(train_caps + heldout_caps, cfg.eval_comparisons, 2_000_000_000)
    wr, acc_base, acc_tuned, base_imgs, tuned_imgs = _evaluate(base_pipe, tuned_pipe, judge, caps, seeds, cfg, "all captions")
    wr_held = None
    if cfg.eval_heldout_comparisons and heldout_caps:
        hcaps, hseeds = _eval_set(heldout_caps, cfg.eval_heldout_comparisons, 2_100_000_000)
        wr_held, hacc_base, hacc_tuned, _, _ = _evaluate(base_pipe, tuned_pipe, judge, hcaps, hseeds, cfg, "held-out captions")

    eval_s = time.time() - t_eval
    print("[4/4] writing the report and plots")
    grid = save_grid(out / "grid.png", [base_imgs[:12], tuned_imgs[:12]], ["base", "tuned"], caps[:12])
    rows = read_metrics_jsonl(Path(rr.train_output_dir) / "metrics.jsonl")
    curves = save_training_curves(out / "training_curves.png", rows, ["loss", "rewards/accuracies", "rewards/margins"])
    report = {
        "pairs": pairs.to_dict() | {"heldout_captions": heldout_caps},
        "train": {"steps": rr.rounds[-1]["steps"], "seconds": round(rr.train_seconds, 1), "final_dir": str(result_dir),
                  "nonfinite_steps": sum(r["nonfinite_steps"] for r in rr.rounds), "config": rr.train_output_dir},
        "rounds": rr.rounds,
        "win_rate": wr.to_dict(),
        "accuracy_base": acc_base,
        "accuracy_tuned": acc_tuned,
        "heldout_win_rate": wr_held.to_dict() if wr_held else None,
        "heldout_accuracy_base": hacc_base if wr_held else None,
        "heldout_accuracy_tuned": hacc_tuned if wr_held else None,
        "demo_config": asdict(cfg),
        "seconds": round(time.time() - t0, 1),
        "seconds_by_phase": {"sampling_and_judging_pairs": round(rr.pairs_seconds, 1), "training": round(rr.train_seconds, 1),
                             "evaluation": round(eval_s, 1)},
    }
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    print(format_summary(report))
    print(f"report: {report_path}\ngrid:   {grid}\ncurves: {curves}")
    return DemoResult(report, report_path, grid, curves)


def format_summary(report: dict[str, Any]) -> str:
    """The short table `diffdpo demo` prints."""
    p, t, wr = report["pairs"], report["train"], report["win_rate"]
    a0, a1 = report["accuracy_base"], report["accuracy_tuned"]

    def pct(x: float) -> str:
        return f"{100 * x:5.1f}%"

    n_rounds = len(report.get("rounds", []))
    lines = [
        "",
        f"pairs used {p['decided']} (of {p['rows']} prompts, best and worst of "
        f"{report['demo_config'].get('images_per_prompt', 2)} samples each; {p['ties']} ties dropped"
        f"{f', over {n_rounds} rounds' if n_rounds > 1 else ''}), "
        f"steps {t['steps']}{' per round' if n_rounds > 1 else ''} ({t['seconds']:.0f}s in all)",
        f"win rate tuned vs base  {pct(wr['rate'])}  95% CI [{pct(wr['ci_low'])}, {pct(wr['ci_high'])}]  "
        f"ties {pct(wr['tie_rate'])}  (W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}, n={wr['n']})",
    ]
    if report.get("heldout_win_rate"):
        h = report["heldout_win_rate"]
        lines.append(
            f"held-out captions       {pct(h['rate'])}  95% CI [{pct(h['ci_low'])}, {pct(h['ci_high'])}]  "
            f"ties {pct(h['tie_rate'])}  (n={h['n']})"
        )
    lines.append(f"{'accuracy':<12}{'base':>8}{'tuned':>8}{'change':>9}")
    for key in ("colour", "shape", "position", "all", "aesthetic"):
        lines.append(f"{key:<12}{pct(a0[key]):>8}{pct(a1[key]):>8}{100 * (a1[key] - a0[key]):+8.1f}")
    phases = report.get("seconds_by_phase")
    lines.append(f"total time {report['seconds']:.0f}s" + (
        f" (pairs {phases['sampling_and_judging_pairs']:.0f}s, training {phases['training']:.0f}s, "
        f"evaluation {phases['evaluation']:.0f}s)" if phases else ""))
    return "\n".join(lines)


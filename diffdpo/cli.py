"""The ``diffdpo`` command.

Every subcommand that runs an experiment takes ``--config PATH.yaml`` plus ``key=value``
overrides (dotted keys for nested fields, e.g. ``optim.lr=1e-4``). Heavy imports happen inside the
handlers so ``diffdpo --help`` stays fast.

Each subcommand is registered by one ``_register_*`` function below; add a command together with
the code that implements it (no stubs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", default=None, help="YAML config file (fields of the command's config)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. beta=5000 optim.lr=1e-5"
    )


def _config_command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
                    help: str, description: str) -> None:
    """Register a subcommand that takes ``--config`` plus ``key=value`` overrides and runs ``func``."""
    p = sub.add_parser(name, help=help, description=description)
    _add_config_args(p)
    p.set_defaults(func=func)


# ------------------------------------------------------------------------------------------------
# losses / demo


def _run_losses(args: argparse.Namespace) -> int:
    from diffdpo.config import load_config
    from diffdpo.loss_table import LossTableConfig, format_table, loss_table

    cfg = load_config(LossTableConfig, args.config, args.overrides)
    rows = loss_table(cfg)
    print(format_table(rows, cfg))
    unstable = [r.name for r in rows if not (r.finite_fp32 and r.finite_bf16)]
    if unstable:
        print(f"non-finite loss or gradient at the extreme inputs: {', '.join(unstable)}", file=sys.stderr)
        return 1
    return 0


def _register_losses(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "losses", _run_losses,
        help="evaluate every loss of the DAA library on a seeded batch (value, gradient norm, stability)",
        description="Print a table of every loss type (and f-divergence variant) evaluated on one seeded batch.",
    )


def _run_recipe(module: str, config_class: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A handler that loads ``module.config_class`` from ``--config`` + overrides and calls ``module.function``."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        from diffdpo.config import load_config

        mod = importlib.import_module(module)
        getattr(mod, function)(load_config(getattr(mod, config_class), args.config, args.overrides))
        return 0

    return run


def _register_demo(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "demo", _run_recipe("diffdpo.recipes.demo", "DemoConfig", "run_demo"),
        help="Diffusion-DPO end to end on the embedded shapes world (CPU, no downloads)",
        description="Load the shipped tiny text-to-image base, sample and judge preference pairs (Pick-a-Pic "
        "schema), train Diffusion-DPO with LoRA, and report the win rate against the base with a 95% CI.",
    )


def _register_mpo(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "mpo", _run_recipe("diffdpo.recipes.mpo", "MPOConfig", "run_mpo"),
        help="MPO on the tiny LM world: split pairs by reward gap, DPO on easy, online IPO on hard from the DPO model",
        description="Score preference pairs with a reward model, split them at a quantile of the reward gap, train "
        "offline DPO on the easy pairs, then online IPO on the hard pairs' prompts with the stage-1 model as initial "
        "policy and reference (Gou and Nguyen 2024; PPO replaced by online IPO); writes report.json.",
    )


def _register_aligndistil(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "aligndistil", _run_recipe("diffdpo.recipes.aligndistil", "AlignDistilConfig", "run_aligndistil"),
        help="AlignDistil: train (or load) DPO and reverse DPO models, distil their token-level teacher into the policy",
        description="Stage A trains a DPO model and a reverse DPO model (pairs swapped) or loads them; stage B distils "
        "the token-adaptive contrastive teacher into the base model, off-policy (chosen responses) or on-policy (one "
        "sample per prompt) (Zhang et al. 2025, arXiv 2503.02832); the policy is saved with save_pretrained.",
    )
    _config_command(
        sub, "study-aligndistil",
        _run_recipe("diffdpo.recipes.aligndistil", "AlignDistilStudyConfig", "run_aligndistil_study"),
        help="AlignDistil (off/on-policy) vs DPO on the tiny LM world: gold win rate per step, same pairs, 3 seeds",
        description="Train DPO (evaluated every few steps; also the teacher), a reverse DPO model and AlignDistil off- "
        "and on-policy per seed, and write results.csv, summary.csv (95% t-intervals per step), study.png, summary.md.",
    )


def _register_modpo_front(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "modpo-front", _run_recipe("diffdpo.recipes.modpo", "ModpoFrontConfig", "run_modpo_front"),
        help="MODPO's Pareto front on the tiny two-objective LM world vs mixed-data DPO and DPO soups, several seeds",
        description="Train a DPO model per objective, then MODPO (the other objective's implicit reward as margin), "
        "mixed-data DPO and weight soups at every weight w; evaluate both gold judges and write results.csv, "
        "summary.csv (95% intervals), front.png and summary.md with the goal check (Zhou et al. 2023).",
    )


def _register_online_t2i(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "online-t2i", _run_recipe("diffdpo.recipes.online_t2i", "OnlineT2IConfig", "run_online_t2i"),
        help="online Diffusion-DPO rounds on any diffusers pipeline: sample, score, best/worst pairs, train, repeat",
        description="Each round samples images per prompt from the current model, scores them with a reward model "
        "(PickScore, HPSv2, CLIP, aesthetic, or the toy shapes judge), keeps the best and the worst as a Pick-a-Pic "
        "pair, and trains a fresh adapter on all pairs so far; then evaluates tuned vs base (docs/online_t2i.md).",
    )


def _register_study_online(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "study-online",
        _run_recipe("diffdpo.recipes.studies.online", "OnlineStudyConfig", "run_online_study"),
        help="offline DPO vs online DPO/IPO/IPO-MD/GRAO/MPO on the tiny LM world, same prompt budget, several seeds",
        description="Train every method for every seed through the shipped tiny-world configs with the same number "
        "of annotated prompts, evaluate each policy against the base (gold win rate, KL), and write results.csv, "
        "summary.csv (95% intervals), study.png and summary.md with the goal check of issue 15.",
    )


def _register_study_kl_budget(sub: argparse._SubParsersAction) -> None:
    def run(args: argparse.Namespace) -> int:
        from diffdpo.config import load_config
        from diffdpo.recipes.studies.kl_budget import KLBudgetStudyConfig, run_kl_budget_study

        command = " ".join(["diffdpo study-kl-budget", *(["--config", str(args.config)] if args.config else []),
                            *args.overrides])  # written into summary.md beside the numbers
        run_kl_budget_study(load_config(KLBudgetStudyConfig, args.config, args.overrides), command=command)
        return 0

    _config_command(
        sub, "study-kl-budget", run,
        help="over-optimisation: gold win rate vs KL for DPO/IPO/SLiC at several betas, likelihood indicators, early stop",
        description="Label pairs sampled from the base by a noisy, length-biased proxy judge, train DPO, IPO and SLiC "
        "at several betas and seeds past one epoch, evaluate every few steps (gold win rate and KL against the base, "
        "top-10 entropy and mass, chosen log-likelihood and margin), fit the scaling laws and write results.csv, "
        "fits.csv, leads.csv, early_stop.csv, two figures and summary.md.",
    )


def _register_meet(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "meet", _run_recipe("diffdpo.recipes.meet", "MEETConfig", "run_meet"),
        help="MEET on the tiny LM world: control tokens tuned alone, then the model, vs joint training and text controls",
        description="For every seed, train MEET (stage 1: only the control tokens, model frozen; stage 2: the model), "
        "the joint-training baseline and hand-written text controls with the same steps; measure each control's "
        "controllability and gold score on held-out prompts; write results.csv, summary.csv (95% intervals), meet.png "
        "and summary.md with the goal check (Xue et al. 2023, docs/meet.md).",
    )


def _run_generate(args: argparse.Namespace) -> int:
    from diffdpo.lm.control import generate_main

    return generate_main(args.model, args.prompts, args.control, n=args.n, max_new_tokens=args.max_new_tokens,
                         seed=args.seed, temperature=args.temperature, base=args.base)


def _register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="sample completions from a control-trained LM (lm_control / MEET) under a chosen control",
        description="Load a trained final/ folder (save_pretrained model or peft adapter, with controls.json), write "
        "the chosen control before each prompt and print one JSON line per sample: prompt, control, completion.",
    )
    p.add_argument("--model", required=True, help="final/ folder of an lm_control or tiny_lm_control run")
    p.add_argument("--prompts", required=True, help="a prompt, or a .txt (one per line) / .jsonl (prompt column) file")
    p.add_argument("--control", required=True, help="the control name (one of the trained controls)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens per completion")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--base", default=None, help="base model of a peft adapter folder (default: its adapter config's)")
    p.set_defaults(func=_run_generate)

def _register_study_dense(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "study-dense",
        _run_recipe("diffdpo.recipes.studies.dense", "DenseStudyConfig", "run_dense_study"),
        help="plain DPO vs RLHF-V dense DPO (annotated spans / token diff) on the tiny hallucination world, 3 seeds",
        description="Train plain DPO and dense DPO variants for every seed through configs/dense_dpo_tiny.yaml at "
        "equal steps, sample held-out reviews, and write the wrong-word error rates (results.csv, summary.csv with "
        "95% intervals, study.png, summary.md).",
    )


def _register_study_length(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "study-length",
        _run_recipe("diffdpo.recipes.studies.length", "LengthStudyConfig", "run_length_study"),
        help="length exploitation under a length-biased judge: DPO, IPO, KTO, ORPO, length-regularised DPO, 3 seeds",
        description="Build best-vs-worst pairs of base samples by a length-biased proxy judge, train each method with "
        "evaluations every few steps, and write the length ratio to the base, gold and length-controlled gold "
        "(results.csv, pairs.csv, summary.csv with 95% intervals, length.png, summary.md).",
    )


def _register_study_separability(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "study-separability",
        _run_recipe("diffdpo.recipes.studies.separability", "SeparabilityStudyConfig", "run_separability_study"),
        help="single-model vs multi-model preference sets: linear separability probes, DPO win rate and robustness",
        description="Build a single-model set (best vs worst policy samples) and a multi-model set (chosen from a "
        "stronger generator), probe their separability (hidden states, length, bag of words), train DPO on each and "
        "measure the gold win rate and robustness on adversarial pairs (results.csv, summary.csv, separability.png, "
        "summary.md).",
    )


# ------------------------------------------------------------------------------------------------
# train


def _run_train(args: argparse.Namespace) -> int:
    from diffdpo.train import main as train_main

    return train_main(args.config, args.overrides)


def _register_train(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "train", _run_train,
        help="preference-train a model (Diffusion-DPO on SD1.5/SDXL, ...) from a YAML config",
        description="Run the shared training loop (diffdpo.train) with the config's task and loss; "
        "multi-GPU: accelerate launch -m diffdpo.cli train --config ...",
    )


# ------------------------------------------------------------------------------------------------
# dso


def _run_dso(args: argparse.Namespace) -> int:
    from diffdpo.recipes.dso.loop import main as dso_main

    return dso_main(args.config, args.overrides)


def _register_dso(sub: argparse._SubParsersAction) -> None:
    _config_command(
        sub, "dso", _run_dso,
        help="DSO: rounds of sample -> simulate -> DPO/DRO/KTO fine-tune of a 3D generator (toy voxels on CPU)",
        description="Self-improvement loop with simulation feedback (Li et al. 2025): each round samples "
        "objects, scores their stability in pybullet, builds pairs or labels and fine-tunes a LoRA adapter "
        "with the shared training loop; writes scores, reports, plots and renders per round.",
    )


# ------------------------------------------------------------------------------------------------
# eval and relabel (reward models)


def _add_scoring_args(p: argparse.ArgumentParser, what: str) -> None:
    """The options every reward-model command shares: tie margin, device and dtype."""
    p.add_argument("--tie-margin", type=float, default=0.0, help="score difference at or below which a pair is a tie")
    p.add_argument("--device", default="cpu", help=f"torch device of {what}")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def _run_eval(args: argparse.Namespace) -> int:
    from diffdpo.eval.compare import compare

    result = compare(
        args.base, args.prompts, args.scorer, args.out, lora=args.lora, unet=args.unet,
        prompt_column=args.prompt_column, max_prompts=args.max_prompts, seeds=args.seeds, seed=args.seed,
        steps=args.steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
        batch_size=args.batch_size, tie_margin=args.tie_margin, grid=args.grid, device=args.device, dtype=args.dtype,
    )
    print(result.summary())
    print(f"wrote {result.report_path}, {result.grid_path}")
    return 0


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="win rate of a tuned text-to-image model (LoRA or UNet) over its base, judged by reward models",
        description="Sample base and tuned images from the same prompts and seeds, score both with every --scorer, "
        "and report each scorer's win rate (95%% CI, ties), mean score change, a JSON report and an image grid.",
    )
    p.add_argument("base", help="base pipeline: a diffusers folder (SD1.5, SDXL, data/toy_t2i) or a hub id")
    tuned = p.add_mutually_exclusive_group(required=True)
    tuned.add_argument("--lora", default=None, help="tuned = base + these LoRA weights (fused; file or folder)")
    tuned.add_argument("--unet", default=None, help="tuned = base with this UNet (UNet folder or pipeline folder)")
    p.add_argument("--prompts", required=True, help="text file (one prompt per line), or a .parquet / .csv file")
    p.add_argument("--prompt-column", default=None, help="parquet/CSV column of the prompts (default: prompt or caption)")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N unique prompts")
    p.add_argument("--scorer", action="append", required=True, metavar="NAME=PATH[,KEY=VALUE...]",
                   help="a reward model (clip, pickscore, hpsv2, aesthetic) and its weights; repeatable")
    p.add_argument("--out", required=True, help="output folder for report.json and grid.png")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds SEED, SEED+1, ...)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--grid", type=int, default=8, help="comparisons shown in grid.png")
    _add_scoring_args(p, "the pipeline and scorers")
    p.set_defaults(func=_run_eval)


def _run_relabel(args: argparse.Namespace) -> int:
    from diffdpo.data import relabel_pairs
    from diffdpo.rewards import build_scorer

    kw = {k: v for k, v in (("arch", args.arch), ("processor_path", args.processor_path),
                            ("clip_path", args.clip_path)) if v is not None}
    scorer = build_scorer(args.scorer, args.scorer_path, device=args.device, dtype=args.dtype, **kw)
    result = relabel_pairs(args.source, scorer, batch_size=args.batch_size, tie_margin=args.tie_margin,
                           out_path=args.out)
    print(result.summary())
    print("wrote " + ", ".join(str(p) for p in result.out_paths))
    return 0


def _register_relabel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "relabel", help="AI-feedback relabelling of Pick-a-Pic pairs with a scorer (PickScore, HPSv2, CLIP, aesthetic)",
        description="Score both images of every pair and relabel it (the AI-feedback variant of Diffusion-DPO, "
        "Wallace et al. 2023); prints the five counts and the agreement with the earlier labels.",
    )
    p.add_argument("source", help="Pick-a-Pic v2 parquet file or folder of shards")
    p.add_argument("out", nargs="?", default=None,
                   help="output parquet (one source file) or folder (shards); default beside the source")
    p.add_argument("--scorer", required=True, choices=["pickscore", "hpsv2", "clip", "aesthetic"], help="the scorer")
    p.add_argument("--scorer-path", required=True, help="its weights: a local path, or a hub id")
    p.add_argument("--arch", default=None, help="open_clip architecture (clip, hpsv2, aesthetic)")
    p.add_argument("--processor-path", default=None, help="pickscore: processor folder (default: the model's)")
    p.add_argument("--clip-path", default=None, help="aesthetic: the CLIP ViT-L/14 weights the head reads")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per scorer call")
    _add_scoring_args(p, "the scorer")
    p.set_defaults(func=_run_relabel)


def _run_reward_model(args: argparse.Namespace) -> int:
    from diffdpo.rewards.reward_model import main as reward_model_main

    return reward_model_main(args.config, args.overrides)


def _register_reward_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reward-model", help="train an LM reward model (Bradley-Terry) or pairwise preference model on preference pairs",
        description="diffdpo reward-model train --config FILE [key=value ...]: a sequence-classification model (or a "
        "value head on a causal LM) trained on prompt/chosen/rejected pairs; prints held-out pair accuracy before "
        "and after, saves with save_pretrained (docs/lm.md).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    train = actions.add_parser("train", help="train from a YAML config (configs/reward_model_tiny.yaml) + key=value")
    _add_config_args(train)
    train.set_defaults(func=_run_reward_model)


# ------------------------------------------------------------------------------------------------
# sim


def _run_sim(args: argparse.Namespace) -> int:
    from sim.cli import main as sim_main

    return sim_main(args.sim_args)


def _register_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="physical-stability scores of meshes (DSO protocol): sim score PATH... --out scores.parquet",
        description="Forwarded to `python -m sim`; see `diffdpo sim score --help`.",
        add_help=False,
    )
    p.add_argument("sim_args", nargs=argparse.REMAINDER, help="arguments of `python -m sim`")
    p.set_defaults(func=_run_sim)


_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_aligndistil,
    _register_demo,
    _register_dso,
    _register_eval,
    _register_generate,
    _register_losses,
    _register_meet,
    _register_modpo_front,
    _register_mpo,
    _register_online_t2i,
    _register_relabel,
    _register_reward_model,
    _register_sim,
    _register_study_dense,
    _register_study_online,
    _register_study_length,
    _register_study_separability,
    _register_study_kl_budget,
    _register_train,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffdpo",
        description="Align generative models with preference and simulation feedback "
        "(Diffusion-DPO, DSO, direct alignment losses).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: DIFFDPO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _REGISTRARS:
        register(sub)
    return parser


#: Errors a user can fix: one line and exit status 2 instead of a traceback. Bugs (TypeError,
#: AttributeError, RuntimeError, ...) keep their traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DIFFDPO_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        parser.exit(2, f"diffdpo {args.command}: error: {message}\n(diffdpo --debug {args.command} ... shows the traceback)\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

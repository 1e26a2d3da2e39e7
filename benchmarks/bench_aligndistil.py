"""What AlignDistil's token-level teacher costs: one AlignDistil step vs one DPO step, same model and pairs.

Both sides train the same causal LM (full fine-tune, AdamW, clipping at 1.0) on batches of ``--batch`` pairs of
the tiny world (:func:`diffdpo.toy.tiny_lm.build_world`):

(a) DPO: :func:`diffdpo.train.train_step` on the ``tiny_lm`` task (``configs/lm_dpo_tiny.yaml``, padded layout,
    the reference a frozen copy): one policy forward over chosen + rejected (2B sequences) with the chunked LM
    head (per-token log-probs only), one reference forward, the sigmoid loss, backward.
(b) AlignDistil (off-policy, :class:`diffdpo.recipes.aligndistil.Distiller`): one forward of each teacher (DPO
    and reverse DPO models, full copies) and of the policy over the B chosen responses, full-vocabulary logits
    of all four (teachers' chunked over ``--chunk`` tokens), the token-adaptive teacher, the reverse-KL loss,
    backward. The teachers are copies of the base here: their weights do not change the cost.

``--model tiny`` is the world's model (hidden 64, 2 layers, vocabulary 54); ``--model synthetic`` a seeded
Llama-style model with ``--vocab`` / ``--hidden`` / ``--layers`` (the same tokens: ids above the tokenizer's are
never seen, but every logit row has ``--vocab`` entries), where the full-vocabulary cost shows.

Reported per side: **response tokens per second** (the completion tokens the step trains on: chosen and
rejected for DPO, chosen only for AlignDistil) and **pairs per second**, over ``--steps`` timed steps after
``--warmup`` (wall clock; CUDA synchronised). **Peak memory**: on GPU the peak of
``torch.cuda.max_memory_allocated`` during the timed steps, minus the memory allocated before them (tensor
memory only, no allocator cache); on CPU the process's peak resident set size (``ru_maxrss``) minus its resident
set size after setup (a lower bound: allocator reuse hides part of it), plus the absolute peak. Each side runs
in its own process, so neither inherits the other's peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_dpo_tiny.yaml"


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def prepare_model(args: argparse.Namespace, world: Any, out: Path) -> Path:
    """The model folder both sides train: the world's, or a synthetic one saved with the world's tokenizer."""
    if args.model == "tiny":
        return world.model_dir
    from transformers import AutoTokenizer

    from diffdpo.toy.tiny_lm import build_model

    folder = out / "synthetic"
    if not (folder / "config.json").is_file():
        model = build_model(args.vocab, hidden_size=args.hidden, layers=args.layers, seed=0,
                            num_attention_heads=max(4, args.hidden // 64), num_key_value_heads=2)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(world.model_dir).save_pretrained(folder)
    return folder


def build_side(side: str, args: argparse.Namespace, world: Any, model_dir: Path, out: Path) -> tuple[Any, Any]:
    """(step() -> response tokens of the step, the trained model)."""
    import torch

    if side == "dpo":
        from diffdpo.train import load_train_config, micro_batches, setup, train_step

        cfg = load_train_config(CONFIG, [
            f"output_dir={out / 'dpo'}", "overwrite=true", "progress_bar=false", "tensorboard=false",
            "checkpoint_every=0", f"per_device_batch_size={args.batch}", f"max_steps={args.steps + args.warmup}",
            f"tiny_lm.world={world.root}", f"tiny_lm.model.pretrained={model_dir}", f"tiny_lm.data.source={world.pairs}",
            "tiny_lm.layout=padded", "tiny_lm.eval_samples_per_prompt=1", f"tiny_lm.logits_chunk_size={args.chunk}"])
        tr = setup(cfg)
        batches = micro_batches(tr.task, cfg, tr.accelerator, tr.state)

        def step() -> int:
            logs = train_step(tr, batches)
            return int(round(logs["length/chosen"] * args.batch + logs["length/rejected"] * args.batch))

        return step, tr.task.policy.model
    from diffdpo.recipes.aligndistil import AlignDistilConfig, Distiller

    cfg = AlignDistilConfig(output_dir=str(out / "aligndistil"), batch_size=args.batch, steps=args.steps + args.warmup,
                            logits_chunk_size=args.chunk)
    distiller = Distiller(cfg, world.pairs, model_dir, model_dir, model_dir)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return (lambda: distiller.step()["tokens"]), distiller.model


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from diffdpo.toy.tiny_lm import build_world

    torch.set_num_threads(args.threads)
    out = Path(args.work)
    world = build_world(out / "world", n_pairs=max(32, 4 * args.batch), sft_steps=5)  # cost only, not quality
    model_dir = prepare_model(args, world, out)
    step, model = build_side(side, args, world, model_dir, out)
    cuda = torch.cuda.is_available()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_after_setup = _rss_mib()
    tokens = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens += step()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    res = {"side": side, "device": "cuda" if cuda else "cpu", "steps": args.steps, "pairs": args.steps * args.batch,
           "response_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "pairs_per_s": args.steps * args.batch / wall, "vocab": int(model.config.vocab_size),
           "parameters": sum(p.numel() for p in model.parameters())}
    if cuda:
        res.update(memory="cuda max_memory_allocated during the timed steps minus allocated before (MiB)",
                   peak_mem_mib=(torch.cuda.max_memory_allocated() - base_alloc) / 2**20,
                   peak_abs_mib=torch.cuda.max_memory_allocated() / 2**20)
    else:
        peak = _peak_rss_mib()
        res.update(memory="peak RSS minus RSS after setup (MiB; a lower bound)",
                   peak_mem_mib=max(peak - rss_after_setup, 0.0), peak_abs_mib=peak)
    return res


def spawn_side(side: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"{side}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_aligndistil", "--side", side, "--side-out", str(out),
           "--work", str(work), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--threads", str(args.threads), "--model", args.model, "--vocab", str(args.vocab), "--hidden",
           str(args.hidden), "--layers", str(args.layers), "--chunk", str(args.chunk)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.read_text())


def report(res: dict[str, Any]) -> None:
    d, a = res["dpo"], res["aligndistil"]
    print(f"device {d['device']}, vocabulary {d['vocab']}, {d['parameters'] / 1e6:.2f} M parameters, "
          f"{d['steps']} timed steps of {d['pairs'] // d['steps']} pairs; memory: {d['memory']}")
    print(f"{'':14}{'tokens/s':>12}{'pairs/s':>10}{'peak mem MiB':>14}{'abs peak MiB':>14}")
    for name, r in (("DPO", d), ("AlignDistil", a)):
        print(f"{name:14}{r['tokens_per_s']:>12.1f}{r['pairs_per_s']:>10.2f}{r['peak_mem_mib']:>14.1f}"
              f"{r['peak_abs_mib']:>14.1f}")
    print(f"{'ratio AD/DPO':14}{res['ratio_tokens_per_s']:>12.2f}{res['ratio_pairs_per_s']:>10.2f}"
          f"{res['ratio_peak_mem']:>14.2f}")
    print("tokens = response tokens trained on per step (DPO: chosen + rejected; AlignDistil: chosen only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing starts")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (CPU)")
    parser.add_argument("--model", choices=["tiny", "synthetic"], default="synthetic")
    parser.add_argument("--vocab", type=int, default=32000, help="synthetic: vocabulary size")
    parser.add_argument("--hidden", type=int, default=256, help="synthetic: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="synthetic: layers")
    parser.add_argument("--chunk", type=int, default=1024, help="response tokens per logits chunk (both sides)")
    parser.add_argument("--tiny", action="store_true", help="tests: the tiny model, 2 steps of 4 pairs, 1 warmup")
    parser.add_argument("--work", default="", help="folder for the world and models; empty = a temp folder")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--side", choices=["dpo", "aligndistil"], help=argparse.SUPPRESS)
    parser.add_argument("--side-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.steps, args.batch, args.warmup = "tiny", 2, 4, 1
    if args.side:
        Path(args.side_out).write_text(json.dumps(run_side(args.side, args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        res: dict[str, Any] = {s: spawn_side(s, args, work) for s in ("dpo", "aligndistil")}
    d, a = res["dpo"], res["aligndistil"]
    res.update(ratio_tokens_per_s=a["tokens_per_s"] / d["tokens_per_s"], ratio_pairs_per_s=a["pairs_per_s"] / d["pairs_per_s"],
               ratio_peak_mem=a["peak_mem_mib"] / d["peak_mem_mib"] if d["peak_mem_mib"] > 0 else float("nan"),
               args={k: v for k, v in vars(args).items() if k not in ("side", "side_out", "json", "work")})
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

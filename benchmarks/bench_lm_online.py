"""Online DPO training step: TRL's OnlineDPOTrainer vs ours (diffdpo.train + tiny_lm_online), side by side.

Both sides train the tiny world's SFT model (:func:`diffdpo.toy.tiny_lm.build_world`: Llama-style, hidden 64,
2 layers) with **LoRA** (rank 8, alpha 8, no dropout, the same seven projection modules; the reference is the
base model with the adapter off on both sides) on the world's 16 training prompts, ``--batch`` prompts per
optimizer step, 2 samples per prompt (``max_new_tokens`` 16, temperature 1, no top-k/top-p), labelled by the
world's exact judge (:class:`diffdpo.toy.tiny_lm_judge.TinyWorldJudge`; TRL gets its reward as a reward
function and takes the higher-reward sample as chosen), hard labels, the sigmoid (DPO) loss with beta 0.1,
AdamW lr 1e-3, constant schedule, clipping at 1.0:

(a) TRL ``OnlineDPOTrainer`` (``trl.experimental.online_dpo``): one step = ``trainer.training_step``
    (HF ``generate``, policy and reference forwards over the padded [prompt; completion] batch, reward
    function, loss, backward), clipping, AdamW step. Its prompts carry the BOS token as text, because it
    tokenises prompts with ``add_special_tokens=False``: both sides then feed the model the same prompt ids.
(b) ours: ``diffdpo.train.train_step`` on the ``tiny_lm_online`` task built from
    ``configs/lm_online_dpo_tiny.yaml`` (sampling with the KV cache, judge, policy and reference log-probs of
    the sampled ids in one packed forward, the shared loss library, clipping, AdamW step).

Throughput is **annotated pairs per CPU-second**: the (prompt, 2 samples) pairs each side sampled and sent to
the judge (``--batch`` per step on both sides), over the process CPU time (``time.process_time``) of the
measured steps after ``--warmup`` steps; wall time is reported too. Ours leaves empty and duplicate pairs out
of the judge call and ties out of the loss (``count/...`` metrics, in the JSON), TRL judges and trains on
every pair; the work per pair (generation, forwards, backward) is the same.

Peak memory is the peak resident set size (``resource.getrusage``) of a fresh process per side, minus the
resident set size after the imports (the same libraries on both sides: torch, transformers, peft, accelerate,
datasets, TRL, diffdpo) and before the model loads (``delta``); the absolute peak is shown too.
Each side runs in its own subprocess so that neither inherits the other's peak.
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

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_online_dpo_tiny.yaml"
LR, BETA, LORA_RANK = 1e-3, 0.1, 8


# ------------------------------------------------------------------------------------------------
# memory


def _rss_kib() -> int:
    """Current resident set size of this process in KiB (Linux /proc)."""
    import os

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# ------------------------------------------------------------------------------------------------
# the two sides (each runs in its own process)


def build_trl(world: Path, args: argparse.Namespace, out_dir: Path) -> tuple[Any, Any]:
    """(step(), pairs_per_step) for TRL's OnlineDPOTrainer on the world's prompts."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from diffdpo.toy.tiny_lm import SUBJECTS, prompt_for
    from diffdpo.toy.tiny_lm_judge import TinyWorldJudge

    judge = TinyWorldJudge()

    def tiny_world_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return judge(prompts, completions).tolist()

    tokenizer = AutoTokenizer.from_pretrained(world / "model")
    model = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.float32)
    # TRL tokenises prompts with add_special_tokens=False: the BOS as text gives the ids our side feeds
    rows = [{"prompt": f"{tokenizer.bos_token} {prompt_for(s)}"} for s in SUBJECTS]
    cfg = OnlineDPOConfig(output_dir=str(out_dir), per_device_train_batch_size=args.batch, learning_rate=LR,
                          weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0, beta=BETA,
                          loss_type="sigmoid", max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=0, top_p=1.0, use_cpu=True, report_to="none", bf16=False, save_strategy="no",
                          logging_strategy="no", disable_dropout=True, seed=0, dataloader_num_workers=0)
    peft = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    trainer = OnlineDPOTrainer(model=model, reward_funcs=tiny_world_reward, args=cfg,
                               train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.steps)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we do not run
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    lengths: list[float] = []
    generate = trainer._generate

    def generate_and_count(*a: Any, **k: Any) -> Any:  # completion tokens (EOS included), as ours reports
        out = generate(*a, **k)
        lengths.append(float(out[3].sum(1).float().mean()))
        return out

    trainer._generate = generate_and_count
    loader = trainer.get_train_dataloader()
    it = iter(loader)

    def step() -> dict[str, float]:
        nonlocal it
        try:
            inputs = next(it)
        except StopIteration:
            it = iter(loader)
            inputs = next(it)
        trainer.training_step(trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return {"count/annotated_pairs": float(len(inputs["prompt"])), "online/length": lengths[-1]}

    return step, args.batch


def build_ours(world: Path, args: argparse.Namespace, out_dir: Path) -> tuple[Any, Any]:
    """(step(), pairs_per_step) for our tiny_lm_online task in the one loop."""
    from diffdpo.train import load_train_config, micro_batches, setup, train_step

    cfg = load_train_config(CONFIG, [
        f"output_dir={out_dir}", f"per_device_batch_size={args.batch}", f"max_steps={args.warmup + args.steps}",
        f"optim.lr={LR}", f"loss.beta={BETA}", "progress_bar=false", "tensorboard=false", "checkpoint_every=0",
        "eval_every=0", f"tiny_lm_online.world={world}", f"tiny_lm_online.lora.rank={LORA_RANK}",
        f"tiny_lm_online.online.max_new_tokens={args.max_new_tokens}",
        f"tiny_lm_online.online.temperature={args.temperature}",
    ])
    tr = setup(cfg)
    batches = micro_batches(tr.task, cfg, tr.accelerator, tr.state)

    def step() -> dict[str, float]:
        return train_step(tr, batches)

    return step, args.batch


def run_side(side: str, world: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build one side, run warm-up + measured steps; time, pairs and peak RSS (this process only)."""
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    datasets.disable_progress_bars()
    # both sides import the same libraries before the baseline, so the delta counts training, not imports
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import trl.experimental.online_dpo  # noqa: F401

    import diffdpo.toy.tiny_lm_online  # noqa: F401
    import diffdpo.train  # noqa: F401

    base_rss = _rss_kib()
    with tempfile.TemporaryDirectory() as tmp:
        build = build_trl if side == "trl" else build_ours
        step, pairs_per_step = build(world, args, Path(tmp) / side)
        for _ in range(args.warmup):
            step()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        labelled, length = 0.0, 0.0
        for _ in range(args.steps):
            logs = step()
            labelled += logs.get("count/annotated_pairs", 0.0)
            length += logs.get("online/length", float("nan")) / args.steps
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    pairs = pairs_per_step * args.steps
    peak = _peak_rss_kib()
    return {"pairs": pairs, "labelled_pairs": labelled, "mean_completion_tokens": length, "cpu_s": cpu_s,
            "wall_s": wall_s,
            "pairs_per_cpu_s": pairs / cpu_s, "pairs_per_wall_s": pairs / wall_s,
            "peak_rss_mib": peak / 1024, "base_rss_mib": base_rss / 1024, "peak_delta_mib": (peak - base_rss) / 1024}


def spawn_side(side: str, world: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one side in a fresh Python process; its JSON, or ``{"error": ...}`` with what failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_lm_online", "--side", side, "--world", str(world),
               "--side-out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--threads", str(args.threads),
               "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if out.is_file():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit code {proc.returncode}: " + "\n".join(tail)}


# ------------------------------------------------------------------------------------------------
# report


def report(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ours, trl = res["ours"], res["trl"]
    print(f"tiny world SFT model (Llama-style, hidden 64, 2 layers), LoRA r={LORA_RANK} on both; {args.batch} "
          f"prompts/step x 2 samples, max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, exact "
          f"judge, sigmoid loss; {args.steps} measured steps after {args.warmup} warm-up; torch threads "
          f"{args.threads}; each side in its own process")
    rows = [("annotated pairs / CPU-s", "pairs_per_cpu_s", "{:.1f}"), ("annotated pairs / wall-s", "pairs_per_wall_s",
            "{:.1f}"), ("peak RSS delta (MiB)", "peak_delta_mib", "{:.1f}"), ("peak RSS (MiB)", "peak_rss_mib", "{:.1f}"),
            ("mean completion tokens", "mean_completion_tokens", "{:.2f}")]
    print(f"{'':26s} {'TRL OnlineDPOTrainer':>21s} {'diffdpo':>10s} {'ours / TRL':>11s}")
    ratios: dict[str, float] = {}
    for label, key, fmt in rows:
        a = fmt.format(trl[key]) if "error" not in trl else "n/a"
        b = fmt.format(ours[key]) if "error" not in ours else "n/a"
        r = ""
        if "error" not in trl and "error" not in ours:
            ratios[key] = ours[key] / trl[key]
            r = f"x{ratios[key]:.2f}"
        print(f"{label:26s} {a:>21s} {b:>10s} {r:>11s}")
    if "error" not in ours:
        print(f"ours: {ours['labelled_pairs']:.0f} of {ours['pairs']} pairs labelled (empty/duplicate pairs are not "
              "sent to the judge)")
    for side in ("trl", "ours"):
        if "error" in res[side]:
            print(f"{side} did not run: {res[side]['error']}")
    met = None
    if ratios:
        met = ratios["pairs_per_cpu_s"] >= 1.5 and ratios["peak_delta_mib"] <= 1.0
        print(f"goal (>= 1.5x TRL's pairs per CPU-second at <= 1x its peak RSS delta): "
              f"{'met' if met else 'NOT met'} (x{ratios['pairs_per_cpu_s']:.2f}, x{ratios['peak_delta_mib']:.2f})")
    return {"ratios": ratios, "goal_met": met}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing starts")
    parser.add_argument("--batch", type=int, default=16, help="prompts per optimizer step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each side's process")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--world", default="", help="tiny world folder (used as it is if built, else built); empty = a temp folder")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--side", choices=["trl", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--side-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:  # a child process: one side, JSON to --side-out
        try:
            result = run_side(args.side, Path(args.world), args)
        except Exception as exc:  # noqa: BLE001 - reported by the parent as the reason this side did not run
            import traceback

            result = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"}
        Path(args.side_out).write_text(json.dumps(result))
        return 0

    from diffdpo.toy.tiny_lm import TinyWorld, build_world

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.world) if args.world else Path(tmp) / "world"
        # a world already built is used as it is (as the tiny_lm_online task does)
        world = (TinyWorld(root) if (root / "world.json").is_file() else build_world(root)).root
        res: dict[str, Any] = {"trl": spawn_side("trl", world, args), "ours": spawn_side("ours", world, args)}
    res.update(report(res, args))
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("side", "side_out", "json")}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if "error" not in res["ours"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

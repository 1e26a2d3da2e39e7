"""LM DPO training step: TRL's DPOTrainer vs ours (diffdpo.train + diffdpo.lm), side by side, in one process.

Both sides train the same Llama-style model (built from a config; hidden 256, 4 layers, GQA, vocab 8192) on
the same preference pairs with variable-length prompts and completions, batch for batch:

(a) TRL ``DPOTrainer`` (its own tokenisation and collator, right-padded [chosen; rejected] batch, its fused
    chunked LM head, reference = frozen copy or LoRA adapters disabled): one step = ``trainer.training_step``
    (forward, reference forward, loss, backward), gradient clipping at 1.0, AdamW step.
(b) ours: ``diffdpo.train.train_step`` on ``diffdpo.lm.task.LMPreferenceTask`` (padding-free batch with each
    pair's prompt computed once, chunked LM head scoring completion tokens only, the same reference choice,
    the shared loss library, clipping at 1.0, AdamW step), including the per-step indicators (top-k
    entropy/mass, token KL) that TRL does not compute.

Throughput is tokens per CPU-second of the training thread (``time.thread_time``; torch runs on one thread,
so other processes on shared cores do not distort it), tokens being the real prompt + completion tokens of
the chosen and rejected sequences (TRL's ``num_tokens``: the same count for both sides, padding excluded).
The measured steps of (a) and (b) are interleaved; the median step is reported.

Peak memory on CPU has no allocator counter like ``torch.cuda.max_memory_allocated``. We measure live
*tensor* bytes: the bytes resident before a step (weights, reference copy, optimizer state; counted over
unique storages) plus the peak of allocations minus frees during one step, read from the torch profiler's
memory events (``profile_memory=True``). Python objects and allocator caching are not included.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------
# model and data


def build_model(vocab_size: int, seed: int = 0) -> Any:
    from diffdpo.toy.tiny_lm import build_model as tiny_model

    return tiny_model(vocab_size, hidden_size=256, layers=4, seed=seed, intermediate_size=688, num_attention_heads=8,
                      num_key_value_heads=4, max_position_embeddings=1024)


def make_rows(n: int, seed: int, prompt_len: tuple[int, int], completion_len: tuple[int, int]) -> list[dict]:
    """Pairs of random word sequences of the tiny world's vocabulary, lengths uniform in the given ranges."""
    from diffdpo.toy.tiny_lm import SPECIALS, vocabulary

    words = [w for w in vocabulary() if w not in SPECIALS]
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " " + " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(*prompt_len).strip(), "chosen": text(*completion_len), "rejected": text(*completion_len)}
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# the two training steps


@dataclass
class Side:
    name: str
    step: Callable[[int], None]  # runs the training step on batch i
    resident: Callable[[], int]  # bytes of live tensors between steps
    tokens: list[int]  # real tokens of batch i


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type != "cpu":
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def build_trl(model: Any, tokenizer: Any, rows: list[dict], batch_size: int, lora: bool, tmp: Path) -> Side:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=batch_size, learning_rate=1e-5,
                     report_to="none", use_cpu=True, beta=0.1, max_length=None, disable_dropout=True,
                     precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=False, save_strategy="no",
                     logging_strategy="no", dataset_num_proc=None)
    kwargs: dict[str, Any] = {}
    if lora:
        kwargs["peft_config"] = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    else:
        kwargs["ref_model"] = copy.deepcopy(model).requires_grad_(False).eval()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         **kwargs)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we do not run
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    n = len(rows) // batch_size
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)])
               for b in range(n)]

    def step(i: int) -> None:
        trainer.training_step(trainer.model, batches[i])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def resident() -> int:
        tensors = [*trainer.model.parameters(), *trainer.model.buffers(), *_optimizer_tensors(trainer.optimizer)]
        if trainer.ref_model is not None:
            tensors += [*trainer.ref_model.parameters(), *trainer.ref_model.buffers()]
        return _storage_bytes(tensors)

    tokens = [int(b["attention_mask"].sum()) for b in batches]
    return Side("trl DPOTrainer", step, resident, tokens)


def build_ours(model: Any, tokenizer: Any, rows: list[dict], batch_size: int, lora: bool, tmp: Path,
               layout: str) -> Side:
    from diffdpo.lm.task import LMPreferenceTask
    from diffdpo.train import load_train_config, setup, train_step

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_train_config(None, [
        "task=lm", f"output_dir={tmp / 'ours'}", f"per_device_batch_size={batch_size}", "optim.lr=1e-5",
        "optim.weight_decay=0.0", "optim.lr_scheduler=constant", "optim.max_grad_norm=1.0", "loss.type=sigmoid",
        "loss.beta=0.1", "tensorboard=false", "progress_bar=false", "checkpoint_every=0", "lm.model.pretrained=model",
        f"lm.data.source={path}", f"lm.layout={layout}", f"lm.lora.enabled={str(lora).lower()}", "lm.lora.rank=16",
        "lm.lora.alpha=32",
    ])
    accel = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no", is_main_process=True,
                            wait_for_everyone=lambda: None)
    task = LMPreferenceTask(cfg.lm, loss_type="sigmoid", accelerator=accel, per_device_batch_size=batch_size,
                            model=model, tokenizer=tokenizer)
    tr = setup(cfg, task)
    ds = task.dataset()
    n = len(rows) // batch_size
    batches = []
    for b in range(n):
        idx = list(range(b * batch_size, (b + 1) * batch_size))
        batches.append((torch.tensor(idx), task.collate([ds[i] for i in idx])))

    def step(i: int) -> None:
        train_step(tr, iter([batches[i]]))

    def resident() -> int:
        tensors = [*task.policy.parameters(), *task.policy.buffers(), *_optimizer_tensors(tr.optimizer)]
        if task.ref_policy is not None:
            tensors += [*task.ref_policy.parameters(), *task.ref_policy.buffers()]
        return _storage_bytes(tensors)

    tokens = [b["tokens"].num_tokens for _, b in batches]
    return Side(f"diffdpo ({layout})", step, resident, tokens)


# ------------------------------------------------------------------------------------------------
# measurement


def step_peak_bytes(side: Side, i: int) -> int:
    """Peak of (allocations - frees) during one step, from the torch profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        side.step(i)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def run_sides(sides: list[Side], steps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Interleaved measured steps of every side on the same batches; median per-token CPU time."""
    n = len(sides[0].tokens)
    assert all(side.tokens == sides[0].tokens for side in sides), "every side must see the same tokens"
    times: dict[str, list[float]] = {side.name: [] for side in sides}
    for k in range(warmup + steps):
        i = k % n
        for side in sides:
            t0 = time.thread_time()
            side.step(i)
            dt = time.thread_time() - t0
            if k >= warmup:
                times[side.name].append(dt / side.tokens[i])
    out = {}
    for side in sides:
        resident = side.resident()
        peak = step_peak_bytes(side, 0)
        out[side.name] = {"tokens_per_s": 1.0 / statistics.median(times[side.name]),
                          "resident_mib": resident / 2**20, "step_mib": peak / 2**20,
                          "peak_mib": (resident + peak) / 2**20}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 96], help="prompt words, uniform range")
    parser.add_argument("--completion-len", type=int, nargs=2, default=[8, 320], help="completion words, uniform")
    parser.add_argument("--layout", default="shared_prompt", choices=["padded", "packed", "shared_prompt"])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the extra row of ours with TRL's padded layout")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    from diffdpo.toy.tiny_lm import build_tokenizer

    tokenizer = build_tokenizer()
    n_batches = min(args.steps + args.warmup, 4)
    rows = make_rows(args.batch_size * n_batches, 0, tuple(args.prompt_len), tuple(args.completion_len))
    print(f"model: Llama-style, hidden 256, 4 layers, vocab 8192; {args.batch_size} pairs/step, prompts "
          f"{args.prompt_len[0]}-{args.prompt_len[1]} and completions {args.completion_len[0]}-"
          f"{args.completion_len[1]} tokens; torch threads {args.threads}; median of {args.steps} steps after "
          f"{args.warmup} warm-up")
    print("throughput = real tokens per CPU-second of the training thread; memory = live tensor bytes "
          "(resident weights/ref/optimizer + peak of one step, torch profiler)")
    ok = True
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir)
            base = build_model(8192)
            lora = mode == "lora"
            sides = [build_trl(copy.deepcopy(base), tokenizer, rows, args.batch_size, lora, tmp / "trl"),
                     build_ours(copy.deepcopy(base), tokenizer, rows, args.batch_size, lora, tmp / "a", args.layout)]
            if not args.no_ablation and args.layout != "padded":
                sides.append(build_ours(copy.deepcopy(base), tokenizer, rows, args.batch_size, lora, tmp / "b",
                                        "padded"))
            res = run_sides(sides, args.steps, args.warmup)
        for name, r in res.items():
            print(f"{mode:4s} {name:26s} {r['tokens_per_s']:9.0f} tokens/s  peak {r['peak_mib']:8.1f} MiB "
                  f"(resident {r['resident_mib']:7.1f} + step {r['step_mib']:7.1f})")
        a = res[sides[0].name]
        for k, side in enumerate(sides[1:]):
            b = res[side.name]
            speed, mem = b["tokens_per_s"] / a["tokens_per_s"], b["peak_mib"] / a["peak_mib"]
            verdict = ""
            if k == 0:
                met = speed >= 1.5 and mem <= 0.8
                ok &= met
                verdict = f" -> goal (>= 1.5x, <= 0.8x) {'met' if met else 'NOT met'}"
            print(f"{mode:4s} {side.name} vs TRL: x{speed:.2f} tokens/s, x{mem:.2f} peak memory "
                  f"(step memory x{b['step_mib'] / a['step_mib']:.2f}){verdict}")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""AlignDistil (Zhang et al. 2025, "AlignDistil: Token-Level Language Model Alignment as Adaptive Policy
Distillation", arXiv 2503.02832; code songmzhang/AlignDistil) as a recipe over the library.

``diffdpo aligndistil --config configs/aligndistil_tiny.yaml`` runs the paper's three steps:

1. **Stage A**: train a DPO model on the pairs and a *reverse* DPO model on the same pairs with chosen and
   rejected swapped (written to ``reverse_pairs.jsonl``), each through the one training loop with
   ``dpo_config`` (``tiny_lm`` or ``lm`` task, full fine-tune or LoRA); or load both from ``dpo_model`` /
   ``reverse_dpo_model`` (model folders, or peft adapter folders on ``base_model``).
2. **Teachers**: per batch, one backbone forward of each teacher (DPO, reverse DPO; the reference too in the
   RLHF modes) at the response tokens. LoRA teachers share one base model: their adapters are injected side
   by side and switched per forward (the reference is the base with adapters off), no copies.
3. **Stage B**: distil into the policy, initialised from ``base_model`` (the reference / SFT model), with the
   per-token loss ``(beta / w) KL(pi_theta || pi*)`` of :func:`diffdpo.losses.aligndistil_token_losses`, the
   teacher ``pi*`` and weight ``w`` of :func:`diffdpo.losses.aligndistil_teacher` (``mode``), mean over each
   response's tokens, mean over the batch. ``policy=off``: on the chosen responses of the pairs (the paper's
   off-policy variant, beta2 10); ``policy=on``: on one completion per prompt sampled from the current policy
   at temperature 1 (the on-policy variant, beta2 15). Full-vocabulary logits are formed per chunk of
   ``logits_chunk_size`` response tokens (recomputed in backward), so a large vocabulary never holds the
   (tokens, V) logits of the whole batch.

The distilled policy is saved with ``save_pretrained`` under ``output_dir/final`` (stock transformers loads it).

``diffdpo study-aligndistil --config configs/study_aligndistil_tiny.yaml`` (:func:`run_aligndistil_study`)
compares AlignDistil with DPO on the same pairs and the same number of steps on the tiny world: the gold win
rate against the base every ``eval_every`` steps, several seeds; results.csv, summary.csv (mean and 95%
t-interval per method and step), study.png and summary.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffdpo.config import help_meta
from diffdpo.losses import ALIGNDISTIL_CONTRASTIVE_MODES, ALIGNDISTIL_MODES
from diffdpo.train import OptimConfig


def _default_optim() -> OptimConfig:
    return OptimConfig(lr=1.5e-3, weight_decay=0.0, lr_scheduler="constant")


@dataclass
class AlignDistilConfig:
    """The ``diffdpo aligndistil`` recipe (defaults: the tiny world, the paper's off-policy settings)."""

    output_dir: str = field(default="runs/aligndistil_tiny", metadata=help_meta("stages and the distilled policy go here"))
    world: str = field(default="runs/tiny_lm_world", metadata=help_meta("tiny world (built if missing) when pairs/base_model are empty"))
    seed: int = field(default=0, metadata=help_meta("seed of the world, both stages and on-policy sampling"))
    pairs: str = field(default="", metadata=help_meta("preference pairs (.jsonl prompt/chosen/rejected); empty = the world's"))
    base_model: str = field(default="", metadata=help_meta("reference / SFT model folder (policy init); empty = the world's"))
    dpo_config: str = field(default="configs/lm_dpo_tiny.yaml", metadata=help_meta("stage A training config (task tiny_lm or lm)"))
    dpo_steps: int = field(default=40, metadata=help_meta("optimizer steps of each stage-A model"))
    dpo_model: str = field(default="", metadata=help_meta("load the DPO model from here instead of training it"))
    reverse_dpo_model: str = field(default="", metadata=help_meta("load the reverse DPO model from here instead of training it"))
    mode: str = field(default="aligndistil", metadata=help_meta("teacher: " + ", ".join(ALIGNDISTIL_MODES)))
    beta: float = field(default=0.1, metadata=help_meta("beta of the DPO reward (the loss weighs tokens by beta / w)"))
    beta2: float = field(default=10.0, metadata=help_meta("adaptive: w = beta2 * TVD + eps; fixed modes: w = beta / beta2 (paper 10 off, 15 on)"))
    eps: float = field(default=1e-3, metadata=help_meta("added to the adaptive weight (code: 1e-3)"))
    policy: Literal["off", "on"] = field(default="off", metadata=help_meta("off: chosen responses; on: one sample per prompt"))
    steps: int = field(default=40, metadata=help_meta("stage B optimizer steps"))
    batch_size: int = field(default=16, metadata=help_meta("prompts (responses) per step, stage A and B"))
    max_new_tokens: int = field(default=16, metadata=help_meta("on-policy: sampled tokens per completion"))
    length_normalize: bool = field(default=True, metadata=help_meta("divide each response's summed loss by its tokens (code: --reward_len_norm)"))
    logits_chunk_size: int = field(default=1024, metadata=help_meta("response tokens per full-vocabulary logits chunk"))
    optim: OptimConfig = field(default_factory=_default_optim)

    def __post_init__(self) -> None:
        if self.mode not in ALIGNDISTIL_MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; use one of {', '.join(ALIGNDISTIL_MODES)}")
        if self.policy not in ("off", "on"):
            raise ValueError(f"policy must be off or on, got {self.policy!r}")
        if not (self.beta > 0 and math.isfinite(self.beta)) or not (self.beta2 >= 0 and math.isfinite(self.beta2)):
            raise ValueError(f"beta must be > 0 and beta2 >= 0, got beta={self.beta}, beta2={self.beta2}")
        if min(self.steps, self.dpo_steps, self.batch_size, self.max_new_tokens, self.logits_chunk_size) < 1:
            raise ValueError("steps, dpo_steps, batch_size, max_new_tokens and logits_chunk_size must be >= 1")
        if bool(self.dpo_model) != bool(self.reverse_dpo_model):
            raise ValueError("give both dpo_model and reverse_dpo_model (load), or neither (train both in stage A)")


# ------------------------------------------------------------------------------------------------
# stage A: the DPO and reverse DPO models


def resolve_inputs(cfg: AlignDistilConfig) -> tuple[Path, Path]:
    """(pairs file, base model folder): the config's, or the tiny world's (built once)."""
    if cfg.pairs and cfg.base_model:
        return Path(cfg.pairs), Path(cfg.base_model)
    from diffdpo.toy.tiny_lm import build_world

    world = build_world(cfg.world, seed=cfg.seed)
    return Path(cfg.pairs or world.pairs), Path(cfg.base_model or world.model_dir)


def write_reverse_pairs(pairs: Path, out: Path) -> Path:
    """The pairs with chosen and rejected swapped (spans too), for the reverse DPO model."""
    from diffdpo.lm.data import load_rows

    rows, _ = load_rows(str(pairs))
    swapped = []
    for r in rows:
        s = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        if "chosen_spans" in r or "rejected_spans" in r:
            s["chosen_spans"], s["rejected_spans"] = r.get("rejected_spans"), r.get("chosen_spans")
        swapped.append(s)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in swapped))
    return out


def dpo_train_config(cfg: AlignDistilConfig, pairs: Path, base: Path, out_dir: Path, extra: list[str] | tuple = ()) -> Any:
    """The stage-A training config: ``dpo_config`` pointed at ``pairs`` and ``base``, ``dpo_steps`` steps."""
    from diffdpo.config import peek_key
    from diffdpo.train import load_train_config

    task = str(peek_key(cfg.dpo_config, (), "task", default="tiny_lm"))
    if task not in ("tiny_lm", "lm"):
        raise ValueError(f"dpo_config={cfg.dpo_config!r} trains task {task!r}; stage A needs task tiny_lm or lm")
    section = [f"{task}.data.source={pairs}", f"{task}.model.pretrained={base}"]
    if task == "tiny_lm":
        section += [f"tiny_lm.world={cfg.world}", "tiny_lm.eval_samples_per_prompt=1"]
    return load_train_config(cfg.dpo_config, [
        f"output_dir={out_dir}", f"seed={cfg.seed}", f"max_steps={cfg.dpo_steps}",
        f"per_device_batch_size={cfg.batch_size}", "gradient_accumulation_steps=1", "progress_bar=false",
        "tensorboard=false", "checkpoint_every=0", "eval_every=0", "overwrite=true", *section, *extra])


def train_dpo(train_cfg: Any, *, eval_every: int = 0, evaluate: Callable[[Any], dict] | None = None
              ) -> tuple[Path, list[dict]]:
    """Train through the loop's :func:`diffdpo.train.train_step`; ``evaluate(model)`` every ``eval_every`` steps.
    Returns (exported folder ``output_dir/final``, evaluations with their step)."""
    from diffdpo.train import micro_batches, setup, train_step

    tr = setup(train_cfg)
    batches = micro_batches(tr.task, train_cfg, tr.accelerator, tr.state)
    evals = []
    while tr.state.step < train_cfg.max_steps:
        train_step(tr, batches)
        tr.state.step += 1
        if evaluate is not None and eval_every and tr.state.step % eval_every == 0:
            evals.append({"step": tr.state.step, **evaluate(tr.task.policy.model)})
    final = Path(train_cfg.output_dir) / "final"
    tr.task.export(final)
    return final, evals


def stage_a(cfg: AlignDistilConfig, pairs: Path, base: Path) -> tuple[Path, Path]:
    """(DPO model, reverse DPO model) folders: loaded as given, or trained on the pairs and the swapped pairs."""
    if cfg.dpo_model:
        return Path(cfg.dpo_model), Path(cfg.reverse_dpo_model)
    out = Path(cfg.output_dir)
    dpo, _ = train_dpo(dpo_train_config(cfg, pairs, base, out / "dpo"))
    reverse = write_reverse_pairs(pairs, out / "reverse_pairs.jsonl")
    rev, _ = train_dpo(dpo_train_config(cfg, reverse, base, out / "reverse_dpo"))
    return dpo, rev


# ------------------------------------------------------------------------------------------------
# teachers: one backbone forward each per batch


def _is_adapter(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _load_lm(path: Path, device: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval().requires_grad_(False)


def _inject_adapter(model: Any, folder: Path, name: str) -> None:
    """Add the peft adapter saved in ``folder`` to ``model`` under ``name`` (beside any adapters it has)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftLoraConfig.from_pretrained(str(folder))
    inject_adapter_in_model(config, model, adapter_name=name)
    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name)


class Teachers:
    """The DPO model, the reverse DPO model and the reference, as many as ``mode`` needs.

    Full models are held once each. LoRA teachers (two adapter folders) share one base: both adapters are
    injected into it and :meth:`hidden` switches the active adapter per forward; the reference is that base
    with adapters off.
    """

    def __init__(self, base: Path, dpo: Path, reverse: Path, mode: str, device: Any) -> None:
        from diffdpo.adapters import tuner_layers
        from diffdpo.lm.logps import CausalLMLogps

        self.names = ["dpo", "reverse"] if mode in ALIGNDISTIL_CONTRASTIVE_MODES else ["dpo", "reference"]
        adapters = _is_adapter(dpo), _is_adapter(reverse)
        if any(adapters) and not all(adapters):
            raise ValueError(f"dpo_model {str(dpo)!r} and reverse_dpo_model {str(reverse)!r}: give two LoRA adapter "
                             "folders or two model folders, not one of each")
        self.shared = None
        if all(adapters):
            lm = _load_lm(base, device)
            _inject_adapter(lm, dpo, "dpo")
            _inject_adapter(lm, reverse, "reverse")
            lm.to(device).eval().requires_grad_(False)
            self.layers = tuner_layers(lm)
            self.shared = CausalLMLogps(lm)
        else:
            paths = {"dpo": dpo, "reverse": reverse, "reference": base}
            self.models = {n: CausalLMLogps(_load_lm(paths[n], device)) for n in self.names}

    def _activate(self, name: str) -> None:
        for layer in self.layers:
            layer.enable_adapters(name != "reference")
            if name != "reference":
                layer.set_adapter(name)

    @torch.no_grad()
    def hidden(self, batch: Any) -> dict[str, tuple[torch.Tensor, Any]]:
        """Per teacher: hidden states at the response targets (M, d) and its LM head; one forward each."""
        from diffdpo.lm.logps import head_spec

        out = {}
        for name in self.names:
            if self.shared is not None:
                self._activate(name)
                wrapper = self.shared
            else:
                wrapper = self.models[name]
            out[name] = wrapper.hidden_at_targets(batch), head_spec(wrapper.causal_lm)
        if self.shared is not None:
            self._activate("dpo")
        return out


# ------------------------------------------------------------------------------------------------
# stage B: distillation


def distil_token_losses(hidden: torch.Tensor, head: Any, teachers: dict[str, tuple[torch.Tensor, Any]],
                        cfg: AlignDistilConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token AlignDistil losses (M,) of the policy's response hidden states, chunked over tokens.

    Each chunk forms the teachers' and the policy's full-vocabulary logits; with more than one chunk the
    policy's chunk is recomputed in backward (activation checkpointing), so at most one chunk of (tokens, V)
    logits is alive. Also returns detached per-token ``weights`` w, ``tvd`` and ``kl`` KL(pi || pi*).
    """
    from torch.utils.checkpoint import checkpoint

    from diffdpo.lm.logps import _logits
    from diffdpo.losses import aligndistil_teacher, aligndistil_token_losses

    m = hidden.shape[0]
    chunk = cfg.logits_chunk_size
    losses, weights, tvds, kls = [], [], [], []
    for s in range(0, m, chunk):
        e = min(s + chunk, m)
        with torch.no_grad():
            z = {n: _logits(h[s:e], hd)[0] for n, (h, hd) in teachers.items()}  # (c, V) each
            teacher = aligndistil_teacher(z["dpo"], rev_logits=z.get("reverse"), ref_logits=z.get("reference"),
                                          mode=cfg.mode, beta=cfg.beta, beta2=cfg.beta2, eps=cfg.eps)

        def chunk_loss(h: torch.Tensor, t=teacher) -> torch.Tensor:
            return aligndistil_token_losses(_logits(h, head)[0], t.logits, t.weights, beta=cfg.beta)

        h = hidden[s:e]
        loss = checkpoint(chunk_loss, h, use_reentrant=False) if m > chunk else chunk_loss(h)  # (c,)
        losses.append(loss)
        weights.append(teacher.weights)
        tvds.append(teacher.tvd if teacher.tvd is not None else torch.full_like(teacher.weights, math.nan))
        kls.append(loss.detach() * teacher.weights / cfg.beta)
    return torch.cat(losses), {"weights": torch.cat(weights), "tvd": torch.cat(tvds), "kl": torch.cat(kls)}


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of a seeded permutation per epoch (the last incomplete batch of an epoch is dropped)."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        for b in range(n // batch_size):
            yield order[b * batch_size : (b + 1) * batch_size]
        epoch += 1


class Distiller:
    """Stage B state: policy, teachers, data, optimiser. :meth:`step` is one optimizer step."""

    def __init__(self, cfg: AlignDistilConfig, pairs: Path, base: Path, dpo: Path, reverse: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from diffdpo.lm.data import TokenizeOptions, load_preference_data, load_rows
        from diffdpo.lm.logps import CausalLMLogps
        from diffdpo.train import build_lr_scheduler, build_optimizer

        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.data = load_preference_data(str(pairs), self.tokenizer, TokenizeOptions())
        if len(self.data) < cfg.batch_size:
            raise ValueError(f"{pairs}: {len(self.data)} usable pairs, fewer than batch_size={cfg.batch_size}")
        self.prompts = [r["prompt"] for r in load_rows(str(pairs))[0]]
        self.teachers = Teachers(base, dpo, reverse, cfg.mode, self.device)
        torch.manual_seed(cfg.seed)
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(self.device).train()
        self.policy = CausalLMLogps(lm)
        self.optimizer = build_optimizer(lm.parameters(), cfg.optim, cfg.optim.lr)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.order = _batches(len(self.data), cfg.batch_size, cfg.seed)
        self.step_count = 0

    @property
    def model(self) -> Any:
        return self.policy.model

    def next_batch(self) -> Any:
        """The next batch as a padded :class:`~diffdpo.lm.packing.TokenBatch`: chosen responses (off-policy)
        or one completion per prompt sampled from the policy at temperature 1 (on-policy)."""
        from diffdpo.lm.generate import sample_completions
        from diffdpo.lm.packing import Group, collate_groups

        items = [self.data[i] for i in next(self.order)]
        if self.cfg.policy == "off":
            groups = [Group(it["prompt_ids"], [it["chosen_ids"]]) for it in items]
        else:
            prompts = [self.prompts[it["row"]] for it in items]
            seed = self.cfg.seed * 1_000_003 + self.step_count
            done = sample_completions(self.model, self.tokenizer, prompts, n=1, max_new_tokens=self.cfg.max_new_tokens,
                                      temperature=1.0, seed=seed)
            groups = [Group(p, [c]) for p, c in zip(done.prompt_ids, done.completion_ids)]
        return collate_groups(groups, "padded", self.tokenizer.pad_token_id).to(self.device)

    def step(self) -> dict[str, float]:
        """One AlignDistil optimizer step; the batch's loss, mean weight, TVD and KL(pi || pi*)."""
        from diffdpo.lm.logps import head_spec
        from diffdpo.losses import aligndistil_sequence_losses

        batch = self.next_batch()
        teachers = self.teachers.hidden(batch)  # one forward per teacher
        hidden = self.policy.hidden_at_targets(batch)  # (M, d)
        token_losses, stats = distil_token_losses(hidden, head_spec(self.policy.causal_lm), teachers, self.cfg)
        losses = aligndistil_sequence_losses(token_losses, batch.sequence_index, batch.num_sequences,
                                             length_normalize=self.cfg.length_normalize)  # [S]
        loss = losses.mean()
        loss.backward()
        if self.cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return {"step": self.step_count, "loss": float(loss.detach()), "weight": float(stats["weights"].mean()),
                "tvd": float(stats["tvd"].mean()), "kl_teacher": float(stats["kl"].mean()),
                "tokens": int(batch.labels.numel())}

    def save(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        return out_dir


def run_aligndistil(cfg: AlignDistilConfig, *, eval_every: int = 0,
                    evaluate: Callable[[Any], dict] | None = None) -> dict[str, Any]:
    """Stage A (train or load), stage B (``steps`` distillation steps); the policy in ``output_dir/final``.

    ``evaluate(model)`` every ``eval_every`` steps (the study); the returned dict has the per-step logs and
    evaluations and is written to ``output_dir/aligndistil.json``."""
    pairs, base = resolve_inputs(cfg)
    dpo, reverse = stage_a(cfg, pairs, base)
    distiller = Distiller(cfg, pairs, base, dpo, reverse)
    logs, evals = [], []
    start = time.perf_counter()
    for _ in range(cfg.steps):
        logs.append(distiller.step())
        if evaluate is not None and eval_every and distiller.step_count % eval_every == 0:
            distiller.model.eval()
            evals.append({"step": distiller.step_count, **evaluate(distiller.model)})
            distiller.model.train()
    final = distiller.save(Path(cfg.output_dir) / "final")
    last = logs[-1]
    print(f"aligndistil ({cfg.mode}, {cfg.policy}-policy): {cfg.steps} steps in {time.perf_counter() - start:.1f} s, "
          f"loss {last['loss']:.4f}, mean w {last['weight']:.3f}; policy in {final}")
    report = {"config": asdict(cfg), "dpo_model": str(dpo), "reverse_dpo_model": str(reverse), "final": str(final),
              "logs": logs, "evals": evals}
    (Path(cfg.output_dir) / "aligndistil.json").write_text(json.dumps(report, indent=1))
    return report


# ------------------------------------------------------------------------------------------------
# the study: AlignDistil vs DPO per training step on the tiny world

STUDY_METHODS = ("dpo", "aligndistil_off", "aligndistil_on")
STUDY_RESULT_COLUMNS = ["method", "seed", "step", "wins", "ties", "losses", "n", "win_rate", "win_rate_low",
                        "win_rate_high", "kl"]
STUDY_SUMMARY_COLUMNS = ["method", "step", "seeds", "win_rate_mean", "win_rate_t_low", "win_rate_t_high", "kl_mean"]


@dataclass
class AlignDistilStudyConfig:
    """The ``diffdpo study-aligndistil`` recipe: AlignDistil vs DPO with the same pairs and steps, per step."""

    out_dir: str = field(default="runs/study_aligndistil_tiny", metadata=help_meta("runs, CSVs, PNG and summary.md go here"))
    world: str = field(default="runs/tiny_lm_world", metadata=help_meta("tiny world of seed 0; seed s uses <world>_seed<s>"))
    dpo_config: str = field(default="configs/lm_dpo_tiny.yaml", metadata=help_meta("DPO (baseline and teachers) training config"))
    methods: list[str] = field(default_factory=lambda: list(STUDY_METHODS), metadata=help_meta(
        "methods: " + ", ".join(STUDY_METHODS) + " (the AlignDistil ones reuse the DPO run as teacher)"))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=help_meta("seeds (world and training)"))
    steps: int = field(default=40, metadata=help_meta("optimizer steps of every method (and of the reverse DPO model)"))
    batch_size: int = field(default=16, metadata=help_meta("pairs (prompts) per step, every method"))
    eval_every: int = field(default=4, metadata=help_meta("gold win rate against the base every N steps"))
    eval_samples_per_prompt: int = field(default=32, metadata=help_meta("policy/base comparisons per held-out prompt"))
    max_new_tokens: int = field(default=16, metadata=help_meta("sampled tokens per completion (evaluation, on-policy)"))
    eval_seed: int = field(default=1234, metadata=help_meta("seed of the evaluation samples"))
    beta: float = field(default=0.1, metadata=help_meta("AlignDistil beta (the DPO config sets DPO's)"))
    beta2_off: float = field(default=10.0, metadata=help_meta("AlignDistil beta2, off-policy (paper 10)"))
    beta2_on: float = field(default=15.0, metadata=help_meta("AlignDistil beta2, on-policy (paper 15)"))
    lr: float = field(default=1.5e-3, metadata=help_meta("AlignDistil learning rate (DPO: the config's, 1.5e-3 shipped)"))
    teacher_steps: int = field(default=0, metadata=help_meta(
        "steps of the teachers (DPO and reverse DPO); 0 = steps (the DPO baseline run is the teacher)"))
    fast: bool = field(default=False, metadata=help_meta("tests: first seed only, 2 steps of 4, 4 comparisons per prompt"))

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in STUDY_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; use some of {', '.join(STUDY_METHODS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        if self.fast:
            self.seeds, self.steps, self.batch_size, self.eval_every = self.seeds[:1], 2, 4, 1
            self.eval_samples_per_prompt, self.max_new_tokens = 4, 8
        if self.fast and self.teacher_steps:
            self.teacher_steps = 1
        if self.teacher_steps < 0 or min(self.steps, self.batch_size, self.eval_every, self.eval_samples_per_prompt) < 1:
            raise ValueError("steps, batch_size, eval_every and eval_samples_per_prompt must be >= 1, teacher_steps >= 0")


def _seed_runs(cfg: AlignDistilStudyConfig, seed: int) -> list[dict[str, Any]]:
    """Every method of one seed: DPO (evaluated; it is also the teacher), reverse DPO, AlignDistil off/on."""
    from transformers import AutoModelForCausalLM

    from diffdpo.adapters import eval_mode
    from diffdpo.recipes.studies.common import evaluate_vs_base
    from diffdpo.recipes.studies.online import world_root
    from diffdpo.toy.tiny_lm import build_world

    world = build_world(world_root(cfg, seed), seed=seed)
    root = Path(cfg.out_dir) / "runs" / f"seed{seed}"
    base = AutoModelForCausalLM.from_pretrained(world.model_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)

    def evaluate(model: Any) -> dict[str, float]:
        with torch.no_grad(), eval_mode(model):
            return evaluate_vs_base(model, base.to(next(model.parameters()).device), tokenizer,
                                    samples_per_prompt=cfg.eval_samples_per_prompt,
                                    max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed)

    acfg = AlignDistilConfig(output_dir=str(root), world=str(world.root), seed=seed, pairs=str(world.pairs),
                             base_model=str(world.model_dir), dpo_config=cfg.dpo_config, dpo_steps=cfg.steps,
                             beta=cfg.beta, steps=cfg.steps, batch_size=cfg.batch_size,
                             max_new_tokens=cfg.max_new_tokens, optim=OptimConfig(lr=cfg.lr, weight_decay=0.0,
                                                                                   lr_scheduler="constant"))
    rows: list[dict[str, Any]] = []
    dpo_dir, evals = train_dpo(dpo_train_config(acfg, world.pairs, world.model_dir, root / "dpo"),
                               eval_every=cfg.eval_every, evaluate=evaluate if "dpo" in cfg.methods else None)
    rows += [{"method": "dpo", "seed": seed, **e} for e in evals]
    distil = [m for m in cfg.methods if m != "dpo"]
    if distil:
        teacher = acfg
        if cfg.teacher_steps and cfg.teacher_steps != cfg.steps:  # teachers of their own length
            teacher = AlignDistilConfig(**{**asdict(acfg), "optim": acfg.optim, "dpo_steps": cfg.teacher_steps})
            dpo_dir, _ = train_dpo(dpo_train_config(teacher, world.pairs, world.model_dir, root / "teacher_dpo"))
        reverse = write_reverse_pairs(world.pairs, root / "reverse_pairs.jsonl")
        rev_dir, _ = train_dpo(dpo_train_config(teacher, reverse, world.model_dir, root / "reverse_dpo"))
    for method in distil:
        policy = "off" if method == "aligndistil_off" else "on"
        mcfg = AlignDistilConfig(**{**asdict(acfg), "optim": acfg.optim, "output_dir": str(root / method),
                                    "dpo_model": str(dpo_dir), "reverse_dpo_model": str(rev_dir), "policy": policy,
                                    "beta2": cfg.beta2_off if policy == "off" else cfg.beta2_on})
        report = run_aligndistil(mcfg, eval_every=cfg.eval_every, evaluate=evaluate)
        rows += [{"method": method, "seed": seed, **e} for e in report["evals"]]
    return rows


def summarise_study(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and step: mean win rate over seeds with its 95% t-interval, mean KL."""
    from diffdpo.recipes.studies.common import t_interval

    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for step in sorted({int(r["step"]) for r in rows if r["method"] == method}):
            mine = [r for r in rows if r["method"] == method and int(r["step"]) == step]
            mean, low, high = t_interval([float(r["win_rate"]) for r in mine])
            kl = sum(float(r["kl"]) for r in mine) / len(mine)
            out.append({"method": method, "step": step, "seeds": len(mine), "win_rate_mean": mean,
                        "win_rate_t_low": low, "win_rate_t_high": high, "kl_mean": kl})
    return out


def plot_study(summary: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Gold win rate vs base per training step, one line per method with its 95% t-band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method in dict.fromkeys(s["method"] for s in summary):
        mine = [s for s in summary if s["method"] == method]
        steps = [s["step"] for s in mine]
        ax.plot(steps, [s["win_rate_mean"] for s in mine], marker="o", ms=3, label=method)
        if all(s["seeds"] > 1 for s in mine):
            ax.fill_between(steps, [s["win_rate_t_low"] for s in mine], [s["win_rate_t_high"] for s in mine], alpha=0.2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(-0.02, 1.02)  # a t-band over 3 seeds can leave [0, 1]; the CSV keeps its bounds
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gold win rate vs base (ties = non-wins)")
    ax.set_title("tiny world: AlignDistil vs DPO, same pairs (95% t-bands)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def convergence(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean win rate over all evaluated steps (area under the curve / steps) and the first step whose
    mean reaches 95% of DPO's last mean (None if never)."""
    by = {m: [s for s in summary if s["method"] == m] for m in dict.fromkeys(s["method"] for s in summary)}
    target = 0.95 * by["dpo"][-1]["win_rate_mean"] if "dpo" in by else math.nan
    out = []
    for method, mine in by.items():
        first = next((s["step"] for s in mine if s["win_rate_mean"] >= target), None)
        out.append({"method": method, "auc": sum(s["win_rate_mean"] for s in mine) / len(mine),
                    "final": mine[-1]["win_rate_mean"], "first_step_at_target": first, "target": target})
    return out


def _study_markdown(cfg: AlignDistilStudyConfig, summary: list[dict[str, Any]], conv: list[dict[str, Any]]) -> str:
    def f(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    methods = list(dict.fromkeys(s["method"] for s in summary))
    cell = {(s["method"], s["step"]): s for s in summary}
    lines = ["| step | " + " | ".join(f"{m} (mean [95% t])" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for step in sorted({s["step"] for s in summary}):
        parts = []
        for m in methods:
            s = cell.get((m, step))
            parts.append("" if s is None else f"{f(s['win_rate_mean'])} [{f(s['win_rate_t_low'])}, {f(s['win_rate_t_high'])}]")
        lines.append(f"| {step} | " + " | ".join(parts) + " |")
    lines += ["", "| method | mean win rate over steps | final | first step >= 95% of DPO's final |", "|---|---|---|---|"]
    lines += [f"| {c['method']} | {f(c['auc'])} | {f(c['final'])} | {c['first_step_at_target'] or 'never'} |" for c in conv]
    teacher = cfg.teacher_steps or cfg.steps
    lines += ["", f"{len(cfg.seeds)} seeds; {cfg.steps} steps x {cfg.batch_size} pairs per method; teachers (DPO and "
              f"reverse DPO) trained {teacher} steps; "
              f"{cfg.eval_samples_per_prompt} comparisons per held-out prompt every {cfg.eval_every} steps.", "",
              "Command: `diffdpo study-aligndistil --config configs/study_aligndistil_tiny.yaml"
              + (f" teacher_steps={cfg.teacher_steps}`" if cfg.teacher_steps else "`"), "",
              f"Config: `{json.dumps(asdict(cfg))}`", ""]
    return "\n".join(lines)


def run_aligndistil_study(cfg: AlignDistilStudyConfig) -> list[dict[str, Any]]:
    """Every seed and method; results.csv, summary.csv, study.png, summary.md under ``out_dir``; the summary."""
    from diffdpo.recipes.studies.common import write_csv

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        rows += _seed_runs(cfg, seed)
        write_csv(out / "results.csv", rows, STUDY_RESULT_COLUMNS)  # after every seed: a crash keeps the rest
    summary = summarise_study(rows)
    write_csv(out / "summary.csv", summary, STUDY_SUMMARY_COLUMNS)
    plot_study(summary, out / "study.png")
    conv = convergence(summary)
    (out / "summary.md").write_text(_study_markdown(cfg, summary, conv))
    for c in conv:
        print(f"study-aligndistil {c['method']}: mean win rate over steps {c['auc']:.3f}, final {c['final']:.3f}, "
              f"first step at 95% of DPO's final: {c['first_step_at_target']}")
    return summary

"""Config dataclasses of the language-model task (the ``lm:`` section of a training config), and the
task's registry entry (:data:`TASK`, declared as a ``diffdpo.tasks`` entry point)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from diffdpo.adapters import LoraConfig
from diffdpo.config import help_meta
from diffdpo.task import TaskContext, TaskSpec


@dataclass
class LMModelConfig:
    pretrained: str = field(default="", metadata=help_meta("AutoModelForCausalLM path or hub id"))
    revision: str | None = field(default=None, metadata=help_meta("hub revision"))
    tokenizer: str | None = field(default=None, metadata=help_meta("tokenizer path or hub id; None = same as pretrained"))
    dtype: str = field(
        default="auto",
        metadata=help_meta("dtype of frozen weights (LoRA base, reference copy): float32 | bfloat16 | float16 | auto "
                    "(= the mixed-precision dtype); trained full weights stay float32"),
    )
    attn_implementation: str = field(
        default="sdpa", metadata=help_meta("eager | sdpa | flash_attention_2 | ...; packed layouts need sdpa/eager or flash")
    )
    trust_remote_code: bool = field(default=False, metadata=help_meta("allow custom modelling code from the hub"))
    disable_dropout: bool = field(default=True, metadata=help_meta("set every dropout to 0 (as TRL does for DPO)"))

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"lm.model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class LMLoraConfig(LoraConfig):
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata=help_meta("module names to adapt (not lm_head: log-probs read the head's weight directly)"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if "lm_head" in self.target_modules:
            raise ValueError("lm.lora.target_modules must not include lm_head (the chunked head reads its weight)")


@dataclass
class LMDataConfig:
    source: str = field(default="", metadata=help_meta(".jsonl/.json/.parquet file, save_to_disk folder, or datasets hub id"))
    split: str = field(default="train", metadata=help_meta("split of a folder or hub dataset"))
    max_rows: int | None = field(default=None, metadata=help_meta("use only the first N rows"))
    max_length: int | None = field(default=None, metadata=help_meta("max prompt + completion tokens per sequence"))
    max_prompt_length: int | None = field(default=None, metadata=help_meta("max prompt tokens (keeps the prompt's end)"))
    truncation_mode: Literal["keep_start", "keep_end"] = field(
        default="keep_start", metadata=help_meta("keep_start: cut completions' ends; keep_end: cut the prompt's start first")
    )
    add_eos: bool = field(default=True, metadata=help_meta("append EOS to non-chat completions lacking it (as TRL)"))


@dataclass
class LMReferenceConfig:
    kind: Literal["auto", "adapters_disabled", "frozen_copy", "precomputed"] = field(
        default="auto",
        metadata=help_meta("auto = adapters_disabled with LoRA, frozen_copy otherwise; precomputed = reference "
                    "log-probs computed once and cached on disk, no reference model kept in memory"),
    )
    cache_dir: str = field(default="runs/ref_logps_cache", metadata=help_meta("where precomputed reference log-probs go"))
    batch_size: int = field(default=16, metadata=help_meta("pairs per forward when precomputing"))


@dataclass
class LMMarginConfig:
    """MODPO's margin rewards (``loss.type=modpo``; Zhou et al. 2023, arXiv 2310.03708): one per objective other
    than the trained one, computed once per pair before training and cached on disk (:mod:`diffdpo.lm.margin`)."""

    kinds: list[str] = field(default_factory=list, metadata=help_meta(
        "per margin objective: implicit (beta * log(pi_k / pi_ref) of a DPO model) or reward_model (a reward model's score)"))
    models: list[str] = field(default_factory=list, metadata=help_meta(
        "per margin objective: a DPO model folder (full model or peft adapter) or a reward model folder"))
    reference: str = field(default="", metadata=help_meta("pi_ref of the implicit rewards; empty = lm.model.pretrained"))
    reward_model_class: str = field(default="diffdpo.rewards.lm:HFRewardModel", metadata=help_meta(
        "reward_model: 'package.module:Name' called as Name(folder, device=, batch_size=)(prompts, completions)"))
    beta: float = field(default=0.1, metadata=help_meta("beta of the implicit rewards (the margin DPO model's beta)"))
    cache_dir: str = field(default="runs/margin_cache", metadata=help_meta("where computed margin rewards are cached"))
    batch_size: int = field(default=16, metadata=help_meta("pairs per forward when computing them"))

    def __post_init__(self) -> None:
        if len(self.kinds) != len(self.models):
            raise ValueError(f"lm.margin.kinds ({len(self.kinds)}) and lm.margin.models ({len(self.models)}) must "
                             "have one entry per margin objective each")
        bad = [k for k in self.kinds if k not in ("implicit", "reward_model")]
        if bad:
            raise ValueError(f"lm.margin.kinds: unknown {bad}; use implicit or reward_model")
        if not (self.beta > 0 and self.batch_size >= 1):
            raise ValueError("lm.margin.beta must be > 0 and lm.margin.batch_size >= 1")


@dataclass
class LMConfig:
    model: LMModelConfig = field(default_factory=LMModelConfig)
    lora: LMLoraConfig = field(default_factory=LMLoraConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    reference: LMReferenceConfig = field(default_factory=LMReferenceConfig)
    layout: Literal["padded", "packed", "shared_prompt"] = field(
        default="shared_prompt",
        metadata=help_meta("padded (as TRL) | packed (padding-free) | shared_prompt (padding-free, each pair's prompt once)"),
    )
    average_log_prob: bool = field(
        default=False, metadata=help_meta("length-averaged sequence log-probs (SimPO, ORPO, RLHF-V dense DPO) instead of sums")
    )
    dense_gamma: float | None = field(
        default=None, metadata=help_meta("RLHF-V dense DPO: weight of corrected-segment tokens (> 1); None = off")
    )
    logits_chunk_size: int = field(default=1024, metadata=help_meta("target tokens per LM-head chunk (memory bound)"))
    topk: int = field(default=20, metadata=help_meta("k of the top-k entropy / mass over-optimisation indicators; 0 = off"))
    margin: LMMarginConfig = field(default_factory=LMMarginConfig)

    def __post_init__(self) -> None:
        if self.dense_gamma is not None and self.dense_gamma <= 0:
            raise ValueError(f"lm.dense_gamma must be > 0, got {self.dense_gamma}")
        if self.logits_chunk_size < 1 or self.topk < 0:
            raise ValueError("lm.logits_chunk_size must be >= 1 and lm.topk >= 0")

    def check_loss(self, loss: Any) -> None:
        """MODPO: margin models and weights agree (1 + K weights for K margin objectives), before any model loads."""
        k = len(self.margin.models)
        if loss.type != "modpo":
            if k:
                raise ValueError(f"lm.margin.models is set but loss.type={loss.type!r}; margin rewards are for modpo")
            return
        if not k:
            raise ValueError("loss.type=modpo needs the other objectives' margin rewards: set lm.margin.kinds and "
                             "lm.margin.models (one entry per objective)")
        if len(loss.modpo_weights) != k + 1:
            raise ValueError(f"loss.modpo_weights has {len(loss.modpo_weights)} entries but lm.margin.models names {k} "
                             f"margin objective(s): give {k + 1} weights [w_0 (trained objective), w_1 ... w_{k}]")


def _build_task(cfg: LMConfig, context: TaskContext) -> Any:
    from diffdpo.lm.task import LMPreferenceTask

    return LMPreferenceTask(cfg, **context.kwargs())


TASK = TaskSpec("lm", LMConfig, _build_task, default_beta=0.1,
                description="DPO-family (pairs) or KTO-family (labels) training of a causal LM (beta 0.1 as TRL)")

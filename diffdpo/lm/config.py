"""Config dataclasses of the language-model task (the ``lm:`` section of a training config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffdpo.config import help_meta


@dataclass
class LMModelConfig:
    pretrained: str = field(default="", metadata=help_meta("AutoModelForCausalLM path or hub id (empty with lm.tiny_world)"))
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
class LMLoraConfig:
    enabled: bool = field(default=False, metadata=help_meta("train LoRA adapters (reference = adapters disabled)"))
    rank: int = field(default=16, metadata=help_meta("LoRA rank r"))
    alpha: float | None = field(default=None, metadata=help_meta("LoRA alpha; None = 2 x rank"))
    dropout: float = field(default=0.0, metadata=help_meta("LoRA dropout"))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata=help_meta("module names to adapt (not lm_head: log-probs read the head's weight directly)"),
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lm.lora.rank must be >= 1, got {self.rank}")
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
    ipo_length_normalize: bool = field(default=True, metadata=help_meta("IPO: divide log-ratios by completion length (TRL)"))
    simpo_gamma: float = field(default=0.5, metadata=help_meta("SimPO target reward margin"))
    kto_desirable_weight: float = field(default=1.0, metadata=help_meta("KTO lambda_D"))
    kto_undesirable_weight: float = field(default=1.0, metadata=help_meta("KTO lambda_U"))
    logits_chunk_size: int = field(default=1024, metadata=help_meta("target tokens per LM-head chunk (memory bound)"))
    topk: int = field(default=20, metadata=help_meta("k of the top-k entropy / mass over-optimisation indicators; 0 = off"))
    tiny_world: str | None = field(
        default=None, metadata=help_meta("folder of the tiny offline LM world: built if missing; model and data default to it")
    )
    eval_samples_per_prompt: int = field(default=16, metadata=help_meta("tiny world: sampled reviews per held-out prompt"))

    def __post_init__(self) -> None:
        if self.dense_gamma is not None and self.dense_gamma <= 0:
            raise ValueError(f"lm.dense_gamma must be > 0, got {self.dense_gamma}")
        if self.logits_chunk_size < 1 or self.topk < 0:
            raise ValueError("lm.logits_chunk_size must be >= 1 and lm.topk >= 0")

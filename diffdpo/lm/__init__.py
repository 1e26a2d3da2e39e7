"""Language-model backend: preference data, padding-free sequence log-probs, references, the LM task.

An LM supplies the loss library (:mod:`diffdpo.losses`) with per-sequence completion log-probs of the
policy and the reference; everything else (loss types, f-divergences, KTO, ...) is shared with the
diffusion and 3D modalities. See ``docs/lm.md``.

* :mod:`diffdpo.lm.data`: formats, tokenisation (TRL's rules), truncation, skip reports, RLHF-V weights.
* :mod:`diffdpo.lm.packing`: padded / padding-free / shared-prompt batch layouts, block-aware attention.
* :mod:`diffdpo.lm.logps`: chunked LM head, per-sequence log-probs, top-k and KL indicators.
* :mod:`diffdpo.lm.reference`: precomputed reference log-probs cached on disk.
* :mod:`diffdpo.lm.task`: :class:`LMPreferenceTask`, the training loop's task (``task: lm`` in a config).
* :mod:`diffdpo.lm.tiny`: the tiny offline review world with a programmatic judge.
"""

from __future__ import annotations

from typing import Any

from diffdpo.lm.config import LMConfig
from diffdpo.lm.data import TokenizedDataset, TokenizeOptions, load_preference_data
from diffdpo.lm.logps import CausalLMLogps, HeadSpec, TokenLogps, head_logps, sequence_logps
from diffdpo.lm.packing import Group, TokenBatch, collate_groups, prepare_for_packing

__all__ = [
    "CausalLMLogps",
    "Group",
    "HeadSpec",
    "LMConfig",
    "LMPreferenceTask",
    "TokenBatch",
    "TokenLogps",
    "TokenizeOptions",
    "TokenizedDataset",
    "collate_groups",
    "head_logps",
    "load_preference_data",
    "prepare_for_packing",
    "sequence_logps",
]


def __getattr__(name: str) -> Any:
    # The task imports diffdpo.train, which imports diffdpo.lm.config: load it on first use only.
    if name == "LMPreferenceTask":
        from diffdpo.lm.task import LMPreferenceTask

        return LMPreferenceTask
    raise AttributeError(f"module 'diffdpo.lm' has no attribute {name!r}")

"""Language-model backend: preference data, padding-free sequence log-probs, references, the LM task.

An LM supplies the loss library (:mod:`diffdpo.losses`) with per-sequence completion log-probs of the
policy and the reference; everything else (loss types, f-divergences, KTO, ...) is shared with the
diffusion and 3D modalities. See ``docs/lm.md``.

* :mod:`diffdpo.lm.data`: formats, tokenisation (TRL's rules), truncation, skip reports, RLHF-V weights.
* :mod:`diffdpo.lm.packing`: padded / padding-free / shared-prompt batch layouts, block-aware attention.
* :mod:`diffdpo.lm.logps`: chunked LM head, per-sequence log-probs, top-k and KL indicators.
* :mod:`diffdpo.lm.reference`: precomputed reference log-probs cached on disk.
* :mod:`diffdpo.lm.task`: :class:`LMPreferenceTask`, the training loop's task (``task: lm`` in a config).

The tiny offline review world with its judge is an embedded world: :mod:`diffdpo.toy.tiny_lm`.
"""

from __future__ import annotations

from diffdpo.lm.config import LMConfig
from diffdpo.lm.data import TokenizedDataset, TokenizeOptions, load_preference_data
from diffdpo.lm.logps import CausalLMLogps, HeadSpec, TokenLogps, head_logps, sequence_logps
from diffdpo.lm.packing import Group, TokenBatch, collate_groups, prepare_for_packing
from diffdpo.lm.task import LMPreferenceTask

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


"""Batch layouts for sequence log-probs: padded, padding-free (packed) and shared-prompt packing.

A *group* is one prompt with one or more completions: a preference pair is a group with two
completions (chosen, rejected), an unpaired KTO/DRO sample a group with one. Every (group, branch) is
one *sequence* ``prompt + completion``; sequences are numbered branch-major, ``seq = branch * G + g``,
so for pairs the first G sequences are the chosen and the next G the rejected completions (as TRL
stacks them).

Three layouts of the same sequences, giving the same log-probs (tested to float32 round-off):

* ``padded``: one row per sequence, right-padded to the longest; what TRL's DPOTrainer runs.
* ``packed`` (padding-free): all sequences concatenated into one row of N real tokens, position ids
  restarting at 0 for every sequence, attention confined to each sequence. No pad token is computed.
* ``shared_prompt``: like ``packed``, but a pair's prompt appears once, followed by the chosen and
  then the rejected completion; the rejected completion attends to the prompt and to itself, never
  to the chosen one, and its positions continue from the prompt. A causal LM's prompt states do not
  depend on what follows, so this is exact, and the prompt is computed once instead of twice.

Packed layouts need attention that respects the sequence boundaries. For ``eager``/``sdpa`` models we
register the attention implementation :data:`VARLEN_ATTENTION` (sdpa per block, cost sum_i L_i^2; a
plain call without ``diffdpo_blocks`` behaves exactly like ``sdpa``). transformers' own packed path
(``position_ids`` resets with ``attention_mask=None``) also gives correct values, but builds an N x N
mask and attends over all N packed tokens, which is slower than padding on CPU; it is also silently
disabled when a KV cache is active (``use_cache=True``), a trap we avoid by always passing
``use_cache=False``. ``flash_attention_*`` models get the standard ``cu_seq_lens_*`` varlen kwargs
(``packed`` only: flash kernels cannot express the shared-prompt mask).

Log-probs are taken only at *target* positions: each completion token with the index of the position
that predicts it (the previous token of the same sequence; for the first completion token, the last
prompt token, which in ``shared_prompt`` both completions share). No prompt or pad position goes
through the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
from torch import Tensor

Layout = Literal["padded", "packed", "shared_prompt"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

#: Name under which :func:`register_varlen_attention` registers the block-aware sdpa attention.
VARLEN_ATTENTION = "diffdpo_varlen"

#: A packed block: (start offset, prompt length, completion lengths), all in tokens.
Block = tuple[int, int, tuple[int, ...]]


@dataclass
class Group:
    """One prompt and its completions (token ids), with optional per-token completion weights."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    completion_weights: list[list[float]] | None = None  # one weight per completion token (dense DPO)

    def __post_init__(self) -> None:
        if not self.completion_ids:
            raise ValueError("a group needs at least one completion")
        if self.completion_weights is not None:
            if len(self.completion_weights) != len(self.completion_ids) or any(
                len(w) != len(c) for w, c in zip(self.completion_weights, self.completion_ids)
            ):
                raise ValueError("completion_weights must give one weight per completion token")


@dataclass
class TokenBatch:
    """Model inputs for one forward pass plus the map from hidden states to target tokens.

    ``source_index`` indexes the flattened hidden states ``(rows * width, d)``: the position whose
    next-token distribution scores ``labels[m]``. ``sequence_index[m]`` says which sequence the
    target belongs to, so per-sequence sums are one ``index_add``.
    """

    layout: str
    input_ids: Tensor  # (rows, width)
    position_ids: Tensor  # (rows, width)
    attention_mask: Tensor | None  # (rows, width), padded layout only
    blocks: list[Block] | None  # packed layouts only
    source_index: Tensor  # (M,) long
    labels: Tensor  # (M,) long
    token_weights: Tensor  # (M,) float32
    sequence_index: Tensor  # (M,) long
    num_sequences: int
    completion_lengths: Tensor  # (S,) completion tokens scored per sequence
    sequence_lengths: Tensor  # (S,) prompt + completion tokens per sequence (prompt counted per sequence)
    max_block_length: int = 0  # longest block (flash varlen kwargs)
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Real tokens of all sequences, prompts counted once per sequence (the layout-free workload)."""
        return int(self.sequence_lengths.sum())

    @property
    def computed_positions(self) -> int:
        """Positions the backbone actually computes (pads included, shared prompts once)."""
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> TokenBatch:
        move = {
            name: getattr(self, name).to(device)
            for name in ("input_ids", "position_ids", "source_index", "labels", "token_weights", "sequence_index")
        }
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        extra = {k: v.to(device) for k, v in self.extra.items()}
        return replace(self, attention_mask=mask, extra=extra, **move)

    def model_kwargs(self, attn_implementation: str) -> dict:
        """Keyword arguments for the transformers backbone under ``attn_implementation``."""
        kwargs: dict = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.layout == "padded":
            kwargs["attention_mask"] = self.attention_mask
            return kwargs
        assert self.blocks is not None
        if attn_implementation.startswith("flash"):
            if any(len(b[2]) > 1 for b in self.blocks):
                raise ValueError(
                    "layout='shared_prompt' needs the block-aware attention (eager/sdpa models); flash attention "
                    "kernels cannot express it. Use lm.layout=packed with flash attention."
                )
            cu = torch.tensor([0] + [b[0] + b[1] + b[2][0] for b in self.blocks], dtype=torch.int32)
            cu = cu.to(self.input_ids.device)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_block_length,
                          max_length_k=self.max_block_length)
            return kwargs
        if attn_implementation != VARLEN_ATTENTION:
            raise ValueError(
                f"a packed batch needs attn_implementation={VARLEN_ATTENTION!r} (see diffdpo.lm.packing."
                f"prepare_for_packing) or flash attention; the model uses {attn_implementation!r}"
            )
        kwargs["diffdpo_blocks"] = self.blocks
        return kwargs


def collate_groups(
    groups: Sequence[Group], layout: Layout, pad_token_id: int = 0, pad_to_multiple_of: int | None = None
) -> TokenBatch:
    """Lay out ``groups`` (all with the same number of completions) for one forward pass."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; choose one of {', '.join(LAYOUTS)}")
    if not groups:
        raise ValueError("cannot collate an empty list of groups")
    branches = len(groups[0].completion_ids)
    if any(len(g.completion_ids) != branches for g in groups):
        raise ValueError("every group of a batch must have the same number of completions")
    n_groups = len(groups)
    # sequences in branch-major order: seq = branch * G + g
    seqs = [(g, b) for b in range(branches) for g in range(n_groups)]
    seq_lens = torch.tensor([len(groups[g].prompt_ids) + len(groups[g].completion_ids[b]) for g, b in seqs])
    if layout == "padded":
        return _collate_padded(groups, seqs, seq_lens, pad_token_id, pad_to_multiple_of)
    return _collate_packed(groups, seqs, seq_lens, shared=layout == "shared_prompt")


def _weights(group: Group, branch: int) -> list[float]:
    if group.completion_weights is None:
        return [1.0] * len(group.completion_ids[branch])
    return list(group.completion_weights[branch])


def _targets(completion: list[int], weights: list[float], first_source: int, next_source: int, seq: int,
             out: dict[str, list]) -> int:
    """Append the targets of one completion; returns how many were scored.

    ``first_source`` predicts completion token 0 (the last prompt token; -1 if the prompt is empty,
    then token 0 has no predictor and is not scored). Token j > 0 is predicted by ``next_source + j - 1``.
    """
    scored = 0
    for j, (tok, w) in enumerate(zip(completion, weights)):
        src = first_source if j == 0 else next_source + j - 1
        if src < 0:
            continue
        out["source"].append(src)
        out["labels"].append(tok)
        out["weights"].append(w)
        out["seq"].append(seq)
        scored += 1
    return scored


def _finish(layout: str, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None,
            blocks: list[Block] | None, t: dict[str, list], scored: list[int], seq_lens: Tensor,
            max_block: int = 0) -> TokenBatch:
    return TokenBatch(
        layout=layout, input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        blocks=blocks, source_index=torch.tensor(t["source"], dtype=torch.long),
        labels=torch.tensor(t["labels"], dtype=torch.long),
        token_weights=torch.tensor(t["weights"], dtype=torch.float32),
        sequence_index=torch.tensor(t["seq"], dtype=torch.long), num_sequences=len(scored),
        completion_lengths=torch.tensor(scored, dtype=torch.long), sequence_lengths=seq_lens,
        max_block_length=max_block,
    )


def _collate_padded(groups: Sequence[Group], seqs: list[tuple[int, int]], seq_lens: Tensor, pad_token_id: int,
                    pad_to_multiple_of: int | None) -> TokenBatch:
    width = int(seq_lens.max())
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows = len(seqs)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    t: dict[str, list] = {"source": [], "labels": [], "weights": [], "seq": []}
    scored = []
    for s, (g, b) in enumerate(seqs):
        group = groups[g]
        p, comp = group.prompt_ids, group.completion_ids[b]
        ids = p + comp
        input_ids[s, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[s, : len(ids)] = 1
        base = s * width
        scored.append(_targets(comp, _weights(group, b), base + len(p) - 1 if p else -1, base + len(p), s, t))
    position_ids = torch.arange(width).expand(rows, width).clone()
    return _finish("padded", input_ids, position_ids, attention_mask, None, t, scored, seq_lens)


def _collate_packed(groups: Sequence[Group], seqs: list[tuple[int, int]], seq_lens: Tensor,
                    shared: bool) -> TokenBatch:
    n_groups = len(groups)
    ids: list[int] = []
    pos: list[int] = []
    blocks: list[Block] = []
    t: dict[str, list] = {"source": [], "labels": [], "weights": [], "seq": []}
    scored_by_seq: dict[int, int] = {}
    branches = len(groups[0].completion_ids)
    max_block = 0

    def add_block(g: int, branch_ids: list[int]) -> None:
        nonlocal max_block
        group = groups[g]
        p = group.prompt_ids
        start = len(ids)
        ids.extend(p)
        pos.extend(range(len(p)))
        lens = []
        for b in branch_ids:
            comp = group.completion_ids[b]
            comp_start = len(ids)
            ids.extend(comp)
            pos.extend(range(len(p), len(p) + len(comp)))
            seq = b * n_groups + g
            scored_by_seq[seq] = _targets(comp, _weights(group, b), start + len(p) - 1 if p else -1, comp_start,
                                          seq, t)
            lens.append(len(comp))
        blocks.append((start, len(p), tuple(lens)))
        max_block = max(max_block, len(p) + max(lens))

    if shared:
        for g in range(n_groups):
            add_block(g, list(range(branches)))
    else:
        for g, b in seqs:
            add_block(g, [b])
    input_ids = torch.tensor(ids, dtype=torch.long)[None]  # (1, N)
    position_ids = torch.tensor(pos, dtype=torch.long)[None]  # (1, N)
    scored = [scored_by_seq[s] for s in range(len(seqs))]
    layout = "shared_prompt" if shared else "packed"
    return _finish(layout, input_ids, position_ids, None, blocks, t, scored, seq_lens, max_block)


# ------------------------------------------------------------------------------------------------
# block-aware attention for eager/sdpa models


def varlen_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, diffdpo_blocks: list[Block] | None = None,
                             **kwargs) -> tuple[Tensor, None]:
    """sdpa attention confined to packed blocks; plain sdpa when no blocks are given.

    ``query``/``key``/``value``: (1, H, N, D) for a packed row. For a block (start, P, (C0, C1, ...)),
    the prompt and the first completion attend causally among themselves; completion j > 0 attends to
    the prompt and causally to itself (a bottom-right-aligned causal mask over ``[prompt, completion_j]``).
    Returns (1, N, H, D) like transformers' attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if diffdpo_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch must be one row, got query of shape {tuple(query.shape)}")
    sdpa_kwargs = {k: v for k, v in kwargs.items() if k in ("dropout", "scaling")}
    outs: list[Tensor] = []
    for start, p, lens in diffdpo_blocks:
        end0 = start + p + lens[0]
        o, _ = sdpa_attention_forward(module, query[:, :, start:end0], key[:, :, start:end0],
                                      value[:, :, start:end0], None, **sdpa_kwargs)
        outs.append(o)  # (1, P + C0, H, D)
        b0 = end0
        for c in lens[1:]:
            q = query[:, :, b0 : b0 + c]
            k = torch.cat([key[:, :, start : start + p], key[:, :, b0 : b0 + c]], dim=2)
            v = torch.cat([value[:, :, start : start + p], value[:, :, b0 : b0 + c]], dim=2)
            qi = torch.arange(c, device=query.device)[:, None]
            ki = torch.arange(p + c, device=query.device)[None, :]
            mask = (ki < p) | (ki - p <= qi)  # (C, P + C): the whole prompt, causal within the completion
            o, _ = sdpa_attention_forward(module, q, k, v, mask[None, None], **sdpa_kwargs)
            outs.append(o)  # (1, C, H, D)
            b0 += c
    return torch.cat(outs, dim=1), None


def _varlen_mask(*args, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """Mask builder for :data:`VARLEN_ATTENTION`: none for packed rows (blocks say it all), sdpa's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register :data:`VARLEN_ATTENTION` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


def prepare_for_packing(model: torch.nn.Module, layout: Layout) -> str:
    """Switch an eager/sdpa ``model`` to :data:`VARLEN_ATTENTION` for packed layouts; returns the implementation.

    Padded layouts and flash-attention models are left alone. Other implementations (flex, paged, ...)
    cannot run packed batches here; that is an error that says what to do.
    """
    impl = model.config._attn_implementation
    if layout == "padded" or impl.startswith("flash") or impl == VARLEN_ATTENTION:
        return impl
    if impl not in ("eager", "sdpa"):
        raise ValueError(
            f"lm.layout={layout!r} needs an eager, sdpa or flash_attention model; this one uses {impl!r}. "
            "Load it with attn_implementation='sdpa' or use lm.layout=padded."
        )
    register_varlen_attention()
    model.set_attn_implementation(VARLEN_ATTENTION)
    return VARLEN_ATTENTION

"""Preference data for language models: loading, tokenisation, truncation, dense-DPO weights.

Formats (the common ones, as TRL names them):

* **standard pairs**: ``prompt``, ``chosen``, ``rejected`` strings;
* **conversational pairs**: ``prompt``, ``chosen``, ``rejected`` as lists of ``{"role", "content"}``
  messages (the tokenizer's chat template is applied); the prompt may be implicit, i.e. ``chosen`` and
  ``rejected`` are whole conversations sharing their first turns, which become the prompt;
* **unpaired** (KTO, DRO): ``prompt``, ``completion`` and ``label`` (bool for KTO, a float reward for
  DRO). Paired data can be unpaired on load (chosen -> True, rejected -> False), as TRL does for KTO.

Sources: a local ``.jsonl``/``.json``/``.parquet`` file, a folder written by
``datasets.Dataset.save_to_disk``, a ``datasets`` hub id (``name`` or ``name:split``), a
``datasets.Dataset``, or a list of dicts.

Tokenisation follows TRL so our batches equal DPOTrainer's token for token: the prompt and
prompt + completion are tokenised separately, the completion starts where they diverge (token merges
across the boundary stay in the completion), and for standard data an EOS token is appended to each
completion that lacks it.

Truncation rules, applied per example in this order:

1. ``max_prompt_length``: a longer prompt keeps its *last* tokens (the context nearest the answer).
2. ``max_length`` (prompt + completion, per sequence):
   * ``truncation_mode="keep_start"`` (TRL's default): each completion is cut at its end so that
     prompt + completion fits; an example whose prompt alone fills ``max_length`` has no completion
     tokens left.
   * ``truncation_mode="keep_end"``: the prompt loses tokens from its start, the same number for the
     chosen and the rejected sequence (so both keep one shared prompt), enough for the longer one to
     fit; a completion longer than ``max_length`` is then cut at its end as well. (TRL's ``keep_end``
     slices each sequence independently, which can give chosen and rejected different prompts.)
3. An example left with an empty completion (after truncation, or given empty) cannot be scored: it
   is **skipped and reported** (count, row numbers and reason in :attr:`TokenizedDataset.skipped`, and a
   warning), never turned into a zero-length sequence whose averaged log-prob would be 0/0 = NaN.

Dense DPO (RLHF-V, Yu et al. 2023, "RLHF-V: Towards Trustworthy MLLMs via Behavior Alignment from
Fine-grained Correctional Human Feedback", arXiv 2312.00849, Sec. 3.2 "DDPO"): the chosen response is a
correction of the rejected one; tokens in the corrected segments weigh ``gamma`` (> 1) and the rest 1,
and the sequence log-prob is the weighted mean (see :func:`diffdpo.lm.logps.sequence_logps`). Segments
are found by a token diff of chosen against rejected (:func:`correction_weights`): tokens of each side
that are not in a common run are the corrected (chosen) or the replaced (rejected) segments.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

TruncationMode = Literal["keep_start", "keep_end"]


@dataclass
class TokenizeOptions:
    """How examples become token ids (see the module docstring for the truncation rules)."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: TruncationMode = "keep_start"
    add_eos: bool = True  # standard (non-chat) data: append EOS to completions that lack it, as TRL does
    dense_gamma: float | None = None  # RLHF-V weight of corrected tokens; None = plain (all weights 1)

    def __post_init__(self) -> None:
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be keep_start or keep_end, got {self.truncation_mode!r}")
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.dense_gamma is not None and self.dense_gamma <= 0:
            raise ValueError(f"dense_gamma must be > 0, got {self.dense_gamma}")


@dataclass
class Skipped:
    """One example that was left out, and why."""

    row: int
    reason: str


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples (dicts of token-id lists) plus the report of skipped rows.

    Paired items: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (+ ``chosen_weights``,
    ``rejected_weights`` for dense DPO). Unpaired items: ``prompt_ids``, ``completion_ids``, ``label``.
    Every item carries ``index`` (its position here) and ``row`` (its row in the source).
    """

    items: list[dict[str, Any]]
    paired: bool
    skipped: list[Skipped] = field(default_factory=list)
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def fingerprint(self) -> str:
        """sha256 of every token id, weight and label: the data part of the reference-cache key."""
        h = hashlib.sha256()
        keys = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_weights", "rejected_weights",
                "completion_ids", "label")
        for item in self.items:
            h.update(json.dumps([item.get(k) for k in keys], separators=(",", ":")).encode())
        return h.hexdigest()

    def report(self, limit: int = 5) -> str:
        """A one-paragraph summary of skipped rows for people."""
        if not self.skipped:
            return f"{self.source}: {len(self.items)} examples, none skipped"
        shown = "; ".join(f"row {s.row}: {s.reason}" for s in self.skipped[:limit])
        more = f" (and {len(self.skipped) - limit} more)" if len(self.skipped) > limit else ""
        return (f"{self.source}: {len(self.items)} examples kept, {len(self.skipped)} skipped: {shown}{more}. "
                "Raise lm.data.max_length (or lower max_prompt_length) to keep them.")


# ------------------------------------------------------------------------------------------------
# loading rows


def load_rows(source: str | Path | Sequence[dict] | Any, split: str = "train") -> tuple[list[dict], str]:
    """Rows of a preference dataset as dicts, and a name for messages (see the module docstring)."""
    if isinstance(source, (list, tuple)):
        return [dict(r) for r in source], "<rows>"
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return source.to_list(), "<datasets.Dataset>"
    path = Path(str(source))
    if path.is_file():
        return _read_file(path), str(path)
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # DatasetDict
            if split not in ds:
                raise ValueError(f"{path} has splits {list(ds.keys())}, not {split!r}; set lm.data.split")
            ds = ds[split]
        return ds.to_list(), str(path)
    if str(source).endswith((".jsonl", ".json", ".parquet")):
        raise FileNotFoundError(f"preference data file {str(source)!r} does not exist")
    name, _, name_split = str(source).partition(":")
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split=name_split or split)
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do
        raise FileNotFoundError(
            f"could not load preference data {str(source)!r}: not a local file or folder, and loading it as a "
            f"datasets hub id failed ({type(exc).__name__}: {exc}). Give a .jsonl/.json/.parquet path."
        ) from exc
    return ds.to_list(), str(source)


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
    return rows


def is_conversational(value: Any) -> bool:
    """True for a list of ``{"role", "content"}`` messages."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _extract_implicit_prompt(row: dict) -> dict:
    """Conversational pairs without ``prompt``: the shared leading turns become the prompt (as TRL)."""
    chosen, rejected = row["chosen"], row["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def unpair_rows(rows: list[dict]) -> list[dict]:
    """Paired rows -> unpaired (chosen: label True, rejected: label False), rows interleaved."""
    out = []
    for row in rows:
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True, "_row": row.get("_row")})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False, "_row": row.get("_row")})
    return out


# ------------------------------------------------------------------------------------------------
# tokenisation


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tokenizer: Any, value: Any, *, generation_prompt: bool = False) -> list[int]:
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True,
                                            add_generation_prompt=generation_prompt)
        return list(out["input_ids"])
    return list(tokenizer(value)["input_ids"])


def _split_prompt(tokenizer: Any, prompt: Any, completions: list[Any], add_eos: bool
                  ) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, completion ids) with TRL's rule: completions start where the tokenisations diverge."""
    conversational = isinstance(prompt, list)
    if not conversational and add_eos and tokenizer.eos_token:
        completions = [c if c.endswith(tokenizer.eos_token) else c + tokenizer.eos_token for c in completions]
    prompt_ids = _ids(tokenizer, prompt, generation_prompt=True)
    full = [_ids(tokenizer, prompt + c) for c in completions]
    cut = min(_common_prefix(prompt_ids, f) for f in full)
    return prompt_ids[:cut], [f[cut:] for f in full]


def _truncate(prompt: list[int], comps: list[list[int]], weights: list[list[float]] | None,
              opts: TokenizeOptions) -> tuple[list[int], list[list[int]], list[list[float]] | None]:
    if opts.max_prompt_length is not None and len(prompt) > opts.max_prompt_length:
        prompt = prompt[len(prompt) - opts.max_prompt_length :]
    if opts.max_length is None:
        return prompt, comps, weights
    if opts.truncation_mode == "keep_end":
        excess = max(len(prompt) + len(c) for c in comps) - opts.max_length
        if excess > 0:
            prompt = prompt[min(excess, len(prompt)) :]
    room = max(opts.max_length - len(prompt), 0)
    comps = [c[:room] for c in comps]
    if weights is not None:
        weights = [w[:room] for w in weights]
    return prompt, comps, weights


def correction_weights(chosen: list[int], rejected: list[int], gamma: float) -> tuple[list[float], list[float]]:
    """RLHF-V token weights: ``gamma`` on the corrected (chosen) / replaced (rejected) segments, else 1.

    The segments are the tokens outside the common runs of a diff of the two completions (difflib,
    autojunk off so repeated tokens are not dropped from the matching).
    """
    w_c, w_r = [gamma] * len(chosen), [gamma] * len(rejected)
    matcher = difflib.SequenceMatcher(a=chosen, b=rejected, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        w_c[a : a + size] = [1.0] * size
        w_r[b : b + size] = [1.0] * size
    return w_c, w_r


def tokenize_pairs(rows: list[dict], tokenizer: Any, opts: TokenizeOptions, source: str = "<rows>"
                   ) -> TokenizedDataset:
    """Tokenise standard or conversational preference pairs; skipped rows are reported, not dropped silently."""
    items: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    for n, row in enumerate(rows):
        row_no = row.get("_row", n)
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(f"{source}, row {row_no}: missing column(s) {', '.join(missing)}; preference pairs need "
                             f"prompt, chosen, rejected (got {', '.join(sorted(k for k in row if k != '_row'))})")
        if "prompt" not in row:
            if not is_conversational(row["chosen"]):
                raise ValueError(f"{source}, row {row_no}: no 'prompt' column; only conversational data may leave "
                                 "the prompt implicit")
            row = _extract_implicit_prompt(row)
        if is_conversational(row["chosen"]) != isinstance(row["prompt"], list):
            raise ValueError(f"{source}, row {row_no}: prompt and completions must both be strings or both be "
                             "message lists")
        if (isinstance(row["chosen"], str) and not row["chosen"]) or (isinstance(row["rejected"], str) and not row["rejected"]):
            skipped.append(Skipped(row_no, "empty chosen or rejected completion"))
            continue
        prompt, (chosen, rejected) = _split_prompt(tokenizer, row["prompt"], [row["chosen"], row["rejected"]],
                                                   opts.add_eos)
        weights = list(correction_weights(chosen, rejected, opts.dense_gamma)) if opts.dense_gamma else None
        prompt, (chosen, rejected), weights = _truncate(prompt, [chosen, rejected], weights, opts)
        if not chosen or not rejected:
            skipped.append(Skipped(row_no, f"completion empty after truncation (prompt {len(prompt)} tokens, "
                                           f"max_length {opts.max_length})"))
            continue
        item: dict[str, Any] = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "row": row_no}
        if weights is not None:
            item["chosen_weights"], item["rejected_weights"] = weights
        item["index"] = len(items)
        items.append(item)
    ds = TokenizedDataset(items, paired=True, skipped=skipped, source=source)
    if skipped:
        warnings.warn(ds.report(), stacklevel=2)
    return ds


def tokenize_unpaired(rows: list[dict], tokenizer: Any, opts: TokenizeOptions, source: str = "<rows>"
                      ) -> TokenizedDataset:
    """Tokenise unpaired (prompt, completion, label) rows for KTO/DRO-style losses."""
    items: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    for n, row in enumerate(rows):
        row_no = row.get("_row", n) if row.get("_row") is not None else n
        missing = [k for k in ("prompt", "completion", "label") if k not in row]
        if missing:
            raise ValueError(f"{source}, row {row_no}: missing column(s) {', '.join(missing)}; unpaired data needs "
                             f"prompt, completion, label (got {', '.join(sorted(k for k in row if k != '_row'))})")
        if isinstance(row["completion"], str) and not row["completion"]:
            skipped.append(Skipped(row_no, "empty completion"))
            continue
        prompt, (completion,) = _split_prompt(tokenizer, row["prompt"], [row["completion"]], opts.add_eos)
        prompt, (completion,), _ = _truncate(prompt, [completion], None, opts)
        if not completion:
            skipped.append(Skipped(row_no, f"completion empty after truncation (prompt {len(prompt)} tokens, "
                                           f"max_length {opts.max_length})"))
            continue
        label = row["label"]
        items.append({"prompt_ids": prompt, "completion_ids": completion,
                      "label": bool(label) if isinstance(label, bool) else float(label),
                      "row": row_no, "index": len(items)})
    ds = TokenizedDataset(items, paired=False, skipped=skipped, source=source)
    if skipped:
        warnings.warn(ds.report(), stacklevel=2)
    return ds


def load_preference_data(source: Any, tokenizer: Any, opts: TokenizeOptions, *, unpaired: bool = False,
                         split: str = "train", max_rows: int | None = None) -> TokenizedDataset:
    """Load, (un)pair and tokenise a preference dataset from any supported source."""
    rows, name = load_rows(source, split)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise ValueError(f"{name}: the dataset is empty")
    rows = [{**r, "_row": i} for i, r in enumerate(rows)]
    is_paired_data = "chosen" in rows[0] or "rejected" in rows[0]
    if unpaired:
        if is_paired_data:
            rows = [r if "prompt" in r else _extract_implicit_prompt(r) for r in rows]
            rows = unpair_rows(rows)
        return tokenize_unpaired(rows, tokenizer, opts, name)
    if not is_paired_data:
        columns = ", ".join(sorted(k for k in rows[0] if k != "_row"))
        raise ValueError(f"{name}: a paired loss needs chosen/rejected columns; got {columns}. "
                         "For (prompt, completion, label) data use a pointwise loss (loss.type=kto).")
    return tokenize_pairs(rows, tokenizer, opts, name)

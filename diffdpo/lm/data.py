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
completion that lacks it. Rows whose prompt loses its last token(s) that way (a token merging across the
boundary, or a chat template rendering the prompt alone differently) are counted and reported in one
warning per dataset, as TRL warns.

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

KTO's mismatched pairs (:func:`assign_kl_completions`) follow TRL's KTOTrainer: example i's KL sequence
is its own prompt followed by its neighbour's *whole* completion, then cut by the same ``max_length``
rule, so a completion is never reused as cut for the neighbour's prompt.

Bad input raises a one-line :class:`ValueError` naming the file, the line (while reading a ``.jsonl``)
or the row (counted from 0 over the data rows), and what to do.

Dense DPO (RLHF-V, Yu et al. 2023, "RLHF-V: Towards Trustworthy MLLMs via Behavior Alignment from
Fine-grained Correctional Human Feedback", arXiv 2312.00849, Sec. 3.1 "DDPO", eq. 5): the chosen response
is a correction of the rejected one; tokens in the corrected segments weigh ``gamma`` (> 1) and the rest 1,
on both sides, and the sequence log-prob is the weighted mean
``(sum_u log p + gamma * sum_c log p) / (|y_u| + gamma |y_c|)`` with ``lm.average_log_prob=true`` (the
paper's eq. 5; their code's README command uses the weighted sum, ``dpo_use_average False``), see
:func:`diffdpo.lm.logps.sequence_logps`. Where the segments come from:

* **annotated spans** (this module's format): a pair row may carry ``chosen_spans`` and/or
  ``rejected_spans``, each a list of ``[start, end)`` character offsets into that row's ``chosen`` /
  ``rejected`` string as given (before any EOS is appended), sorted, non-overlapping, ``0 <= start < end
  <= len(text)``; e.g. ``{"rejected": " good , purple and warm .", "rejected_spans": [[8, 14]]}``. A row that
  gives one side's spans and not the other's has no weighted token on the other side (``[]``). Spans map to
  completion tokens through the fast tokenizer's offsets of ``prompt + completion``: a token counts as inside
  when its characters overlap a span by at least one character (a token straddling a span edge is inside;
  zero-width tokens such as BOS never are). See :func:`span_token_weights`. Spans need string completions
  and a fast tokenizer (``return_offsets_mapping``); invalid spans raise a ``ValueError`` naming the file,
  row and key before any training;
* **token diff** (fallback, rows without either key): :func:`correction_weights`, the tokens outside the
  common runs of a diff of chosen against rejected; logged once per dataset ("no span annotations: dense
  weights from a token diff").

The released RLHF-V data (``openbmb/RLHF-V-Dataset``, formerly ``HaoyeZhang/RLHF-V-Dataset``) has no span
column: each row's ``text`` is a JSON string ``{"question", "chosen", "rejected"}`` (plus ``image``,
``ds_name``, ``origin_dataset``, ``origin_split``, ``idx``, ``image_path``), and their trainer finds the
segments by a token diff (Muffin ``utils/diff_lib.get_diff_ids``). Rows in that form are read here too
(``question`` becomes the prompt; the image is not used) and take the token-diff fallback.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

TruncationMode = Literal["keep_start", "keep_end"]
SPAN_KEYS = ("chosen_spans", "rejected_spans")
logger = logging.getLogger(__name__)


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
    ``rejected_weights`` for dense DPO). Unpaired items: ``prompt_ids``, ``completion_ids``, ``label``
    (+ ``uncut_prompt_ids`` / ``uncut_completion_ids``, the ids before the ``max_length`` cut where it
    changed them, and after :func:`assign_kl_completions` ``kl_completion_ids``, and ``kl_prompt_ids``
    where the KL sequence's prompt differs from ``prompt_ids``).
    Every item carries ``index`` (its position here) and ``row`` (its row in the source).
    """

    items: list[dict[str, Any]]
    paired: bool
    skipped: list[Skipped] = field(default_factory=list)
    source: str = "<memory>"
    options: TokenizeOptions = field(default_factory=TokenizeOptions)  # how the items were cut

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
    rows, name, _ = _load_rows(source, split)
    return rows, name


def _load_rows(source: Any, split: str) -> tuple[list[dict], str, list[int] | None]:
    """Rows, a name for messages, and each row's line in a ``.jsonl`` file (None for other sources)."""
    if isinstance(source, (list, tuple)):
        for n, r in enumerate(source):
            _check_is_object(r, f"<rows>, row {n}")
        return [dict(r) for r in source], "<rows>", None
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return source.to_list(), "<datasets.Dataset>", None
    path = Path(str(source))
    if path.is_file():
        rows, lines = _read_file(path)
        return rows, str(path), lines
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # DatasetDict
            if split not in ds:
                raise ValueError(f"{path} has splits {list(ds.keys())}, not {split!r}; set lm.data.split")
            ds = ds[split]
        return ds.to_list(), str(path), None
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
    return ds.to_list(), str(source), None


def _read_file(path: Path) -> tuple[list[dict], list[int] | None]:
    """Rows of a .parquet, .json (one array) or .jsonl file, and for .jsonl each row's line number."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), None
    data = path.read_bytes()
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 ({exc.reason}); "
                         "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}); fix the JSON array") from None
        for n, r in enumerate(rows):
            _check_is_object(r, f"{path}, row {n}")
        return rows, None
    rows, lines = [], []
    # split on "\n" only: JSON strings may hold raw U+2028 and other characters str.splitlines() splits on
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        _check_is_object(row, f"{path}, line {n}")
        rows.append(row)
        lines.append(n)
    return rows, lines


_JSON_TYPES = {list: "a JSON array", str: "a JSON string", int: "a JSON number", float: "a JSON number",
               bool: "a JSON boolean", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), f"a {type(value).__name__}")


def _where(source: str, row: dict, row_no: int) -> str:
    """Where a row is, for messages: the file, its row (from 0) and, for a .jsonl file, its line."""
    return f"{source}, {_row_label(row, row_no)}"


def _row_label(row: dict, row_no: int) -> str:
    line = row.get("_line")
    return f"row {row_no}" + (f" (line {line})" if line is not None else "")


def _columns(row: dict) -> str:
    return ", ".join(sorted(k for k in row if k not in ("_row", "_line")))


def _check_is_object(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        what = _json_type(row)
        raise ValueError(f"{where}: {what}, not a JSON object; each row must be an object such as "
                         '{"prompt": ..., "chosen": ..., "rejected": ...} or {"prompt": ..., "completion": ..., '
                         '"label": ...}')


def _check_texts(row: dict, keys: Sequence[str], where: str) -> None:
    """Prompt and completion values must be strings or lists of chat messages (dicts)."""
    for key in keys:
        value = row[key]
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
            continue
        what = "a list that is not {role, content} messages" if isinstance(value, list) else _json_type(value)
        raise ValueError(f"{where}: {key!r} is {what}; give a string or a list of {{role, content}} messages "
                         "(or drop the row)")


def _check_pair(row: dict, source: str, row_no: int) -> dict:
    """A preference pair with its columns checked and its prompt made explicit."""
    where = _where(source, row, row_no)
    if "chosen" not in row and "rejected" not in row and "text" in row:
        row = _from_rlhfv_text(row, where)
    for key in SPAN_KEYS:
        if key in row and key.removesuffix("_spans") not in row:
            raise ValueError(f"{where}: {key!r} given without a {key.removesuffix('_spans')!r} completion to point "
                             f"into; add {key.removesuffix('_spans')!r} or drop {key!r}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}; preference pairs need "
                         f"prompt, chosen, rejected (got {_columns(row)})")
    _check_texts(row, [k for k in ("prompt", "chosen", "rejected") if k in row], where)
    if "prompt" not in row:
        if not is_conversational(row["chosen"]):
            raise ValueError(f"{where}: no 'prompt' column; only conversational data may leave the prompt implicit")
        row = _extract_implicit_prompt(row)
    if is_conversational(row["chosen"]) != isinstance(row["prompt"], list):
        raise ValueError(f"{where}: prompt and completions must both be strings or both be message lists")
    return row


def _from_rlhfv_text(row: dict, where: str) -> dict:
    """A row of the RLHF-V release (``text`` = JSON ``{"question", "chosen", "rejected"}``) as a standard pair."""
    try:
        text = json.loads(row["text"]) if isinstance(row["text"], str) else row["text"]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: 'text' is not JSON ({exc.msg}); RLHF-V rows hold a JSON string with "
                         "question, chosen and rejected") from None
    if not isinstance(text, dict) or not all(k in text for k in ("question", "chosen", "rejected")):
        raise ValueError(f"{where}: 'text' lacks question/chosen/rejected; give prompt, chosen, rejected columns or "
                         "an RLHF-V 'text' JSON with those three keys")
    return {**row, "prompt": text["question"], "chosen": text["chosen"], "rejected": text["rejected"]}


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
        where = {"_row": row.get("_row")} | ({"_line": row["_line"]} if "_line" in row else {})
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True, **where})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False, **where})
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
                  ) -> tuple[list[int], list[list[int]], list[int]]:
    """(prompt ids, completion ids, prompt ids left out) with TRL's rule: completions start where the
    tokenisations of the prompt and of prompt + completion diverge (not always at the prompt's end)."""
    conversational = isinstance(prompt, list)
    if not conversational:
        completions = [_with_eos(tokenizer, c, add_eos) for c in completions]
    prompt_ids = _ids(tokenizer, prompt, generation_prompt=True)
    full = [_ids(tokenizer, prompt + c) for c in completions]
    cut = min(_common_prefix(prompt_ids, f) for f in full)
    return prompt_ids[:cut], [f[cut:] for f in full], prompt_ids[cut:]


def _warn_merged(source: str, merged: dict[str, list[int]], total: int, tokenizer: Any) -> None:
    """One warning per dataset for rows whose prompt lost its last token(s) to the completion."""
    if not merged:
        return
    row, dropped = next(iter(merged.items()))
    warnings.warn(
        f"{source}: in {len(merged)} of {total} rows the tokenised prompt is not a prefix of the tokenised "
        f"prompt + completion (tokens merge across the boundary, or the chat template renders the prompt alone "
        f"differently), e.g. {row} loses {tokenizer.decode(dropped)!r} from its prompt; the completion starts "
        "where they diverge (as TRL), so training sees a different context than inference: end prompts on a token "
        "boundary (put the space at the start of the completion) or fix the chat template", stacklevel=3)


def _truncate(prompt: list[int], comps: list[list[int]], weights: list[list[float]] | None,
              opts: TokenizeOptions) -> tuple[list[int], list[list[int]], list[list[float]] | None]:
    return _fit_max_length(_cut_prompt(prompt, opts), comps, weights, opts)


def _cut_prompt(prompt: list[int], opts: TokenizeOptions) -> list[int]:
    """Rule 1: ``max_prompt_length`` keeps the prompt's last tokens."""
    if opts.max_prompt_length is not None and len(prompt) > opts.max_prompt_length:
        return prompt[len(prompt) - opts.max_prompt_length :]
    return prompt


def _fit_max_length(prompt: list[int], comps: list[list[int]], weights: list[list[float]] | None,
                    opts: TokenizeOptions) -> tuple[list[int], list[list[int]], list[list[float]] | None]:
    """Rule 2: prompt + each completion fits ``max_length`` (``truncation_mode`` says what is cut)."""
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
    autojunk off so repeated tokens are not dropped from the matching). This is the fallback for pairs
    without annotated spans. RLHF-V's own trainer (Muffin ``get_diff_ids``) differs in two ways: common runs
    shorter than 3 tokens count as changed, and only replacements (a changed run on both sides) are weighted,
    so a pure insertion or deletion gets no weight there; here it does.
    """
    w_c, w_r = [gamma] * len(chosen), [gamma] * len(rejected)
    matcher = difflib.SequenceMatcher(a=chosen, b=rejected, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        w_c[a : a + size] = [1.0] * size
        w_r[b : b + size] = [1.0] * size
    return w_c, w_r


def _check_spans(spans: Any, text: Any, key: str, where: str) -> list[tuple[int, int]]:
    """``[[start, end), ...]`` character spans of ``text``: sorted, non-overlapping, inside the text."""
    fix = f"give {key} as sorted, non-overlapping [start, end) character offsets into the completion string"
    if not isinstance(text, str):
        raise ValueError(f"{where}: {key!r} needs a string completion, got {_json_type(text)}; {fix}")
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"{where}: {key!r} is {_json_type(spans)}, not a list of [start, end] pairs; {fix}")
    out: list[tuple[int, int]] = []
    for span in spans:
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise ValueError(f"{where}: {key!r} holds {span!r}, not a [start, end] pair of integers; {fix}")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise ValueError(f"{where}: {key!r} span [{start}, {end}) is empty or outside the {len(text)} characters "
                             f"of the completion; {fix}")
        if out and start < out[-1][1]:
            raise ValueError(f"{where}: {key!r} span [{start}, {end}) overlaps or precedes [{out[-1][0]}, "
                             f"{out[-1][1]}); {fix}")
        out.append((start, end))
    return out


def _row_spans(row: dict, where: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
    """The row's checked (chosen, rejected) spans; None when it has neither key (token-diff fallback)."""
    if not any(k in row for k in SPAN_KEYS):
        return None
    chosen, rejected = (_check_spans(row.get(k) or [], row[k.removesuffix("_spans")], k, where) for k in SPAN_KEYS)
    return chosen, rejected


def _offsets(tokenizer: Any, text: str, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{where}: character spans need a fast tokenizer (offsets mapping); "
                         f"{type(tokenizer).__name__} is not one: load it with use_fast=True, or drop the span columns")
    enc = tokenizer(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _span_weights(tokenizer: Any, prompt: str, completion: str, completion_ids: list[int],
                  spans: Sequence[tuple[int, int]], gamma: float, where: str = "<text>") -> list[float]:
    """Weights of ``completion_ids`` (the last tokens of ``prompt + completion``): ``gamma`` on tokens whose
    characters overlap a span of ``completion`` (offsets relative to the completion), 1 elsewhere."""
    ids, offsets = _offsets(tokenizer, prompt + completion, where)
    n = len(completion_ids)
    if n == 0:
        return []
    if ids[len(ids) - n :] != completion_ids:
        raise ValueError(f"{where}: the completion's tokens differ between two tokenisations of prompt + completion; "
                         "the tokenizer is not deterministic, drop the span columns to use the token diff")
    base = len(prompt)
    shifted = [(base + s, base + e) for s, e in spans]
    weights = []
    for a, b in offsets[len(ids) - n :]:
        inside = a < b and any(a < e and b > s for s, e in shifted)  # overlap by >= 1 character
        weights.append(float(gamma) if inside else 1.0)
    return weights


def span_token_weights(tokenizer: Any, completion: str, spans: Sequence[Sequence[int]], gamma: float, *,
                       prompt: str = "") -> tuple[list[int], list[float]]:
    """Completion token ids and their RLHF-V dense-DPO weights (arXiv 2312.00849, eq. 5) for one completion.

    ``spans`` are ``[start, end)`` character offsets into ``completion``; a token weighs ``gamma`` when its
    characters overlap a span by at least one character, 1 otherwise. The tokens are those training sees:
    ``prompt + completion`` tokenised as one text, the completion starting where that tokenisation and the
    prompt's diverge (TRL's rule, :func:`tokenize_pairs`), no EOS appended. For display (e.g. the AlignDistil
    notebook) and tests; training gets the same weights through :func:`tokenize_pairs`.
    """
    checked = _check_spans([list(s) for s in spans], completion, "spans", "span_token_weights")
    _, (completion_ids,), _ = _split_prompt(tokenizer, prompt, [completion], add_eos=False)
    return completion_ids, _span_weights(tokenizer, prompt, completion, completion_ids, checked, gamma,
                                         "span_token_weights")


def _with_eos(tokenizer: Any, text: str, add_eos: bool) -> str:
    """The completion text :func:`_split_prompt` tokenises (EOS appended to standard data, as TRL)."""
    eos = tokenizer.eos_token
    return text if not (add_eos and eos) or text.endswith(eos) else text + eos


def tokenize_pairs(rows: list[dict], tokenizer: Any, opts: TokenizeOptions, source: str = "<rows>"
                   ) -> TokenizedDataset:
    """Tokenise standard or conversational preference pairs; skipped rows are reported, not dropped silently."""
    items: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    merged: dict[str, list[int]] = {}  # row -> prompt tokens left out (see _split_prompt)
    diffed = 0  # rows whose dense weights come from the token diff (no span annotations)
    for n, row in enumerate(rows):
        row_no = row.get("_row", n)
        row = _check_pair(row, source, row_no)
        where = _where(source, row, row_no)
        spans = _row_spans(row, where)  # checked before any training, with or without dense_gamma
        if (isinstance(row["chosen"], str) and not row["chosen"]) or (isinstance(row["rejected"], str) and not row["rejected"]):
            skipped.append(Skipped(row_no, "empty chosen or rejected completion"))
            continue
        prompt, (chosen, rejected), dropped = _split_prompt(tokenizer, row["prompt"], [row["chosen"], row["rejected"]],
                                                            opts.add_eos)
        if dropped:
            merged[_row_label(row, row_no)] = dropped
        weights = None
        if opts.dense_gamma and spans is None:
            weights = list(correction_weights(chosen, rejected, opts.dense_gamma))
            diffed += 1
        elif opts.dense_gamma:
            weights = [_span_weights(tokenizer, row["prompt"], _with_eos(tokenizer, row[k], opts.add_eos), ids, sp,
                                     opts.dense_gamma, where)
                       for k, ids, sp in (("chosen", chosen, spans[0]), ("rejected", rejected, spans[1]))]
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
    ds = TokenizedDataset(items, paired=True, skipped=skipped, source=source, options=opts)
    if diffed:
        logger.warning("%s: no span annotations: dense weights from a token diff (%d of %d rows; give chosen_spans / "
                       "rejected_spans to weigh the annotated segments)", source, diffed, len(rows))
    _warn_merged(source, merged, len(rows), tokenizer)
    if skipped:
        warnings.warn(ds.report(), stacklevel=2)
    return ds


def tokenize_unpaired(rows: list[dict], tokenizer: Any, opts: TokenizeOptions, source: str = "<rows>"
                      ) -> TokenizedDataset:
    """Tokenise unpaired (prompt, completion, label) rows for KTO/DRO-style losses."""
    items: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    merged: dict[str, list[int]] = {}  # row -> prompt tokens left out (see _split_prompt)
    for n, row in enumerate(rows):
        row_no = row.get("_row", n) if row.get("_row") is not None else n
        where = _where(source, row, row_no)
        missing = [k for k in ("prompt", "completion", "label") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing column(s) {', '.join(missing)}; unpaired data needs "
                             f"prompt, completion, label (got {_columns(row)})")
        _check_texts(row, ("prompt", "completion"), where)
        label = row["label"]
        if not isinstance(label, (bool, int, float)):
            raise ValueError(f"{where}: 'label' is {_json_type(label)}; give true/false (desirable or not) or a number")
        if isinstance(row["completion"], str) and not row["completion"]:
            skipped.append(Skipped(row_no, "empty completion"))
            continue
        prompt, (uncut,), dropped = _split_prompt(tokenizer, row["prompt"], [row["completion"]], opts.add_eos)
        if dropped:
            merged[_row_label(row, row_no)] = dropped
        uncut_prompt = _cut_prompt(prompt, opts)
        prompt, (completion,), _ = _fit_max_length(uncut_prompt, [uncut], None, opts)
        if not completion:
            skipped.append(Skipped(row_no, f"completion empty after truncation (prompt {len(prompt)} tokens, "
                                           f"max_length {opts.max_length})"))
            continue
        item = {"prompt_ids": prompt, "completion_ids": completion,
                "label": bool(label) if isinstance(label, bool) else float(label), "row": row_no, "index": len(items)}
        if prompt != uncut_prompt:  # kept for KTO's KL sequences, which are cut anew (assign_kl_completions)
            item["uncut_prompt_ids"] = uncut_prompt
        if completion != uncut:
            item["uncut_completion_ids"] = uncut
        items.append(item)
    ds = TokenizedDataset(items, paired=False, skipped=skipped, source=source, options=opts)
    total = len({r["_row"] if r.get("_row") is not None else n for n, r in enumerate(rows)})
    _warn_merged(source, merged, total, tokenizer)
    if skipped:
        warnings.warn(ds.report(), stacklevel=2)
    return ds


def assign_kl_completions(ds: TokenizedDataset, chunk: int) -> None:
    """KTO's mismatched pairs, as TRL's KTOTrainer builds them: within each run of ``chunk`` consecutive
    examples, example i gets the completion of example i - 1 (the first gets the last's).

    The KL sequence is example i's prompt followed by the neighbour's whole completion (before any
    ``max_length`` cut), cut by the dataset's own ``max_length`` rule, as TRL's collator cuts
    ``prompt_ids + KL_completion_ids``; reusing the neighbour's completion as cut for its own prompt
    would give sequences of the wrong length whenever prompt lengths differ.
    """
    opts, items = ds.options, ds.items
    for start in range(0, len(items), chunk):
        run = items[start : start + chunk]
        comps = [it.get("uncut_completion_ids", it["completion_ids"]) for it in run]
        for it, kl in zip(run, [comps[-1], *comps[:-1]]):
            prompt, (kl,), _ = _fit_max_length(it.get("uncut_prompt_ids", it["prompt_ids"]), [kl], None, opts)
            it["kl_completion_ids"] = kl
            if prompt != it["prompt_ids"]:  # keep_end: this prompt lost a different number of tokens
                it["kl_prompt_ids"] = prompt
            else:
                it.pop("kl_prompt_ids", None)


def load_preference_data(source: Any, tokenizer: Any, opts: TokenizeOptions, *, unpaired: bool = False,
                         split: str = "train", max_rows: int | None = None) -> TokenizedDataset:
    """Load, (un)pair and tokenise a preference dataset from any supported source."""
    rows, name, lines = _load_rows(source, split)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise ValueError(f"{name}: the dataset is empty")
    for i, r in enumerate(rows):
        _check_is_object(r, f"{name}, row {i}")
    rows = [{**r, "_row": i} | ({"_line": lines[i]} if lines else {}) for i, r in enumerate(rows)]
    is_paired_data = "chosen" in rows[0] or "rejected" in rows[0] or "text" in rows[0]  # "text": RLHF-V release
    if unpaired:
        if is_paired_data:
            rows = unpair_rows([_check_pair(r, name, r["_row"]) for r in rows])
        return tokenize_unpaired(rows, tokenizer, opts, name)
    if not is_paired_data:
        raise ValueError(f"{name}: a paired loss needs chosen/rejected columns; got {_columns(rows[0])}. "
                         "For (prompt, completion, label) data use a pointwise loss (loss.type=kto).")
    return tokenize_pairs(rows, tokenizer, opts, name)

"""Loading, tokenisation (TRL's rules), truncation and skip reports, dense-DPO weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffdpo.lm.data import (
    TokenizeOptions,
    correction_weights,
    load_preference_data,
    load_rows,
    tokenize_pairs,
)
from tests.lm.conftest import write_jsonl

PAIR = {"prompt": "review : the soup was", "chosen": " good and warm .", "rejected": " bad ."}


def ids(tok, text):
    return tok(text)["input_ids"]


def test_standard_pair_tokens(tokenizer):
    ds = tokenize_pairs([PAIR], tokenizer, TokenizeOptions())
    item = ds[0]
    assert item["prompt_ids"] == ids(tokenizer, PAIR["prompt"])  # BOS + prompt words
    assert tokenizer.decode(item["chosen_ids"]) == "good and warm . <eos>"  # EOS appended, as TRL
    assert tokenizer.decode(item["rejected_ids"]) == "bad . <eos>"
    assert item["prompt_ids"] + item["chosen_ids"] == ids(tokenizer, PAIR["prompt"] + PAIR["chosen"] + "<eos>")
    assert (item["index"], item["row"]) == (0, 0)


def test_conversational_pairs_explicit_and_implicit_prompt(tokenizer):
    user = [{"role": "user", "content": "review : the soup was"}]
    good, bad = [{"role": "assistant", "content": "good ."}], [{"role": "assistant", "content": "bad ."}]
    explicit = tokenize_pairs([{"prompt": user, "chosen": good, "rejected": bad}], tokenizer, TokenizeOptions())[0]
    implicit = tokenize_pairs([{"chosen": user + good, "rejected": user + bad}], tokenizer, TokenizeOptions())[0]
    assert explicit == implicit
    assert tokenizer.decode(explicit["prompt_ids"]).endswith("; assistant :")
    assert tokenizer.decode(explicit["chosen_ids"]) == "good . ;"  # chat template, no EOS added


def test_keep_start_truncation_cuts_completion_ends(tokenizer):
    p = len(ids(tokenizer, PAIR["prompt"]))
    item = tokenize_pairs([PAIR], tokenizer, TokenizeOptions(max_length=p + 2))[0]
    assert tokenizer.decode(item["chosen_ids"]) == "good and"
    assert tokenizer.decode(item["rejected_ids"]) == "bad ."


def test_keep_end_truncation_drops_prompt_start_equally(tokenizer):
    p = len(ids(tokenizer, PAIR["prompt"]))
    item = tokenize_pairs([PAIR], tokenizer, TokenizeOptions(max_length=p + 2, truncation_mode="keep_end"))[0]
    # chosen has 5 tokens (with EOS): the prompt loses 3 from its start, for both completions
    assert item["prompt_ids"] == ids(tokenizer, PAIR["prompt"])[3:]
    assert len(item["chosen_ids"]) == 5 and len(item["rejected_ids"]) == 3


def test_max_prompt_length_keeps_the_prompt_end(tokenizer):
    item = tokenize_pairs([PAIR], tokenizer, TokenizeOptions(max_prompt_length=2))[0]
    assert tokenizer.decode(item["prompt_ids"]) == "soup was"


def test_pairs_left_without_completion_are_skipped_and_reported(tokenizer):
    p = len(ids(tokenizer, PAIR["prompt"]))
    long_prompt = {**PAIR, "prompt": PAIR["prompt"] + " and the soup was"}
    rows = [PAIR, long_prompt, {**PAIR, "rejected": ""}]
    with pytest.warns(UserWarning, match="2 skipped"):
        ds = tokenize_pairs(rows, tokenizer, TokenizeOptions(max_length=p + 1), source="pairs.jsonl")
    assert len(ds) == 1 and [s.row for s in ds.skipped] == [1, 2]
    assert "completion empty after truncation" in ds.skipped[0].reason
    assert "empty chosen or rejected" in ds.skipped[1].reason
    assert "pairs.jsonl" in ds.report() and "row 1" in ds.report()


def test_files_unpairing_and_errors(tokenizer, tmp_path: Path):
    opts = TokenizeOptions()
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, PAIR])
    assert len(load_preference_data(path, tokenizer, opts)) == 2
    unpaired = load_preference_data(path, tokenizer, opts, unpaired=True)
    assert [it["label"] for it in unpaired] == [True, False, True, False]
    assert unpaired[1]["completion_ids"] == tokenize_pairs([PAIR], tokenizer, opts)[0]["rejected_ids"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([PAIR]), tmp_path / "pairs.parquet")
    assert load_rows(tmp_path / "pairs.parquet")[0] == [PAIR]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIR) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2"):
        load_rows(bad)
    with pytest.raises(ValueError, match="row 0: missing column.*rejected"):
        load_preference_data([{"prompt": "a", "chosen": "b"}], tokenizer, opts)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="pointwise loss"):
        load_preference_data([{"prompt": "a", "completion": "b", "label": True}], tokenizer, opts)


def test_correction_weights_mark_the_replaced_segments():
    """RLHF-V: chosen 'good and warm .' corrects rejected 'bad and cold .': only the changed words weigh gamma."""
    chosen, rejected = [10, 11, 12, 13], [20, 11, 21, 13]
    w_c, w_r = correction_weights(chosen, rejected, 5.0)
    assert w_c == [5.0, 1.0, 5.0, 1.0] and w_r == [5.0, 1.0, 5.0, 1.0]
    assert correction_weights([1, 2], [1, 2, 3], 2.0) == ([1.0, 1.0], [1.0, 1.0, 2.0])


def test_dense_weights_survive_tokenisation_and_truncation(tokenizer):
    row = {"prompt": "review : the soup was", "chosen": " good and warm .", "rejected": " bad and warm ."}
    item = tokenize_pairs([row], tokenizer, TokenizeOptions(dense_gamma=3.0))[0]
    assert item["chosen_weights"] == [3.0, 1.0, 1.0, 1.0, 1.0]  # good and warm . <eos>
    assert item["rejected_weights"] == [3.0, 1.0, 1.0, 1.0, 1.0]
    p = len(ids(tokenizer, row["prompt"]))
    cut = tokenize_pairs([row], tokenizer, TokenizeOptions(dense_gamma=3.0, max_length=p + 2))[0]
    assert cut["chosen_weights"] == [3.0, 1.0]


def test_fingerprint_changes_with_data(tokenizer):
    a = tokenize_pairs([PAIR], tokenizer, TokenizeOptions())
    b = tokenize_pairs([{**PAIR, "chosen": " good ."}], tokenizer, TokenizeOptions())
    assert a.fingerprint() == tokenize_pairs([PAIR], tokenizer, TokenizeOptions()).fingerprint() != b.fingerprint()

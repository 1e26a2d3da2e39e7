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


def test_prompt_tokens_merging_into_the_completion_warn_once_with_a_count(tokenizer, tmp_path: Path):
    """'... soup w' + 'as good .' tokenises as '... soup was good .': the prompt's last token changes, so the
    completion starts at 'was' (TRL's rule) and the prompt loses 'w'; one warning names the file and the count."""
    merged = {"prompt": "review : the soup w", "chosen": "as good .", "rejected": "as bad ."}
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, merged, PAIR, merged, merged])
    with pytest.warns(UserWarning) as record:
        ds = load_preference_data(path, tokenizer, TokenizeOptions())
    messages = [str(w.message) for w in record if "merge" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "pairs.jsonl" in messages[0] and "3 of 5 rows" in messages[0] and "row 1 (line 2)" in messages[0]
    assert tokenizer.decode(ds[1]["chosen_ids"]) == "was good . <eos>"
    with pytest.warns(UserWarning, match="3 of 5 rows"):  # unpaired (KTO): counted per source row
        load_preference_data(path, tokenizer, TokenizeOptions(), unpaired=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no merge, no warning
        load_preference_data(write_jsonl(tmp_path / "clean.jsonl", [PAIR]), tokenizer, TokenizeOptions())


@pytest.mark.parametrize("case", ["not_utf8", "chosen_null", "array_line", "bad_json", "missing_chosen",
                                  "label_null", "completion_null"])
def test_bad_jsonl_rows_raise_one_line_errors_naming_file_and_row(tokenizer, tmp_path: Path, case):
    """Each bad input gives a ValueError whose message is one line: the file, the line or row, what to do.
    Rows count data rows from 0; lines count the file's lines from 1 (the blank first line shifts them)."""
    lines = [json.dumps(PAIR)] * 3
    unpaired = case in ("label_null", "completion_null")
    if case == "not_utf8":
        lines[2] = json.dumps(PAIR).replace("soup", "caf\\u00e9")
        data = "\n".join(lines).encode().replace(b"caf\\u00e9", "café".encode("latin-1"))
        expected = r"line 4: .*UTF-8"
    elif case == "chosen_null":
        lines[2] = json.dumps({**PAIR, "chosen": None})
        expected = r"row 2 \(line 4\): 'chosen' is null"
    elif case == "array_line":
        lines[2] = json.dumps(["review", "good", "bad"])
        expected = r"line 4: .*array.*JSON object"
    elif case == "bad_json":
        lines[2] = "{oops"
        expected = r"line 4: not valid JSON"
    elif case == "missing_chosen":
        lines[2] = json.dumps({"prompt": "a", "rejected": "b"})
        expected = r"row 2 \(line 4\): missing column\(s\) chosen"
    elif case == "label_null":
        lines = [json.dumps({"prompt": "a", "completion": " b", "label": True}),
                 json.dumps({"prompt": "a", "completion": " b", "label": None})]
        expected = r"row 1 \(line 3\): 'label' is null"
    else:  # completion_null
        lines = [json.dumps({"prompt": "a", "completion": None, "label": True})]
        expected = r"row 0 \(line 2\): 'completion' is null"
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n" + (data if case == "not_utf8" else "\n".join(lines).encode()))  # a blank first line
    with pytest.raises(ValueError, match=r"data\.jsonl, " + expected) as info:
        load_preference_data(path, tokenizer, TokenizeOptions(), unpaired=unpaired)
    assert "\n" not in str(info.value)
    if case == "chosen_null":  # paired data unpaired for KTO is checked before unpairing
        with pytest.raises(ValueError, match=r"data\.jsonl, row 2 \(line 4\): 'chosen' is null"):
            load_preference_data(path, tokenizer, TokenizeOptions(), unpaired=True)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_kl_completions_are_the_neighbours_whole_completion_cut_for_this_prompt(tokenizer, mode):
    """KTO's mismatched pair i = prompt i + completion i-1 *before* its own cut, then cut to max_length."""
    from diffdpo.lm.data import assign_kl_completions, tokenize_unpaired

    rows = [{"prompt": "review : the soup was", "completion": " good , warm and calm .", "label": True},
            {"prompt": "review : review : review : the soup was", "completion": " bad .", "label": False},
            {"prompt": "review : the cafe was", "completion": " fun .", "label": True}]
    opts = TokenizeOptions(max_length=11, truncation_mode=mode)
    ds = tokenize_unpaired(rows, tokenizer, opts)
    assign_kl_completions(ds, chunk=3)
    full = [ids(tokenizer, r["prompt"] + r["completion"] + "<eos>") for r in rows]  # no merges: prompt is a prefix
    prompts = [ids(tokenizer, r["prompt"]) for r in rows]
    for i, neighbour in enumerate([2, 0, 1]):
        item = ds[i]
        kl_prompt = item.get("kl_prompt_ids", item["prompt_ids"])
        seq = kl_prompt + item["kl_completion_ids"]
        whole = prompts[i] + full[neighbour][len(prompts[neighbour]):]
        assert seq == (whole[:11] if mode == "keep_start" else whole[max(len(whole) - 11, 0):])
    # row 1 (prompt 10 tokens) gets row 0's completion (7 tokens), not as cut for row 0's prompt (5 tokens)
    if mode == "keep_start":
        assert len(ds[1]["kl_completion_ids"]) == 1 and "kl_prompt_ids" not in ds[1]
    else:  # its own sequence kept 8 prompt tokens; the KL sequence keeps 4 and the whole completion
        assert len(ds[1]["prompt_ids"]) == 8 and len(ds[1]["kl_prompt_ids"]) == 4
        assert len(ds[1]["kl_completion_ids"]) == 7

"""RLHF-V dense DPO from annotated spans: span -> token mapping, the weighted log-prob, bad spans, the fallback."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from diffdpo.lm.data import TokenizeOptions, load_preference_data, span_token_weights, tokenize_pairs
from diffdpo.lm.logps import CausalLMLogps, sequence_logps
from diffdpo.lm.packing import Group, collate_groups
from diffdpo.losses import preference_loss
from tests.lm.conftest import make_model, write_jsonl

PROMPT = "review : the soup was"
CORRUPTED = " good , hotel and warm ."  # "hotel" is the inserted wrong word: characters [8, 13)
CORRECTED = " good and warm ."


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A hand-made BPE without pre-tokenizer whose tokens cross word boundaries: 'good purple warm' ->
    goo | 'd p' | u | r | p | 'le w' | a | r | m, so the span of 'purple' [5, 11) starts inside 'd p' and ends
    inside 'le w'."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("good purple warm."))
    merges = [("o", "o"), ("g", "oo"), ("d", " "), ("d ", "p"), ("l", "e"), ("le", " "), ("le ", "w")]
    vocab = {c: i for i, c in enumerate(["<eos>", *chars, *("".join(m) for m in merges)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_tokens_straddling_a_span_edge_count_as_inside(bpe_tokenizer):
    text = "good purple warm"
    ids, weights = span_token_weights(bpe_tokenizer, text, [[5, 11]], 4.0)
    pieces = [bpe_tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert pieces == ["goo", "d p", "u", "r", "p", "le w", "a", "r", "m"]
    # 'd p' covers characters [3, 6) and overlaps [5, 11) by 'p'; 'le w' covers [9, 13) and overlaps by 'le'
    assert weights == [1.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0]
    # a span of one character inside a token marks that token only; spans ending at a token's start do not
    assert span_token_weights(bpe_tokenizer, text, [[4, 5]], 2.0)[1] == [1.0, 2.0] + [1.0] * 7  # the space
    assert span_token_weights(bpe_tokenizer, text, [[0, 3]], 2.0)[1] == [2.0] + [1.0] * 8  # 'goo' exactly


def test_spans_through_tokenize_pairs_with_a_prompt_and_eos(bpe_tokenizer):
    """Offsets are relative to the completion; the prompt and the appended EOS are never weighted."""
    row = {"prompt": ".", "chosen": "good warm", "rejected": "good purple warm", "rejected_spans": [[5, 11]]}
    item = tokenize_pairs([row], bpe_tokenizer, TokenizeOptions(dense_gamma=4.0))[0]
    assert bpe_tokenizer.convert_ids_to_tokens(item["rejected_ids"])[-1] == "<eos>"
    assert item["rejected_weights"] == [1.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    assert item["chosen_weights"] == [1.0] * len(item["chosen_ids"])  # no chosen_spans: nothing weighted there


def test_word_level_spans_both_sides(tokenizer):
    row = {"prompt": PROMPT, "chosen": " good and calm .", "rejected": " good and rude .",
           "chosen_spans": [[10, 14]], "rejected_spans": [[10, 14]]}
    item = tokenize_pairs([row], tokenizer, TokenizeOptions(dense_gamma=5.0))[0]
    assert item["chosen_weights"] == [1.0, 1.0, 5.0, 1.0, 1.0]  # good and calm . <eos>
    assert item["rejected_weights"] == [1.0, 1.0, 5.0, 1.0, 1.0]
    plain = tokenize_pairs([row], tokenizer, TokenizeOptions())[0]
    assert "chosen_weights" not in plain  # spans are read (and checked) but unused without dense_gamma


def test_weighted_log_prob_by_hand():
    """RLHF-V eq. 5 on both sides, gamma 5. Chosen tokens logp (-1, -2, -3), none corrected:
    mean = -6 / 3 = -2. Rejected tokens (-1, -4, -1) with the middle one corrected:
    weighted sum = -1 + 5 * -4 - 1 = -22, N = 2 + 5 * 1 = 7, weighted mean = -22 / 7.
    Reference all -2 (means -2, -2): DPO logit beta * ((-2 - -2) - (-22/7 - -2)) = 0.5 * 8/7 = 4/7,
    loss = log(1 + exp(-4/7))."""
    batch = collate_groups([Group([1], [[5, 6, 7], [5, 8, 7]], [[1.0, 1.0, 1.0], [1.0, 5.0, 1.0]])], "packed")
    policy = torch.tensor([-1.0, -2.0, -3.0, -1.0, -4.0, -1.0])  # chosen targets then rejected targets
    mean = sequence_logps(policy, batch, average=True)
    assert mean.tolist() == pytest.approx([-2.0, -22 / 7])
    assert sequence_logps(policy, batch).tolist() == pytest.approx([-6.0, -22.0])  # RLHF-V's README command: sum
    ref = sequence_logps(torch.full((6,), -2.0), batch, average=True)
    loss = preference_loss(mean[:1], mean[1:], ref[:1], ref[1:], beta=0.5).losses
    assert loss.item() == pytest.approx(torch.log1p(torch.exp(torch.tensor(-4 / 7))).item())


def test_dense_logps_of_a_real_model_match_an_independent_computation(tokenizer):
    """Packed weighted means from span weights == full-logits token log-probs averaged with the same weights."""
    row = {"prompt": PROMPT, "chosen": CORRECTED, "rejected": CORRUPTED, "rejected_spans": [[8, 13]]}
    item = tokenize_pairs([row], tokenizer, TokenizeOptions(dense_gamma=3.0))[0]
    model = make_model(tokenizer).eval()
    batch = collate_groups([Group(item["prompt_ids"], [item["chosen_ids"], item["rejected_ids"]],
                                  [item["chosen_weights"], item["rejected_weights"]])], "padded", tokenizer.pad_token_id)

    with torch.no_grad():
        ours = sequence_logps(CausalLMLogps(model, topk=0)(batch).logps, batch, average=True)
        expected = []
        for comp, w in ((item["chosen_ids"], item["chosen_weights"]), (item["rejected_ids"], item["rejected_weights"])):
            ids = torch.tensor([item["prompt_ids"] + comp])
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            tok = logp[len(item["prompt_ids"]) - 1 :]
            wt = torch.tensor(w)
            expected.append(float((tok * wt).sum() / wt.sum()))
    assert item["rejected_weights"].count(3.0) == 1  # 'hotel' only
    assert ours.tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("spans", "message"), [
    ([[8, 40]], r"span \[8, 40\) is empty or outside the 24 characters"),
    ([[-1, 3]], r"span \[-1, 3\) is empty or outside"),
    ([[5, 5]], r"span \[5, 5\) is empty"),
    ([[2, 9], [8, 13]], r"span \[8, 13\) overlaps or precedes \[2, 9\)"),
    ([[8, 13], [1, 3]], r"overlaps or precedes"),
    ([[8, "13"]], "not a \\[start, end\\] pair of integers"),
    ("8-13", "not a list of \\[start, end\\] pairs"),
])
def test_bad_spans_name_the_file_row_and_key(tmp_path, tokenizer, spans, message):
    good = {"prompt": PROMPT, "chosen": CORRECTED, "rejected": CORRUPTED, "rejected_spans": [[8, 13]]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, {**good, "rejected_spans": spans}])
    with pytest.raises(ValueError, match=rf"pairs\.jsonl, row 1 \(line 2\): 'rejected_spans' .*{message}"):
        load_preference_data(path, tokenizer, TokenizeOptions())  # checked even without dense_gamma


def test_spans_without_their_text_or_on_messages_are_refused(tokenizer):
    with pytest.raises(ValueError, match="row 0.*'rejected_spans' given without a 'rejected'"):
        tokenize_pairs([{"prompt": PROMPT, "chosen": CORRECTED, "rejected_spans": [[0, 1]]}], tokenizer,
                       TokenizeOptions())
    user, good = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "good ."}]
    with pytest.raises(ValueError, match="'chosen_spans' needs a string completion"):
        tokenize_pairs([{"prompt": user, "chosen": good, "rejected": good, "chosen_spans": [[0, 1]]}], tokenizer,
                       TokenizeOptions(dense_gamma=2.0))


def test_token_diff_fallback_is_logged_once(tokenizer, caplog):
    rows = [{"prompt": PROMPT, "chosen": CORRECTED, "rejected": CORRUPTED},
            {"prompt": PROMPT, "chosen": " calm .", "rejected": " calm , soup ."}]
    with caplog.at_level(logging.WARNING, logger="diffdpo.lm.data"):
        ds = tokenize_pairs(rows, tokenizer, TokenizeOptions(dense_gamma=3.0))
    notes = [r.getMessage() for r in caplog.records if "no span annotations: dense weights from a token diff" in r.getMessage()]
    assert len(notes) == 1 and "2 of 2 rows" in notes[0]
    assert ds[0]["rejected_weights"] == [1.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0]  # the diff marks ', hotel'
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffdpo.lm.data"):
        tokenize_pairs([{**rows[0], "rejected_spans": [[8, 13]]}], tokenizer, TokenizeOptions(dense_gamma=3.0))
        tokenize_pairs(rows, tokenizer, TokenizeOptions())  # plain DPO: no weights, nothing to say
    assert not [r for r in caplog.records if "token diff" in r.getMessage()]


def test_rlhfv_release_rows_are_read(tokenizer):
    """openbmb/RLHF-V-Dataset: 'text' holds JSON {question, chosen, rejected}; no spans -> token diff."""
    text = json.dumps({"question": PROMPT, "chosen": CORRECTED, "rejected": CORRUPTED})
    ds = load_preference_data([{"ds_name": "RLHF-V", "text": text, "idx": 0}], tokenizer, TokenizeOptions(dense_gamma=2.0))
    assert tokenizer.decode(ds[0]["rejected_ids"]) == "good , hotel and warm . <eos>"
    assert ds[0]["rejected_weights"] == [1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="row 0: 'text' lacks question/chosen/rejected"):
        load_preference_data([{"text": json.dumps({"question": "q"})}], tokenizer, TokenizeOptions())

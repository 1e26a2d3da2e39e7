"""Padding-free batches give the same log-probs and gradients as padded ones."""

from __future__ import annotations

import pytest
import torch

from diffdpo.lm.logps import CausalLMLogps, sequence_logps
from diffdpo.lm.packing import VARLEN_ATTENTION, Group, collate_groups, prepare_for_packing
from tests.lm.conftest import make_model

GROUPS = [
    Group([1, 37, 6, 47, 44, 53], [[28, 5, 2], [9, 10, 11, 12, 13, 5, 2]]),
    Group([1, 37, 6], [[30, 2], [31, 32, 2]]),
    Group([1, 37, 6, 47, 40, 53, 8, 9], [[41, 42, 43, 44, 45, 46, 2], [20, 2]]),
]


def _logps_and_grads(model, layout, groups=GROUPS, average=False):
    prepare_for_packing(model, layout)
    wrapped = CausalLMLogps(model, chunk_size=5, topk=4)
    batch = collate_groups(groups, layout, pad_token_id=0)
    out = wrapped(batch)
    seq = sequence_logps(out.logps, batch, average=average)
    model.zero_grad(set_to_none=True)
    (seq * torch.linspace(0.5, 1.5, seq.shape[0])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return seq.detach(), grads, out, batch


def _naive_logps(model, groups):
    """One unpadded forward per sequence through the model's own logits (chosen first, then rejected)."""
    out = []
    for b in range(2):
        for g in groups:
            ids = torch.tensor([g.prompt_ids + g.completion_ids[b]])
            with torch.no_grad():
                lp = model(input_ids=ids, use_cache=False).logits.log_softmax(-1)[0]
            p = len(g.prompt_ids)
            out.append(sum(lp[p - 1 + j, t] for j, t in enumerate(g.completion_ids[b])))
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_packed_equals_padded_logps_and_grads(tokenizer, layout):
    padded, grads_padded, _, pb = _logps_and_grads(make_model(tokenizer), "padded")
    packed, grads_packed, _, kb = _logps_and_grads(make_model(tokenizer), layout)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for name, g in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # no pad token is computed; the shared prompt is computed once per pair
    assert kb.computed_positions < pb.computed_positions
    assert kb.num_tokens == pb.num_tokens == sum(len(g.prompt_ids) * 2 + sum(map(len, g.completion_ids))
                                                 for g in GROUPS)
    if layout == "shared_prompt":
        assert kb.computed_positions == sum(len(g.prompt_ids) + sum(map(len, g.completion_ids)) for g in GROUPS)


def test_logps_match_one_sequence_at_a_time(tokenizer):
    model = make_model(tokenizer)
    expected = _naive_logps(model, GROUPS)
    got, _, _, _ = _logps_and_grads(model, "shared_prompt")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shared_prompt_with_many_branches_and_one_token_prompt(tokenizer):
    groups = [Group([1], [[5, 6], [7], [8, 9, 10]]), Group([1, 2, 3], [[4], [5], [6, 7]])]
    padded, *_ = _logps_and_grads(make_model(tokenizer), "padded", groups)
    shared, *_ = _logps_and_grads(make_model(tokenizer), "shared_prompt", groups)
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)


def test_empty_prompt_scores_from_the_second_token():
    """Without a prompt the first completion token has no predictor: it is not scored (as TRL's shift)."""
    batch = collate_groups([Group([], [[5, 6, 7]])], "packed")
    assert batch.labels.tolist() == [6, 7]
    assert batch.source_index.tolist() == [0, 1]
    assert batch.completion_lengths.tolist() == [2]


def test_average_and_token_weights():
    """Weighted mean: RLHF-V's (sum_u logp + gamma sum_c logp) / (|u| + gamma |c|)."""
    batch = collate_groups([Group([1], [[2, 3, 4]], [[1.0, 3.0, 1.0]])], "packed")
    token_logps = torch.tensor([-1.0, -2.0, -4.0])
    assert sequence_logps(token_logps, batch).item() == pytest.approx(-1 - 6 - 4)
    assert sequence_logps(token_logps, batch, average=True).item() == pytest.approx(-11 / 5)


def test_sequence_without_scored_tokens_is_zero_not_nan():
    batch = collate_groups([Group([], [[5]]), Group([1], [[5]])], "packed")
    values = sequence_logps(torch.tensor([-2.0]), batch, average=True)
    assert values.tolist() == [0.0, -2.0]


def test_transformers_native_packing_agrees_but_needs_use_cache_false(tokenizer):
    """The trap we avoid: transformers' own packed path is ignored when a KV cache is active."""
    model = make_model(tokenizer).eval()
    batch = collate_groups(GROUPS, "packed")
    seqs = [g.prompt_ids + g.completion_ids[0] for g in GROUPS]
    with torch.no_grad():
        single = model(input_ids=torch.tensor([seqs[1]]), use_cache=False).logits[0]
        start = len(seqs[0])
        # GROUPS are laid out chosen-major: block 1 is group 1's chosen sequence
        ok = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        leaky = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=True).logits[0]
    span = slice(start, start + len(seqs[1]))
    torch.testing.assert_close(ok[span], single, rtol=1e-5, atol=1e-5)
    assert (leaky[span] - single).abs().max() > 1e-3


def test_flash_kwargs_and_layout_errors(tokenizer):
    batch = collate_groups(GROUPS, "packed")
    kw = batch.model_kwargs("flash_attention_2")
    lens = [len(g.prompt_ids) + len(g.completion_ids[b]) for b in range(2) for g in GROUPS]
    assert kw["cu_seq_lens_q"].tolist() == torch.tensor([0, *lens]).cumsum(0).tolist()
    assert kw["max_length_q"] == max(lens)
    with pytest.raises(ValueError, match="flash attention kernels cannot"):
        collate_groups(GROUPS, "shared_prompt").model_kwargs("flash_attention_2")
    with pytest.raises(ValueError, match=VARLEN_ATTENTION):
        batch.model_kwargs("sdpa")
    with pytest.raises(ValueError, match="layout"):
        collate_groups(GROUPS, "ragged")
    model = make_model(tokenizer, attn_implementation="eager")
    assert prepare_for_packing(model, "packed") == VARLEN_ATTENTION

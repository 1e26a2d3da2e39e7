"""Sampling with the KV cache (diffdpo.lm.generate): greedy = HF generate, per-prompt seeding, the
geometric mixture of IPO-MD / Nash-MD with the LoRA adapter toggled in one model, finished flags."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diffdpo.adapters import add_lora, fold_adapters
from diffdpo.lm.generate import mixture_logprobs, next_token_logprobs, sample_completions, sample_seed
from diffdpo.toy.tiny_lm import SUBJECTS, prompt_for
from tests.lm.conftest import make_model

# prompts of different token lengths, so batches are left-padded
PROMPTS = [prompt_for(s) for s in SUBJECTS[:4]] + ["review :", "review : the book", prompt_for("the view")]


def lora_policy(tokenizer, scale: float = 0.3):
    """(policy with a perturbed LoRA adapter, a frozen copy of its base): policy != reference."""
    model = make_model(tokenizer, seed=0)
    base = copy.deepcopy(model)
    add_lora(model, 4, target_modules=["q_proj", "v_proj", "up_proj"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model, base


def generate_greedy(model, tokenizer, prompts, max_new_tokens):
    """HF generate, greedy, each row cut after its first EOS."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return rows


@pytest.mark.parametrize("with_lora", [False, True])
def test_greedy_equals_hf_generate(tokenizer, with_lora):
    model = lora_policy(tokenizer)[0] if with_lora else make_model(tokenizer, seed=0)
    out = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0.0, seed=0, batch_size=4)
    expected = generate_greedy(model, tokenizer, PROMPTS, 10)
    assert out.completion_ids == expected
    assert out.finished.tolist() == [r[-1] == tokenizer.eos_token_id for r in expected]


def by_prompt(out):
    """{(prompt, occurrence): [completion ids of its n samples]}."""
    seen: dict[str, int] = {}
    keys = []
    for p in out.prompts:
        keys.append((p, seen.get(p, 0)))
        seen[p] = seen.get(p, 0) + 1
    table: dict = {}
    for r, i in enumerate(out.prompt_index.tolist()):
        table.setdefault(keys[i], []).append(out.completion_ids[r])
    return table


def test_samples_do_not_depend_on_batch_size_or_prompt_order(tokenizer):
    """Each sample's generator is seeded from (seed, prompt text, occurrence, sample index): batch size 1
    and 7, and the prompts reversed, give every prompt the same samples; a duplicated prompt gets fresh
    ones; another seed gives others. Run on the mixture, so both KV caches of the LoRA model are in play."""
    model, _ = lora_policy(tokenizer)
    prompts = PROMPTS + [PROMPTS[0]]  # a duplicate: occurrence 1
    kw = dict(n=3, max_new_tokens=8, seed=11, mixture=0.25)
    one = sample_completions(model, tokenizer, prompts, batch_size=1, **kw)
    seven = sample_completions(model, tokenizer, prompts, batch_size=7, **kw)
    reverse = sample_completions(model, tokenizer, prompts[::-1], batch_size=5, **kw)
    assert one.completion_ids == seven.completion_ids
    assert one.finished.tolist() == seven.finished.tolist()
    assert by_prompt(one) == by_prompt(reverse)
    table = by_prompt(one)
    assert table[(PROMPTS[0], 0)] != table[(PROMPTS[0], 1)]
    other = sample_completions(model, tokenizer, prompts, batch_size=7, **{**kw, "seed": 12})
    assert other.completion_ids != one.completion_ids
    assert sample_seed(11, "a", 0, 0) == sample_seed(11, "a", 0, 0) != sample_seed(11, "a", 0, 1)


def test_mixture_logprobs_by_hand():
    """Five tokens, b = 0.25:
        z_pol = (2, 1, 0, -1, 0.5),  z_ref = (0, 0, 1, 1, -2)
        log pi_b(v) = (1 - b) log pi(v) + b log pi_ref(v) - log sum_w exp((1 - b) log pi(w) + b log pi_ref(w)),
    computed below with ``math`` only; it equals TRL's log_softmax(b z_ref + (1 - b) z_pol) (the two
    log-partition terms shift every token alike), and b = 0 / 1 give the policy / the reference."""
    z_pol, z_ref, b = [2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 1.0, 1.0, -2.0], 0.25

    def log_softmax(z):
        log_total = math.log(sum(math.exp(x) for x in z))
        return [x - log_total for x in z]

    mixed = [(1 - b) * p + b * r for p, r in zip(log_softmax(z_pol), log_softmax(z_ref))]
    expected = torch.tensor(log_softmax(mixed))
    got = mixture_logprobs(torch.tensor(z_pol), torch.tensor(z_ref), b)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.exp().sum(), torch.tensor(1.0))
    trl_form = F.log_softmax(b * torch.tensor(z_ref) + (1 - b) * torch.tensor(z_pol), dim=-1)
    torch.testing.assert_close(got, trl_form)
    torch.testing.assert_close(mixture_logprobs(torch.tensor(z_pol), torch.tensor(z_ref), 0.0),
                               torch.tensor(log_softmax(z_pol)))
    torch.testing.assert_close(mixture_logprobs(torch.tensor(z_pol), torch.tensor(z_ref), 1.0),
                               torch.tensor(log_softmax(z_ref)))
    with pytest.raises(ValueError, match="mixture"):
        mixture_logprobs(torch.tensor(z_pol), torch.tensor(z_ref), 1.5)


def test_lora_toggling_equals_separate_policy_and_reference_copies(tokenizer):
    """The mixture from one LoRA model (adapters on / off, two caches) equals the mixture from two
    separate models: the policy with its adapter folded into the weights and a frozen base copy, for the
    first token's distribution and for whole sampled completions; adapters are on again afterwards."""
    model, base = lora_policy(tokenizer)
    merged = copy.deepcopy(model)
    fold_adapters(merged)
    policy_before = next_token_logprobs(model, tokenizer, PROMPTS)
    one = next_token_logprobs(model, tokenizer, PROMPTS, mixture=0.25)
    two = next_token_logprobs(merged, tokenizer, PROMPTS, mixture=0.25, ref_model=base)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    expected = mixture_logprobs(policy_before, next_token_logprobs(base, tokenizer, PROMPTS), 0.25)
    torch.testing.assert_close(one, expected, atol=1e-5, rtol=1e-5)
    kw = dict(n=2, max_new_tokens=8, seed=3, mixture=0.25, batch_size=5)
    assert (sample_completions(model, tokenizer, PROMPTS, **kw).completion_ids
            == sample_completions(merged, tokenizer, PROMPTS, ref_model=base, **kw).completion_ids)
    torch.testing.assert_close(next_token_logprobs(model, tokenizer, PROMPTS), policy_before)
    assert model.training  # the training flag is restored


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_sampled_first_tokens_follow_the_normalised_mixture(tokenizer):
    """5000 first tokens drawn with b = 0.25 against the exact mixture distribution p.

    E[TV(empirical, p)] <= 1/2 sum_v sqrt(p_v / N) and TV moves by at most 1/N per draw, so by McDiarmid
    P(TV > bound + 0.03) <= exp(-2 N 0.03^2) = exp(-9). The policy and the reference themselves are
    further than that from the draws, so the check tells the mixture apart from either end (the shared,
    unadapted head is sharpened x20 so that the random tiny model's distributions are far from uniform)."""
    model, _ = lora_policy(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    prompt, draws = PROMPTS[0], 5000
    out = sample_completions(model, tokenizer, [prompt], n=draws, max_new_tokens=1, seed=0, mixture=0.25,
                             batch_size=draws)
    first = torch.tensor([ids[0] for ids in out.completion_ids])
    empirical = torch.bincount(first, minlength=len(tokenizer)).double() / draws
    exact = next_token_logprobs(model, tokenizer, [prompt], mixture=0.25)[0].double().exp()
    bound = 0.5 * float(exact.div(draws).sqrt().sum()) + 0.03
    assert total_variation(empirical, exact) < bound
    policy = next_token_logprobs(model, tokenizer, [prompt], mixture=0.0)[0].double().exp()
    reference = next_token_logprobs(model, tokenizer, [prompt], mixture=1.0)[0].double().exp()
    assert total_variation(empirical, policy) > 2 * bound
    assert total_variation(empirical, reference) > 2 * bound


def test_mixture_matches_trl_geometric_mixture_wrapper_form(tokenizer):
    """TRL's ``GeometricMixtureWrapper`` (removed with NashMDTrainer before TRL 1.16, so not importable here)
    ran two models and returned ``log_softmax(c * z_ref + (1 - c) * z_policy)`` on the raw logits. The same
    computation on two separate copies (the policy with its LoRA folded in, and the base) agrees with our
    one-model, adapter-toggled mixture."""
    model, base = lora_policy(tokenizer)
    merged = copy.deepcopy(model)
    fold_adapters(merged)
    merged.eval()
    base.eval()
    c = 0.25
    for prompt in PROMPTS[:3]:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            z_policy = merged(**enc).logits[0, -1].float()
            z_ref = base(**enc).logits[0, -1].float()
        trl_form = F.log_softmax(c * z_ref + (1 - c) * z_policy, -1)
        ours = next_token_logprobs(model, tokenizer, [prompt], mixture=c)[0]
        torch.testing.assert_close(ours.exp(), trl_form.exp(), atol=1e-5, rtol=1e-5)


def test_finished_flags_ids_and_texts(tokenizer):
    """A row that samples EOS stops there (EOS kept, finished); one that does not has exactly
    max_new_tokens ids and is unfinished. Texts follow tiny_lm.sample_reviews: a leading space, words
    joined by spaces, and prompt + text tokenises back to the prompt ids and the sampled words."""
    model = make_model(tokenizer, seed=0)
    eos, max_new = tokenizer.eos_token_id, 4
    out = sample_completions(model, tokenizer, PROMPTS, n=40, max_new_tokens=max_new, seed=5, batch_size=64)
    assert len(out) == len(PROMPTS) * 40 == out.finished.numel() == len(out.texts)
    assert out.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(40)]
    assert 0 < int(out.finished.sum()) < len(out)  # both kinds occur
    special = set(tokenizer.all_special_ids)
    checked = 0
    for ids, done, text, prompt_ids, row in zip(out.completion_ids, out.finished.tolist(), out.texts,
                                                out.prompt_ids, out.to_rows()):
        assert eos not in ids[:-1]
        if done:
            assert ids[-1] == eos and len(ids) <= max_new
        else:
            assert len(ids) == max_new and ids[-1] != eos
        assert row["completion_ids"] == ids and row["finished"] == done and row["completion"] == text
        words = ids[:-1] if done else ids
        if words and not special & set(words):
            assert text == " " + " ".join(tokenizer.convert_ids_to_tokens(words))
            assert tokenizer(row["prompt"] + text)["input_ids"] == prompt_ids + words
            checked += 1
    assert checked > 100
    first = sample_completions(model, tokenizer, PROMPTS, n=20, max_new_tokens=1, seed=5)
    assert first.finished.tolist() == [ids == [eos] for ids in first.completion_ids]


def test_top_k_one_is_greedy_and_bad_arguments(tokenizer):
    model = make_model(tokenizer, seed=0)
    greedy = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0.0, seed=0)
    top1 = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=6, top_k=1, seed=0)
    tiny_p = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=6, top_p=1e-6, seed=0)
    assert greedy.completion_ids == top1.completion_ids == tiny_p.completion_ids
    with pytest.raises(ValueError, match="ref_model"):
        sample_completions(model, tokenizer, PROMPTS, max_new_tokens=2, seed=0, mixture=0.25)
    for bad in ({"n": 0}, {"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1},
                {"batch_size": 0}, {"mixture": -0.1}):
        with pytest.raises(ValueError):
            sample_completions(model, tokenizer, PROMPTS, **{"max_new_tokens": 2, "seed": 0, **bad})

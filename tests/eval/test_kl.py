"""KL(pi || pi_ref) estimators: exact on an enumerable toy, unbiased by Monte Carlo, zero for identical models.

The toy is an autoregressive model over a 3-token vocabulary for exactly 3 steps with explicit,
seeded next-token tables for every prefix (1 + 3 + 9 prefixes), so all 27 sequences can be enumerated
and the sequence-level KL(pi || pi_ref) = sum_y pi(y) log(pi(y) / pi_ref(y)) computed by brute force.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from diffdpo.eval.kl import KLEstimate, kl_analytic, kl_estimates, kl_k1, kl_k3, lm_kl_estimates

V, T = 3, 3


def tables(seed: int, sharpness: float = 1.5) -> list[torch.Tensor]:
    """Next-token log-probs per prefix: level t is (3**t, V), prefix code = base-3 number of the prefix."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(sharpness * torch.randn(V**t, V, generator=gen, dtype=torch.float64), dim=-1)
            for t in range(T)]


def code(prefix) -> int:
    return sum(int(x) * V ** (len(prefix) - 1 - i) for i, x in enumerate(prefix))


def exact_kl(pi, ref) -> float:
    total = 0.0
    for y in itertools.product(range(V), repeat=T):
        lp = sum(float(pi[t][code(y[:t]), y[t]]) for t in range(T))
        lq = sum(float(ref[t][code(y[:t]), y[t]]) for t in range(T))
        total += math.exp(lp) * (lp - lq)
    return total


def sample(pi, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ys = torch.zeros(n, T, dtype=torch.long)
    codes = torch.zeros(n, dtype=torch.long)
    for t in range(T):
        ys[:, t] = torch.multinomial(pi[t][codes].exp(), 1, generator=gen).squeeze(1)
        codes = codes * V + ys[:, t]
    return ys


def along(tab, ys: torch.Tensor) -> torch.Tensor:
    """(N, T, V) next-token log-probs at each prefix of the sequences ``ys``."""
    out, codes = [], torch.zeros(ys.shape[0], dtype=torch.long)
    for t in range(T):
        out.append(tab[t][codes])
        codes = codes * V + ys[:, t]
    return torch.stack(out, dim=1)


def token_logps(logps: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    return logps.gather(-1, ys.unsqueeze(-1)).squeeze(-1)  # (N, T)


def test_by_hand():
    """Two tokens, log pi = (-1, -2), log pi_ref = (-1.5, -1):
    k1 = (-1 + 1.5) + (-2 + 1) = 0.5 - 1 = -0.5 (a single sequence's k1 may be negative);
    k3: log r = (-0.5, +1): (e^-0.5 - 1 + 0.5) + (e^1 - 1 - 1) = 0.106531 + 0.718282 = 0.824812.
    The second row has only its first token real (mask): k1 = 0.5, k3 = 0.106531.
    Analytic, one position, p = (0.5, 0.5), q = (0.25, 0.75): 0.5 ln 2 + 0.5 ln(2/3) = 0.143841."""
    pol = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.5, -1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert kl_k1(pol, ref, mask).tolist() == pytest.approx([-0.5, 0.5], abs=1e-12)
    k3_a = math.exp(-0.5) - 1 + 0.5
    k3_b = math.e - 1 - 1
    assert kl_k3(pol, ref, mask).tolist() == pytest.approx([k3_a + k3_b, k3_a], abs=1e-12)
    assert k3_a + k3_b == pytest.approx(0.824812, abs=1e-6)
    p = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))
    q = torch.log(torch.tensor([[[0.25, 0.75]]], dtype=torch.float64))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert float(kl_analytic(p, q)[0]) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.143841, abs=1e-6)


def test_analytic_expectation_is_the_exact_kl_by_enumeration():
    """sum_y pi(y) * sum_t KL(pi(.|y_<t) || ref(.|y_<t)) = KL(pi || ref) over sequences (chain rule)."""
    pi, ref = tables(0), tables(1)
    ys = torch.tensor(list(itertools.product(range(V), repeat=T)))  # all 27 sequences, (27, 3)
    p_seq = token_logps(along(pi, ys), ys).sum(1).exp()
    assert float(p_seq.sum()) == pytest.approx(1.0, abs=1e-12)
    analytic = kl_analytic(along(pi, ys), along(ref, ys))  # (27,)
    exact = exact_kl(pi, ref)
    assert exact > 0.1  # a non-trivial toy
    assert float((p_seq * analytic).sum()) == pytest.approx(exact, abs=1e-12)
    # k1 and k3 are unbiased too: their expectations by enumeration are the exact KL
    k1 = kl_k1(token_logps(along(pi, ys), ys), token_logps(along(ref, ys), ys))
    k3 = kl_k3(token_logps(along(pi, ys), ys), token_logps(along(ref, ys), ys))
    assert float((p_seq * k1).sum()) == pytest.approx(exact, abs=1e-12)
    assert float((p_seq * k3).sum()) == pytest.approx(exact, abs=1e-12)


def near(tab, seed: int, scale: float = 0.3) -> list[torch.Tensor]:
    """A reference close to ``tab``: each table's logits perturbed by scale * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(t + scale * torch.randn(t.shape, generator=gen, dtype=torch.float64), dim=-1)
            for t in tab]


@pytest.mark.parametrize("case", ["far", "near"])
def test_monte_carlo_means_match_the_exact_kl(case):
    """20000 samples from pi: each estimator's mean is within 4 standard errors of the brute-force KL
    (and within 0.03 nats); the analytic estimate has a smaller spread than k1, and so has k3 when the
    reference is near the policy (Schulman's regime; far from it, k3 can spread more than k1);
    k3 and analytic are >= 0 per sequence."""
    pi = tables(0)
    ref = tables(1) if case == "far" else near(pi, 1)
    exact = exact_kl(pi, ref)
    ys = sample(pi, 20000, seed=7)
    pol_l, ref_l = along(pi, ys), along(ref, ys)
    est = kl_estimates(token_logps(pol_l, ys), token_logps(ref_l, ys), policy_logits=pol_l, ref_logits=ref_l)
    assert isinstance(est, KLEstimate) and est.n == 20000
    for name in ("k1", "k3", "analytic"):
        mean, se = getattr(est, name), getattr(est, f"{name}_stderr")
        assert abs(mean - exact) < 4 * se, (name, mean, exact, se)
        assert abs(mean - exact) < 0.03, (name, mean, exact)
    assert est.analytic_stderr < est.k1_stderr
    if case == "near":
        assert exact < 0.2 and est.k3_stderr < est.k1_stderr
    assert (est.per_sequence["k3"] >= 0).all() and (est.per_sequence["analytic"] >= 0).all()
    assert est.value("analytic") == est.analytic and est.value("k1") == est.k1


def test_identical_models_give_zero_and_bad_inputs_are_named():
    pi = tables(0)
    ys = sample(pi, 50, seed=0)
    lp = along(pi, ys)
    est = kl_estimates(token_logps(lp, ys), token_logps(lp, ys), policy_logits=lp, ref_logits=lp)
    assert est.k1 == 0.0 and est.k3 == 0.0 and est.analytic == pytest.approx(0.0, abs=1e-15)
    no_logits = kl_estimates(token_logps(lp, ys), token_logps(lp, ys))
    assert no_logits.analytic is None and no_logits.value("analytic") == no_logits.k3
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        kl_k1(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="mask has shape"):
        kl_k3(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="both policy_logits and ref_logits"):
        kl_estimates(torch.zeros(2, 3), torch.zeros(2, 3), policy_logits=lp)
    with pytest.raises(ValueError, match="estimator="):
        est.value("k2")


# ------------------------------------------------------------------------------------------------
# a transformers causal LM on sampled completions (the tiny LM world)


@pytest.fixture(scope="module")
def tiny():
    from diffdpo.lm.generate import sample_completions
    from diffdpo.toy.tiny_lm import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(len(tok), hidden_size=32, layers=1, seed=0)
    prompts = ["review of the pizza :", "review of the film :"]
    comps = sample_completions(model, tok, prompts, n=4, max_new_tokens=6, seed=0)
    return model, tok, comps


def test_lm_identical_policy_and_reference_give_zero(tiny):
    model, tok, comps = tiny
    est = lm_kl_estimates(model, comps, ref_model=copy.deepcopy(model), batch_size=3, pad_token_id=tok.pad_token_id)
    assert est.n == len(comps) == 8
    for name in ("k1", "k3", "analytic"):
        assert abs(getattr(est, name)) < 1e-6, name


def test_lm_lora_reference_and_a_different_reference(tiny):
    """LoRA with B = 0 changes nothing (KL 0 with the adapters-off reference); perturbed adapters give the
    same numbers as a separate reference copy, with KL > 0. k1 per sequence is the difference of the
    sequence log-probs computed directly."""
    from diffdpo.adapters import add_lora

    model, tok, comps = tiny
    base = copy.deepcopy(model)
    lora = copy.deepcopy(model)
    add_lora(lora, rank=2, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.zero_()
    zero = lm_kl_estimates(lora, comps, pad_token_id=tok.pad_token_id)
    assert abs(zero.analytic) < 1e-6 and abs(zero.k1) < 1e-6
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    toggled = lm_kl_estimates(lora, comps, pad_token_id=tok.pad_token_id)
    separate = lm_kl_estimates(lora, comps, ref_model=base, pad_token_id=tok.pad_token_id)
    assert toggled.analytic > 1e-4
    for name in ("k1", "k3", "analytic"):
        torch.testing.assert_close(toggled.per_sequence[name], separate.per_sequence[name], rtol=1e-5, atol=1e-6)
    # k1 per sequence = log pi(y|x) - log pi_ref(y|x), here computed row by row without padding
    row = 3
    ids = torch.tensor([comps.prompt_ids[row] + comps.completion_ids[row]])
    n_prompt, n_comp = len(comps.prompt_ids[row]), len(comps.completion_ids[row])

    def seq_logp(m):
        with torch.no_grad():
            logps = torch.log_softmax(m(input_ids=ids).logits[0].double(), dim=-1)
        return sum(float(logps[n_prompt - 1 + t, ids[0, n_prompt + t]]) for t in range(n_comp))

    lora.eval()
    direct = seq_logp(lora) - seq_logp(base)
    assert float(toggled.per_sequence["k1"][row]) == pytest.approx(direct, abs=1e-4)


def test_lm_needs_a_reference(tiny):
    model, _, comps = tiny
    with pytest.raises(ValueError, match="no reference"):
        lm_kl_estimates(model, comps)

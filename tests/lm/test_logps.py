"""The chunked LM head: exact log-probs, gradients and indicators without materialising all logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffdpo.lm.logps import HeadSpec, head_logps, head_spec


def _naive(hidden, weight, bias, labels, scale=1.0, softcap=None):
    z = F.linear(hidden, weight, bias) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z.log_softmax(-1)


@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.7, None), (1.0, 2.5)])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_values_and_gradients_match_full_logits(scale, softcap, chunk):
    g = torch.Generator().manual_seed(0)
    m, d, v = 23, 8, 31
    hidden = torch.randn(m, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (m,), generator=g)
    upstream = torch.randn(m, generator=g)

    out = head_logps(hidden, labels, HeadSpec(weight, bias, scale, softcap), chunk_size=chunk)
    grads = torch.autograd.grad((out.logps * upstream).sum(), (hidden, weight, bias))
    logp = _naive(hidden, weight, bias, labels, scale, softcap)
    expected = logp.gather(1, labels[:, None]).squeeze(1)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(out.logps, expected, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, expected_grads):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_indicators_and_token_kl():
    """top-k mass = sum of the k largest probabilities; top-k entropy = entropy of them renormalised;
    token KL = sum_v p_v (log p_v - log q_v)."""
    g = torch.Generator().manual_seed(1)
    hidden, ref_hidden = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    weight = torch.randn(9, 4, generator=g)
    labels = torch.randint(0, 9, (5,), generator=g)
    out = head_logps(hidden, labels, HeadSpec(weight), chunk_size=2, topk=3, ref_hidden=ref_hidden,
                     ref_head=HeadSpec(weight))
    logp, ref_logp = _naive(hidden, weight, None, labels), _naive(ref_hidden, weight, None, labels)
    top = logp.exp().topk(3, dim=-1).values
    q = top / top.sum(-1, keepdim=True)
    torch.testing.assert_close(out.topk_mass, top.sum(-1))
    torch.testing.assert_close(out.topk_entropy, -(q * q.log()).sum(-1))
    torch.testing.assert_close(out.token_kl, (logp.exp() * (logp - ref_logp)).sum(-1))
    torch.testing.assert_close(out.ref_logps, ref_logp.gather(1, labels[:, None]).squeeze(1))
    # a uniform distribution: top-k entropy = log k, mass = k / V
    flat = head_logps(torch.zeros(1, 4), torch.tensor([0]), HeadSpec(weight), topk=3)
    assert flat.topk_entropy.item() == pytest.approx(math.log(3))
    assert flat.topk_mass.item() == pytest.approx(3 / 9)


def test_frozen_head_gets_no_gradient_and_hidden_does():
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(6, 3)  # frozen (LoRA base)
    out = head_logps(hidden, torch.tensor([0, 1, 2, 3]), HeadSpec(weight))
    out.logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_head_spec_reads_the_model_and_rejects_adapted_heads(tokenizer):
    from diffdpo.toy.tiny_lm import build_model

    model = build_model(len(tokenizer), final_logit_softcapping=None)
    spec = head_spec(model)
    assert spec.weight is model.lm_head.weight and spec.softcap is None
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="lm_head"):
        head_spec(model)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match=r"\(M, d\)"):
        head_logps(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), HeadSpec(torch.zeros(5, 4)))
    with pytest.raises(ValueError, match="together"):
        head_logps(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), HeadSpec(torch.zeros(5, 4)),
                   ref_hidden=torch.zeros(2, 4))

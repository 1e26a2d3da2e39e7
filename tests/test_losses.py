"""Tests of diffdpo.losses: hand-worked numbers, TRL parity, the Diffusion-DPO identity, properties.

Hand-worked inputs used throughout (unless a test says otherwise):
    policy_chosen = -1.0, policy_rejected = -2.0, ref_chosen = ref_rejected = -1.5
    => u_w = +0.5, u_l = -0.5, delta = u_w - u_l = 1.0
The expected values are written with the ``math`` module only, never with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffdpo.losses import (
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    POINTWISE_LOSS_TYPES,
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    grao_loss,
    pointwise_loss,
    preference_loss,
)
from tests.trl_reference import trl_cpo_losses, trl_dpo_loss, trl_kto_loss, trl_orpo_or_terms

LN2 = math.log(2.0)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def pair(dtype=torch.float64):
    return [torch.tensor([v], dtype=dtype) for v in (-1.0, -2.0, -1.5, -1.5)]


def loss_of(loss_type: str, beta: float, inputs=None, **kw) -> float:
    inputs = inputs if inputs is not None else pair()
    return float(preference_loss(*inputs, loss_type=loss_type, beta=beta, **kw).losses[0])


def modpo_extra(b: int, dtype=torch.float64) -> dict:
    return {
        "margin_rewards_chosen": torch.full((b, 1), 1.0, dtype=dtype),
        "margin_rewards_rejected": torch.full((b, 1), 3.0, dtype=dtype),
        "weights": [0.5, 0.5],
    }


def extra_for(loss_type: str, b: int, dtype=torch.float64) -> dict:
    """The data inputs a loss type cannot do without (MODPO's margin rewards, length_dpo's lengths)."""
    if loss_type == "modpo":
        return modpo_extra(b, dtype)
    if loss_type == "length_dpo":
        return {"chosen_lengths": torch.arange(b) % 7 + 3, "rejected_lengths": torch.arange(b) % 5 + 1}
    return {}


# --------------------------------------------------------------------------------------------
# hand-worked numbers, one per loss type


class TestHandWorked:
    def test_sigmoid(self):
        """beta = 0.5: -log sigma(0.5 * 1) = log(1 + e^-0.5) = 0.474077"""
        assert loss_of("sigmoid", 0.5) == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)
        assert loss_of("sigmoid", 0.5) == pytest.approx(0.4740769841801067, abs=1e-12)

    def test_cdpo(self):
        """eps = 0.1: 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.9 * 0.474077 + 0.1 * 0.974077"""
        expected = 0.9 * 0.4740769841801067 + 0.1 * 0.9740769841801067
        assert loss_of("cdpo", 0.5, label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)
        # sigmoid with label smoothing is the same objective (TRL's historical convention)
        assert loss_of("sigmoid", 0.5, label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)

    def test_robust(self):
        """eps = 0.1: (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8 = 0.411577"""
        expected = (0.9 * 0.4740769841801067 - 0.1 * 0.9740769841801067) / 0.8
        assert loss_of("robust", 0.5, label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)

    def test_hinge(self):
        """relu(1 - 0.5 * 1) = 0.5; with beta = 2: relu(1 - 2) = 0"""
        assert loss_of("hinge", 0.5) == pytest.approx(0.5)
        assert loss_of("hinge", 2.0) == 0.0

    def test_ipo(self):
        """beta = 0.25: (delta - 1/(2 * 0.25))^2 = (1 - 2)^2 = 1"""
        assert loss_of("ipo", 0.25) == pytest.approx(1.0)

    def test_ipo_length_normalised(self):
        """lengths 2 and 4: (0.5/2 - (-0.5)/4 - 2)^2 = (0.375 - 2)^2 = 2.640625"""
        got = loss_of(
            "ipo",
            0.25,
            chosen_lengths=torch.tensor([2.0]),
            rejected_lengths=torch.tensor([4.0], dtype=torch.float64),
        )
        assert got == pytest.approx(2.640625)

    def test_bco_pair(self):
        """r_w = 0.25, r_l = -0.25: -log sig(0.25) - log sig(0.25) = 2 log(1 + e^-0.25); shift 0.1 moves both"""
        assert loss_of("bco_pair", 0.5) == pytest.approx(2 * math.log1p(math.exp(-0.25)), abs=1e-12)
        expected = -logsig(0.25 - 0.1) - logsig(-(-0.25 - 0.1))
        assert loss_of("bco_pair", 0.5, bco_delta=0.1) == pytest.approx(expected, abs=1e-12)

    def test_nca_pair(self):
        """-log sig(0.25) - 0.5 log sig(-0.25) - 0.5 log sig(0.25) = 1.5 * 0.575939 + 0.5 * 0.825939"""
        expected = 1.5 * math.log1p(math.exp(-0.25)) + 0.5 * math.log1p(math.exp(0.25))
        assert loss_of("nca_pair", 0.5) == pytest.approx(expected, abs=1e-12)
        assert expected == pytest.approx(1.2768788, abs=1e-6)

    def test_sppo_hard(self):
        """beta = 0.5: (0.5 - 1)^2 + (-0.5 + 1)^2 = 0.5"""
        assert loss_of("sppo_hard", 0.5) == pytest.approx(0.5)

    def test_exo_pair(self):
        """eps = 0.1: sig(0.5)(log sig(0.5) - log 0.9) + sig(-0.5)(log sig(-0.5) - log 0.1)"""
        expected = sig(0.5) * (logsig(0.5) - math.log(0.9)) + sig(-0.5) * (logsig(-0.5) - math.log(0.1))
        assert loss_of("exo_pair", 0.5, label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)

    def test_apo(self):
        """apo_zero: (1 - sig(0.25)) + sig(-0.25); apo_down: sig(0.25) + 1 - sig(0.5)"""
        assert loss_of("apo_zero", 0.5) == pytest.approx(1 - sig(0.25) + sig(-0.25), abs=1e-12)
        assert loss_of("apo_down", 0.5) == pytest.approx(sig(0.25) + 1 - sig(0.5), abs=1e-12)

    def test_simpo(self):
        """average log-probs -1, -2, beta 2, gamma 0.5: -log sig(2 * 1 - 0.5) = log(1 + e^-1.5)"""
        got = float(
            preference_loss(*pair()[:2], None, None, loss_type="simpo", beta=2.0, simpo_gamma=0.5).losses[0]
        )
        assert got == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-12)

    def test_orpo(self):
        """p_w = e^-1, p_l = e^-2: log odds = 1 - (log(1 - e^-1) - log(1 - e^-2)); loss = 1 - 0.1 log sig(.)"""
        log_odds = 1.0 - (math.log(1 - math.exp(-1)) - math.log(1 - math.exp(-2)))
        got = float(preference_loss(*pair()[:2], None, None, loss_type="orpo", beta=0.1).losses[0])
        assert got == pytest.approx(1.0 - 0.1 * logsig(log_odds), abs=1e-12)

    def test_modpo(self):
        """w = (0.5, 0.5), margins 1 (chosen) and 3 (rejected), beta 0.5:
        logits = (0.5 * 1 - 0.5 * (1 - 3)) / 0.5 = 3  =>  loss = log(1 + e^-3)"""
        assert loss_of("modpo", 0.5, **modpo_extra(1)) == pytest.approx(math.log1p(math.exp(-3.0)), abs=1e-12)

    def test_f_divergences(self):
        """beta 0.5, u_w = 0.5, u_l = -0.5, sigmoid loss log(1 + e^{-0.5 * delta_f}):
        forward KL: delta = e^{0.5} - e^{-0.5}; JS: delta = logsig(0.5) - logsig(-0.5) = 0.5;
        alpha = 0.5: delta = 2 (e^{0.25} - e^{-0.25})"""
        cases = {
            "forward_kl": math.exp(0.5) - math.exp(-0.5),
            "js": 0.5,
            "alpha": 2 * (math.exp(0.25) - math.exp(-0.25)),
        }
        for f, delta in cases.items():
            got = loss_of("sigmoid", 0.5, f_divergence=f, f_alpha=0.5)
            assert got == pytest.approx(math.log1p(math.exp(-0.5 * delta)), abs=1e-12), f

    def test_kto(self):
        """u = (0.5, -0.5), beta 0.5. Batch z0 = max(0, mean u) = 0: both losses 1 - sig(0.25).
        z0 = 0.2: desirable 1 - sig(0.5 * 0.3), undesirable 1 - sig(0.5 * 0.7), weights 2 and 3."""
        policy, ref = (
            torch.tensor([-1.0, -2.0], dtype=torch.float64),
            torch.tensor([-1.5, -1.5], dtype=torch.float64),
        )
        labels = torch.tensor([True, False])
        out = pointwise_loss(policy, ref, labels, loss_type="kto", beta=0.5)
        assert out.losses.tolist() == pytest.approx([1 - sig(0.25), 1 - sig(0.25)], abs=1e-12)
        out = pointwise_loss(
            policy,
            ref,
            labels,
            loss_type="kto",
            beta=0.5,
            z0=0.2,
            desirable_weight=2.0,
            undesirable_weight=3.0,
        )
        assert out.losses.tolist() == pytest.approx([2 * (1 - sig(0.15)), 3 * (1 - sig(0.35))], abs=1e-12)
        # a negative KL estimate is clamped to 0
        out = pointwise_loss(policy, ref, labels, loss_type="kto", beta=0.5, z0=-1.0)
        assert float(out.kl) == 0.0

    def test_dro(self):
        """r = (1, 0), V = (0.2, 0.1), tau 0.5: 0.5 (1 - 0.2 - 0.25)^2 = 0.15125, 0.5 (0 - 0.1 + 0.25)^2 = 0.01125"""
        policy, ref = (
            torch.tensor([-1.0, -2.0], dtype=torch.float64),
            torch.tensor([-1.5, -1.5], dtype=torch.float64),
        )
        out = pointwise_loss(
            policy,
            ref,
            torch.tensor([1.0, 0.0], dtype=torch.float64),
            loss_type="dro",
            beta=0.5,
            values=torch.tensor([0.2, 0.1], dtype=torch.float64),
        )
        assert out.losses.tolist() == pytest.approx([0.15125, 0.01125], abs=1e-12)

    def test_dso_dro(self):
        """DSO code: (2o - 1) * m. m = (0.2, 0.4), o = (1, 0) -> (0.2, -0.4), with logp = -0.5 m.
        Anchored: -log sig(0.5 * s * u) with s = (1, -1), u = (0.5, -0.5) -> log(1 + e^-0.25) twice."""
        mse = torch.tensor([0.2, 0.4], dtype=torch.float64)
        labels = torch.tensor([True, False])
        out = pointwise_loss(-0.5 * mse, None, labels, loss_type="dso_dro", beta=1.0)
        assert out.losses.tolist() == pytest.approx([0.2, -0.4], abs=1e-12)
        policy, ref = (
            torch.tensor([-1.0, -2.0], dtype=torch.float64),
            torch.tensor([-1.5, -1.5], dtype=torch.float64),
        )
        out = pointwise_loss(policy, ref, labels, loss_type="dso_dro", beta=0.5, anchored=True)
        assert out.losses.tolist() == pytest.approx([math.log1p(math.exp(-0.25))] * 2, abs=1e-12)

    def test_sft(self):
        """-logp on desirable samples, 0 on undesirable: (1, 0)"""
        out = pointwise_loss(
            torch.tensor([-1.0, -2.0]), None, torch.tensor([True, False]), loss_type="sft", beta=1.0
        )
        assert out.losses.tolist() == [1.0, 0.0]

    def test_length_dpo(self):
        """beta = 0.5, h = 1, |y_w| = 10, |y_l| = 4 tokens, alpha = 0.05 (CheXalign):
        logit = 0.5 * 1 + 0.05 * (10 - 4) = 0.8; -log sigma(0.8) = log(1 + e^-0.8) = log(1.449329) = 0.371101.
        Swapping the lengths: logit = 0.5 - 0.3 = 0.2; log(1 + e^-0.2) = log(1.818731) = 0.598139."""
        lengths = {"chosen_lengths": torch.tensor([10]), "rejected_lengths": torch.tensor([4])}
        assert loss_of("length_dpo", 0.5, **lengths) == pytest.approx(math.log1p(math.exp(-0.8)), abs=1e-12)
        assert loss_of("length_dpo", 0.5, **lengths) == pytest.approx(0.3711006659, abs=1e-9)
        swapped = {"chosen_lengths": torch.tensor([4]), "rejected_lengths": torch.tensor([10])}
        assert loss_of("length_dpo", 0.5, **swapped) == pytest.approx(0.5981388693, abs=1e-9)
        # alpha = 0.1: logit = 0.5 + 0.6 = 1.1; log(1 + e^-1.1) = 0.287335
        got = loss_of("length_dpo", 0.5, length_alpha=0.1, **lengths)
        assert got == pytest.approx(math.log1p(math.exp(-1.1)), abs=1e-12)

    def test_every_type_has_a_hand_worked_test(self):
        names = " ".join(n for n in dir(self) if n.startswith("test_"))
        for t in PREFERENCE_LOSS_TYPES + POINTWISE_LOSS_TYPES:
            key = {"apo_zero": "apo", "apo_down": "apo"}.get(t, t)
            assert f"test_{key}" in names, f"no hand-worked test for {t}"


# --------------------------------------------------------------------------------------------
# diagnostics and the identities the design relies on


def test_diagnostics():
    """rewards = beta * u: chosen 0.25, rejected -0.25, margin 0.5, accuracy 1"""
    out = preference_loss(*pair(), loss_type="sigmoid", beta=0.5)
    assert float(out.chosen_rewards[0]) == 0.25 and float(out.rejected_rewards[0]) == -0.25
    assert float(out.margins[0]) == 0.5 and float(out.accuracies[0]) == 1.0
    assert not out.chosen_rewards.requires_grad
    m = out.metrics()
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "robust"])
@pytest.mark.parametrize("f_divergence", F_DIVERGENCES)
def test_ln2_at_reference(loss_type, f_divergence):
    """policy == reference: every sigmoid-family loss is exactly ln 2 (f-scores of equal log-ratios cancel)."""
    logps = torch.randn(8, dtype=torch.float64)
    ref = torch.randn(8, dtype=torch.float64)
    out = preference_loss(
        ref,
        logps,
        ref,
        logps,
        loss_type=loss_type,
        beta=5000.0,
        label_smoothing=0.2 if loss_type != "sigmoid" else 0.0,
        f_divergence=f_divergence,
    )
    assert torch.allclose(out.losses, torch.full((8,), LN2, dtype=torch.float64), atol=1e-12)


def test_ln2_at_reference_fp32():
    x = torch.randn(16)
    out = preference_loss(x, x.flip(0), x, x.flip(0), beta=0.1)
    assert torch.equal(out.losses, torch.full((16,), math.log(2.0), dtype=torch.float32))


def test_diffusion_dpo_identity():
    """DESIGN.md: with logp = -0.5 * mse, preference_loss(beta=5000) is the official Diffusion-DPO loss
    -logsigmoid(-0.5 * 5000 * ((m_w - m_l) - (r_w - r_l))) (Wallace et al. 2023, eq. 14)."""
    gen = torch.Generator().manual_seed(0)
    m_w, m_l, r_w, r_l = (torch.rand(256, generator=gen, dtype=torch.float64) * 0.2 for _ in range(4))
    official = -torch.nn.functional.logsigmoid(-0.5 * 5000 * ((m_w - m_l) - (r_w - r_l)))
    ours = preference_loss(-0.5 * m_w, -0.5 * m_l, -0.5 * r_w, -0.5 * r_l, beta=5000.0).losses
    assert torch.allclose(ours, official, atol=1e-6, rtol=0)
    # implicit accuracy: the inside term > 0 <=> chosen reward > rejected reward
    inside = -0.5 * 5000 * ((m_w - m_l) - (r_w - r_l))
    acc = preference_loss(-0.5 * m_w, -0.5 * m_l, -0.5 * r_w, -0.5 * r_l, beta=5000.0).accuracies
    assert torch.equal(acc.bool(), inside > 0)


# --------------------------------------------------------------------------------------------
# parity with TRL, run through TRL's own code (tests/trl_reference.py)

TRL_DPO_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
]
TRL_F_NAMES = {
    "reverse_kl": "reverse_kl",
    "forward_kl": "forward_kl",
    "js": "js_divergence",
    "alpha": "alpha_divergence",
}


def _random_batch(seed: int, n: int = 32, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen, dtype=dtype) * 3 - 10).requires_grad_(True) for _ in range(4)]


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves[:2])


TRL_CASES = [
    (t, f) for t in TRL_DPO_TYPES for f in F_DIVERGENCES if f == "reverse_kl" or t in F_DIVERGENCE_LOSS_TYPES
]


@pytest.mark.parametrize("loss_type,f_divergence", TRL_CASES)
def test_trl_dpo_parity(loss_type, f_divergence):
    # TRL's alpha-divergence code has no float64 branch: compare that one in float32 (tolerance 1e-6 relative).
    dtype = torch.float32 if f_divergence == "alpha" else torch.float64
    for seed in range(3):
        x = _random_batch(seed, dtype=dtype)
        eps = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
        beta = [0.1, 0.5, 2.0][seed]
        kw = {}
        if loss_type == "ipo":
            gen = torch.Generator().manual_seed(100 + seed)
            kw = {
                "chosen_lengths": torch.randint(1, 20, (32,), generator=gen),
                "rejected_lengths": torch.randint(1, 20, (32,), generator=gen),
            }
        theirs = trl_dpo_loss(
            *x,
            loss_type=loss_type,
            beta=beta,
            label_smoothing=eps,
            f_divergence_type=TRL_F_NAMES[f_divergence],
            f_alpha_divergence_coef=1.0 - 0.3,
            **kw,
        )
        ours = preference_loss(
            *x,
            loss_type=loss_type,
            beta=beta,
            label_smoothing=eps,
            f_divergence=f_divergence,
            f_alpha=0.3,
            **kw,
        ).losses.mean()
        tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-6, rtol=0)
        # TRL's exo_pair builds eps as a float32 tensor: agreement to ~1e-8, well inside 1e-6
        assert torch.allclose(ours, theirs.to(ours.dtype), **tol), (float(ours), float(theirs))
        for g_ours, g_theirs in zip(_grads(ours, x), _grads(theirs, x)):
            assert torch.allclose(g_ours, g_theirs, **tol)


def test_trl_kto_parity():
    for seed in range(3):
        x = _random_batch(seed, n=24)
        labels = torch.rand(24, generator=torch.Generator().manual_seed(seed)) > 0.4
        kl_p, kl_r = (
            torch.randn(24, generator=torch.Generator().manual_seed(50 + seed), dtype=torch.float64) + s
            for s in (0.5, 0.0)
        )
        theirs = trl_kto_loss(
            x[0], x[1], labels, kl_p, kl_r, beta=0.3, desirable_weight=1.2, undesirable_weight=0.8
        )
        out = pointwise_loss(
            x[0],
            x[1],
            labels,
            loss_type="kto",
            beta=0.3,
            kl_policy_logps=kl_p,
            kl_ref_logps=kl_r,
            desirable_weight=1.2,
            undesirable_weight=0.8,
        )
        assert torch.allclose(out.losses.mean(), theirs, atol=1e-6, rtol=0)
        assert torch.allclose(
            torch.autograd.grad(out.losses.mean(), x[0])[0], torch.autograd.grad(theirs, x[0])[0], atol=1e-9
        )


def test_trl_simpo_and_orpo_parity():
    gen = torch.Generator().manual_seed(3)
    pw, pl = (-torch.rand(32, generator=gen, dtype=torch.float64) * 3 - 1e-3 for _ in range(2))
    ours = preference_loss(
        pw, pl, None, None, loss_type="simpo", beta=2.5, simpo_gamma=0.7, label_smoothing=0.1
    ).losses
    theirs = trl_cpo_losses(pw, pl, loss_type="simpo", beta=2.5, simpo_gamma=0.7, label_smoothing=0.1)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    # ORPO: TRL returns the odds-ratio term beta * logsigmoid(log_odds) (and adds the NLL outside);
    # ours is the complete per-pair loss -p_w - beta * logsigmoid(log_odds). TRL casts to float32.
    ours = preference_loss(pw, pl, None, None, loss_type="orpo", beta=0.2).losses
    theirs = -pw - trl_orpo_or_terms(pw, pl, beta=0.2).double()
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_alpha_mapping_to_trl_coefficient():
    """Paper alpha a <-> TRL coefficient 1 - a: the same scores for every a."""
    x = _random_batch(7, dtype=torch.float32)
    for a in (0.1, 0.5, 0.9):
        ours = preference_loss(*x, beta=0.4, f_divergence="alpha", f_alpha=a).losses.mean()
        theirs = trl_dpo_loss(
            *x,
            loss_type="sigmoid",
            beta=0.4,
            f_divergence_type="alpha_divergence",
            f_alpha_divergence_coef=1 - a,
        )
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# numerical stability at the Diffusion-DPO scale


def _all_variants():
    for t in PREFERENCE_LOSS_TYPES:
        for f in F_DIVERGENCES if t in F_DIVERGENCE_LOSS_TYPES else ("reverse_kl",):
            yield ("pair", t, f)
    for t in POINTWISE_LOSS_TYPES:
        yield ("point", t, None)
    yield ("point", "dso_dro_anchored", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,loss_type,f_divergence", list(_all_variants()))
def test_extreme_inputs_finite(kind, loss_type, f_divergence, dtype):
    """log-ratios of +-1e4 and beta up to 5000: finite losses and gradients in fp32 and bf16."""
    n = 8
    sign = torch.tensor([1.0, -1.0] * (n // 2))
    for beta in (0.1, 5000.0):
        if kind == "pair":
            if loss_type in REFERENCE_FREE_LOSS_TYPES:  # log-probs are <= 0: use -1e4 and ~0
                pw, pl = (-(1 + sign) * 5e3).to(dtype), (-(1 - sign) * 5e3).to(dtype)
                ins = [pw.requires_grad_(), pl.requires_grad_(), None, None]
            else:
                ins = [
                    (sign * 1e4).to(dtype).requires_grad_(),
                    (-sign * 1e4).to(dtype).requires_grad_(),
                    torch.zeros(n, dtype=dtype),
                    torch.zeros(n, dtype=dtype),
                ]
            extra = extra_for(loss_type, n, dtype)
            out = preference_loss(
                *ins,
                loss_type=loss_type,
                beta=beta,
                f_divergence=f_divergence,
                label_smoothing=0.1 if loss_type in ("robust", "exo_pair", "cdpo") else 0.0,
                **extra,
            )
            leaves = ins[:2]
        else:
            p = (sign * 1e4).to(dtype).requires_grad_()
            r = torch.zeros(n, dtype=dtype)
            extra, labels = {}, sign > 0
            name = loss_type
            if loss_type == "dro":
                labels, extra = torch.randn(n).to(dtype), {"values": torch.zeros(n, dtype=dtype)}
            if loss_type == "dso_dro_anchored":
                name, extra = "dso_dro", {"anchored": True}
            out = pointwise_loss(p, r, labels, loss_type=name, beta=beta, **extra)
            leaves = [p]
        loss = out.losses.float().mean()
        grads = torch.autograd.grad(loss, leaves)
        assert torch.isfinite(loss), (loss_type, f_divergence, beta)
        assert all(torch.isfinite(g).all() for g in grads), (loss_type, f_divergence, beta)


# --------------------------------------------------------------------------------------------
# properties (hypothesis)

finite = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False)
batches = st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=16)
NON_NEGATIVE = [
    t for t in PREFERENCE_LOSS_TYPES if t != "robust"
]  # rDPO is an unbiased estimator: may be < 0


@settings(max_examples=60, deadline=None)
@given(
    rows=batches,
    beta=st.floats(min_value=1e-3, max_value=50),
    loss_type=st.sampled_from([t for t in PREFERENCE_LOSS_TYPES if t not in REFERENCE_FREE_LOSS_TYPES]),
)
def test_swap_flips_margins(rows, beta, loss_type):
    x = torch.tensor(rows, dtype=torch.float64).T
    extra = extra_for(loss_type, x.shape[1])
    a = preference_loss(x[0], x[1], x[2], x[3], loss_type=loss_type, beta=beta, **extra)
    b = preference_loss(x[1], x[0], x[3], x[2], loss_type=loss_type, beta=beta, **extra)
    assert torch.allclose(a.margins, -b.margins)
    assert torch.equal(a.chosen_rewards, b.rejected_rewards)


@settings(max_examples=60, deadline=None)
@given(
    rows=batches,
    beta=st.floats(min_value=1e-3, max_value=5000),
    loss_type=st.sampled_from(NON_NEGATIVE),
    f=st.sampled_from(F_DIVERGENCES),
)
def test_non_negative_and_finite_gradients(rows, beta, loss_type, f):
    x = torch.tensor(rows, dtype=torch.float64).T
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        x = -x.abs() - 1e-3
    if loss_type not in F_DIVERGENCE_LOSS_TYPES:
        f = "reverse_kl"
    leaves = [x[0].clone().requires_grad_(), x[1].clone().requires_grad_()]
    refs = (None, None) if loss_type in REFERENCE_FREE_LOSS_TYPES else (x[2], x[3])
    extra = extra_for(loss_type, x.shape[1])
    out = preference_loss(*leaves, *refs, loss_type=loss_type, beta=beta, f_divergence=f, **extra)
    assert (out.losses >= -1e-12).all()
    grads = torch.autograd.grad(out.losses.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


@settings(max_examples=40, deadline=None)
@given(rows=batches, beta=st.floats(min_value=1e-3, max_value=5000))
def test_kto_bounded(rows, beta):
    x = torch.tensor(rows, dtype=torch.float64).T
    labels = x[2] > 0
    out = pointwise_loss(x[0], x[1], labels, loss_type="kto", beta=beta)
    assert ((out.losses >= 0) & (out.losses <= 1)).all()


# --------------------------------------------------------------------------------------------
# errors for people, and no device sync on the hot path


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_type": "dpo"}, "loss_type='dpo'"),
        ({"f_divergence": "kl"}, "f_divergence='kl'"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": torch.tensor(0.1)}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"f_divergence": "alpha", "f_alpha": 1.5}, "f_alpha"),
        ({"loss_type": "nca_pair", "f_divergence": "js"}, "only defined"),
        ({"loss_type": "sigmoid", "simpo_gamma": 1.0}, "simpo_gamma"),
        ({"loss_type": "modpo"}, "margin_rewards_chosen"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(*pair(), **kwargs)


def test_bad_shapes_and_missing_reference():
    a, b = torch.zeros(4), torch.zeros(5)
    with pytest.raises(ValueError, match="shape mismatch: policy_rejected_logps"):
        preference_loss(a, b, a, a)
    with pytest.raises(ValueError, match=r"1-D per-sample tensor"):
        preference_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss(a, a, None, None)
    with pytest.raises(ValueError, match="bool labels"):
        pointwise_loss(a, a, torch.ones(4), loss_type="kto")
    with pytest.raises(ValueError, match="float rewards"):
        pointwise_loss(a, a, torch.ones(4, dtype=torch.bool), loss_type="dro", values=a)
    with pytest.raises(ValueError, match="needs values"):
        pointwise_loss(a, a, torch.ones(4), loss_type="dro")
    with pytest.raises(ValueError, match="needs ref_logps"):
        pointwise_loss(a, None, torch.ones(4, dtype=torch.bool), loss_type="kto")
    with pytest.raises(ValueError, match="shape mismatch: labels"):
        pointwise_loss(a, a, torch.ones(5, dtype=torch.bool), loss_type="kto")


def test_no_host_sync(monkeypatch):
    """Validation inspects shapes and Python scalars only: reading a tensor's value would sync a GPU."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside the loss")

    x = _random_batch(0, n=8)
    labels = torch.rand(8) > 0.5
    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    for t in PREFERENCE_LOSS_TYPES:
        refs = (None, None) if t in REFERENCE_FREE_LOSS_TYPES else (x[2], x[3])
        extra = extra_for(t, 8)
        preference_loss(x[0], x[1], *refs, loss_type=t, beta=0.1, **extra)
    pointwise_loss(x[0], x[1], labels, loss_type="kto", beta=0.1)
    pointwise_loss(x[0], x[1], labels, loss_type="dso_dro", beta=0.1, anchored=True)
    pointwise_loss(x[0], x[1], x[2].detach(), loss_type="dro", beta=0.1, values=x[3])


# --------------------------------------------------------------------------------------------
# online IPO with soft labels (Calandriello et al. 2024) and GRAO (Wang et al. 2025)


def test_soft_ipo_by_hand():
    """delta = h = 1, tau = beta = 0.25 (1/(2 tau) = 2), p = 0.8:
        p (h - 2)^2 + (1 - p) (-h - 2)^2 = 0.8 * 1 + 0.2 * 9 = 2.6.
    Expanding, p (h - c)^2 + (1 - p) (h + c)^2 = h^2 - 2 c (2p - 1) h + c^2
                                               = (h - (2p - 1) c)^2 + c^2 (1 - (2p - 1)^2)
                                               = (h - (2p - 1)/(2 tau))^2 + p (1 - p) / tau^2,
    here (1 - 1.2)^2 + 0.16 / 0.0625 = 0.04 + 2.56 = 2.6: h is regressed towards (2p - 1)/(2 tau)."""
    got = loss_of("ipo", 0.25, preference_probs=torch.tensor([0.8], dtype=torch.float64))
    assert got == pytest.approx(2.6, abs=1e-12)
    assert got == pytest.approx((1 - 0.6 * 2) ** 2 + 0.8 * 0.2 / 0.25**2, abs=1e-12)
    # p = 1/2: the minimiser is h = 0 (no preference, no push), the gradient there is 0
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    out = preference_loss(h, zero, zero, zero, loss_type="ipo", beta=0.25,
                          preference_probs=torch.tensor([0.5], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.losses.sum(), h)
    assert float(grad) == 0.0


@pytest.mark.parametrize("lengths", [False, True])
def test_soft_ipo_hard_labels_are_ipo(lengths):
    """p = 1 is the IPO loss on (chosen, rejected); p = 0 is the IPO loss on the swapped pair, with or
    without length normalisation."""
    x = _random_batch(3, n=8)
    extra = {}
    if lengths:
        extra = {"chosen_lengths": torch.arange(1.0, 9.0), "rejected_lengths": torch.arange(8.0, 0.0, -1)}
    ipo = preference_loss(*x, loss_type="ipo", beta=0.3, **extra).losses
    ones = preference_loss(*x, loss_type="ipo", beta=0.3, preference_probs=torch.ones(8), **extra).losses
    torch.testing.assert_close(ones, ipo, rtol=0, atol=0)
    swapped_extra = ({"chosen_lengths": extra["rejected_lengths"], "rejected_lengths": extra["chosen_lengths"]}
                     if lengths else {})
    swapped = preference_loss(x[1], x[0], x[3], x[2], loss_type="ipo", beta=0.3, **swapped_extra).losses
    zeros = preference_loss(*x, loss_type="ipo", beta=0.3, preference_probs=torch.zeros(8), **extra).losses
    torch.testing.assert_close(zeros, swapped)


def test_soft_ipo_bad_arguments():
    with pytest.raises(ValueError, match="preference_probs"):
        preference_loss(*pair(), loss_type="sigmoid", preference_probs=torch.ones(1))
    with pytest.raises(ValueError, match="shape mismatch: preference_probs"):
        preference_loss(*pair(), loss_type="ipo", preference_probs=torch.ones(2))


def grao_inputs(dtype=torch.float64):
    """G = 3: J_exp = (-1, -2, -3), J_imit = -1.5, rewards (1, 0, -1), reference answer reward 1."""
    j_exp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=dtype, requires_grad=True)
    j_imit = torch.tensor([-1.5], dtype=dtype, requires_grad=True)
    return j_exp, j_imit, torch.tensor([[1.0, 0.0, -1.0]], dtype=dtype), torch.tensor([1.0], dtype=dtype)


def test_grao_by_hand():
    """Samples: mean 0, std (Bessel) sqrt((1 + 0 + 1) / 2) = 1, so A = (1, 0, -1).
    With the answer, {1, 0, -1, 1}: mean 0.25, squared deviations 0.5625 + 0.0625 + 1.5625 + 0.5625
    = 2.75, std sqrt(2.75 / 3) = 0.957427, A_y = 0.75 / 0.957427 = 0.783349.
    beta = 0.5, lam = 0.6:
        (1/G) sum_i A_i J_exp(o_i)                = (-1 + 0 + 3) / 3              =  0.666667
        beta A_y J_imit(y)                       = 0.5 * 0.783349 * (-1.5)       = -0.587512
        (1/G) sum_i lam A_i (J_exp(o_i) - J_imit) = 0.6 * (1 * 0.5 + (-1) * (-1.5)) / 3 = 0.4
        loss = -(0.666667 - 0.587512 + 0.4) = -0.479155
    Gradients: d loss / d J_exp(o_i) = -(1 + lam) A_i / G = -1.6 * (1, 0, -1) / 3;
    d loss / d J_imit(y) = -beta A_y + lam * mean_i A_i = -0.391675 (the advantages sum to 0)."""
    j_exp, j_imit, rewards, answer_reward = grao_inputs()
    out = grao_loss(j_exp, j_imit, rewards, answer_reward, beta=0.5, lam=0.6, eps=0.0)
    a_y = 0.75 / math.sqrt(2.75 / 3)
    expected = -(2 / 3 + 0.5 * a_y * -1.5 + 0.6 * 2 / 3)
    assert float(out.losses.detach()[0]) == pytest.approx(expected, abs=1e-12)
    assert float(out.losses.detach()[0]) == pytest.approx(-0.479155, abs=1e-6)
    assert out.advantages.tolist() == [[1.0, 0.0, -1.0]]
    assert float(out.ref_answer_advantages[0]) == pytest.approx(0.783349, abs=1e-6)
    grad_exp, grad_imit = torch.autograd.grad(out.losses.sum(), (j_exp, j_imit))
    torch.testing.assert_close(grad_exp, torch.tensor([[-1.6 / 3, 0.0, 1.6 / 3]], dtype=torch.float64))
    assert float(grad_imit[0]) == pytest.approx(-0.5 * a_y, abs=1e-12)
    # the default eps = 1e-6 moves this by ~1e-6 only
    default = grao_loss(*grao_inputs()).losses.detach()
    assert float(default[0]) == pytest.approx(expected, abs=1e-5)
    assert not out.advantages.requires_grad and not out.ref_answer_advantages.requires_grad
    m = out.metrics()
    assert set(m) == {"loss", "advantages/ref_answer", "advantages/std", "rewards/std", "groups/zero_std"}
    assert float(m["rewards/std"]) == 1.0 and float(m["groups/zero_std"]) == 0.0


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_grao_flat_groups_give_zero_advantages_not_nan(eps):
    """Query 0: rewards (0.3, 0.3, 0.3) and answer 0.3: every advantage is 0, so is the loss and its
    gradient. Query 1: rewards (0, 0, 0), answer 1: A_i = 0 but over {0, 0, 0, 1} (mean 0.25, std
    sqrt(0.75 / 3) = 0.5) A_y = 0.75 / 0.5 = 1.5, so only imitation is left:
    loss = -beta * A_y * J_imit = -0.5 * 1.5 * (-2) = 1.5."""
    j_exp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -4.0]], dtype=torch.float64, requires_grad=True)
    j_imit = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([[0.3, 0.3, 0.3], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = grao_loss(j_exp, j_imit, rewards, torch.tensor([0.3, 1.0], dtype=torch.float64), eps=eps)
    assert torch.equal(out.advantages, torch.zeros(2, 3, dtype=torch.float64))
    assert float(out.ref_answer_advantages[0]) == 0.0
    assert float(out.ref_answer_advantages[1]) == pytest.approx(1.5 if eps == 0 else 1.5 / (1 + 2e-6), abs=1e-12)
    assert float(out.losses.detach()[0]) == 0.0
    assert float(out.losses.detach()[1]) == pytest.approx(1.5, abs=1e-5)
    grads = torch.autograd.grad(out.losses.sum(), (j_exp, j_imit))
    assert all(torch.isfinite(g).all() for g in grads)
    assert float(grads[1][0]) == 0.0 and float(grads[0][0].abs().sum()) == 0.0
    assert float(out.metrics()["groups/zero_std"]) == 1.0


def test_grao_bad_arguments():
    j_exp, j_imit, rewards, answer_reward = grao_inputs()
    with pytest.raises(ValueError, match="G >= 2"):
        grao_loss(j_exp[:, :1], j_imit, rewards[:, :1], answer_reward)
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        grao_loss(j_exp[0], j_imit, rewards, answer_reward)
    with pytest.raises(ValueError, match="shape mismatch: rewards"):
        grao_loss(j_exp, j_imit, rewards[:, :2], answer_reward)
    with pytest.raises(ValueError, match="queries"):
        grao_loss(j_exp, torch.zeros(2), rewards, torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        grao_loss(j_exp, j_imit, rewards, answer_reward, beta=-1.0)
    with pytest.raises(ValueError, match="lam"):
        grao_loss(j_exp, j_imit, rewards, answer_reward, lam=float("nan"))


def test_online_losses_do_not_sync(monkeypatch):
    """Soft-label IPO and GRAO read no tensor value on the host either."""
    x = _random_batch(0, n=8)
    j_exp, j_imit, rewards, answer_reward = grao_inputs()

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside the loss")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    preference_loss(*x, loss_type="ipo", beta=0.1, preference_probs=torch.full((8,), 0.7))
    grao_loss(j_exp, j_imit, rewards, answer_reward).metrics()


# --------------------------------------------------------------------------------------------
# length-regularised DPO (R-DPO, Park et al. 2024; CheXalign, Hein et al. 2024)


def test_length_dpo_with_alpha_zero_is_sigmoid():
    """alpha = 0 removes the length term: the loss, its gradients and the rewards are DPO's."""
    x = _random_batch(5, n=16)
    extra = extra_for("length_dpo", 16)
    ours = preference_loss(*x, loss_type="length_dpo", beta=0.3, length_alpha=0.0, **extra)
    dpo = preference_loss(*x, loss_type="sigmoid", beta=0.3)
    torch.testing.assert_close(ours.losses, dpo.losses, rtol=0, atol=0)
    torch.testing.assert_close(ours.margins, dpo.margins, rtol=0, atol=0)
    for g_ours, g_dpo in zip(_grads(ours.losses.sum(), x), _grads(dpo.losses.sum(), x)):
        torch.testing.assert_close(g_ours, g_dpo, rtol=0, atol=0)


def test_length_dpo_equal_lengths_is_sigmoid_and_longer_chosen_lowers_the_loss():
    """Equal lengths cancel; a longer chosen raises the logit (lower loss, smaller push on h)."""
    x = _random_batch(6, n=8)
    same = torch.full((8,), 5)
    dpo = preference_loss(*x, loss_type="sigmoid", beta=0.2).losses
    eq = preference_loss(*x, loss_type="length_dpo", beta=0.2, chosen_lengths=same, rejected_lengths=same).losses
    torch.testing.assert_close(eq, dpo, rtol=0, atol=1e-15)
    longer = preference_loss(*x, loss_type="length_dpo", beta=0.2, chosen_lengths=same + 4,
                             rejected_lengths=same).losses
    assert (longer < dpo).all()


def test_length_dpo_needs_lengths():
    with pytest.raises(ValueError, match="length_dpo' needs chosen_lengths and rejected_lengths"):
        preference_loss(*pair(), loss_type="length_dpo")
    with pytest.raises(ValueError, match="length_dpo' needs chosen_lengths and rejected_lengths"):
        preference_loss(*pair(), loss_type="length_dpo", chosen_lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match="length_alpha"):
        preference_loss(*pair(), loss_type="length_dpo", length_alpha=-1.0,
                        chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match="shape mismatch: chosen_lengths"):
        preference_loss(*pair(), loss_type="length_dpo", chosen_lengths=torch.tensor([3, 4]),
                        rejected_lengths=torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="length_alpha"):  # not an argument of other types
        preference_loss(*pair(), loss_type="sigmoid", length_alpha=0.1)


def test_length_dpo_loss_config_passes_alpha():
    from diffdpo.train import LossConfig

    kw = LossConfig(type="length_dpo", beta=0.1).loss_kwargs()
    assert kw["loss_type"] == "length_dpo" and kw["length_alpha"] == 0.05
    assert "length_alpha" not in LossConfig(type="sigmoid", beta=0.1).loss_kwargs()

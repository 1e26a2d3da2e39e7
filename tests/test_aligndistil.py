"""AlignDistil (Zhang et al. 2025, arXiv 2503.02832): teacher logits and loss by hand, limiting cases, the recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffdpo.losses import aligndistil_sequence_losses, aligndistil_teacher, aligndistil_token_losses

P_DPO = [0.4, 0.3, 0.1, 0.1, 0.1]
P_REV = [0.1, 0.1, 0.2, 0.3, 0.3]


def _log(p: list[float]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


def test_teacher_logits_on_a_five_token_vocabulary_match_the_hand_worked_formula():
    """p_dpo = [.4 .3 .1 .1 .1], p_rev = [.1 .1 .2 .3 .3] (logits = log-probs), beta2 = 0.5, eps = 1e-3.

    TVD = .3 + .2 + .1 + .2 + .2 = 1.0, so w = 0.5 * 1.0 + 0.001 = 0.501, and
    z* = z_dpo + w (z_dpo - z_rev) = 1.501 ln p_dpo - 0.501 ln p_rev:
      v0: 1.501 * ln .4 - 0.501 * ln .1 = -1.375352 + 1.153595 = -0.221757
      v1: 1.501 * ln .3 - 0.501 * ln .1 = -1.807163 + 1.153595 = -0.653568
      v2: 1.501 * ln .1 - 0.501 * ln .2 = -3.456180 + 0.806328 = -2.649852
      v3, v4: 1.501 * ln .1 - 0.501 * ln .3 = -3.456180 + 0.603190 = -2.852990
    """
    t = aligndistil_teacher(_log(P_DPO), rev_logits=_log(P_REV), mode="aligndistil", beta=0.1, beta2=0.5, eps=1e-3)
    assert float(t.tvd) == pytest.approx(1.0, abs=1e-6)
    assert float(t.weights) == pytest.approx(0.501, abs=1e-6)
    expected = [-0.221757, -0.653568, -2.649852, -2.852990, -2.852990]
    assert t.logits.tolist() == pytest.approx(expected, abs=2e-6)


def test_token_loss_and_sequence_reduction_by_hand():
    """One token, policy uniform (p = 0.2 each), teacher z* from the test above, beta 0.1, w 0.501.

    sum_v exp(z*_v) = .801109 + .520186 + .070662 + 2 * .057672 = 1.507301, log = 0.410320
    KL(u || q) = sum_v 0.2 (ln 0.2 - z*_v + 0.410320) = ln 0.2 - 0.2 * sum z* + 0.410320
               = -1.609438 + 0.2 * 9.231157 + 0.410320 = 0.647113
    loss = (beta / w) * KL = 0.1 / 0.501 * 0.647113 = 0.129164
    Two responses of 1 and 2 such tokens: each mean is 0.129164; summed: 0.129164 and 0.258329.
    """
    z_star = torch.tensor([-0.221757, -0.653568, -2.649852, -2.852990, -2.852990], dtype=torch.float64)
    policy = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    loss = aligndistil_token_losses(policy, z_star, torch.tensor(0.501, dtype=torch.float64), beta=0.1)
    assert float(loss.detach()) == pytest.approx(0.129164, abs=2e-6)
    loss.backward()
    assert policy.grad is not None and policy.grad.abs().sum() > 0  # the policy is what learns
    tokens = loss.detach().repeat(3)
    index = torch.tensor([0, 1, 1])
    assert aligndistil_sequence_losses(tokens, index, 2).tolist() == pytest.approx([0.129164, 0.129164], abs=2e-6)
    summed = aligndistil_sequence_losses(tokens, index, 2, length_normalize=False)
    assert summed.tolist() == pytest.approx([0.129164, 0.258329], abs=4e-6)


def test_loss_is_zero_when_the_policy_is_the_teacher_and_uses_reverse_kl():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(7, 11, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    assert aligndistil_token_losses(teacher + 3.0, teacher, w).abs().max() < 1e-12  # shift-invariant softmax
    policy = torch.randn(7, 11, generator=g, dtype=torch.float64)
    p, q = policy.softmax(-1), teacher.softmax(-1)
    reverse_kl = (p * (p.log() - q.log())).sum(-1)  # KL(pi || teacher), not KL(teacher || pi)
    assert aligndistil_token_losses(policy, teacher, w, beta=0.3).tolist() == pytest.approx(
        (0.3 / w * reverse_kl).tolist(), rel=1e-10)


def test_limiting_cases():
    g = torch.Generator().manual_seed(1)
    z_dpo, z_rev, z_ref = (torch.randn(4, 6, 9, generator=g, dtype=torch.float64) for _ in range(3))
    # extrapolation weight 0 (beta2 = 0, eps = 0): the contrastive teacher is the DPO model itself
    t0 = aligndistil_teacher(z_dpo, rev_logits=z_rev, mode="aligndistil", beta2=0.0, eps=0.0)
    assert torch.equal(t0.logits, z_dpo) and torch.equal(t0.weights, torch.zeros(4, 6, dtype=torch.float64))
    # the RLHF-equivalent form w z_dpo + (1 - w) z_ref, w = beta / beta2: w = 1 is the DPO model ...
    assert torch.allclose(aligndistil_teacher(z_dpo, ref_logits=z_ref, mode="rlhf", beta=0.1, beta2=0.1).logits, z_dpo)
    # ... w -> 0 the reference, and in between the teacher's log-probs move monotonically from one to the other
    far = aligndistil_teacher(z_dpo, ref_logits=z_ref, mode="rlhf", beta=0.1, beta2=1e11).logits
    assert torch.allclose(far, z_ref, atol=1e-9)
    distances = []
    for beta2 in (1e11, 0.4, 0.2, 0.125, 0.1):  # w = 0, .25, .5, .8, 1
        logits = aligndistil_teacher(z_dpo, ref_logits=z_ref, mode="rlhf", beta=0.1, beta2=beta2).logits
        distances.append(float((logits - z_dpo).abs().max()))
    assert distances == sorted(distances, reverse=True) and distances[-1] < 1e-12
    # the fixed contrastive mode: z_dpo + (beta / beta2) (z_dpo - z_rev)
    fixed = aligndistil_teacher(z_dpo, rev_logits=z_rev, mode="contrastive", beta=0.1, beta2=0.4).logits
    assert torch.allclose(fixed, z_dpo + 0.25 * (z_dpo - z_rev))
    # identical DPO and reverse models: TVD 0, w = eps, the teacher is the DPO model
    same = aligndistil_teacher(z_dpo, rev_logits=z_dpo.clone(), beta2=10.0)
    assert torch.allclose(same.weights, torch.full((4, 6), 1e-3, dtype=torch.float64)) and torch.equal(same.logits, z_dpo)


def test_adaptive_weight_stays_within_its_documented_bounds():
    """w = beta2 * TVD + eps with TVD = sum_v |p - q| in [0, 2]: w in [eps, 2 beta2 + eps]; disjoint supports hit 2."""
    g = torch.Generator().manual_seed(2)
    z_dpo = torch.randn(64, 13, generator=g) * 5
    z_rev = torch.randn(64, 13, generator=g) * 5
    for mode, key in (("aligndistil", "rev_logits"), ("rlhf_adaptive", "ref_logits")):
        t = aligndistil_teacher(z_dpo, **{key: z_rev}, mode=mode, beta2=10.0, eps=1e-3)
        assert float(t.tvd.min()) >= 0.0 and float(t.tvd.max()) <= 2.0 + 1e-6
        assert float(t.weights.min()) >= 1e-3 and float(t.weights.max()) <= 2 * 10.0 + 1e-3 + 1e-5
    a = torch.tensor([[50.0, -50.0]])
    extreme = aligndistil_teacher(a, rev_logits=-a, beta2=10.0, eps=1e-3)
    assert float(extreme.tvd) == pytest.approx(2.0) and float(extreme.weights) == pytest.approx(20.001)


def test_bad_inputs_are_refused_with_the_missing_piece_named():
    z = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="rev_logits"):
        aligndistil_teacher(z, ref_logits=z, mode="aligndistil")
    with pytest.raises(ValueError, match="ref_logits"):
        aligndistil_teacher(z, rev_logits=z, mode="rlhf")
    with pytest.raises(ValueError, match="mode"):
        aligndistil_teacher(z, rev_logits=z, mode="nope")
    with pytest.raises(ValueError, match="beta2"):
        aligndistil_teacher(z, ref_logits=z, mode="rlhf", beta2=0.0)
    with pytest.raises(ValueError, match="same shape"):
        aligndistil_teacher(z, rev_logits=torch.zeros(3, 4))


def test_chunked_distillation_equals_one_chunk():
    """The recipe's token-chunked loss (checkpointed chunks) gives the same losses and gradients as one chunk."""
    from diffdpo.lm.logps import HeadSpec
    from diffdpo.recipes.aligndistil import AlignDistilConfig, distil_token_losses

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 8, generator=g, dtype=torch.float64)
    heads = {n: HeadSpec(torch.randn(12, 8, generator=g, dtype=torch.float64)) for n in ("policy", "dpo", "reverse")}
    teachers = {n: (torch.randn(10, 8, generator=g, dtype=torch.float64), heads[n]) for n in ("dpo", "reverse")}
    results = []
    for chunk in (100, 3):
        h = hidden.clone().requires_grad_(True)
        losses, stats = distil_token_losses(h, heads["policy"], teachers, AlignDistilConfig(logits_chunk_size=chunk))
        losses.sum().backward()
        results.append((losses.detach(), h.grad, stats["weights"]))
    assert torch.allclose(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1])
    assert torch.allclose(results[0][2], results[1][2])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffdpo.toy.tiny_lm import build_world

    return build_world(tmp_path_factory.mktemp("ad") / "world", seed=0, n_pairs=32, sft_steps=20)


def _cfg(world, out, **kw):
    from diffdpo.recipes.aligndistil import AlignDistilConfig

    return AlignDistilConfig(output_dir=str(out), world=str(world.root), pairs=str(world.pairs),
                             base_model=str(world.model_dir), dpo_steps=2, steps=2, batch_size=4, max_new_tokens=6, **kw)


def test_fast_pipeline_trains_both_teachers_distils_and_saves_a_stock_model(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from diffdpo.recipes.aligndistil import run_aligndistil

    report = run_aligndistil(_cfg(world, tmp_path / "off"))
    rows = [json.loads(line) for line in (tmp_path / "off" / "reverse_pairs.jsonl").read_text().splitlines()]
    first = json.loads(world.pairs.read_text().splitlines()[0])
    assert (rows[0]["chosen"], rows[0]["rejected"]) == (first["rejected"], first["chosen"])  # pairs swapped
    assert len(report["logs"]) == 2 and all(math.isfinite(r["loss"]) for r in report["logs"])
    assert all(1e-3 <= r["weight"] <= 20.001 + 1e-4 for r in report["logs"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "off" / "final")  # stock transformers, safetensors
    base = AutoModelForCausalLM.from_pretrained(world.model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))  # it learned
    # (on-policy with loaded stage-A models: test_fast_study_writes_csvs_png_and_summary)


def test_lora_teachers_share_one_base_and_switch_adapters(world, tmp_path):
    from diffdpo.lm.logps import CausalLMLogps
    from diffdpo.lm.packing import Group, collate_groups
    from diffdpo.recipes.aligndistil import (
        Teachers,
        _inject_adapter,
        _load_lm,
        dpo_train_config,
        run_aligndistil,
        train_dpo,
        write_reverse_pairs,
    )

    cfg = _cfg(world, tmp_path / "lora")
    lora = ["tiny_lm.lora.enabled=true", "tiny_lm.lora.rank=4", "optim.lr=5e-2"]
    dpo, _ = train_dpo(dpo_train_config(cfg, world.pairs, world.model_dir, tmp_path / "lora" / "dpo", lora))
    rev_pairs = write_reverse_pairs(world.pairs, tmp_path / "lora" / "reverse.jsonl")
    rev, _ = train_dpo(dpo_train_config(cfg, rev_pairs, world.model_dir, tmp_path / "lora" / "rev", lora))
    assert (dpo / "adapter_config.json").is_file() and (rev / "adapter_config.json").is_file()
    teachers = Teachers(world.model_dir, dpo, rev, "aligndistil", torch.device("cpu"))
    assert teachers.shared is not None  # one base model, two adapters
    batch = collate_groups([Group([1, 5, 6], [[7, 8, 2]]), Group([1, 9], [[10, 2]])], "padded", 0)
    hidden = teachers.hidden(batch)
    # each adapter's states equal a separate load of that adapter alone; the reference = the base
    for name, folder in (("dpo", dpo), ("reverse", rev)):
        alone = _load_lm(world.model_dir, "cpu")
        _inject_adapter(alone, folder, "default")
        assert torch.allclose(hidden[name][0], CausalLMLogps(alone).hidden_at_targets(batch), atol=1e-6)
    assert not torch.allclose(hidden["dpo"][0], hidden["reverse"][0])
    ref = Teachers(world.model_dir, dpo, rev, "rlhf", torch.device("cpu")).hidden(batch)["reference"][0]
    assert torch.allclose(ref, CausalLMLogps(_load_lm(world.model_dir, "cpu")).hidden_at_targets(batch), atol=1e-6)
    out = run_aligndistil(_cfg(world, tmp_path / "lora_b", dpo_model=str(dpo), reverse_dpo_model=str(rev)))
    assert len(out["logs"]) == 2


def test_config_errors_name_the_key(tmp_path):
    from diffdpo.recipes.aligndistil import AlignDistilConfig, AlignDistilStudyConfig

    with pytest.raises(ValueError, match="mode"):
        AlignDistilConfig(mode="x")
    with pytest.raises(ValueError, match="reverse_dpo_model"):
        AlignDistilConfig(dpo_model="a")
    with pytest.raises(ValueError, match="methods"):
        AlignDistilStudyConfig(methods=["ppo"])
    from pathlib import Path

    from diffdpo.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = load_config(AlignDistilConfig, root / "aligndistil_tiny.yaml")
    assert (shipped.mode, shipped.beta, shipped.beta2, shipped.policy) == ("aligndistil", 0.1, 10.0, "off")
    study = load_config(AlignDistilStudyConfig, root / "study_aligndistil_tiny.yaml")
    assert study.seeds == [0, 1, 2] and (study.beta2_off, study.beta2_on) == (10.0, 15.0)


def test_fast_study_writes_csvs_png_and_summary(world, tmp_path):
    from diffdpo.recipes import aligndistil
    from diffdpo.recipes.aligndistil import AlignDistilStudyConfig, run_aligndistil_study
    from diffdpo.recipes.studies.common import read_csv

    cfg = AlignDistilStudyConfig(out_dir=str(tmp_path / "study"), world=str(world.root), fast=True)
    summary = run_aligndistil_study(cfg)
    rows = read_csv(tmp_path / "study" / "results.csv")
    assert {r["method"] for r in rows} == {"dpo", "aligndistil_off", "aligndistil_on"}
    assert sorted({int(r["step"]) for r in rows}) == [1, 2]
    assert all(0.0 <= float(r["win_rate"]) <= 1.0 for r in rows)
    assert {(s["method"], s["step"]) for s in summary} == {(m, s) for m in aligndistil.STUDY_METHODS for s in (1, 2)}
    text = (tmp_path / "study" / "summary.md").read_text()
    assert "diffdpo study-aligndistil" in text and (tmp_path / "study" / "study.png").stat().st_size > 0

"""MPO recipe (diffdpo.recipes.mpo): the split by hand, stage 2's reference = the stage-1 model, end to end."""

from __future__ import annotations

import json

import torch

from diffdpo.online import lm as online
from diffdpo.recipes import mpo
from diffdpo.task import register_task
from diffdpo.toy import tiny_lm, tiny_lm_online
from diffdpo.train import run, setup

for _spec in (online.TASK, tiny_lm_online.TASK, tiny_lm.TASK):
    register_task(_spec)


def test_the_split_by_hand():
    """gaps [3, 1, NaN, 2, 5, 1]: finite [3, 1, 2, 5, 1], median 2 -> easy = gap > 2 = rows 0, 4; hard = 1, 3, 5."""
    gaps = torch.tensor([3.0, 1.0, float("nan"), 2.0, 5.0, 1.0])
    easy, hard, threshold = mpo.split_pairs(gaps)
    assert (easy, hard, threshold) == ([0, 4], [1, 3, 5], 2.0)
    easy, hard, threshold = mpo.split_pairs(gaps, 0.0)  # threshold = the smallest gap, 1
    assert (easy, hard, threshold) == ([0, 3, 4], [1, 5], 1.0)


def _cfg(world, tmp_path, **kw) -> mpo.MPOConfig:
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    return mpo.MPOConfig(output_dir=str(tmp_path / "mpo"), world=str(world.root), stage1_steps=3, stage2_steps=2,
                         per_device_batch_size=4, eval_samples_per_prompt=2, max_new_tokens=8,
                         stage1_config=str(repo / "configs/lm_dpo_tiny.yaml"),
                         stage2_config=str(repo / "configs/lm_online_ipo_tiny.yaml"), **kw)


def test_stage2_starts_from_the_stage1_model_as_reference(world, tmp_path):
    """At stage 2 step 0 the policy and reference log-probs are equal, and differ from the base model's."""
    from transformers import AutoModelForCausalLM

    cfg = _cfg(world, tmp_path)
    prep = mpo.prepare(cfg)
    assert prep["n_easy"] + prep["n_hard"] == prep["n_pairs"] > 0
    tr1 = setup(mpo.stage1_config(cfg, world, prep["easy"]))
    run(tr1)
    stage1_dir = mpo.save_stage1_model(tr1.task, world.model_dir, tmp_path / "stage1_model")
    tr2 = setup(mpo.stage2_config(cfg, world, stage1_dir, prep["hard_prompts"]))
    task = tr2.task
    batch = task.collate([task.dataset()[i] for i in range(4)])
    out = task.compute(tr2.model, batch, torch.arange(4))
    assert out.size > 0
    torch.testing.assert_close(out.policy_chosen.detach(), out.ref_chosen)
    base = AutoModelForCausalLM.from_pretrained(world.model_dir)
    stage1 = AutoModelForCausalLM.from_pretrained(stage1_dir)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(base.parameters(), stage1.parameters()))
    assert diff > 1e-4  # stage 1 moved the model: the reference is not the base
    ids = torch.tensor([task.tokenizer("review : the soup was good .")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, stage1(ids).logits, atol=1e-4)


def test_a_stage1_lora_is_folded_into_the_saved_model(world, tmp_path):
    """A LoRA stage 1: the saved plain model computes what the stage-1 policy (adapter on) computed."""
    from transformers import AutoModelForCausalLM

    cfg = _cfg(world, tmp_path)
    prep = mpo.prepare(cfg)
    tr1 = setup(mpo.stage1_config(cfg, world, prep["easy"], ["tiny_lm.lora.enabled=true", "tiny_lm.lora.rank=4"]))
    run(tr1)
    ids = torch.tensor([tr1.task.tokenizer("review : the soup was good .")["input_ids"]])
    with torch.no_grad():
        before = tr1.task.policy.model(input_ids=ids).logits
    stage1_dir = mpo.save_stage1_model(tr1.task, world.model_dir, tmp_path / "stage1_model")
    with torch.no_grad():
        after = AutoModelForCausalLM.from_pretrained(stage1_dir)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(world.model_dir)(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after, base, atol=1e-4)


def test_a_tiny_end_to_end_run_writes_its_report(world, tmp_path):
    report = mpo.run_mpo(_cfg(world, tmp_path))
    saved = json.loads((tmp_path / "mpo" / "report.json").read_text())
    assert saved["easy"] == report["easy"] > 0 and saved["hard"] > 0
    for key in ("stage1_vs_base", "stage2_vs_base"):
        r = saved[key]
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1
        assert r["wins"] + r["ties"] + r["losses"] == 8  # 4 held-out prompts x 2


def test_the_config_loads():
    from pathlib import Path

    from diffdpo.config import load_config

    cfg = load_config(mpo.MPOConfig, Path(__file__).resolve().parents[2] / "configs/mpo_tiny.yaml")
    assert cfg.easy_quantile == 0.5 and cfg.stage2_config.endswith("lm_online_ipo_tiny.yaml")

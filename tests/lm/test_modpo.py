"""MODPO end to end: margin rewards (hand-worked and against plain transformers), their cache, the loss in the loop
with the right margins per pair, bad input before training, resume, peft export, and the front sweep's fast mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffdpo.lm import margin as margin_lib
from diffdpo.toy import tiny_lm_objectives as objectives
from diffdpo.train import LossConfig, apply_loss, load_train_config, run, setup, train

from .conftest import make_model, write_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_implicit_reward_and_modpo_loss_by_hand():
    """Implicit rewards: beta (log pi - log pi_ref) = 0.1 * (-3 - -4) = 0.1 and 0.1 * (-5 - -4.5) = -0.05.

    MODPO through the loop's apply_loss, w = (0.25, 0.75), beta 0.1: u_w = -3 - -4 = 1, u_l = -5 - -4 = -1,
    beta (u_w - u_l) = 0.2; margins chosen 0.4, rejected 0.0 -> logit (0.2 - 0.75 * 0.4) / 0.25 = -0.4;
    loss = -log sigmoid(-0.4) = log(1 + e^0.4) = 0.913015.
    """
    r = margin_lib.implicit_rewards(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5]), 0.1)
    assert r.tolist() == pytest.approx([0.1, -0.05])
    from diffdpo.task import LogpsOut

    out = LogpsOut(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]),
                   loss_inputs={"margin_rewards_chosen": torch.tensor([[0.4]]),
                                "margin_rewards_rejected": torch.tensor([[0.0]])})
    losses, _ = apply_loss(out, LossConfig(type="modpo", beta=0.1, modpo_weights=[0.25, 0.75]))
    assert losses.item() == pytest.approx(math.log1p(math.exp(0.4)), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# margin rewards of real tiny models


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def two_models(tokenizer, tmp_path):
    """pi_ref (seed 0) and a different 'DPO' model (seed 1), saved as plain folders."""
    return (_save(make_model(tokenizer, seed=0), tokenizer, tmp_path / "ref"),
            _save(make_model(tokenizer, seed=1), tokenizer, tmp_path / "dpo"))


def _task(tokenizer, pair_rows, tmp_path, ref: Path, dpo: Path, **margin):
    from accelerate import Accelerator

    from diffdpo.lm.config import LMConfig
    from diffdpo.lm.task import LMPreferenceTask

    cfg = LMConfig()
    cfg.model.pretrained = str(ref)
    cfg.lora.enabled = False
    cfg.data.source = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows[:6]))
    cfg.margin.kinds, cfg.margin.models = ["implicit"], [str(dpo)]
    cfg.margin.cache_dir = str(tmp_path / "cache")
    for k, v in margin.items():
        setattr(cfg.margin, k, v)
    return LMPreferenceTask(cfg, loss_type="modpo", accelerator=Accelerator(cpu=True), tokenizer=tokenizer)


def _plain_logps(path: Path, tokenizer, prompt: str, completion: str) -> float:
    """Summed completion log-probs with plain transformers: the independent implementation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    n_prompt = len(tokenizer(prompt)["input_ids"])
    ids = tokenizer(prompt + completion + " " + tokenizer.eos_token, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logps = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return float(logps[torch.arange(len(targets)), targets][n_prompt - 1:].sum())


def test_implicit_margins_equal_plain_transformers_and_are_looked_up_per_pair(tokenizer, pair_rows, tmp_path,
                                                                               two_models):
    ref, dpo = two_models
    task = _task(tokenizer, pair_rows, tmp_path, ref, dpo, beta=0.5)
    m = task.margins
    assert tuple(m.chosen.shape) == (6, 1)
    for i in (0, 4):
        row = pair_rows[i]
        for got, key in ((m.chosen[i, 0], "chosen"), (m.rejected[i, 0], "rejected")):
            want = 0.5 * (_plain_logps(dpo, tokenizer, row["prompt"], row[key])
                          - _plain_logps(ref, tokenizer, row["prompt"], row[key]))
            assert float(got) == pytest.approx(want, abs=1e-4)
    # the loop's batch: pairs 3 and 1, in that order -> their own margins
    batch = task.collate([task.dataset()[3], task.dataset()[1]])
    out = task.compute(task.policy, batch, torch.tensor([3, 1]))
    assert torch.equal(out.loss_inputs["margin_rewards_chosen"], m.chosen[[3, 1]])
    assert torch.equal(out.loss_inputs["margin_rewards_rejected"], m.rejected[[3, 1]])


def test_the_cache_is_reused_and_a_change_computes_anew(tokenizer, pair_rows, tmp_path, two_models):
    ref, dpo = two_models
    first = _task(tokenizer, pair_rows, tmp_path, ref, dpo).margins
    stamp = first.path.stat().st_mtime_ns
    again = _task(tokenizer, pair_rows, tmp_path, ref, dpo).margins
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # read, not recomputed
    assert torch.equal(again.chosen, first.chosen)
    other_beta = _task(tokenizer, pair_rows, tmp_path, ref, dpo, beta=0.2).margins
    assert other_beta.path != first.path
    torch.testing.assert_close(other_beta.chosen, first.chosen * 2.0)  # beta 0.2 vs the default 0.1
    _save(make_model(tokenizer, seed=2), tokenizer, dpo)  # the margin model changed on disk
    changed = _task(tokenizer, pair_rows, tmp_path, ref, dpo).margins
    assert changed.path not in (first.path, other_beta.path)
    assert not torch.allclose(changed.chosen, first.chosen)
    assert len(list((tmp_path / "cache").glob("margin_rewards-*.safetensors"))) == 3


def test_a_peft_adapter_margin_model_reads_its_base_as_reference(tokenizer, pair_rows, tmp_path, two_models):
    """A LoRA 'DPO model' saved by peft: margin = beta * (log pi_adapter - log pi_base), pi_base = adapters off."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    ref, _ = two_models
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(ref),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ref), tmp_path / "adapter").merge_and_unload()
    merged_dir = _save(merged, tokenizer, tmp_path / "merged")
    from_adapter = _task(tokenizer, pair_rows, tmp_path, ref, tmp_path / "adapter").margins
    from_merged = _task(tokenizer, pair_rows, tmp_path, ref, merged_dir).margins
    torch.testing.assert_close(from_adapter.chosen, from_merged.chosen, atol=1e-4, rtol=0)
    assert from_adapter.chosen.abs().max() > 1e-3  # the adapter does change the log-probs


# ------------------------------------------------------------------------------------------------
# the loop on the two-objective task (a random tiny model: no world built)


@pytest.fixture(scope="module")
def objective_files(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("modpo")
    base = _save(make_model(tokenizer, seed=0), tokenizer, root / "base")
    margin = _save(make_model(tokenizer, seed=1), tokenizer, root / "margin")
    data = write_jsonl(root / "pairs.jsonl", objectives.objective_rows(16, seed=5))
    return root, base, margin, data


def _modpo_cfg(objective_files, out: Path, *extra: str):
    root, base, margin, data = objective_files
    return load_train_config(CONFIGS / "modpo_tiny.yaml", [
        f"output_dir={out}", f"tiny_lm_objectives.world={root / 'w'}", f"tiny_lm_objectives.model.pretrained={base}",
        f"tiny_lm_objectives.objectives_data={data}", f"tiny_lm_objectives.margin.models=[{margin}]",
        f"tiny_lm_objectives.margin.cache_dir={root / 'cache'}", "tiny_lm_objectives.eval_samples_per_prompt=1",
        "per_device_batch_size=4", "progress_bar=false", *extra])


def test_modpo_resumes_like_the_uninterrupted_run_and_exports_for_stock_transformers(objective_files, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = ["checkpoint_every=1"]
    full = train(_modpo_cfg(objective_files, tmp_path / "a", "max_steps=3", *ckpt))
    train(_modpo_cfg(objective_files, tmp_path / "b", "max_steps=1", *ckpt))
    tr = setup(_modpo_cfg(objective_files, tmp_path / "b", "max_steps=3", "resume_from=latest", *ckpt))
    resumed = run(tr)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history[1:]], abs=1e-6)
    # the final model (save_pretrained) loads in stock transformers and gives the trained policy's logits
    loaded = AutoModelForCausalLM.from_pretrained(resumed.final_dir).eval()
    ids = tr.task.tokenizer("review : the soup was good .", return_tensors="pt")["input_ids"]
    trained = tr.task.policy.causal_lm.eval()
    trained.set_attn_implementation("sdpa")  # the loop's packed attention needs packed batches
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights, match", [("[0.5,0.6]", "sum to 1"), ("[0.0,1.0]", "w_0 > 0"),
                                            ("[0.2,0.3,0.5]", "names 1 margin objective")])
def test_a_bad_weight_vector_fails_before_training(objective_files, tmp_path, capsys, weights, match):
    from diffdpo.cli import main

    root, base, margin, data = objective_files
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(CONFIGS / "modpo_tiny.yaml"), f"output_dir={tmp_path / 'run'}",
              f"tiny_lm_objectives.model.pretrained={base}", f"tiny_lm_objectives.objectives_data={data}",
              f"tiny_lm_objectives.margin.models=[{margin}]", f"loss.modpo_weights={weights}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "modpo_weights" in err and len(err.strip().splitlines()) == 2  # message + --debug hint
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_preference_set_without_the_objective_column_fails_before_training(objective_files, tmp_path, capsys):
    from diffdpo.cli import main

    root, base, margin, data = objective_files
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    del rows[3]["objective"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(CONFIGS / "modpo_margin_dpo_tiny.yaml"), f"output_dir={tmp_path / 'run'}",
              f"tiny_lm_objectives.world={tmp_path / 'w'}", f"tiny_lm_objectives.model.pretrained={base}",
              f"tiny_lm_objectives.objectives_data={bad}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "row 3: no 'objective' column" in err and str(bad) in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_objectives_labels_and_the_mixture_shares():
    """Gold judges and Bradley-Terry label probabilities by hand; data mostly ordered by each objective's judge.

    positivity(" good , warm and calm .") = 3, positivity(" bad .") = -1: P = sigma(1.0 * 4) = 0.982014;
    conciseness: -2 vs -6 words: P = sigma(0.5 * 4) = sigma(2) = 0.880797.
    """
    long_good, short_bad = " good , warm and calm .", " bad ."
    assert objectives.positivity(" good , warm , calm and fresh .") == 4.0
    assert objectives.conciseness(" good , warm , calm and fresh .") == -8.0
    assert objectives.preference_probability("positivity", long_good, short_bad) == pytest.approx(0.982014, abs=1e-6)
    assert objectives.preference_probability("conciseness", " good .", long_good) == pytest.approx(0.880797, abs=1e-6)
    rows = objectives.objective_rows(200, seed=0)
    for name in objectives.OBJECTIVES:
        mine = [r for r in rows if r["objective"] == name]
        judge = objectives.GOLD[name]
        assert 0.7 < sum(judge(r["chosen"]) > judge(r["rejected"]) for r in mine) / len(mine) < 1.0  # noisy labels
    sets = margin_lib.split_objectives(rows, objectives.OBJECTIVES)
    mix = objectives.mixture_rows(sets, [0.3, 0.7], seed=0)
    assert len(mix) == 200 and sum(r in sets["positivity"] for r in mix) == 60


# ------------------------------------------------------------------------------------------------
# the sweep


def test_the_front_sweep_writes_one_point_per_method_and_weight(world, tmp_path):
    from diffdpo.recipes import modpo

    cfg = modpo.ModpoFrontConfig(out_dir=str(tmp_path / "front"), world=str(world.root), fast=True,
                                 weights=[0.3, 0.7], dpo_config=str(CONFIGS / "modpo_margin_dpo_tiny.yaml"),
                                 modpo_config=str(CONFIGS / "modpo_tiny.yaml"))
    modpo.run_modpo_front(cfg)
    rows = modpo.read_results(tmp_path / "front" / "results.csv")
    points = sorted((r["method"], float(r["w_positivity"])) for r in rows)
    assert points == sorted([("dpo_positivity", 1.0), ("dpo_conciseness", 0.0)]
                            + [(m, w) for m in modpo.METHODS for w in (0.3, 0.7)])
    assert all(math.isfinite(float(r["gold_positivity"])) for r in rows)
    assert len(modpo.read_results(tmp_path / "front" / "summary.csv")) == len(rows)  # one seed
    assert (tmp_path / "front" / "front.png").stat().st_size > 0
    assert "Goal" in (tmp_path / "front" / "summary.md").read_text()


def test_hypervolume_and_goal_by_hand():
    """Points (1, -4) and (3, -8) above the reference (-4, -12): (3+4)(-8+12) = 28, plus the strip
    (1+4)(-4+8) = 20 -> 48. A dominated point adds nothing."""
    from diffdpo.recipes import modpo

    assert modpo.hypervolume([(1.0, -4.0), (3.0, -8.0)]) == pytest.approx(48.0)
    assert modpo.hypervolume([(1.0, -4.0), (3.0, -8.0), (0.0, -9.0)]) == pytest.approx(48.0)
    rows = [{"method": m, "w_positivity": 0.5, "seed": s, "gold_positivity": p + s * 0.1, "gold_conciseness": c}
            for s in range(3) for m, p, c in (("modpo", 2.0, -4.0), ("mixed_dpo", 1.0, -5.0))]
    summary, volumes = modpo.summarise(rows)
    ok, lines = modpo.check_goal(summary)
    assert ok is True and "dominated by MODPO w_0=0.5" in lines[0]
    rows = [dict(r, gold_positivity=r["gold_positivity"] - (3.0 if r["method"] == "modpo" else 0)) for r in rows]
    ok, lines = modpo.check_goal(modpo.summarise(rows)[0])
    assert ok is False and "not covered" in lines[0]


def test_reward_model_margins_are_its_scores_of_each_pair(tokenizer, pair_rows, tmp_path, two_models):
    """kind reward_model: each pair's margin is the reward model's score of its own prompt + completion."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from diffdpo.rewards.lm import HFRewardModel

    ref, _ = two_models
    torch.manual_seed(3)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                    num_labels=1, pad_token_id=tokenizer.pad_token_id))
    rm_dir = _save(rm, tokenizer, tmp_path / "rm")
    m = _task(tokenizer, pair_rows, tmp_path, ref, rm_dir, kinds=["reward_model"]).margins
    rows = pair_rows[:6]
    want = HFRewardModel(rm_dir)([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    torch.testing.assert_close(m.rejected[:, 0], want.float(), atol=1e-5, rtol=0)
    assert not torch.allclose(m.chosen, m.rejected)


def test_shipped_modpo_configs_load():
    from diffdpo.config import load_config
    from diffdpo.recipes.modpo import ModpoFrontConfig

    cfg = load_train_config(CONFIGS / "modpo_tiny.yaml")
    assert cfg.loss.type == "modpo" and cfg.loss.modpo_weights == [0.5, 0.5]
    assert cfg.tiny_lm_objectives.margin.kinds == ["implicit"]
    assert load_train_config(CONFIGS / "modpo_margin_dpo_tiny.yaml").tiny_lm_objectives.objective == "conciseness"
    front = load_config(ModpoFrontConfig, CONFIGS / "modpo_front_tiny.yaml")
    assert len(front.weights) == 5 and front.seeds == [0, 1, 2]

"""Online DPO / SLiC / IPO and IPO-MD on the shared loop (``tiny_lm_online``): labels, bad input, resume, learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffdpo.online import lm as online
from diffdpo.task import register_task
from diffdpo.toy import tiny_lm_online
from diffdpo.toy.tiny_lm import judge
from diffdpo.train import TrainConfig, apply_loss, load_train_config, micro_batches, setup, train, train_step

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["lm_online_ipo_tiny.yaml", "lm_online_dpo_tiny.yaml", "lm_online_slic_tiny.yaml", "lm_ipomd_tiny.yaml"]

# the entry points in pyproject.toml register these once the package is (re)installed; registering the same
# spec objects here keeps the tests independent of the installed metadata
for _spec in (online.TASK, tiny_lm_online.TASK):
    register_task(_spec)


def _cfg(world, out: Path, name: str = "lm_online_ipo_tiny.yaml", *overrides: str) -> TrainConfig:
    return load_train_config(REPO / "configs" / name, [
        f"tiny_lm_online.world={world.root}", f"output_dir={out}", "progress_bar=false", "per_device_batch_size=4",
        "tiny_lm_online.online.eval_samples_per_prompt=2", "tiny_lm_online.online.max_new_tokens=12", *overrides])


def _batch(task, n: int = 8) -> tuple[dict, torch.Tensor]:
    items = [task.dataset()[i] for i in range(n)]
    return task.collate(items), torch.arange(n)


def _seq_logps(task, prompt_ids: list[int], completion_ids: list[int]) -> tuple[float, float]:
    """Policy and reference summed log-probs of one completion, by its own forward."""
    from diffdpo.lm.logps import sequence_logps
    from diffdpo.lm.packing import Group, collate_groups

    tokens = collate_groups([Group(prompt_ids, [completion_ids])], "padded", task.tokenizer.pad_token_id)
    with torch.no_grad():
        ref_hidden, ref_head = task._reference_hidden(tokens)
        out = task.policy(tokens, ref_hidden, ref_head)
    return float(sequence_logps(out.logps, tokens)[0]), float(sequence_logps(out.ref_logps, tokens)[0])


COUNTS = ("count/samples", "count/annotated_pairs", "count/ties", "count/empty", "count/duplicates", "count/no_eos",
          "count/nan_labels", "count/judge_errors", "count/unlabelled")


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_trains_through_the_cli(world, tmp_path, name):
    from diffdpo.cli import main

    out = tmp_path / "run"
    overrides = [f"tiny_lm_online.world={world.root}", f"output_dir={out}", "progress_bar=false", "max_steps=2",
                 "per_device_batch_size=4", "eval_every=2", "tiny_lm_online.online.eval_samples_per_prompt=2"]
    assert main(["train", "--config", str(REPO / "configs" / name), *overrides]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in (*COUNTS, "loss", "online/samples_per_s", "online/length", "kl/sampled", "pairs"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert r["count/samples"] == 8 and r["count/annotated_pairs"] <= 4
    assert {"eval/win_rate", "eval/win_rate_low", "eval/win_rate_high", "eval/wins", "eval/ties"} <= set(rows[-1])
    result = json.loads((out / "final" / "eval.json").read_text())
    assert result["eval/wins"] + result["eval/ties"] + result["eval/losses"] == 8  # 4 held-out prompts x 2


def test_online_ipo_with_the_exact_judge_beats_the_base(world, tmp_path):
    """30 steps of 16 prompts (960 sampled reviews): the gold win rate against the reference, with ties as
    non-wins, and the judged positive rate both rise well above the base's."""
    cfg = _cfg(world, tmp_path / "run", "lm_online_ipo_tiny.yaml", "per_device_batch_size=16", "max_steps=30",
               "eval_every=30", "tiny_lm_online.online.eval_samples_per_prompt=16")
    result = train(cfg)
    last = result.history[-1]
    assert last["eval/wins"] + last["eval/ties"] + last["eval/losses"] == 64
    assert last["eval/win_rate_low"] > 0.5, last  # the lower Wilson bound, ties counting as non-wins
    assert last["eval/positive_rate"] > last["eval/base_positive_rate"] + 0.15, last
    assert last["eval/wins"] > 5 * last["eval/losses"], last
    assert 0 < last["kl/sampled"] < 20


def test_hard_labels_put_the_judges_winner_first(world, tmp_path):
    """Online DPO: for each usable pair, chosen = the completion with the higher judge score; the log-probs
    are those of the sampled token ids (checked against each completion's own forward)."""
    tr = setup(_cfg(world, tmp_path / "run", "lm_online_dpo_tiny.yaml", "max_steps=1"))
    task = tr.task
    batch, keys = _batch(task)
    comps = task.sample(batch["prompts"], keys)  # what compute() will sample: same seeds, same weights
    out = task.compute(tr.model, batch, keys)
    expected_c, expected_r, ties = [], [], 0
    for i in range(len(batch["prompts"])):
        a, b = comps.texts[2 * i], comps.texts[2 * i + 1]
        if not a.strip() or not b.strip() or comps.completion_ids[2 * i] == comps.completion_ids[2 * i + 1]:
            continue  # an empty completion or a duplicate pair: not even annotated
        if judge(a) == judge(b):
            ties += 1  # a tie: annotated, counted, left out of the loss
            continue
        win, lose = (2 * i, 2 * i + 1) if judge(a) > judge(b) else (2 * i + 1, 2 * i)
        expected_c.append(_seq_logps(task, comps.prompt_ids[win], comps.completion_ids[win]))
        expected_r.append(_seq_logps(task, comps.prompt_ids[lose], comps.completion_ids[lose]))
    assert out.size == len(expected_c) > 0
    assert out.metrics["count/ties"] == ties
    torch.testing.assert_close(out.policy_chosen.detach(), torch.tensor([c[0] for c in expected_c]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.ref_rejected, torch.tensor([r[1] for r in expected_r]), atol=1e-4, rtol=1e-5)
    assert "preference_probs" not in out.loss_inputs


def test_soft_ipo_labels_reach_the_loss(world, tmp_path):
    """p = 0.5 everywhere: the online IPO loss p (h - 1/(2 tau))^2 + (1 - p) (h + 1/(2 tau))^2 becomes
    h^2 + 1/(4 tau^2) = h^2 + 25 with tau = beta = 0.1, h = (pi(y1) - ref(y1)) - (pi(y2) - ref(y2)) summed."""
    tr = setup(_cfg(world, tmp_path / "run", "lm_online_ipo_tiny.yaml", "max_steps=1"))
    task = tr.task
    with torch.no_grad():  # move the policy off the reference so that h != 0
        g = torch.Generator().manual_seed(0)
        for name, p in task.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    task.annotator = lambda prompts, a, b: torch.full((len(prompts),), 0.5)
    batch, keys = _batch(task)
    out = task.compute(tr.model, batch, keys)
    n_ok = 8 - int(out.metrics["count/duplicates"]) - int(out.metrics["count/empty"])
    assert out.size == n_ok and out.metrics["count/ties"] == n_ok  # soft labels keep ties (p = 0.5)
    torch.testing.assert_close(out.loss_inputs["preference_probs"], torch.full((n_ok,), 0.5))
    losses, _ = apply_loss(out, tr.cfg.loss)
    h = (out.policy_chosen - out.ref_chosen) - (out.policy_rejected - out.ref_rejected)
    assert h.abs().max() > 1e-3
    torch.testing.assert_close(losses, h**2 + 25.0)


class _NaNReward:
    """A reward model that returns NaN for completions that contain "good"."""

    def __call__(self, prompts, completions):
        return torch.tensor([float("nan") if "good" in c else judge(c) for c in completions])


class _FailsOnce:
    """The exact judge, raising on its first call only."""

    def __init__(self) -> None:
        from diffdpo.toy.tiny_lm_judge import TinyWorldJudge

        self.calls, self.inner = 0, TinyWorldJudge().prefer

    def __call__(self, prompts, a, b):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("judge service unavailable")
        return self.inner(prompts, a, b)


@pytest.mark.parametrize("case", ["nan_reward", "judge_raises", "no_eos"])
def test_bad_generations_and_annotators_are_counted_and_the_loss_stays_finite(world, tmp_path, case):
    from diffdpo.rewards.lm import BradleyTerryPreference

    extra = ["tiny_lm_online.online.max_new_tokens=1"] if case == "no_eos" else []
    tr = setup(_cfg(world, tmp_path / "run", "lm_online_dpo_tiny.yaml", "max_steps=2", "per_device_batch_size=8",
                    *extra))
    if case == "nan_reward":
        tr.task.annotator = BradleyTerryPreference(_NaNReward(), hard=True)
    elif case == "judge_raises":
        tr.task.annotator = _FailsOnce()
    batches = micro_batches(tr.task, tr.cfg, tr.accelerator, tr.state)
    with pytest.warns(RuntimeWarning, match="unavailable") if case == "judge_raises" else _nothing():
        logs = [train_step(tr, batches) for _ in range(2)]
    assert all(math.isfinite(v) for log in logs for v in log.values())
    assert all(log["skipped"] == 0.0 for log in logs)
    if case == "nan_reward":
        assert sum(log["count/nan_labels"] for log in logs) > 0
        assert all(log["count/nan_labels"] == log["count/unlabelled"] for log in logs)
    elif case == "judge_raises":
        # the failed batch call is retried pair by pair: one error counted, every pair still labelled
        assert logs[0]["count/judge_errors"] == 1 and logs[1]["count/judge_errors"] == 0
        assert logs[0]["count/unlabelled"] == 0
    else:
        assert all(log["count/no_eos"] == log["count/samples"] == 16 for log in logs)
        assert all(log["online/length"] == 1.0 for log in logs if log["pairs"] > 0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_batch_with_no_usable_pair_gives_zero_loss_and_no_gradient(world, tmp_path):
    tr = setup(_cfg(world, tmp_path / "run", "lm_online_ipo_tiny.yaml", "max_steps=1"))
    tr.task.annotator = lambda prompts, a, b: torch.full((len(prompts),), float("nan"))
    before = {k: v.clone() for k, v in tr.task.state_dict().items()}
    logs = train_step(tr, micro_batches(tr.task, tr.cfg, tr.accelerator, tr.state))
    assert logs["pairs"] == 0 and logs["skipped"] == 0.0 and logs["grad_norm"] == 0.0
    assert "loss" not in logs and logs["count/nan_labels"] == logs["count/unlabelled"] == 4 - logs["count/duplicates"]
    after = tr.task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # AdamW, no weight decay: nothing moved


def test_samples_are_seeded_by_epoch_and_prompt_not_by_the_batch(world, tmp_path):
    tr = setup(_cfg(world, tmp_path / "run", "lm_online_ipo_tiny.yaml", "max_steps=1"))
    task = tr.task
    n = len(task.dataset())
    prompts = [task.dataset()[i]["prompt"] for i in range(4)]
    full = task.sample(prompts, torch.arange(4))
    alone = task.sample(prompts[2:3], torch.tensor([2]))
    assert alone.completion_ids == full.completion_ids[4:6]
    # the same prompt in the next epoch gets fresh samples; mixed epochs come back in the input order
    mixed = task.sample(prompts[:2], torch.tensor([0, n + 1]))
    assert mixed.completion_ids[:2] == full.completion_ids[:2]
    later = task.sample(prompts[1:2], torch.tensor([n + 1]))
    assert mixed.completion_ids[2:] == later.completion_ids and later.completion_ids != full.completion_ids[2:4]


def test_resuming_reproduces_the_uninterrupted_run(world, tmp_path):
    """Generation is seeded by keys and the run seed, weights and optimizer come back exactly: a run cut
    after 2 steps and resumed gives the same losses, labels, KL and evaluation as the run left alone."""
    base = ["checkpoint_every=2", "eval_every=2", "lm_ipomd_tiny.yaml"]
    name = base.pop()
    full = train(_cfg(world, tmp_path / "a", name, "max_steps=4", *base))
    train(_cfg(world, tmp_path / "b", name, "max_steps=2", *base))
    resumed = train(_cfg(world, tmp_path / "b", name, "max_steps=4", "resume_from=latest", *base))
    assert [h["step"] for h in resumed.history] == [3, 4]
    for h_full, h_res in zip(full.history[2:], resumed.history):
        assert set(h_res) == set(h_full)
        for key in ("loss", "kl/sampled", "count/ties", "count/annotated_pairs", "online/length", "eval/win_rate"):
            if key in h_full:  # the evaluation runs at steps 2 and 4
                assert h_res[key] == pytest.approx(h_full[key], rel=1e-5, abs=1e-6), key
    assert "eval/win_rate" in resumed.history[-1]


def test_the_online_configs_load():
    for name in CONFIGS:
        cfg = load_train_config(REPO / "configs" / name)
        section = cfg.tiny_lm_online
        assert cfg.task == "tiny_lm_online" and cfg.eval_every > 0 and section.lora.enabled
        assert section.annotator.kind == "exact" and section.online.eval_samples_per_prompt > 0
    assert load_train_config(REPO / "configs" / "lm_ipomd_tiny.yaml").tiny_lm_online.online.mixture == 0.125
    assert load_train_config(REPO / "configs" / "lm_online_slic_tiny.yaml").loss.type == "hinge"


def test_bad_online_settings_are_named():
    from diffdpo.config import UserError

    with pytest.raises(UserError, match="mixture"):
        load_train_config(REPO / "configs" / "lm_ipomd_tiny.yaml", ["tiny_lm_online.online.mixture=1.0"])
    with pytest.raises((UserError, ValueError), match="online.labels=soft needs loss.type=ipo"):
        cfg = load_train_config(REPO / "configs" / "lm_online_dpo_tiny.yaml", ["tiny_lm_online.online.labels=soft",
                                                                              "tiny_lm_online.world=/nonexistent/x"])
        online.OnlineLMTask(cfg.tiny_lm_online, loss_type="sigmoid", accelerator=None, annotator=lambda *a: None)


def test_the_generic_task_trains_with_an_hf_reward_model_by_path(world, tmp_path):
    """``task: lm_online`` on any causal LM and prompt file, annotated by a saved sequence classifier
    (Bradley-Terry soft labels for online IPO); a causal LM given as the reward model is a named error."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from diffdpo.toy.tiny_lm import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                    num_labels=1, pad_token_id=0))
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts, eval_prompts = tiny_lm_online.write_prompts(world.root)
    common = ["task=lm_online", f"lm_online.model.pretrained={world.model_dir}", f"lm_online.data.source={prompts}",
              f"lm_online.online.eval_source={eval_prompts}", "lm_online.online.eval_samples_per_prompt=2",
              "lm_online.online.max_new_tokens=12", "lm_online.lora.enabled=true", "loss.type=ipo",
              "per_device_batch_size=4", "max_steps=2", "eval_every=2", "progress_bar=false", "tensorboard=false"]
    result = train(load_train_config(None, [*common, f"output_dir={tmp_path / 'run'}",
                                            f"lm_online.annotator.path={tmp_path / 'rm'}"]))
    last = result.history[-1]
    assert last["count/annotated_pairs"] > 0 and math.isfinite(last["loss"]) and "eval/win_rate" in last
    with pytest.raises(ValueError, match="expected a sequence-classification model"):
        train(load_train_config(None, [*common, f"output_dir={tmp_path / 'bad'}",
                                       f"lm_online.annotator.path={world.model_dir}"]))

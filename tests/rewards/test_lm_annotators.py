"""LM annotators (diffdpo.rewards.lm) and reward-model training (diffdpo.rewards.reward_model), on tiny seeded
models saved with save_pretrained and on the tiny LM world."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from diffdpo.config import UserError, load_config
from diffdpo.rewards.lm import (
    BradleyTerryPreference,
    HFPreferenceModel,
    HFRewardModel,
    NoisyJudge,
    ProgramJudge,
    finite_mask,
    hard_preference,
)
from diffdpo.rewards.reward_model import (
    RewardModelConfig,
    bradley_terry_losses,
    main,
    pair_accuracy,
    pairwise_losses,
    read_pairs,
    split_pairs,
    train_reward_model,
)
from diffdpo.toy import tiny_lm
from diffdpo.toy.tiny_lm_judge import TinyWorldJudge

PROMPT = tiny_lm.prompt_for("the soup")
TINY_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "reward_model_tiny.yaml")


def _reviews(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """n (prompt, positive review, negative review) triples, all distinct pairs."""
    rng = random.Random(seed)
    prompts, good, bad = [], [], []
    while len(prompts) < n:
        prompts.append(tiny_lm.prompt_for(rng.choice(tiny_lm.SUBJECTS)))
        good.append(tiny_lm.review(rng.sample(tiny_lm.POSITIVE, rng.randint(1, 4))))
        bad.append(tiny_lm.review(rng.sample(tiny_lm.NEGATIVE, rng.randint(1, 4))))
    return prompts, good, bad


# ------------------------------------------------------------------------------------------------
# programmatic judges


def test_tiny_world_judge_scores_hand_written_reviews():
    """good, warm, calm: +3; bad and good: 0; awful: -1 (the prompt plays no part)."""
    judge = TinyWorldJudge()
    completions = [" good , warm and calm .", " bad and good .", " awful ."]
    assert judge([PROMPT] * 3, completions).tolist() == [3.0, 0.0, -1.0]
    assert judge(["anything"] * 3, completions).dtype == torch.float32
    prefs = judge.prefer([PROMPT] * 3, completions, [" bad and good .", " good and bad .", " fun ."])
    assert prefs.tolist() == [1.0, 0.5, 0.0]


def test_judges_reject_columns_of_different_lengths_or_non_strings():
    judge = TinyWorldJudge()
    with pytest.raises(ValueError, match="completions must be a list of 2 strings"):
        judge([PROMPT, PROMPT], [" good ."])
    with pytest.raises(ValueError, match=r"completions_b\[0\] is a list"):
        judge.prefer([PROMPT], [" good ."], [[{"role": "assistant", "content": "bad"}]])


def test_noisy_judge_with_no_noise_gives_the_gold_labels_and_flip_rate_one_flips_every_label():
    prompts, good, bad = _reviews(200, seed=0)
    gold = TinyWorldJudge()
    a = [g if i % 2 else b for i, (g, b) in enumerate(zip(good, bad))]  # winners on either side
    b = [b if i % 2 else g for i, (g, b) in enumerate(zip(good, bad))]
    gold_labels = gold.prefer(prompts, a, b)
    assert set(gold_labels.tolist()) == {0.0, 1.0}
    assert torch.equal(NoisyJudge(gold).prefer(prompts, a, b), gold_labels)
    assert torch.equal(NoisyJudge(gold, flip_rate=1.0).prefer(prompts, a, b), 1.0 - gold_labels)


def test_noisy_judge_flips_about_flip_rate_of_the_labels():
    """2000 pairs at flip rate 0.3: the count of flips is Binomial(2000, 0.3), mean 600 and sd 20.5; 4 sd
    either side is [518, 682]. A second seed gives other flips."""
    prompts, good, bad = _reviews(2000, seed=1)
    gold = TinyWorldJudge()
    flipped = (NoisyJudge(gold, flip_rate=0.3, seed=0).prefer(prompts, good, bad) == 0.0).sum().item()
    assert 518 <= flipped <= 682
    other = NoisyJudge(gold, flip_rate=0.3, seed=1).flips(prompts, good, bad)
    assert not torch.equal(NoisyJudge(gold, flip_rate=0.3, seed=0).flips(prompts, good, bad), other)


def test_noisy_judge_labels_do_not_depend_on_batch_size_order_or_sides():
    prompts, good, bad = _reviews(64, seed=2)
    judge = NoisyJudge(TinyWorldJudge(), flip_rate=0.4, seed=3)
    full = judge.prefer(prompts, good, bad)
    chunks = torch.cat([judge.prefer(prompts[i:i + 5], good[i:i + 5], bad[i:i + 5]) for i in range(0, 64, 5)])
    assert torch.equal(chunks, full)
    order = list(range(64))
    random.Random(0).shuffle(order)
    shuffled = judge.prefer([prompts[i] for i in order], [good[i] for i in order], [bad[i] for i in order])
    assert torch.equal(shuffled, full[order])
    assert torch.equal(judge.prefer(prompts, bad, good), 1.0 - full)


def test_noisy_judge_length_bias_adds_bias_times_words():
    """' good , warm and calm .' has 6 whitespace pieces: 3 (gold) + 0.25 * 6 = 4.5; ' awful .': -1 + 0.5 = -0.5.
    With bias 1.0 the long mixed review (0 + 6) beats the short positive one (1 + 2)."""
    gold = TinyWorldJudge()
    judge = NoisyJudge(gold, length_bias=0.25)
    assert judge([PROMPT, PROMPT], [" good , warm and calm .", " awful ."]).tolist() == [4.5, -0.5]
    long_mixed, short_good = " good , bad , fun and dull .", " fun ."
    assert gold.prefer([PROMPT], [long_mixed], [short_good]).item() == 0.0
    assert NoisyJudge(gold, length_bias=1.0).prefer([PROMPT], [long_mixed], [short_good]).item() == 1.0


def test_noisy_judge_rejects_a_flip_rate_outside_zero_one():
    with pytest.raises(ValueError, match="flip_rate"):
        NoisyJudge(TinyWorldJudge(), flip_rate=1.5)


def test_bradley_terry_preference_is_sigmoid_of_the_reward_difference():
    """r(a) = 2.0, r(b) = 0.5: sigmoid(1.5) = 1 / (1 + e^-1.5) = 0.8175745; swapped 0.1824255; equal 0.5.
    hard=True: 1.0, 0.0, 0.5."""
    table = {"a": 2.0, "b": 0.5}
    rm = ProgramJudge(lambda prompt, completion: table[completion])
    soft = BradleyTerryPreference(rm)(["x"] * 3, ["a", "b", "a"], ["b", "a", "a"])
    assert soft.tolist() == pytest.approx([0.8175745, 0.1824255, 0.5], abs=1e-6)
    hard = BradleyTerryPreference(rm, hard=True)(["x"] * 3, ["a", "b", "a"], ["b", "a", "a"])
    assert hard.tolist() == [1.0, 0.0, 0.5]


def test_a_nan_reward_gives_a_nan_preference_and_finite_mask_finds_it():
    table = {"a": 1.0, "b": 0.0, "broken": float("nan")}
    rm = ProgramJudge(lambda prompt, completion: table[completion])
    for pm in (BradleyTerryPreference(rm), BradleyTerryPreference(rm, hard=True), NoisyJudge(rm, flip_rate=1.0).prefer):
        prefs = pm(["x"] * 3, ["a", "broken", "a"], ["b", "a", "broken"])
        assert finite_mask(prefs).tolist() == [True, False, False]
    assert hard_preference(torch.tensor([float("nan")]), torch.tensor([float("nan")])).isnan().all()


# ------------------------------------------------------------------------------------------------
# transformers sequence classifiers


def _tiny_llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tiny_lm.vocabulary()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, initializer_range=0.5, **extra)  # far from uniform attention


@pytest.fixture(scope="module")
def tiny_classifiers(tmp_path_factory):
    """Seeded tiny Llama models saved with save_pretrained: {"reward" (num_labels=1), "two_labels",
    "causal_lm"}."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("lm_annotators")
    tokenizer = tiny_lm.build_tokenizer()
    paths = {}
    for name, build in (("reward", lambda: LlamaForSequenceClassification(_tiny_llama_config(num_labels=1))),
                        ("two_labels", lambda: LlamaForSequenceClassification(_tiny_llama_config(num_labels=2))),
                        ("causal_lm", lambda: LlamaForCausalLM(_tiny_llama_config()))):
        torch.manual_seed(0)
        model = build()
        head = model.score if hasattr(model, "score") else model.lm_head
        torch.nn.init.normal_(head.weight, std=1.0)  # rewards far from 0
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def test_hf_reward_model_loads_by_path_and_matches_a_direct_forward(tiny_classifiers):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    prompts, good, bad = _reviews(4, seed=4)
    completions = good[:2] + bad[:2]
    rewards = HFRewardModel(tiny_classifiers["reward"])(prompts, completions)
    assert rewards.shape == (4,) and rewards.dtype == torch.float32
    model = LlamaForSequenceClassification.from_pretrained(tiny_classifiers["reward"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifiers["reward"])
    with torch.no_grad():
        direct = [model(**tokenizer([p + c], return_tensors="pt")).logits[0, 0] for p, c in zip(prompts, completions)]
    assert rewards.tolist() == pytest.approx([float(d) for d in direct], abs=1e-5)
    assert rewards.std() > 0.01  # the score layer reads something


def test_hf_reward_model_does_not_depend_on_the_batch_size(tiny_classifiers):
    prompts, good, bad = _reviews(12, seed=5)
    completions = [g if i % 2 else b for i, (g, b) in enumerate(zip(good, bad))]  # different lengths
    one = HFRewardModel(tiny_classifiers["reward"], batch_size=1)(prompts, completions)
    eight = HFRewardModel(tiny_classifiers["reward"], batch_size=8)(prompts, completions)
    torch.testing.assert_close(one, eight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [HFRewardModel, HFPreferenceModel])
def test_a_causal_lm_folder_is_not_a_reward_model(tiny_classifiers, cls):
    path = tiny_classifiers["causal_lm"]
    with pytest.raises(ValueError, match="sequence-classification") as err:
        cls(path)
    assert str(path) in str(err.value) and "LlamaForCausalLM" in str(err.value)
    with pytest.raises(ValueError, match="num_labels=2"):
        cls(tiny_classifiers["two_labels"])


def test_a_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no such local folder"):
        HFRewardModel(tmp_path / "nothing-here")


def test_hf_preference_model_averages_both_orders(tiny_classifiers):
    """P(a, b) = (sigmoid(f(a, b)) + 1 - sigmoid(f(b, a))) / 2 with f the logit of 'prompt + a <eos> b', so
    P(a, b) + P(b, a) = 1 and P(a, a) = 0.5."""
    prompts, good, bad = _reviews(6, seed=6)
    pm = HFPreferenceModel(tiny_classifiers["reward"], batch_size=4)
    p_ab, p_ba = pm(prompts, good, bad), pm(prompts, bad, good)
    torch.testing.assert_close(p_ab + p_ba, torch.ones(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(pm(prompts, good, good), torch.full((6,), 0.5), atol=1e-6, rtol=0)
    f = HFRewardModel(tiny_classifiers["reward"])  # the same classifier read as a scorer of whole texts
    f_ab = f(prompts, [g + " <eos> " + b for g, b in zip(good, bad)])
    f_ba = f(prompts, [b + " <eos> " + g for g, b in zip(good, bad)])
    expected = 0.5 * (torch.sigmoid(f_ab) + 1 - torch.sigmoid(f_ba))
    torch.testing.assert_close(p_ab, expected, atol=1e-6, rtol=0)
    assert (p_ab - 0.5).abs().max() > 1e-3  # not trivially a tie


# ------------------------------------------------------------------------------------------------
# training


def test_losses_are_ln2_at_indifference_and_match_hand_numbers():
    """BT: -log sigmoid(0) = ln 2; r_w - r_l = 2: log(1 + e^-2) = 0.126928. Pairwise at logits (0, 0):
    (ln 2 + ln 2) / 2; at (2, -2): log(1 + e^-2) = 0.126928."""
    zeros = torch.zeros(3)
    assert bradley_terry_losses(zeros, zeros).tolist() == pytest.approx([math.log(2)] * 3)
    assert pairwise_losses(zeros, zeros).tolist() == pytest.approx([math.log(2)] * 3)
    assert bradley_terry_losses(torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(0.126928, abs=1e-6)
    assert pairwise_losses(torch.tensor([2.0]), torch.tensor([-2.0])).item() == pytest.approx(0.126928, abs=1e-6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_lm.build_world(tmp_path_factory.mktemp("rm") / "world", seed=0, n_pairs=160, sft_steps=20)


def _config(built, out, **kw):
    base = dict(model=str(built.model_dir), data=str(built.pairs), eval_fraction=0.25, lr=1e-3, epochs=2,
                batch_size=16, max_length=64, output_dir=str(out))
    return RewardModelConfig(**{**base, **kw})


def _held_out(cfg):
    return split_pairs(read_pairs(cfg.data), cfg.eval_fraction, cfg.seed)[1]


def test_bradley_terry_training_reaches_high_held_out_accuracy_and_loads_back(world, tmp_path):
    cfg = _config(world, tmp_path / "bt")
    metrics = train_reward_model(cfg)
    print("bradley_terry held-out accuracy", metrics["eval_accuracy_before"], "->", metrics["eval_accuracy_after"])
    assert metrics["head"] == "value_head" and metrics["n_eval"] == 40
    assert metrics["eval_accuracy_after"] > 0.9
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert json.loads((tmp_path / "bt" / "metrics.json").read_text())["eval_accuracy_after"] == metrics[
        "eval_accuracy_after"]
    loaded = HFRewardModel(tmp_path / "bt")
    pairs = _held_out(cfg)
    rewards = loaded([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    assert float((rewards[:40] > rewards[40:]).double().mean()) == metrics["eval_accuracy_after"]


def test_pairwise_training_reaches_high_held_out_accuracy_and_loads_back(world, tmp_path):
    cfg = _config(world, tmp_path / "pairwise", kind="pairwise")
    metrics = train_reward_model(cfg)
    print("pairwise held-out accuracy", metrics["eval_accuracy_before"], "->", metrics["eval_accuracy_after"])
    assert metrics["eval_accuracy_after"] > 0.8
    pm = HFPreferenceModel(tmp_path / "pairwise")
    assert pair_accuracy("pairwise", pm.scorer, _held_out(cfg)) == metrics["eval_accuracy_after"]


def test_a_trained_sequence_classifier_trains_on_as_one(world, tmp_path):
    """head=auto on a sequence classifier keeps its head; head=value_head on it is refused."""
    first = train_reward_model(_config(world, tmp_path / "first", max_steps=1))
    again = train_reward_model(_config(world, tmp_path / "again", model=str(tmp_path / "first"), max_steps=1))
    assert first["head"] == "value_head" and again["head"] == "sequence_classification"
    assert again["eval_accuracy_before"] == first["eval_accuracy_after"]
    with pytest.raises(UserError, match="already is a sequence classifier"):
        train_reward_model(_config(world, tmp_path / "third", model=str(tmp_path / "first"), head="value_head"))


def test_main_trains_from_the_shipped_config_and_refuses_a_used_output_dir(world, tmp_path, capsys):
    """The second run refuses the folder; with overwrite=true it reruns, bit-identically (same seed)."""
    out = tmp_path / "main"
    args = [f"model={world.model_dir}", f"data={world.pairs}", f"output_dir={out}", "max_steps=1"]
    assert main(TINY_CONFIG, args) == 0
    assert "held-out pair accuracy (32 pairs)" in capsys.readouterr().out
    assert (out / "metrics.json").is_file() and (out / "config.json").is_file()
    with pytest.raises(UserError, match="is not empty .* overwrite=true"):
        main(TINY_CONFIG, args)
    first = json.loads((out / "metrics.json").read_text())
    assert main(TINY_CONFIG, [*args, "overwrite=true"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["train_loss"] == first["train_loss"]  # seeded: split, batch order and the new head
    assert again["eval_accuracy_after"] == first["eval_accuracy_after"]


def test_an_empty_model_and_data_come_from_the_world_builder(world, tmp_path, monkeypatch):
    """world='module:function' is called with world_dir and supplies what model/data leave empty."""
    (tmp_path / "my_world.py").write_text(
        "from types import SimpleNamespace\n"
        f"def build(root):\n    return SimpleNamespace(model_dir={str(world.model_dir)!r}, pairs={str(world.pairs)!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _config(world, tmp_path / "out", model="", data="", world="my_world:build", world_dir="unused", max_steps=1)
    assert train_reward_model(cfg)["model"] == str(world.model_dir)
    with pytest.raises(UserError, match="world='my_world:nothing': cannot import it"):
        train_reward_model(_config(world, tmp_path / "out2", model="", world="my_world:nothing", world_dir="x"))


def test_a_bad_data_row_names_the_file_and_the_row(world, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl, row 1: missing column 'rejected'"):
        train_reward_model(_config(world, tmp_path / "out", data=str(data)))


def test_the_shipped_config_loads():
    cfg = load_config(RewardModelConfig, TINY_CONFIG)
    assert cfg.kind == "bradley_terry" and cfg.world == "diffdpo.toy.tiny_lm:build_world" and not cfg.model
    with pytest.raises(ValueError, match="set model and data"):
        load_config(RewardModelConfig, None, ["kind=pairwise"])
    with pytest.raises(ValueError, match="kind"):
        load_config(RewardModelConfig, TINY_CONFIG, ["kind=ranking"])


def test_the_reward_model_command_trains_and_a_bad_key_exits_2(world, tmp_path, capsys):
    """``diffdpo reward-model train`` is the same ``main``; a wrong key is a one-line error with exit status 2."""
    from diffdpo.cli import main as cli_main

    out = tmp_path / "cli"
    assert cli_main(["reward-model", "train", "--config", TINY_CONFIG, f"model={world.model_dir}",
                     f"data={world.pairs}", f"output_dir={out}", "max_steps=1"]) == 0
    assert (out / "metrics.json").is_file() and "accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli_main(["reward-model", "train", "--config", TINY_CONFIG, "no_such_key=1"])
    assert exc.value.code == 2 and "no_such_key" in capsys.readouterr().err

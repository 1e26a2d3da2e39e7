"""MEET / control tokens (diffdpo.lm.control, tiny_lm_control, diffdpo meet, diffdpo generate): stage 1 trains
only the control-token rows, resume, a trained control picks the behaviour, stock transformers/peft loading,
bad input before training, and the recipe's fast mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffdpo.cli import main as cli_main
from diffdpo.toy.tiny_lm import EVAL_SUBJECTS, judge, prompt_for

from .conftest import write_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DELTA = "model.model.embed_tokens.trainable_tokens_delta.default"


def _stage1_cfg(world, out: Path, *extra: str):
    from diffdpo.train import load_train_config

    return load_train_config(CONFIGS / "meet_tiny_stage1.yaml", [
        f"output_dir={out}", f"tiny_lm_control.world={world.root}", "tiny_lm_control.eval_samples_per_prompt=0",
        "max_steps=2", "per_device_batch_size=4", "progress_bar=false", "checkpoint_every=1", *extra])


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    """A 2-step stage-1 run (checkpoint every step): the trainer before training, the state before and after."""
    from diffdpo.train import run, setup

    tr = setup(_stage1_cfg(world, tmp_path_factory.mktemp("meet") / "a"))
    trainable = sorted(n for n, p in tr.task.policy.named_parameters() if p.requires_grad)
    before = {k: v.clone() for k, v in tr.task.policy.model.state_dict().items()}
    result = run(tr)
    after = {k: v.clone() for k, v in tr.task.policy.model.state_dict().items()}
    return {"tr": tr, "trainable": trainable, "before": before, "after": after, "result": result}


def test_stage1_trains_only_the_control_token_embeddings(stage1, world):
    """Only the peft Trainable Tokens rows require grad and change; the export differs from the base model only
    in the two new control rows (input rows trained, output rows the BOS row's copy)."""
    from transformers import AutoModelForCausalLM

    assert stage1["trainable"] == [DELTA]
    assert [p.shape for p in stage1["tr"].task.trainable_parameters()] == [torch.Size([2, 64])]
    before, after = stage1["before"], stage1["after"]
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.embed_tokens.trainable_tokens_delta.default"]
    ids = stage1["tr"].task.control_ids
    exported = AutoModelForCausalLM.from_pretrained(stage1["result"].final_dir)
    base = AutoModelForCausalLM.from_pretrained(world.model_dir)
    n_old = base.get_input_embeddings().weight.shape[0]
    assert ids == [n_old, n_old + 1]
    b, e = base.state_dict(), exported.state_dict()
    for name, value in b.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(e[name][:n_old], value), name
        else:
            assert torch.equal(e[name], value), name
    mean = b["model.embed_tokens.weight"].mean(0)
    trained = e["model.embed_tokens.weight"][ids]
    assert not torch.allclose(trained, mean.expand_as(trained)), "the control rows did not move from their start"
    assert torch.equal(e["lm_head.weight"][ids], b["lm_head.weight"][[1, 1]])  # BOS (id 1) row copied


def test_stage1_adapter_loads_in_stock_peft_and_resume_matches(stage1, world, tmp_path):
    """The control adapter alone carries the controls on a base resized in stock transformers; resuming from the
    step-1 checkpoint ends where the uninterrupted run ended."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffdpo.train import run, setup

    final = stage1["result"].final_dir
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(world.model_dir)
    base.resize_token_embeddings(len(tokenizer))
    peft_model = PeftModel.from_pretrained(base, str(final / "control_adapter")).eval()
    exported = AutoModelForCausalLM.from_pretrained(final).eval()
    enc = tokenizer(["<ctrl:good> " + prompt_for("the bread"), "<ctrl:bad> " + prompt_for("the bread")],
                    return_tensors="pt")
    with torch.no_grad():
        h_peft = peft_model(**enc, output_hidden_states=True).hidden_states[-1]
        h_exported = exported(**enc, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(h_peft, h_exported)

    checkpoint = final.parent / "checkpoints" / "step-0000001"
    resumed = run(setup(_stage1_cfg(world, tmp_path / "b", f"resume_from={checkpoint}")))
    assert [h["loss"] for h in resumed.history] == pytest.approx([stage1["result"].history[1]["loss"]], abs=1e-6)
    a = load_file(str(final / "control_adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.final_dir / "control_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_shipped_configs_train_controls_that_pick_the_behaviour(world, tmp_path, capsys):
    """Stage 1 then stage 2 through ``diffdpo train`` with the shipped configs, then ``diffdpo generate``: the
    "good" control writes far more positive reviews than "bad". With controls that did nothing the two positive
    rates (64 samples each) would differ by a binomial spread of sd ~0.09; the margin 0.4 is over 4 sd."""
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = [f"tiny_lm_control.world={world.root}", "tiny_lm_control.eval_samples_per_prompt=0", "progress_bar=false"]
    assert cli_main(["train", "--config", str(CONFIGS / "meet_tiny_stage1.yaml"), f"output_dir={s1}", *common]) == 0
    assert cli_main(["train", "--config", str(CONFIGS / "meet_tiny_stage2.yaml"), f"output_dir={s2}", *common,
                     f"tiny_lm_control.model.pretrained={s1 / 'final'}", "optim.lr=1e-4", "max_steps=16"]) == 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt_for(s)} for s in EVAL_SUBJECTS])
    rates = {}
    for control in ("good", "bad"):
        capsys.readouterr()
        assert cli_main(["generate", "--model", str(s2 / "final"), "--prompts", str(prompts), "--control", control,
                         "--n", "16", "--max-new-tokens", "12", "--seed", "5"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert len(rows) == 64 and {r["control"] for r in rows} == {control}
        rates[control] = sum(judge(r["completion"]) > 0 for r in rows) / len(rows)
    assert rates["good"] - rates["bad"] >= 0.4, rates
    with pytest.raises(SystemExit) as exc:
        cli_main(["generate", "--model", str(s2 / "final"), "--prompts", "review : the bread was", "--control", "meh"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'meh' is not a trained control" in err and "bad, good" in err


def _control_cfg(tmp_path: Path, source: Path, *extra: str):
    from diffdpo.train import load_train_config

    return load_train_config(None, ["task=lm_control", "loss.type=sft", f"output_dir={tmp_path / 'out'}",
                                    f"lm_control.data.source={source}",
                                    f"lm_control.model.pretrained={tmp_path / 'no_model_here'}", *extra])


@pytest.mark.parametrize("rows,extra,message", [
    ([{"prompt": "review : the soup was", "completion": " good .", "label": True}], [],
     "row 0: no 'control' column"),
    ([{"prompt": "review : the soup was", "completion": " good .", "control": "great"}], [],
     "control='great' is not a trained control"),
    ([{"prompt": "review : the soup was", "completion": " good .", "rating": 5}],
     ["lm_control.control.column=rating", "lm_control.control.levels={'1': bad, '2': good}"],
     "rating=5 is not a trained control"),
])
def test_bad_control_data_fails_before_any_model_is_loaded(tmp_path, rows, extra, message):
    """The data error (naming file and row) comes first: the model path does not even exist."""
    from diffdpo.train import setup

    source = write_jsonl(tmp_path / "ratings.jsonl", rows)
    with pytest.raises(ValueError, match=message) as exc:
        setup(_control_cfg(tmp_path, source, *extra))
    assert str(source) in str(exc.value)


def test_config_errors_name_the_key(tmp_path):
    from diffdpo.config import ConfigError
    from diffdpo.train import setup

    source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "control": "good"}])
    with pytest.raises(ConfigError, match="control.chosen='fine' is not one of control.names"):
        _control_cfg(tmp_path, source, "lm_control.control.chosen=fine")
    with pytest.raises(ConfigError, match="control.mode=text needs control.texts"):
        _control_cfg(tmp_path, source, "lm_control.control.mode=text")
    with pytest.raises(ValueError, match="loss.type=sft"):
        setup(_control_cfg(tmp_path, source, "loss.type=sigmoid"))


def test_ratings_are_mapped_to_their_controls(world, tmp_path):
    """Pointwise ratings: each row's control token (by control.levels) sits right after BOS in its prompt."""
    from diffdpo.toy.tiny_lm_control import write_ratings
    from diffdpo.train import load_train_config, setup

    cfg = load_train_config(None, [
        "task=tiny_lm_control", "loss.type=sft", f"output_dir={tmp_path / 'out'}", f"tiny_lm_control.world={world.root}",
        "tiny_lm_control.data_kind=ratings", "tiny_lm_control.control.column=rating", "tiny_lm_control.data.max_rows=8",
        "tiny_lm_control.control.levels={positive: good, negative: bad}", "tiny_lm_control.eval_samples_per_prompt=0",
        "max_steps=1", "progress_bar=false"])
    task = setup(cfg).task
    ratings = [json.loads(line) for line in write_ratings(world).read_text().splitlines()[:8]]
    good, bad = task.control_ids
    for item, row in zip(task.dataset().items, ratings):
        want = good if row["rating"] == "positive" else bad
        assert item["prompt_ids"][:2] == [task.tokenizer.bos_token_id, want]
        assert (judge(row["completion"]) > 0) == (row["rating"] == "positive")


def test_meet_recipe_fast_mode_writes_its_tables(world, tmp_path):
    from diffdpo.recipes.meet import MEETConfig, check_goal, read_results, run_meet

    run_meet(MEETConfig(out_dir=str(tmp_path), world=str(world.root), fast=True))
    rows = read_results(tmp_path / "results.csv")
    assert [(r["method"], r["control"]) for r in rows] == [
        (m, c) for m in ("meet", "joint", "text") for c in ("good", "bad")]
    assert all(0.0 <= float(r["controllability"]) <= 1.0 and float(r["n"]) == 16 for r in rows)
    summary = read_results(tmp_path / "summary.csv")
    assert len(summary) == 9 and {s["control"] for s in summary} == {"good", "bad", "mean"}
    assert (tmp_path / "meet.png").stat().st_size > 0
    assert "Goal (issue 16)" in (tmp_path / "summary.md").read_text()
    goal, met, detail = check_goal(rows)
    assert met is not None and "seed 0" in detail


def test_goal_check_compares_meet_and_joint_seed_by_seed():
    """Mean over controls per seed: meet (0.9+0.7)/2 = 0.8 vs joint (1.0+0.4)/2 = 0.7 on seed 0, but
    0.6 vs 0.65 on seed 1: not met on every seed."""
    from diffdpo.recipes.meet import check_goal

    rows = [{"method": m, "seed": s, "control": c, "controllability": v, "gold_score": 0.0}
            for m, s, c, v in [("meet", 0, "good", 0.9), ("meet", 0, "bad", 0.7), ("joint", 0, "good", 1.0),
                               ("joint", 0, "bad", 0.4), ("meet", 1, "good", 0.6), ("meet", 1, "bad", 0.6),
                               ("joint", 1, "good", 0.7), ("joint", 1, "bad", 0.6)]]
    _, met, detail = check_goal(rows)
    assert met is False
    assert "seed 0: 0.800 vs 0.700" in detail and "seed 1: 0.600 vs 0.650" in detail
    _, met, _ = check_goal(rows[:4])
    assert met is True

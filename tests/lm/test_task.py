"""The LM task on the shared training loop: DPO behaviour, references, KTO, dense DPO, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffdpo.train import TrainConfig, load_train_config, setup, train, train_step
from tests.lm.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "lm_dpo_tiny.yaml"


def _cfg(world, tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_train_config(TINY, [f"tiny_lm.world={world.root}", f"output_dir={tmp_path / 'run'}",
                                           "progress_bar=false", "tiny_lm.eval_samples_per_prompt=4", *overrides])


def _one_step(cfg: TrainConfig) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from diffdpo.train import micro_batches

    tr = setup(cfg)
    before = {k: v.clone() for k, v in tr.task.state_dict().items()}
    logs = train_step(tr, micro_batches(tr.task, cfg, tr.accelerator, tr.state))
    return logs, before, tr.task.state_dict()


@pytest.mark.parametrize("extra", [["tiny_lm.layout=packed"], ["tiny_lm.lora.enabled=true", "tiny_lm.layout=padded"]])
def test_first_step_loss_is_ln2_and_weights_move(world, tmp_path, extra):
    """Policy == reference at step 0, so every pair's DPO loss is -log sigmoid(0) = ln 2."""
    cfg = _cfg(world, tmp_path, "max_steps=1", "per_device_batch_size=4", *extra)
    logs, before, after = _one_step(cfg)
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs["kl/token"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < logs["overopt/topk_mass"] <= 1 and logs["overopt/topk_entropy"] > 0
    assert logs["length/chosen"] > 0 and logs["skipped"] == 0.0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if "tiny_lm.lora.enabled=true" in extra:
        assert all("lora_" in k for k in before)


def test_precomputed_reference_is_cached_and_equals_the_live_one(world, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(world, tmp_path, "max_steps=1", "per_device_batch_size=4", "tiny_lm.reference.kind=precomputed",
               f"tiny_lm.reference.cache_dir={cache}", "tiny_lm.data.max_rows=24")
    tr = setup(cfg)
    task = tr.task
    (path,) = cache.glob("ref_logps-*.safetensors")
    assert task.ref_policy is None and task.precomputed.logps.shape == (24, 2)
    # the cached values are the untrained policy's log-probs, as a live reference would compute them
    batch = task.collate([task.dataset()[i] for i in (3, 7, 11)])
    with torch.no_grad():
        out = task.compute(task.policy, batch, torch.arange(3))
    torch.testing.assert_close(out.ref_chosen, out.policy_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ref_rejected, out.policy_rejected, rtol=1e-5, atol=1e-5)
    # reused, not recomputed; other data -> another key
    mtime = path.stat().st_mtime_ns
    setup(cfg)
    assert path.stat().st_mtime_ns == mtime
    setup(_cfg(world, tmp_path, "max_steps=1", "per_device_batch_size=4", "tiny_lm.reference.kind=precomputed",
               f"tiny_lm.reference.cache_dir={cache}", "tiny_lm.data.max_rows=20"))
    assert len(list(cache.glob("ref_logps-*.safetensors"))) == 2


@pytest.mark.parametrize("overrides", [
    ["loss.type=kto", "loss.beta=0.2"],
    ["loss.type=ipo", "loss.beta=0.5"],
    ["tiny_lm.dense_gamma=4.0", "tiny_lm.average_log_prob=true", "loss.beta=2.0"],
    ["loss.type=simpo", "loss.beta=2.0", "tiny_lm.average_log_prob=true"],
    ["loss.type=length_dpo", "loss.length_alpha=0.05"],
])
def test_other_objectives_train(world, tmp_path, overrides):
    cfg = _cfg(world, tmp_path, "max_steps=2", "per_device_batch_size=4", *overrides)
    result = train(cfg)
    assert result.steps == 2 and result.nonfinite_total == 0
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_truncated_away_pairs_are_skipped_not_nan(world, tmp_path):
    """Pairs whose prompt fills max_length are reported and left out; the rest train with finite losses."""
    rows = [json.loads(line) for line in world.pairs.read_text().splitlines()[:8]]
    long_prompt = [{**r, "prompt": r["prompt"] + " and the film was"} for r in rows[:3]]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows + long_prompt)
    cfg = _cfg(world, tmp_path, "max_steps=2", "per_device_batch_size=4", "tiny_lm.data.max_length=8",
               f"tiny_lm.data.source={data}", "tiny_lm.average_log_prob=true")
    with pytest.warns(UserWarning, match=r"8 examples kept, 3 skipped: row 8: completion empty after truncation"):
        result = train(cfg)
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_cli_training_raises_the_preferred_behaviour(world, tmp_path, capsys):
    """`diffdpo train --config configs/lm_dpo_tiny.yaml`: the judged positive rate of sampled reviews rises."""
    from diffdpo.cli import main

    out_dir = tmp_path / "cli"
    code = main(["train", "--config", str(TINY), f"tiny_lm.world={world.root}", f"output_dir={out_dir}",
                 "progress_bar=false", "max_steps=25", "tiny_lm.eval_samples_per_prompt=16"])
    assert code == 0
    result = json.loads((out_dir / "final" / "eval.json").read_text())
    before, after = result["before"]["eval/positive_rate"], result["after"]["eval/positive_rate"]
    assert 0.3 < before < 0.75, before  # the base policy writes both kinds of review
    assert after > before + 0.2, (before, after)
    assert "positive rate" in capsys.readouterr().out
    logs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["rewards/accuracies"] > 0.9 and logs[-1]["kl/token"] > 0


def test_shipped_lm_configs_load():
    for path in sorted((REPO / "configs").glob("lm_*.yaml")):
        cfg = load_train_config(path)
        assert cfg.task in ("lm", "tiny_lm", "lm_online", "tiny_lm_online") and cfg.loss.beta is not None, path


def test_resuming_reproduces_the_uninterrupted_losses(world, tmp_path):
    base = ["per_device_batch_size=4", "checkpoint_every=2", "tiny_lm.layout=packed", "tiny_lm.lora.enabled=true"]
    full = train(_cfg(world, tmp_path / "a", "max_steps=4", *base))
    train(_cfg(world, tmp_path / "b", "max_steps=2", *base))
    resumed = train(_cfg(world, tmp_path / "b", "max_steps=4", "resume_from=latest", *base))
    assert [h["step"] for h in resumed.history] == [3, 4]
    for h_full, h_res in zip(full.history[2:], resumed.history):
        assert h_res["loss"] == pytest.approx(h_full["loss"], rel=1e-5, abs=1e-7)


def test_a_missing_lm_data_file_is_named_before_the_model_loads(tmp_path, capsys):
    from diffdpo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(REPO / "configs" / "lm_dpo_qwen_lora.yaml"), f"output_dir={tmp_path / 'x'}",
              f"lm.data.source={tmp_path / 'pairs.jsonl'}", "lm.model.pretrained=Qwen/not-downloaded",
              "mixed_precision=no", "gradient_checkpointing=false"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "lm.data.source=" in err and "pairs.jsonl" in err and "Traceback" not in err


def test_lm_data_with_no_usable_example_fails_before_the_model_loads(world, tmp_path, capsys):
    """Every completion empty: the data error (with the reader's report) comes first, so the missing model
    folder is never reached."""
    from diffdpo.cli import main

    data = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "review : the soup was", "chosen": "", "rejected": ""}] * 4)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(REPO / "configs" / "lm_dpo_qwen_lora.yaml"), f"output_dir={tmp_path / 'x'}",
              f"lm.data.source={data}", f"lm.model.pretrained={tmp_path / 'no_model'}",
              f"lm.model.tokenizer={world.model_dir}", "mixed_precision=no", "gradient_checkpointing=false"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no example left to train on" in err and "no_model" not in err

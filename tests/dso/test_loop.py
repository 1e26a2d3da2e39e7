"""One round of the DSO loop end to end, and the loop's optional auxiliary loss term."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from diffdpo.adapters import LoraConfig
from diffdpo.recipes.dso import DSOConfig, run_dso
from diffdpo.train import LogpsOut, TrainConfig, train
from tests.dso.box_generator import BoxGenerator

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "toy_voxels"



def _small_cfg(tmp_path: Path, lora_rank: int = 4, dro_anchored: bool = False, **kw) -> DSOConfig:
    settings = dict(output_dir=str(tmp_path), rounds=1, samples_per_class=8, group_size=4, eval_per_class=4,
                    steps_per_round=3, batch_size=2, grid_samples=2,
                    lora=LoraConfig(enabled=lora_rank > 0, rank=max(lora_rank, 1), alpha=8.0))
    cfg = DSOConfig(**{**settings, **kw})
    cfg.loss.dro_anchored = dro_anchored
    cfg.optim.warmup_steps = 0
    return cfg


@pytest.mark.parametrize("loss_type", ["sigmoid", "dso_dro", "kto"])
def test_one_round_writes_scores_report_plot_and_render(tmp_path, loss_type):
    cfg = _small_cfg(tmp_path, aux_weight=0.5, aux_source="winners", dro_anchored=loss_type == "dso_dro")
    cfg.loss.type = loss_type
    report = run_dso(cfg, BoxGenerator())
    assert len(report["summaries"]) == 2  # base + one round
    for name in ("report.json", "stability.png", "grid_round_01.png", "round_01/report.json",
                 "round_01/scores.parquet"):
        assert (tmp_path / name).is_file(), name
    scores = pd.read_parquet(tmp_path / "round_01" / "scores.parquet")
    assert set(scores["split"]) == {"train", "eval"} and len(scores) == 2 * 8 + 2 * 4
    assert {"condition", "group", "seed", "valid", "stable", "angle_deg"} <= set(scores.columns)
    info = json.loads((tmp_path / "round_01" / "report.json").read_text())
    assert info["dataset"]["mixed_groups"] >= 1 and info["last_step"]["loss/aux"] > 0


@pytest.mark.skipif(not (SHIPPED / "voxel_model.json").is_file(), reason="no shipped toy voxel checkpoint")
def test_one_round_on_the_shipped_voxel_model_measures_fidelity(tmp_path):
    from diffdpo.toy.voxel_model import VoxelGenerator

    gen = VoxelGenerator.load(SHIPPED, sample_steps=4)
    cfg = _small_cfg(tmp_path, aux_weight=0.1, min_fidelity=0.1, samples_per_class=4, eval_per_class=2)
    report = run_dso(cfg, gen, gen.reference_bank(20))
    s = report["summaries"][-1]
    assert 0 <= s["fidelity"] <= 1 and 0 <= s["recognisability"] <= 1 and s["volume_ratio"] > 0
    assert "diversity" in s and (tmp_path / "grid_round_01.png").is_file()


class _AuxTask:
    """Two scalar log-likelihoods w*x (DPO pushes w up); the aux term (w + 3)^2 pulls w down harder."""

    def __init__(self, aux: bool) -> None:
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.module = torch.nn.Module()
        self.module.w = self.w
        self.aux = aux

    def trainable_module(self):
        return self.module

    def trainable_parameters(self):
        return [self.w]

    def dataset(self):
        return [torch.tensor([1.0, -1.0])] * 4

    def collate(self, items):
        return torch.stack(items)

    def compute(self, model, batch, keys):
        logp = self.w * batch  # (B, 2)
        zeros = torch.zeros(len(batch))
        aux = ((self.w + 3.0) ** 2).expand(len(batch)) if self.aux else None
        return LogpsOut(logp[:, 0], logp[:, 1], zeros, zeros, aux_losses=aux)

    def state_dict(self):
        return {"w": self.w.detach()}

    def load_state_dict(self, state):
        self.w.data.copy_(state["w"])

    def export(self, out_dir):
        pass


def test_the_loop_adds_a_task_supplied_aux_loss(tmp_path):
    def run(aux: bool) -> tuple[float, list[dict]]:
        task = _AuxTask(aux)
        cfg = TrainConfig(output_dir=str(tmp_path / str(aux)), max_steps=1, per_device_batch_size=2,
                          tensorboard=False, progress_bar=False, checkpoint_every=0)
        cfg.loss.beta, cfg.optim.lr, cfg.optim.max_grad_norm, cfg.optim.weight_decay = 1.0, 0.1, 0.0, 0.0
        history = train(cfg, task).history
        return float(task.w.detach()), history

    w_plain, h_plain = run(False)
    w_aux, h_aux = run(True)
    assert "loss/aux" not in h_plain[0] and h_aux[0]["loss/aux"] == pytest.approx(9.0)
    assert h_aux[0]["loss"] == pytest.approx(h_plain[0]["loss"])  # the preference loss is logged alone
    assert w_plain > 0 > w_aux  # the aux gradient (6 at w = 0) outweighs the DPO one (1)


def test_fidelity_gate_turns_stable_but_unrecognisable_samples_into_losers():
    from diffdpo.dso.evaluate import Scored
    from diffdpo.recipes.dso.rounds import reward_labels

    records = [{"condition": 0, "valid": True, "stable": True, "fidelity": 0.6},
               {"condition": 0, "valid": True, "stable": True, "fidelity": 0.1},  # a legless slab
               {"condition": 0, "valid": True, "stable": False, "fidelity": 0.7},
               {"condition": 0, "valid": False, "stable": False, "fidelity": 0.0}]
    scored = Scored(torch.zeros(4, 1), records)
    assert reward_labels(DSOConfig(), scored).tolist() == [True, True, False, False]  # DSO: stability only
    assert reward_labels(DSOConfig(min_fidelity=0.25), scored).tolist() == [True, False, False, False]
    assert [r["label"] for r in records] == [True, False, False, False]
    records[0]["recognised"] = 0.0  # stable and close to a table, but nearer to some stool: identity lost
    for r in records[1:]:
        r["recognised"] = 1.0
    gated = reward_labels(DSOConfig(require_recognised=True), scored).tolist()
    assert gated == [False, True, False, False]


def test_round_steps_fixed_epochs_capped_by_steps_per_round():
    from diffdpo.recipes.dso.loop import round_steps

    assert round_steps(DSOConfig(steps_per_round=100, batch_size=8), 320) == 100  # epochs off: fixed steps
    cfg = DSOConfig(steps_per_round=100, batch_size=8, epochs_per_round=1.0)
    assert round_steps(cfg, 320) == 40 and round_steps(cfg, 634) == 79  # 320 / 8, round(634 / 8)
    assert round_steps(cfg, 2000) == 100 and round_steps(cfg, 3) == 1  # the cap, and at least one step
    with pytest.raises(ValueError, match="epochs_per_round"):
        DSOConfig(epochs_per_round=-1.0)


def _forced_losers(losing: set[tuple[int, int]]):
    """Four samples per class of the box world, in groups of two; the groups in ``losing`` lose all."""
    from diffdpo.dso.evaluate import score_samples

    gen = BoxGenerator()
    conds, groups = [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1]
    scored = score_samples(gen, conds, list(range(8)), groups=groups)
    for rec in scored.records:
        rec["stable"] = (rec["condition"], rec["group"]) not in losing
    return gen, scored


@pytest.mark.parametrize("pointwise", [False, True])
def test_groups_without_a_good_sample_get_a_scored_training_data_winner(pointwise):
    from diffdpo.recipes.dso.rounds import build_items, rescue_items

    cfg = DSOConfig(rescue_pairs=1)
    gen, scored = _forced_losers({(0, 1), (1, 0)})
    items, counts = build_items(cfg, scored, 1, pointwise)
    assert counts["mixed_groups"] == 0 and items == []  # DSO alone: every group is uniform, nothing to train on
    extra, rc, pool = rescue_items(cfg, gen, scored, 1, pointwise)
    assert rc["losing_groups"] == 2 and rc["rescue_pool"] == 8  # 2 x 1 + 2 draws per class in need
    good = [i for i, r in enumerate(pool.records) if r["label"]]
    assert rc["rescue_pool_good"] == len(good) and all(pool.records[i]["stable"] for i in good)
    assert rc["rescued_groups"] == len({pool.records[i]["condition"] for i in good}) >= 1  # one losing group per class
    losers = {0: scored.latents[2:4], 1: scored.latents[4:6]}  # the members of (0, 1) and (1, 0)
    for it in extra:
        c = it["cond"]
        if pointwise and it["label"]:
            assert any(torch.equal(it["latents"][0], pool.latents[i]) and pool.records[i]["condition"] == c for i in good)
        elif pointwise:
            assert any(torch.equal(it["latents"][0], x) for x in losers[c])
        else:
            w, lo = it["latents"]
            assert any(torch.equal(w, pool.latents[i]) and pool.records[i]["condition"] == c for i in good)
            assert any(torch.equal(lo, x) for x in losers[c])  # never a loser of another class or group
    assert len(extra) == rc["rescued_groups"] * (2 if pointwise else 1)  # rescue_pairs = 1 loser per group


def test_rescue_is_off_by_default_and_needs_training_latents():
    from diffdpo.recipes.dso.rounds import build_items, rescue_items

    cfg = DSOConfig()
    gen, scored = _forced_losers({(0, 0)})
    build_items(cfg, scored, 1, False)
    assert rescue_items(cfg, gen, scored, 1, False) == ([], {}, None)
    bare = type("Bare", (), {})()
    with pytest.raises(ValueError, match="training_latents"):
        rescue_items(DSOConfig(rescue_pairs=2), bare, scored, 1, False)
    with pytest.raises(ValueError, match="rescue_pairs"):
        DSOConfig(rescue_pairs=-1)


def test_accept_round_compares_good_shares_overall_and_per_class():
    from diffdpo.recipes.dso.validation import accept_round

    def recs(goods: dict[int, list[bool]]):
        return [{"condition": c, "label": g} for c, gs in goods.items() for g in gs]

    before = recs({0: [True, False, False, False], 1: [True, True, False, False]})  # 3/8; 0.25 and 0.5
    cfg = DSOConfig(validate_per_class=4, class_drop_tolerance=0.1)
    ok, info = accept_round(cfg, before, recs({0: [True, True, True, False], 1: [True, True, False, False]}))
    assert ok and info["good_before"] == 0.375 and info["good_after"] == 0.625 and info["worst_class_change"] == 0.0
    # better overall (4/8), but class 1 fell from 0.5 to 0.25: -0.25 < -0.1
    ok, info = accept_round(cfg, before, recs({0: [True, True, True, False], 1: [True, False, False, False]}))
    assert not ok and info["worst_class_change"] == -0.25
    ok, _ = accept_round(DSOConfig(class_drop_tolerance=0.3), before,
                         recs({0: [True, True, True, False], 1: [True, False, False, False]}))
    assert ok  # within a looser tolerance
    ok, info = accept_round(cfg, before, recs({0: [True, False, False, False], 1: [True, False, False, False]}))
    assert not ok and info["good_after"] == 0.25  # worse overall
    assert "worst_class_recognised_change" not in info  # no fidelity measurements: not checked

    # with fidelity measurements: class 0 keeps its (low) good share but stops being recognised
    def with_rec(goods, recognised):
        out = recs(goods)
        for r, k in zip(out, [k for c in goods for k in recognised[c]]):
            r["recognised"] = float(k)
        return out

    goods = {0: [True, False, False, False], 1: [True, True, False, False]}
    rec_before = with_rec(goods, {0: [1, 1, 1, 0], 1: [1, 1, 1, 1]})
    ok, info = accept_round(cfg, rec_before, with_rec(goods, {0: [1, 1, 0, 0], 1: [1, 1, 1, 1]}))
    assert not ok and info["worst_class_change"] == 0.0 and info["worst_class_recognised_change"] == -0.25
    ok, info = accept_round(cfg, rec_before, with_rec(goods, {0: [1, 1, 1, 0], 1: [1, 1, 1, 0]}))
    assert not ok and info["worst_class_recognised_change"] == -0.25  # class 1: 1.0 -> 0.75
    ok, info = accept_round(cfg, rec_before, with_rec(goods, {0: [1, 1, 1, 1], 1: [1, 1, 1, 1]}))
    assert ok and info["worst_class_recognised_change"] == 0.0


class _ChangedWhenTrained(BoxGenerator):
    """The box world, except that any trained adapter (a nonzero LoRA B) sets every upper box's shift to
    ``trained_shift``: 1.0 knocks them all off (worse), 0.0 centres them so all stand (better)."""

    def __init__(self, trained_shift: float) -> None:
        super().__init__()
        self.trained_shift = trained_shift

    def sample(self, conditions, seeds):
        x = super().sample(conditions, seeds)
        if any(torch.count_nonzero(p) for n, p in self.network.named_parameters() if "lora_B" in n):
            x[:, 3] = self.trained_shift
        return x


def test_a_round_that_makes_the_policy_worse_is_reverted(tmp_path):
    gen = _ChangedWhenTrained(trained_shift=1.0)
    report = run_dso(_small_cfg(tmp_path, validate_per_class=8), gen)
    info = report["rounds"][1]
    v = info["validation"]
    assert v["accepted"] is False and v["good_after"] < v["good_before"] and v["worst_class_change"] < 0
    assert report["summaries"][1] == report["summaries"][0]  # weights restored: the base's eval
    lora = [p for n, p in gen.network.named_parameters() if "lora_B" in n]
    assert lora and all(torch.count_nonzero(p) == 0 for p in lora)  # B starts at zero and is back there
    scores = pd.read_parquet(tmp_path / "round_01" / "scores.parquet")
    assert (scores["split"] == "validation").sum() == 2 * 8


def test_an_improving_round_is_kept(tmp_path):
    """Training makes every sample stable, so validation must accept the round and keep the adapter;
    a rejected round (reverted adapter, the base's eval repeated) fails each assertion below."""
    gen = _ChangedWhenTrained(trained_shift=0.0)
    report = run_dso(_small_cfg(tmp_path, validate_per_class=8), gen)
    v = report["rounds"][1]["validation"]
    assert v["accepted"] is True and v["step"] == 1.0
    assert v["good_after"] == 1.0 > v["good_before"]
    lora = [p for n, p in gen.network.named_parameters() if "lora_B" in n]
    assert any(torch.count_nonzero(p) for p in lora)  # the update is still in the weights
    assert report["summaries"][1]["stable_rate"] == 1.0 > report["summaries"][0]["stable_rate"]


def test_training_validation_and_eval_seeds_never_meet_over_twelve_rounds(tmp_path):
    """Every (class, seed) the run sampled, read back from the rounds' scores files: training and
    validation seeds are fresh in every round and never touch the held-out evaluation set."""
    cfg = _small_cfg(tmp_path, rounds=12, validate_per_class=2, backtrack=1, samples_per_class=4, group_size=2,
                     eval_per_class=2, steps_per_round=1, grid_samples=1)
    run_dso(cfg, BoxGenerator())
    scores = pd.concat([pd.read_parquet(tmp_path / f"round_{r:02d}" / "scores.parquet") for r in range(1, 13)])
    keys = {split: list(zip(part["condition"], part["seed"])) for split, part in scores.groupby("split")}
    train, evals = keys["train"], set(keys["eval"])
    validation = keys.get("validation", [])
    assert len(train) == 12 * 2 * 4 and len(set(train)) == len(train)  # fresh every round
    assert validation and len(set(validation)) == len(validation)  # rounds without pairs skip validation
    assert not set(train) & evals and not set(validation) & evals and not set(train) & set(validation)
    assert len(evals) == 2 * 2  # the held-out set is the same in every round


def test_the_seed_layout_has_disjoint_blocks():
    """All seeds of run seeds 0-2, rounds 1-12, 10 classes, 3 samples each, every validation try."""
    from diffdpo.recipes.dso import seeds

    n, classes, tries = 3, range(10), range(seeds.MAX_TRIES)
    held_out = {seeds.eval_seed(c, i) for c in classes for i in range(100)}
    seen: set[int] = set()
    for s in range(3):
        for r in range(1, 13):
            block = [seeds.train_seed(s, r, c, i) for c in classes for i in range(n)]
            block += [seeds.validation_seed(s, r, c, i, k) for c in classes for i in range(n) for k in tries]
            assert len(set(block)) == len(block) and not set(block) & held_out and not set(block) & seen
            seen |= set(block)
    round_seeds = [seeds.round_seed(s, r) for s in range(3) for r in range(seeds.MAX_ROUND + 1)]
    assert len(set(round_seeds)) == len(round_seeds)
    with pytest.raises(ValueError, match="round"):
        seeds.train_seed(0, seeds.MAX_ROUND + 1, 0, 0)


class _TooFarIsWorse(BoxGenerator):
    """The box world, except that a step knob above 0.3 knocks every upper box off."""

    def __init__(self) -> None:
        super().__init__()
        self.knob = torch.nn.Parameter(torch.zeros(()))

    def sample(self, conditions, seeds):
        x = super().sample(conditions, seeds)
        if self.knob.item() > 0.3:
            x[:, 3] = 1.0
        return x


@pytest.mark.parametrize("backtrack, step, knob", [(0, 0.0, 0.0), (1, 0.0, 0.0), (2, 0.25, 0.25)])
def test_a_rejected_update_is_backtracked_to_a_shorter_step(backtrack, step, knob):
    """The update moves the knob 0 -> 1; the world breaks above 0.3, so 1 and 1/2 are rejected and 1/4 is kept."""
    from diffdpo.recipes.dso.validation import validate_update, validation_samples

    gen = _TooFarIsWorse()
    cfg = DSOConfig(validate_per_class=8, backtrack=backtrack, min_fidelity=0.0, require_recognised=False)
    before_val = validation_samples(cfg, gen, 1)
    good_before = sum(r["label"] for r in before_val.records)
    assert 0 < good_before < 16  # the untouched world has stable and unstable boxes
    with torch.no_grad():
        gen.knob.fill_(1.0)
    val, v = validate_update(cfg, gen, [gen.knob], [torch.zeros(())], before_val.records, 1)
    assert v["step"] == step and gen.knob.item() == pytest.approx(knob)
    assert [t["step"] for t in v["tries"]] == [1.0, 0.5, 0.25][: min(backtrack, 2) + 1]
    assert v["accepted"] == (step > 0) and [t["accepted"] for t in v["tries"]][:2] == [False] * min(2, backtrack + 1)
    assert len(val.records) == 16
    if step:  # the kept step was judged on its own seeds, not on the ones that rejected the full step
        assert {r["seed"] for r in val.records}.isdisjoint({r["seed"] for r in before_val.records})
    with pytest.raises(ValueError, match="backtrack"):
        DSOConfig(backtrack=5)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_reference_previous_makes_each_round_start_from_its_own_reference(tmp_path, lora_rank):
    """reference=previous: after a kept round the reference (adapters off, or the frozen copy of a full
    fine-tune) computes what the trained policy computes."""
    from diffdpo.adapters import adapters_disabled

    gen = BoxGenerator()
    x, t, c = torch.randn(6, 4), torch.full((6,), 500.0), torch.tensor([0, 1] * 3)
    with torch.no_grad():
        start = gen.predict(gen.network, x, t, c)
    report = run_dso(_small_cfg(tmp_path, reference="previous", lora_rank=lora_rank, rounds=2), gen)
    assert len(report["summaries"]) == 3  # round 2 trained against round 1's policy
    with torch.no_grad():
        policy = gen.predict(gen.network, x, t, c)
        assert not torch.allclose(policy, start, atol=1e-4)  # the round trained something
        if lora_rank:
            with adapters_disabled(gen.network):
                torch.testing.assert_close(gen.predict(gen.network, x, t, c), policy, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        DSOConfig(reference="initial")


def test_lr_decays_per_round_in_the_training_config(tmp_path):
    from diffdpo.recipes.dso.loop import _train_config

    cfg = DSOConfig(lr_decay_per_round=0.5, steps_per_round=10)
    lrs = [_train_config(cfg, tmp_path, r, 80).optim.lr for r in (1, 2, 3)]
    assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4]) and cfg.optim.lr == 1e-3  # the config itself is untouched
    assert _train_config(DSOConfig(), tmp_path, 3, 80).optim.lr == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr_decay_per_round"):
        DSOConfig(lr_decay_per_round=0.0)

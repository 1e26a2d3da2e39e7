"""Our LM task's per-batch loss and gradients equal TRL's DPOTrainer / KTOTrainer on the same tiny model.

TRL's real trainers are built on the same tiny Llama, tokenizer and rows; TRL tokenises the rows
itself, collates a batch with its own collator and computes the loss with its own ``compute_loss``
(its fused LM head, its loss branches). Our side goes through :class:`diffdpo.lm.task.LMPreferenceTask`
(our tokenisation, padding-free shared-prompt layout, chunked head) and :func:`diffdpo.train.apply_loss`
(the shared loss library). float32 throughout; tolerance 1e-5.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from diffdpo.lm.config import LMConfig
from diffdpo.lm.task import LMPreferenceTask
from diffdpo.train import LossConfig, apply_loss
from tests.lm.conftest import make_model, write_jsonl

B = 4
ACCEL = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no", is_main_process=True,
                        wait_for_everyone=lambda: None)

# (our loss type, our f-divergence, our f_alpha, label smoothing) -> TRL's settings
CASES = {
    "sigmoid": ("sigmoid", "reverse_kl", 0.5, 0.0),
    "ipo": ("ipo", "reverse_kl", 0.5, 0.0),
    "hinge": ("hinge", "reverse_kl", 0.5, 0.0),
    "robust": ("robust", "reverse_kl", 0.5, 0.2),
    "sigmoid-forward_kl": ("sigmoid", "forward_kl", 0.5, 0.0),
    "sigmoid-js": ("sigmoid", "js", 0.5, 0.0),
    "sigmoid-alpha": ("sigmoid", "alpha", 0.3, 0.0),
    "ipo-js": ("ipo", "js", 0.5, 0.0),
}
TRL_F = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js": "js_divergence", "alpha": "alpha_divergence"}
BETA = 0.3


def _perturbed(model, scale=0.02, seed=1):
    """A reference that differs from the policy, so log-ratios are not all zero."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ref.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def setup_dpo(tokenizer, pair_rows, tmp_path_factory):
    """TRL DPOTrainer and our task on identical weights and rows (policy != reference)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tmp = tmp_path_factory.mktemp("trl")
    rows = pair_rows[:B]
    policy = make_model(tokenizer, seed=0)
    reference = _perturbed(policy)
    ours_policy, ours_ref = copy.deepcopy(policy), copy.deepcopy(reference)
    args = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=B, report_to="none", use_cpu=True,
                     beta=BETA, max_length=None, disable_dropout=True, precompute_ref_log_probs=False,
                     gradient_checkpointing=False, bf16=False, save_strategy="no", logging_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(B)])

    cfg = LMConfig()
    cfg.model.pretrained, cfg.data.source = "tiny", str(write_jsonl(tmp / "pairs.jsonl", rows))
    cfg.reference.kind = "frozen_copy"
    task = LMPreferenceTask(cfg, loss_type="sigmoid", accelerator=ACCEL, per_device_batch_size=B,
                            model=ours_policy, tokenizer=tokenizer)
    # our reference = the same perturbed weights TRL uses
    task.ref_policy.model.load_state_dict(ours_ref.state_dict())
    batch = task.collate([task.dataset()[i] for i in range(B)])
    return trainer, trl_batch, task, batch


def _trl_loss_and_grads(trainer, batch, loss_type, f_div, f_alpha, eps):
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = TRL_F[f_div], 1.0 - f_alpha
    trainer.label_smoothing = eps
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _our_loss_and_grads(task, batch, loss_type, f_div, f_alpha, eps):
    task.loss_type = loss_type
    model = task.policy.model
    model.zero_grad(set_to_none=True)
    out = task.compute(task.policy, batch, torch.arange(B))
    losses, _ = apply_loss(out, LossConfig(type=loss_type, beta=BETA, label_smoothing=eps, f_divergence=f_div,
                                           f_alpha=f_alpha))
    loss = losses.mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_same_tokens_as_trl(setup_dpo):
    trainer, _, task, _ = setup_dpo
    for i in range(B):
        ours, theirs = task.dataset()[i], trainer.train_dataset[i]
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[key] == theirs[key], (i, key)


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_loss_and_gradients_equal_trl(setup_dpo, case):
    trainer, trl_batch, task, batch = setup_dpo
    loss_type, f_div, f_alpha, eps = CASES[case]
    trl_loss, trl_grads = _trl_loss_and_grads(trainer, trl_batch, loss_type, f_div, f_alpha, eps)
    our_loss, our_grads = _our_loss_and_grads(task, batch, loss_type, f_div, f_alpha, eps)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-5)
    assert abs(float(trl_loss) - 0.6931) > 1e-3 or loss_type != "sigmoid"  # a non-trivial batch
    assert set(our_grads) == set(trl_grads)
    for name, g in trl_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-5, atol=1e-5, msg=f"{case}: {name}")


def test_kto_loss_equals_trl(tokenizer, pair_rows, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from diffdpo.lm.data import unpair_rows

    rows = [{k: v for k, v in r.items() if k != "_row"} for r in unpair_rows(pair_rows[:3])]  # 6 rows
    n = len(rows)
    policy = make_model(tokenizer, seed=0)
    reference = _perturbed(policy, scale=0.05)
    ours_policy, ours_ref = copy.deepcopy(policy), copy.deepcopy(reference)
    args = KTOConfig(output_dir=str(tmp_path / "kto"), per_device_train_batch_size=n, report_to="none",
                     use_cpu=True, beta=BETA, max_length=None, disable_dropout=True, precompute_ref_log_probs=False,
                     desirable_weight=1.0, undesirable_weight=1.5, bf16=False, save_strategy="no")
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch).detach()

    cfg = LMConfig()
    cfg.model.pretrained, cfg.data.source = "tiny", str(write_jsonl(tmp_path / "unpaired.jsonl", rows))
    cfg.reference.kind = "frozen_copy"
    task = LMPreferenceTask(cfg, loss_type="kto", accelerator=ACCEL, per_device_batch_size=n, model=ours_policy,
                            tokenizer=tokenizer)
    task.ref_policy.model.load_state_dict(ours_ref.state_dict())
    for i in range(n):
        assert task.dataset()[i]["kl_completion_ids"] == trainer.train_dataset[i]["KL_completion_ids"]
    out = task.compute(task.policy, task.collate([task.dataset()[i] for i in range(n)]), torch.arange(n))
    losses, metrics = apply_loss(out, LossConfig(type="kto", beta=BETA, kto_undesirable_weight=1.5))
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-5, atol=1e-5)
    assert metrics["kl"] >= 0


def test_lora_loss_and_gradients_equal_trl(tokenizer, pair_rows, tmp_path):
    """LoRA: the reference is the policy with its adapters disabled, in TRL and here."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    rows = pair_rows[:B]
    policy = make_model(tokenizer, seed=0)
    ours_base = copy.deepcopy(policy)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B, report_to="none", use_cpu=True,
                     beta=BETA, max_length=None, disable_dropout=True, precompute_ref_log_probs=False, bf16=False,
                     save_strategy="no")
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero B matrices: the policy differs from the reference
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))

    cfg = LMConfig()
    cfg.model.pretrained, cfg.data.source = "tiny", str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = True, 4, 8.0
    cfg.lora.target_modules = ["q_proj", "v_proj", "up_proj"]
    task = LMPreferenceTask(cfg, loss_type="sigmoid", accelerator=ACCEL, per_device_batch_size=B, model=ours_base,
                            tokenizer=tokenizer)
    assert task.reference_kind == "adapters_disabled"
    ours = dict(task.policy.model.named_parameters())

    def our_name(trl_name: str) -> str:  # TRL wraps the model in a PeftModel; ours has the adapter injected
        return trl_name.removeprefix("base_model.model.")

    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            ours[our_name(name)].copy_(p)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(B)])
    trl_loss, trl_grads = _trl_loss_and_grads(trainer, trl_batch, "sigmoid", "reverse_kl", 0.5, 0.0)
    batch = task.collate([task.dataset()[i] for i in range(B)])
    our_loss, our_grads = _our_loss_and_grads(task, batch, "sigmoid", "reverse_kl", 0.5, 0.0)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-5)
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert sorted(map(our_name, trained)) == sorted(our_grads)  # the same adapters train, nothing else
    for name in trained:
        torch.testing.assert_close(our_grads[our_name(name)], trl_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_kto_truncated_kl_sequences_and_loss_equal_trl(tokenizer, pair_rows, tmp_path):
    """Under max_length, each mismatched (KL) pair is this example's prompt + the neighbour's *whole*
    completion, then cut to max_length, as TRL's KTOTrainer does; prompts of different lengths make a
    completion cut for its own prompt the wrong length for the neighbour's."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from diffdpo.lm.data import unpair_rows

    rows = [{k: v for k, v in r.items() if k != "_row"} for r in unpair_rows(pair_rows[:4])]  # 8 rows
    rows = [{**r, "prompt": "review : " * (i % 3) + r["prompt"]} for i, r in enumerate(rows)]  # 6, 8, 10 tokens
    n, chunk, max_length = len(rows), 4, 12
    policy = make_model(tokenizer, seed=0)
    reference = _perturbed(policy, scale=0.05)
    ours_policy, ours_ref = copy.deepcopy(policy), copy.deepcopy(reference)
    args = KTOConfig(output_dir=str(tmp_path / "kto"), per_device_train_batch_size=chunk, report_to="none",
                     use_cpu=True, beta=BETA, max_length=max_length, disable_dropout=True,
                     precompute_ref_log_probs=False, bf16=False, save_strategy="no")
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    assert len(trainer.train_dataset) == n  # no prompt fills max_length: nothing dropped on either side

    cfg = LMConfig()
    cfg.model.pretrained, cfg.data.source = "tiny", str(write_jsonl(tmp_path / "unpaired.jsonl", rows))
    cfg.data.max_length = max_length
    cfg.reference.kind = "frozen_copy"
    task = LMPreferenceTask(cfg, loss_type="kto", accelerator=ACCEL, per_device_batch_size=chunk, model=ours_policy,
                            tokenizer=tokenizer)
    task.ref_policy.model.load_state_dict(ours_ref.state_dict())
    trainer.model.train()
    cut = 0
    for start in range(0, n, chunk):
        index = list(range(start, start + chunk))
        trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in index])
        for i, row in zip(index, range(chunk)):
            item = task.dataset()[i]
            ours = item.get("kl_prompt_ids", item["prompt_ids"]) + item["kl_completion_ids"]
            theirs = trl_batch["KL_input_ids"][row][trl_batch["KL_attention_mask"][row].bool()].tolist()
            assert ours == theirs, i
            assert len(ours) <= max_length
            cut += len(ours) < len(item["prompt_ids"]) + len(trainer.train_dataset[i]["KL_completion_ids"])
        trl_loss = trainer.compute_loss(trainer.model, trl_batch).detach()
        out = task.compute(task.policy, task.collate([task.dataset()[i] for i in index]), torch.tensor(index))
        losses, _ = apply_loss(out, LossConfig(type="kto", beta=BETA))
        torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-5, atol=1e-5)
    assert cut >= 2  # the test exercises truncation of KL sequences

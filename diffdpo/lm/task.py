"""Language-model preference training as a :class:`diffdpo.task.PreferenceTask`.

For a batch of B pairs (Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290):

1. chosen and rejected sequences are laid out together (``lm.layout``: padded as TRL, padding-free
   packed, or packed with each pair's prompt computed once), see :mod:`diffdpo.lm.packing`;
2. the reference's hidden states at the completion positions, without gradient: the same LoRA model
   with its adapters disabled, a frozen copy, or no model at all when reference log-probs were
   precomputed and cached on disk (:mod:`diffdpo.lm.reference`);
3. one policy forward over all 2B sequences; the chunked LM head gives policy and reference token
   log-probs, top-k entropy/mass and the token KL in one pass (:mod:`diffdpo.lm.logps`);
4. per-sequence sums (or weighted means: SimPO/ORPO, RLHF-V dense DPO) -> :class:`diffdpo.task.LogpsOut`.
   The loss comes from :mod:`diffdpo.losses` in the shared training loop.

Unpaired data (KTO, Ethayarajh et al. 2024, arXiv 2402.01306) gives a :class:`diffdpo.task.PointwiseLogpsOut`
with KTO's reference point estimated, as in TRL, from mismatched (prompt, completion) pairs: within each
run of ``per_device_batch_size`` examples the completions are rotated by one, and each mismatched
sequence is cut to ``max_length`` anew (:func:`diffdpo.lm.data.assign_kl_completions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffdpo.adapters import adapters_disabled, add_lora_from, has_lora, resolve_dtype, save_lora_adapter
from diffdpo.config import check_data_source
from diffdpo.lm.config import LMConfig
from diffdpo.lm.data import TokenizedDataset, TokenizeOptions, assign_kl_completions, load_preference_data
from diffdpo.lm.logps import CausalLMLogps, head_spec, sequence_logps
from diffdpo.lm.margin import precompute_margin_rewards
from diffdpo.lm.models import frozen_copy, load_causal_lm, load_tokenizer, model_fingerprint
from diffdpo.lm.packing import Group, TokenBatch, collate_groups, prepare_for_packing
from diffdpo.lm.reference import PrecomputedReference, precompute_reference
from diffdpo.losses import POINTWISE_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES
from diffdpo.task import LogpsOut, PointwiseLogpsOut, load_trainable_state_dict, trainable_state_dict


class LMPreferenceTask:
    """DPO-family (paired) or KTO-family (unpaired) training of a causal LM on the shared loop."""

    def __init__(self, cfg: LMConfig, *, loss_type: str, accelerator: Any, seed: int = 0,
                 per_device_batch_size: int = 1, gradient_checkpointing: bool = False,
                 model: Any = None, tokenizer: Any = None) -> None:
        self.cfg, self.loss_type, self.seed = cfg, loss_type, seed
        self.device = accelerator.device
        self.pointwise = loss_type in POINTWISE_LOSS_TYPES
        if loss_type == "dro":
            raise ValueError("loss.type=dro needs a learned value model V(x), which the LM task does not provide; "
                             "use kto, sft or a paired loss")
        if not cfg.model.pretrained or not cfg.data.source:
            raise ValueError("the LM task needs lm.model.pretrained and lm.data.source")
        check_data_source(cfg.data.source, "lm.data.source")  # before loading the model
        mixed = getattr(accelerator, "mixed_precision", "no")
        frozen_dtype = resolve_dtype(cfg.model.dtype, mixed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        self._dataset = self._load_data(per_device_batch_size)  # before the model: empty data costs no model load
        lm = model if model is not None else load_causal_lm(cfg.model, frozen_dtype if cfg.lora.enabled else torch.float32)
        self.base_fingerprint = model_fingerprint(lm, cfg.model.pretrained, str(cfg.model.revision))
        self.attn_implementation = prepare_for_packing(lm, cfg.layout)
        if cfg.lora.enabled:
            self._trainable = add_lora_from(lm, cfg.lora)
        else:
            lm.to(torch.float32).requires_grad_(True)
            self._trainable = list(lm.parameters())
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.to(self.device).train()
        self.policy = CausalLMLogps(lm, chunk_size=cfg.logits_chunk_size, topk=cfg.topk)
        self.reference_kind = self._reference_kind()
        self.ref_policy: CausalLMLogps | None = None
        self.precomputed: PrecomputedReference | None = None
        if self.reference_kind == "frozen_copy":
            self.ref_policy = CausalLMLogps(frozen_copy(lm, frozen_dtype), chunk_size=cfg.logits_chunk_size, topk=0)
        elif self.reference_kind == "precomputed":
            self.precomputed = precompute_reference(self, accelerator)
        # MODPO: the other objectives' margin rewards, once per pair, cached on disk like the reference
        self.margins = precompute_margin_rewards(self, accelerator) if loss_type == "modpo" else None

    # ---- setup -------------------------------------------------------------------------------------

    def _load_data(self, per_device_batch_size: int) -> TokenizedDataset:
        d = self.cfg.data
        opts = TokenizeOptions(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                               truncation_mode=d.truncation_mode, add_eos=d.add_eos, dense_gamma=self.cfg.dense_gamma)
        ds = load_preference_data(d.source, self.tokenizer, opts, unpaired=self.pointwise, split=d.split,
                                  max_rows=d.max_rows)
        if len(ds) == 0:
            raise ValueError(f"{ds.report()}: no example left to train on")
        if self.loss_type == "kto":
            assign_kl_completions(ds, per_device_batch_size)
        return ds

    def _reference_kind(self) -> str:
        kind = self.cfg.reference.kind
        if self.loss_type in REFERENCE_FREE_LOSS_TYPES or self.loss_type == "sft":
            return "none"
        if kind == "auto":
            return "adapters_disabled" if self.cfg.lora.enabled else "frozen_copy"
        if kind == "adapters_disabled" and not self.cfg.lora.enabled:
            raise ValueError("lm.reference.kind=adapters_disabled needs lm.lora.enabled=true")
        return kind

    # ---- the PreferenceTask protocol ---------------------------------------------------------------

    def trainable_module(self) -> torch.nn.Module:
        return self.policy

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._trainable

    def dataset(self) -> TokenizedDataset:
        return self._dataset

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Items -> {tokens: TokenBatch, index: (B,), [kl_tokens, labels] for unpaired data}."""
        layout, pad = self.cfg.layout, self.tokenizer.pad_token_id
        index = torch.tensor([it["index"] for it in items], dtype=torch.long)
        if self._dataset.paired:
            groups = [Group(it["prompt_ids"], [it["chosen_ids"], it["rejected_ids"]],
                            [it["chosen_weights"], it["rejected_weights"]] if "chosen_weights" in it else None)
                      for it in items]
            return {"tokens": collate_groups(groups, layout, pad), "index": index}
        out = {"tokens": collate_groups([Group(it["prompt_ids"], [it["completion_ids"]]) for it in items], layout, pad),
               "index": index}
        labels = [it["label"] for it in items]
        out["labels"] = torch.tensor(labels, dtype=torch.bool if isinstance(labels[0], bool) else torch.float32)
        if "kl_completion_ids" in items[0]:
            out["kl_tokens"] = collate_groups([Group(it.get("kl_prompt_ids", it["prompt_ids"]), [it["kl_completion_ids"]])
                                               for it in items], layout, pad)
        return out

    def compute(self, model: torch.nn.Module, batch: dict[str, Any], keys: torch.Tensor) -> LogpsOut | PointwiseLogpsOut:
        """Policy and reference sequence log-probs of a collated batch (see the module docstring)."""
        tokens: TokenBatch = batch["tokens"].to(self.device)
        ref_hidden, ref_head = self._reference_hidden(tokens)
        out = model(tokens, ref_hidden, ref_head)  # TokenLogps, (M,) each
        avg = self.cfg.average_log_prob
        logps = sequence_logps(out.logps, tokens, average=avg)  # (S,)
        ref_logps = self._reference_logps(out, tokens, batch, avg)  # (S,) or None
        metrics = self._metrics(out, tokens, logps, ref_logps)
        if not self._dataset.paired:
            return self._pointwise(model, batch, logps, ref_logps, metrics)
        b = tokens.num_sequences // 2
        ref_c, ref_r = (None, None) if ref_logps is None else (ref_logps[:b], ref_logps[b:])
        out = LogpsOut(logps[:b], logps[b:], ref_c, ref_r, metrics)
        if self.margins is not None:  # (B, K) margin rewards of this batch's pairs, by dataset index
            out.loss_inputs.update(self.margins.lookup(batch["index"], self.device))
        if not avg:  # summed log-probs: the lengths IPO's length normalisation divides by
            lengths = tokens.completion_lengths.to(logps.device)
            out.chosen_lengths, out.rejected_lengths = lengths[:b], lengths[b:]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights by name (LoRA adapters, or the whole model)."""
        return trainable_state_dict(self.policy)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state_dict(self.policy, state)

    def export(self, out_dir: Path) -> None:
        """LoRA -> peft adapter folder; full -> ``save_pretrained`` model; tokenizer alongside."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir)
        if has_lora(self.policy.model):
            save_lora_adapter(self.policy.model, out_dir)
            return
        lm = self.policy.causal_lm
        original = self.cfg.model.attn_implementation
        lm.set_attn_implementation(original if original in ("eager", "sdpa") or original.startswith("flash") else "sdpa")
        try:
            self.policy.model.save_pretrained(out_dir)
        finally:
            lm.set_attn_implementation(self.attn_implementation)

    # ---- pieces of compute -------------------------------------------------------------------------

    def _reference_hidden(self, tokens: TokenBatch) -> tuple[torch.Tensor | None, Any]:
        """Reference hidden states at the target positions (no gradient), and the reference's LM head."""
        if self.reference_kind == "adapters_disabled":
            with torch.no_grad(), adapters_disabled(self.policy.model):
                return self.policy.hidden_at_targets(tokens), head_spec(self.policy.causal_lm)
        if self.reference_kind == "frozen_copy":
            assert self.ref_policy is not None
            with torch.no_grad():
                return self.ref_policy.hidden_at_targets(tokens), head_spec(self.ref_policy.causal_lm)
        return None, None

    def _reference_logps(self, out: Any, tokens: TokenBatch, batch: dict[str, Any], avg: bool) -> torch.Tensor | None:
        if out.ref_logps is not None:
            return sequence_logps(out.ref_logps, tokens, average=avg)
        if self.precomputed is not None:
            return self.precomputed.lookup(batch["index"], paired=self._dataset.paired).to(self.device)
        return None

    def _metrics(self, out: Any, tokens: TokenBatch, logps: torch.Tensor, ref_logps: torch.Tensor | None
                 ) -> dict[str, torch.Tensor]:
        """Detached batch means: log-probs, lengths, KL to the reference, top-k indicators."""
        s = tokens.num_sequences
        lengths = tokens.completion_lengths.to(logps.device, torch.float32)
        names = ("chosen", "rejected") if self._dataset.paired else ("all",)
        half = s // len(names)
        m: dict[str, torch.Tensor] = {"tokens/per_sequence": tokens.sequence_lengths.float().mean()}
        for i, name in enumerate(names):
            m[f"logps/{name}"] = logps[i * half : (i + 1) * half].detach().mean()
            m[f"length/{name}"] = lengths[i * half : (i + 1) * half].mean()
        if ref_logps is not None:
            # mean log-ratio of the data's completions: the sequence-level KL estimate (exact on policy samples)
            m["kl/sequence"] = (logps.detach() - ref_logps).mean()
        if out.token_kl is not None:
            m["kl/token"] = out.token_kl.mean()
        if out.topk_entropy is not None:
            m["overopt/topk_entropy"] = out.topk_entropy.mean()
            m["overopt/topk_mass"] = out.topk_mass.mean()
        return m

    def _pointwise(self, model: torch.nn.Module, batch: dict[str, Any], logps: torch.Tensor,
                   ref_logps: torch.Tensor | None, metrics: dict[str, torch.Tensor]) -> PointwiseLogpsOut:
        labels = batch["labels"].to(self.device)
        kwargs: dict[str, Any] = {}
        if self.loss_type == "kto":
            kl_tokens = batch["kl_tokens"].to(self.device)
            avg = self.cfg.average_log_prob
            with torch.no_grad():
                ref_hidden, ref_head = self._reference_hidden(kl_tokens)
                kl_out = model(kl_tokens, ref_hidden, ref_head, with_stats=False)
            kl_policy = sequence_logps(kl_out.logps, kl_tokens, average=avg)
            if kl_out.ref_logps is not None:
                kl_ref = sequence_logps(kl_out.ref_logps, kl_tokens, average=avg)
            else:
                assert self.precomputed is not None
                kl_ref = self.precomputed.lookup_kl(batch["index"]).to(self.device)
            kwargs = {"kl_policy_logps": kl_policy, "kl_ref_logps": kl_ref}
        return PointwiseLogpsOut(logps, ref_logps, labels, metrics, kwargs)


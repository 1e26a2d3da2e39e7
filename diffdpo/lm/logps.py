"""Per-token and per-sequence log-probs of a causal LM, with over-optimisation indicators.

:class:`CausalLMLogps` wraps a transformers causal LM (optionally PEFT-wrapped). Its forward runs the
backbone once over a :class:`~diffdpo.lm.packing.TokenBatch` (chosen and rejected together, in any
layout), gathers the hidden states that predict completion tokens only, and scores them with a
chunked LM head that never materialises the (tokens, vocab) logits for the backward pass: each chunk's
logits are recomputed in backward (the trick of TRL's fused LM head and Liger's fused linear
cross-entropy). In the same pass, without gradient, it computes per target token:

* the top-k entropy and top-k probability mass of the policy's next-token distribution, the
  likelihood over-optimisation indicators of Shi et al. 2024 ("Understanding Likelihood
  Over-optimisation in Direct Alignment Algorithms", arXiv 2410.11677, Sec. 5): both falling over
  training signal lost diversity;
* the reference log-prob of the target and the exact token-level KL(pi || pi_ref) of the next-token
  distributions, when the reference's hidden states are passed in (the "KL budget" of Rafailov et al.
  2024, "Scaling Laws for Reward Model Overoptimization in Direct Alignment Algorithms",
  arXiv 2406.02900, measured here on the training prefixes).

:func:`sequence_logps` reduces token log-probs to the per-sequence numbers the loss library consumes:
summed (DPO), or weighted-averaged (SimPO, ORPO, and the dense DPO of RLHF-V, where corrected tokens
weigh gamma; see :mod:`diffdpo.lm.data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffdpo.lm.packing import TokenBatch


@dataclass
class HeadSpec:
    """A linear LM head and the logit transforms some architectures apply after it."""

    weight: Tensor  # (V, d)
    bias: Tensor | None = None  # (V,)
    logit_scale: float = 1.0
    softcap: float | None = None  # Gemma-2 style final logit soft-capping: c * tanh(z / c)


@dataclass
class TokenLogps:
    """Per-target-token outputs of :class:`CausalLMLogps` (each (M,), float32)."""

    logps: Tensor  # differentiable
    ref_logps: Tensor | None  # detached; None without reference hidden states
    topk_entropy: Tensor | None  # detached
    topk_mass: Tensor | None  # detached
    token_kl: Tensor | None  # detached KL(pi || pi_ref) of the next-token distributions


def _logits(hidden: Tensor, head: HeadSpec) -> tuple[Tensor, Tensor | None]:
    """float32 logits (m, V) and, with soft-capping, tanh(z / c) for the backward pass."""
    dt = torch.promote_types(hidden.dtype, head.weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.to(dt)
        z = F.linear(hidden.to(dt), head.weight.to(dt), bias).float()
    if head.logit_scale != 1.0:
        z = z * head.logit_scale
    if head.softcap is None:
        return z, None
    t = torch.tanh(z / head.softcap)
    return head.softcap * t, t


class _ChunkedHeadLogps(torch.autograd.Function):
    """log p(label | hidden) through a linear head, chunked over tokens, logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, logit_scale: float,
                softcap: float | None, chunk_size: int, topk: int, ref_hidden: Tensor | None,
                ref_weight: Tensor | None, ref_bias: Tensor | None):  # noqa: ANN205
        head = HeadSpec(weight, bias, logit_scale, softcap)
        ref_head = None if ref_hidden is None else HeadSpec(ref_weight, ref_bias, logit_scale, softcap)
        m = hidden.shape[0]
        out = torch.empty(m, dtype=torch.float32, device=hidden.device)
        ref_out = torch.empty_like(out) if ref_head is not None else None
        kl = torch.empty_like(out) if ref_head is not None else None
        ent = torch.empty_like(out) if topk > 0 else None
        mass = torch.empty_like(out) if topk > 0 else None
        for s in range(0, m, chunk_size):
            e = min(s + chunk_size, m)
            z, _ = _logits(hidden[s:e], head)  # (c, V)
            logp = z.log_softmax(-1)
            out[s:e] = logp.gather(1, labels[s:e, None]).squeeze(1)
            if topk > 0:
                top = logp.topk(min(topk, z.shape[-1]), dim=-1).values  # (c, k) log-probs
                tot = top.logsumexp(-1)  # log top-k mass
                q = (top - tot[:, None]).exp()  # renormalised top-k distribution
                mass[s:e] = tot.exp()
                ent[s:e] = -(q * (top - tot[:, None])).sum(-1)
            if ref_head is not None:
                ref_logp = _logits(ref_hidden[s:e], ref_head)[0].log_softmax(-1)
                ref_out[s:e] = ref_logp.gather(1, labels[s:e, None]).squeeze(1)
                kl[s:e] = (logp.exp() * (logp - ref_logp)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.logit_scale, ctx.softcap, ctx.chunk_size = logit_scale, softcap, chunk_size
        extras = tuple(t for t in (ref_out, ent, mass, kl) if t is not None)
        ctx.mark_non_differentiable(*extras)
        return out, ref_out, ent, mass, kl

    @staticmethod
    def backward(ctx, grad_out: Tensor, *unused):  # noqa: ANN205
        hidden, weight, bias, labels = ctx.saved_tensors
        head = HeadSpec(weight, bias, ctx.logit_scale, ctx.softcap)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dt = torch.promote_types(hidden.dtype, weight.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, hidden.shape[0])
            z, t = _logits(hidden[s:e], head)
            # d logp[label] / dz = onehot(label) - softmax(z), scaled by the upstream gradient
            g = -z.softmax(-1) * grad_out[s:e, None]
            g.scatter_add_(1, labels[s:e, None], grad_out[s:e, None].float())
            if t is not None:
                g = g * (1.0 - t * t)  # through c * tanh(z / c)
            if ctx.logit_scale != 1.0:
                g = g * ctx.logit_scale
            with torch.autocast(hidden.device.type, enabled=False):
                g_dt = g.to(dt)
                if need_h:
                    grad_h[s:e] = (g_dt @ weight.to(dt)).to(hidden.dtype)
                if need_w:
                    grad_w += (g_dt.transpose(0, 1) @ hidden[s:e].to(dt)).float()
            if need_b:
                grad_b += g.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def head_logps(hidden: Tensor, labels: Tensor, head: HeadSpec, *, chunk_size: int = 1024, topk: int = 0,
               ref_hidden: Tensor | None = None, ref_head: HeadSpec | None = None) -> TokenLogps:
    """Log-probs of ``labels`` (M,) from ``hidden`` (M, d) through ``head``, chunked over tokens.

    Peak extra memory is one chunk of logits (``chunk_size`` x V, float32) in forward and backward,
    whatever M is. ``topk`` > 0 adds the top-k entropy/mass indicators; ``ref_hidden`` (M, d) with
    ``ref_head`` adds reference log-probs and the token-level KL to the reference.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (M, d) and labels (M,), got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (ref_hidden is None) != (ref_head is None):
        raise ValueError("pass ref_hidden and ref_head together")
    logps, ref_logps, ent, mass, kl = _ChunkedHeadLogps.apply(
        hidden, head.weight, head.bias, labels, float(head.logit_scale), head.softcap, int(chunk_size), int(topk),
        None if ref_hidden is None else ref_hidden.detach(),
        None if ref_head is None else ref_head.weight.detach(),
        None if ref_head is None or ref_head.bias is None else ref_head.bias.detach(),
    )
    return TokenLogps(logps, ref_logps, ent, mass, kl)


def sequence_logps(token_values: Tensor, batch: TokenBatch, *, average: bool = False) -> Tensor:
    """Per-sequence (S,) weighted sum, or weighted mean if ``average``, of per-target-token values (M,).

    Weights are ``batch.token_weights`` (1 everywhere except dense-DPO corrected segments). The mean
    divides by the sum of weights, RLHF-V's normaliser N = |y_u| + gamma |y_c| (Yu et al. 2023,
    arXiv 2312.00849, eq. 5); a sequence with no scored token gets 0, never NaN.
    """
    w = batch.token_weights.to(token_values.dtype)
    s = batch.num_sequences
    sums = token_values.new_zeros(s).index_add(0, batch.sequence_index, token_values * w)
    if not average:
        return sums
    norm = token_values.new_zeros(s).index_add(0, batch.sequence_index, w)
    return sums / norm.clamp(min=1e-8)


def _unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``*ForCausalLM`` under a PEFT wrapper (LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def head_spec(causal_lm: torch.nn.Module) -> HeadSpec:
    """The LM head of a transformers causal LM as a :class:`HeadSpec` (a plain linear head only)."""
    lm = _unwrap_causal_lm(causal_lm)
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"the LM head is a {type(head).__name__}, not a plain nn.Linear; adapters on the LM head "
            "(e.g. LoRA target 'lm_head') are not supported: remove it from lm.lora.target_modules"
        )
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    scale = getattr(cfg, "logit_scale", None)
    return HeadSpec(head.weight, head.bias, 1.0 if scale is None else float(scale),
                    getattr(cfg, "final_logit_softcapping", None))


class CausalLMLogps(torch.nn.Module):
    """A causal LM as a module whose forward gives per-target-token log-probs of a :class:`TokenBatch`.

    Wrapping the LM in one module keeps the whole computation inside ``forward``, so DDP/FSDP wrappers
    (``accelerator.prepare``) see a normal forward/backward.
    """

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = 1024, topk: int = 20) -> None:
        super().__init__()
        self.model = model
        self.chunk_size, self.topk = chunk_size, topk

    @property
    def causal_lm(self) -> torch.nn.Module:
        return _unwrap_causal_lm(self.model)

    @property
    def attn_implementation(self) -> str:
        return self.causal_lm.config._attn_implementation

    def hidden_at_targets(self, batch: TokenBatch) -> Tensor:
        """Final hidden states (M, d) at the positions that predict ``batch.labels``."""
        lm = self.causal_lm
        backbone = getattr(lm, lm.base_model_prefix)
        out = backbone(**batch.model_kwargs(self.attn_implementation))
        hidden = out.last_hidden_state  # (rows, width, d)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.source_index)  # (M, d)

    def forward(self, batch: TokenBatch, ref_hidden: Tensor | None = None, ref_head: HeadSpec | None = None,
                with_stats: bool = True) -> TokenLogps:
        hidden = self.hidden_at_targets(batch)
        return head_logps(hidden, batch.labels, head_spec(self.causal_lm), chunk_size=self.chunk_size,
                          topk=self.topk if with_stats else 0, ref_hidden=ref_hidden, ref_head=ref_head)

"""The tiny LM world: a review-writing task a program can judge, built offline in seconds on a CPU.

* **Language**: prompts ``review : the soup was`` and completions that are lists of adjectives,
  ``good , warm and calm .``, 1 to 4 adjectives, so completion lengths vary (2 to 8 tokens + EOS).
* **Tokenizer**: word-level, trained with the ``tokenizers`` library on this world's words, saved with
  ``save_pretrained`` (BOS added to every text, EOS/PAD/UNK specials, a small chat template so the
  conversational data path works too).
* **Base policy**: a tiny Llama-style ``LlamaForCausalLM`` (hidden 64, 2 layers) built from a config
  and fine-tuned (SFT) for a few seconds on reviews that are positive or negative with equal
  probability, so it starts out writing about 50% positive reviews.
* **Judge**: a review is preferred when it has more positive than negative adjectives.
* **Preference data**: pairs (positive chosen, negative rejected); half are *corrections* (the rejected
  review with its adjectives replaced, the RLHF-V setting that dense DPO weighs), half are independent
  reviews of different lengths. An unpaired file with the same reviews labelled by the judge serves KTO.
* **Evaluation** (:func:`evaluate_policy`): sample reviews for held-out subjects and report the judged
  positive rate; DPO should raise it well above the base policy's ~0.5.
* **Task** ``tiny_lm`` (:data:`TASK`): the LM task on this world, evaluated before and after training
  (``diffdpo train --config configs/lm_dpo_tiny.yaml``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffdpo.config import help_meta
from diffdpo.lm.config import LMConfig
from diffdpo.lm.task import LMPreferenceTask
from diffdpo.losses import POINTWISE_LOSS_TYPES
from diffdpo.task import TaskContext, TaskSpec

SUBJECTS = ["the soup", "the film", "the hotel", "the book", "the game", "the song", "the park", "the class",
            "the train", "the shop", "the show", "the trip", "the cafe", "the room", "the team", "the view"]
EVAL_SUBJECTS = ["the bread", "the play", "the beach", "the museum"]
POSITIVE = ["good", "great", "lovely", "fun", "warm", "bright", "kind", "calm", "fresh", "clean"]
NEGATIVE = ["bad", "awful", "dull", "cold", "boring", "sad", "rude", "noisy", "stale", "dirty"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT_WORDS = ["user", "assistant", ":", ";"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
WORLD_VERSION = 1


def prompt_for(subject: str) -> str:
    return f"review : {subject} was"


def review(words: list[str]) -> str:
    """`` good , warm and calm .`` (leading space: completions are appended to the prompt)."""
    if len(words) == 1:
        body = words[0]
    else:
        body = " , ".join(words[:-1]) + " and " + words[-1]
    return f" {body} ."


def judge(completion: str) -> float:
    """+1 per positive adjective, -1 per negative one; a review is preferred when this is > 0."""
    toks = completion.replace("<eos>", " ").split()
    return float(sum(t in POSITIVE for t in toks) - sum(t in NEGATIVE for t in toks))


def _adjectives(rng: random.Random, positive: bool, n: int | None = None) -> list[str]:
    pool = POSITIVE if positive else NEGATIVE
    return rng.sample(pool, n if n is not None else rng.randint(1, 4))


def vocabulary() -> list[str]:
    words = {"review", ":", ",", "and", "was", "."}
    for s in SUBJECTS + EVAL_SUBJECTS:
        words.update(s.split())
    words.update(POSITIVE + NEGATIVE + CHAT_WORDS)
    return SPECIALS + sorted(words)


def build_tokenizer() -> Any:
    """Word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (BOS prepended, chat template set)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, seed: int = 0, **overrides: Any) -> Any:
    """A seeded tiny ``LlamaForCausalLM`` (untied head, GQA with 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def sft_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": prompt_for(rng.choice(SUBJECTS)), "completion": review(_adjectives(rng, rng.random() < 0.5))}
            for _ in range(n)]


def preference_rows(n: int, seed: int) -> list[dict]:
    """Positive chosen vs negative rejected; even rows are RLHF-V-style corrections of the rejected one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(SUBJECTS)
        bad = _adjectives(rng, False)
        good = _adjectives(rng, True, len(bad)) if i % 2 == 0 else _adjectives(rng, True)
        rows.append({"prompt": prompt_for(subject), "chosen": review(good), "rejected": review(bad)})
    return rows


def unpaired_rows(pairs: list[dict]) -> list[dict]:
    out = []
    for r in pairs:
        for c in (r["chosen"], r["rejected"]):
            out.append({"prompt": r["prompt"], "completion": c, "label": judge(c) > 0})
    return out


def sft(model: Any, tokenizer: Any, rows: list[dict], *, steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
        seed: int = 0) -> list[float]:
    """Next-token fine-tuning on prompt + completion (+ EOS); returns the loss curve."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = rng.sample(rows, batch_size)
        enc = tokenizer([r["prompt"] + r["completion"] + tokenizer.eos_token for r in batch], padding=True,
                        return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@dataclass
class TinyWorld:
    """Paths of a built tiny world."""

    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.jsonl"

    @property
    def eval_pairs(self) -> Path:
        return self.root / "eval_pairs.jsonl"

    @property
    def unpaired(self) -> Path:
        return self.root / "unpaired.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_world(root: str | Path, *, seed: int = 0, n_pairs: int = 512, sft_steps: int = 300) -> TinyWorld:
    """Build (or reuse, if already built with the same version and seed) the tiny world under ``root``."""
    world = TinyWorld(Path(root))
    stamp = {"version": WORLD_VERSION, "seed": seed, "n_pairs": n_pairs, "sft_steps": sft_steps}
    marker = world.root / "world.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return world
    world.root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed)
    sft(model, tokenizer, sft_rows(4096, seed), steps=sft_steps, seed=seed)
    model.save_pretrained(world.model_dir)
    tokenizer.save_pretrained(world.model_dir)
    pairs = preference_rows(n_pairs, seed + 1)
    _write_jsonl(world.pairs, pairs)
    _write_jsonl(world.eval_pairs, preference_rows(64, seed + 2))
    _write_jsonl(world.unpaired, unpaired_rows(pairs))
    marker.write_text(json.dumps(stamp))
    return world


@torch.no_grad()
def sample_reviews(model: Any, tokenizer: Any, subjects: list[str], *, samples_per_prompt: int = 16, seed: int = 0,
                   max_new_tokens: int = 12) -> list[str]:
    """Sampled completions (temperature 1), ``samples_per_prompt`` per subject, seeded."""
    was_training = model.training
    model.eval()
    prompts = [prompt_for(s) for s in subjects for _ in range(samples_per_prompt)]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the right end
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [" " + t for t in texts]


def evaluate_policy(model: Any, tokenizer: Any, *, samples_per_prompt: int = 16, seed: int = 0) -> dict[str, float]:
    """Judged positive rate, mean judge score and mean length of sampled reviews for held-out subjects."""
    texts = sample_reviews(model, tokenizer, EVAL_SUBJECTS, samples_per_prompt=samples_per_prompt, seed=seed)
    scores = [judge(t) for t in texts]
    return {
        "eval/positive_rate": sum(s > 0 for s in scores) / len(scores),
        "eval/judge_score": sum(scores) / len(scores),
        "eval/length_words": sum(len(t.split()) for t in texts) / len(texts),
    }


# ------------------------------------------------------------------------------------------------
# the tiny world as a training task: the LM task on this world's model and data, judged before and after


@dataclass
class TinyLMConfig(LMConfig):
    """The ``tiny_lm:`` section: an ``lm`` section whose model and data default to the built world."""

    world: str = field(default="runs/tiny_lm_world", metadata=help_meta("folder of the tiny world (built if missing)"))
    eval_samples_per_prompt: int = field(default=16, metadata=help_meta("sampled reviews per held-out prompt"))


class TinyLMTask(LMPreferenceTask):
    """:class:`diffdpo.lm.task.LMPreferenceTask` on the tiny world, with the judge's evaluation added: the
    positive rate of sampled reviews before training and, at export, after (``eval.json``)."""

    def __init__(self, cfg: TinyLMConfig, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.initial_eval = self.evaluate()

    def evaluate(self) -> dict[str, float]:
        return evaluate_policy(self.policy.model, self.tokenizer, samples_per_prompt=self.cfg.eval_samples_per_prompt,
                               seed=self.seed)

    def export(self, out_dir: Path) -> None:
        """The LM task's export, plus ``eval.json`` with the judged positive rate before and after."""
        super().export(out_dir)
        result = {"before": self.initial_eval, "after": self.evaluate()}
        (Path(out_dir) / "eval.json").write_text(json.dumps(result, indent=1))
        print(f"tiny-world evaluation: positive rate {result['before']['eval/positive_rate']:.3f} -> "
              f"{result['after']['eval/positive_rate']:.3f}")


def build_task(cfg: TinyLMConfig, context: TaskContext) -> TinyLMTask:
    """Build the world under ``cfg.world`` (once), point the LM section's model and data at it, train on it."""
    world = build_world(cfg.world, seed=context.seed)
    pointwise = context.loss_type in POINTWISE_LOSS_TYPES
    cfg.model.pretrained = cfg.model.pretrained or str(world.model_dir)
    cfg.data.source = cfg.data.source or str(world.unpaired if pointwise else world.pairs)
    return TinyLMTask(cfg, **context.kwargs())


TASK = TaskSpec("tiny_lm", TinyLMConfig, build_task, default_beta=0.1,
                description="the LM task on the embedded tiny review world, judged before and after training")

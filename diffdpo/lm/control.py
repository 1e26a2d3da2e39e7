"""Controllable generation with control tokens (MEET, Xue et al. 2023, arXiv 2310.00819), as a training task.

MEET ("alignMEnt with parameter-Efficient Tuning") learns several preferences in one model: each preference
(or rating level) has a *control* placed in front of the prompt, and the model is trained by maximum
likelihood on responses conditioned on their control; at inference the user picks the behaviour by picking
the control. From the paper's abstract (the method details are not public as code):

* prior controllable-generation work uses a special token or a hand-written prompt as the control and trains
  it *together* with the model; MEET first optimises the controls alone with parameter-efficient tuning
  (prompt tuning or LoRA), the model frozen, and then fine-tunes the model with the tuned controls;
* controls accept paired preferences and pointwise (rated) data alike.

What this module does (our choices where the paper is silent, see ``docs/meet.md``):

* a control is a new special token ``<ctrl:NAME>`` added to the tokenizer (``control.mode=tokens``), or a
  hand-written text (``control.mode=text``, the Chain-of-Hindsight-style baseline); it is written before the
  prompt text (after BOS when the tokenizer adds one);
* new control tokens all start from the same input embedding, the mean of the existing rows, so at step 0
  every control gives the same distribution and what they do is learnt; their output-embedding rows copy the
  BOS row (a token a causal LM never learns to predict), so sampling does not produce them;
* ``control.train=controls`` (MEET stage 1): only the control tokens' input-embedding rows are trainable, through
  peft's Trainable Tokens (``TrainableTokensConfig``); ``control.train=all`` (MEET stage 2, and the
  joint-training baseline): the whole model, control rows included;
* the loss is ``sft`` (negative log-likelihood of each response given its control and prompt, no reference
  model): paired rows give two examples, ``chosen`` under ``control.chosen`` and ``rejected`` under
  ``control.rejected``; pointwise rows name their control in ``control.column`` (mapped by ``control.levels``);
* export: a ``save_pretrained`` model folder (control rows written in) with its tokenizer and ``controls.json``
  (name -> the text put before the prompt); after stage 1 also ``control_adapter/``, the peft Trainable Tokens
  adapter holding only the control rows.

:func:`load_control_model` and :func:`generate_with_control` serve ``diffdpo generate``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffdpo.config import help_meta
from diffdpo.lm.config import LMConfig
from diffdpo.lm.task import LMPreferenceTask
from diffdpo.task import TaskContext, TaskSpec

CONTROLS_FILE = "controls.json"
CONTROL_ADAPTER_DIR = "control_adapter"


def control_token(name: str) -> str:
    """The special token of control ``name``: ``<ctrl:NAME>``."""
    return f"<ctrl:{name}>"


@dataclass
class ControlConfig:
    """The ``control:`` part of an ``lm_control`` section."""

    names: list[str] = field(default_factory=lambda: ["good", "bad"], metadata=help_meta(
        "control names, one per preference or rating level"))
    mode: Literal["tokens", "text"] = field(default="tokens", metadata=help_meta(
        "tokens: a trainable special token <ctrl:NAME> per control | text: the hand-written texts of control.texts"))
    texts: dict[str, str] = field(default_factory=dict, metadata=help_meta(
        "mode=text: control name -> the text written before the prompt"))
    train: Literal["controls", "all"] = field(default="all", metadata=help_meta(
        "controls: only the control tokens' embeddings (MEET stage 1, model frozen) | all: the whole model"))
    chosen: str = field(default="good", metadata=help_meta("paired data: the control of the chosen response"))
    rejected: str = field(default="bad", metadata=help_meta("paired data: the control of the rejected response"))
    column: str = field(default="control", metadata=help_meta("pointwise data: the column naming each row's control"))
    levels: dict[str, str] = field(default_factory=dict, metadata=help_meta(
        "pointwise data: column value -> control name (empty: the value is the name)"))

    def __post_init__(self) -> None:
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"control.names must be distinct and not empty, got {self.names}")
        bad = [n for n in self.names if not n or any(c.isspace() or c in "<>" for c in n)]
        if bad:
            raise ValueError(f"control.names {bad}: a name must be non-empty, without spaces or '<' '>'")
        for key in ("chosen", "rejected"):
            if getattr(self, key) not in self.names:
                raise ValueError(f"control.{key}={getattr(self, key)!r} is not one of control.names {self.names}")
        unknown = sorted(set(self.levels.values()) - set(self.names))
        if unknown:
            raise ValueError(f"control.levels maps to {unknown}, which are not in control.names {self.names}")
        if self.mode == "text":
            missing = [n for n in self.names if not self.texts.get(n, "").strip()]
            if missing:
                raise ValueError(f"control.mode=text needs control.texts for every control; missing {missing}")
            if self.train == "controls":
                raise ValueError("control.train=controls tunes control tokens; it needs control.mode=tokens")

    def prefix(self, name: str) -> str:
        """What is written before the prompt for control ``name``."""
        return self.texts[name] if self.mode == "text" else control_token(name)

    def prefixes(self) -> dict[str, str]:
        return {n: self.prefix(n) for n in self.names}


@dataclass
class ControlLMConfig(LMConfig):
    """The ``lm_control:`` section: an ``lm`` section plus its controls (``loss.type`` must be ``sft``)."""

    control: ControlConfig = field(default_factory=ControlConfig)


def with_control(prefix: str, prompt: str) -> str:
    """``prefix`` written before ``prompt``, one space between."""
    return f"{prefix} {prompt}"


# ------------------------------------------------------------------------------------------------
# data: paired or pointwise rows -> (control + prompt, response) rows


def _control_of(row: dict, cfg: ControlConfig, where: str) -> str:
    if cfg.column not in row:
        raise ValueError(f"{where}: no {cfg.column!r} column naming the row's control (columns: "
                         f"{', '.join(sorted(k for k in row if not k.startswith('_')))}); pointwise data needs prompt, "
                         f"completion and {cfg.column}, or set lm_control.control.column to the column that holds it")
    value = row[cfg.column]
    key = json.dumps(value) if isinstance(value, bool) else str(value)
    name = cfg.levels.get(key, key) if cfg.levels else key
    if name not in cfg.names:
        how = f" (control.levels maps {sorted(cfg.levels)})" if cfg.levels else ""
        raise ValueError(f"{where}: {cfg.column}={value!r} is not a trained control{how}; "
                         f"the controls are {', '.join(cfg.names)}")
    return name


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a text string for control training, got {type(value).__name__}")
    return value


def control_rows(rows: Sequence[dict], cfg: ControlConfig, source: str) -> list[dict]:
    """Unpaired ``prompt``/``completion``/``label`` rows with the control written before each prompt.

    Paired rows (``chosen``/``rejected``) give two rows each, the chosen response under ``cfg.chosen`` and the
    rejected one under ``cfg.rejected``; pointwise rows give one, under the control their ``cfg.column`` names.
    Every label is True: under its own control each response is the one to imitate (the ``sft`` loss).
    Raises ``ValueError`` naming the source and row for a missing column or an unknown control.
    """
    if not rows:
        raise ValueError(f"{source}: the dataset is empty")
    paired = "chosen" in rows[0] or "rejected" in rows[0]
    out: list[dict] = []
    for n, row in enumerate(rows):
        where = f"{source}, row {n}"
        prompt = _text(row, "prompt", where)
        if paired:
            for key, name in (("chosen", cfg.chosen), ("rejected", cfg.rejected)):
                out.append({"prompt": with_control(cfg.prefix(name), prompt), "completion": _text(row, key, where),
                            "label": True, "_row": n, "control": name})
        else:
            name = _control_of(row, cfg, where)
            out.append({"prompt": with_control(cfg.prefix(name), prompt),
                        "completion": _text(row, "completion", where), "label": True, "_row": n, "control": name})
    return out


# ------------------------------------------------------------------------------------------------
# control tokens in the tokenizer and the model


def add_control_tokens(tokenizer: Any, names: Sequence[str]) -> list[int]:
    """Add ``<ctrl:NAME>`` special tokens that the tokenizer lacks; the ids of every control, in order."""
    from tokenizers import AddedToken

    tokens = [control_token(n) for n in names]
    vocab = tokenizer.get_vocab()
    new = [AddedToken(t, special=True, normalized=False, single_word=False) for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


@torch.no_grad()
def resize_for_controls(model: Any, tokenizer: Any, control_ids: Sequence[int]) -> None:
    """Grow the embeddings to the tokenizer and set the new control rows (see the module docstring).

    Input rows: the mean of the embedding rows the model had before (the same start for every control).
    Output rows (untied heads): a copy of the BOS token's row, which a causal LM is never trained to predict,
    else zeros.
    """
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if len(tokenizer) <= old and all(i < old for i in control_ids):
        return
    mean = emb.weight[:old].float().mean(0)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    bos = tokenizer.bos_token_id
    head_row = head.weight[bos].clone() if head is not None and not tied and bos is not None and bos < old else None
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    for i in control_ids:
        if i >= old:
            emb.weight[i] = mean.to(emb.weight.dtype)
            if head is not None and head.weight is not emb.weight:
                head.weight[i] = 0.0 if head_row is None else head_row.to(head.weight.dtype)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def train_only_control_rows(model: Any, control_ids: Sequence[int]) -> list[torch.nn.Parameter]:
    """Freeze ``model`` and make only the control tokens' input-embedding rows trainable (peft Trainable
    Tokens on the input embedding); returns those (float32) parameters."""
    from peft import TrainableTokensConfig, inject_adapter_in_model

    model.requires_grad_(False)
    target = _module_name(model, model.get_input_embeddings())
    config = TrainableTokensConfig(token_indices=list(control_ids), target_modules=[target])
    inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}  # what diffdpo.adapters.save_lora_adapter (peft's state-dict helper) reads
    params = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def control_token_layer(model: torch.nn.Module) -> Any | None:
    """The peft Trainable Tokens layer on ``model``'s input embedding, if stage 1 put one there."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return next((m for m in model.modules() if isinstance(m, TrainableTokensLayer)), None)


@contextmanager
def control_rows_merged(model: torch.nn.Module):
    """Within the block ``model`` is a plain transformers model with the trained control rows written into its
    embedding (for ``save_pretrained``); the Trainable Tokens layer is put back after."""
    layer = control_token_layer(model)
    if layer is None:
        yield model
        return
    name = _module_name(model, layer)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    child = name.rpartition(".")[2]
    config = model.__dict__.pop("peft_config", None)
    layer.merge()
    setattr(parent, child, layer.base_layer)
    try:
        yield model
    finally:
        setattr(parent, child, layer)
        layer.unmerge()
        if config is not None:
            model.peft_config = config


# ------------------------------------------------------------------------------------------------
# the task


class ControlLMTask(LMPreferenceTask):
    """Maximum likelihood of responses conditioned on their control (MEET's two stages, or joint training)."""

    def __init__(self, cfg: ControlLMConfig, *, loss_type: str, accelerator: Any, seed: int = 0,
                 per_device_batch_size: int = 1, gradient_checkpointing: bool = False,
                 model: Any = None, tokenizer: Any = None) -> None:
        from diffdpo.config import check_data_source
        from diffdpo.lm.data import load_rows
        from diffdpo.lm.models import load_causal_lm, load_tokenizer

        if loss_type != "sft":
            raise ValueError(f"task lm_control trains by maximum likelihood under each control: set loss.type=sft "
                             f"(got {loss_type!r})")
        if cfg.lora.enabled:
            raise ValueError("lm_control: lora.enabled is not supported (control.train=controls tunes only the control "
                             "tokens; control.train=all fine-tunes the whole model)")
        if not cfg.model.pretrained or not cfg.data.source:
            raise ValueError("the lm_control task needs lm_control.model.pretrained and lm_control.data.source")
        check_data_source(cfg.data.source, "lm_control.data.source")
        rows, source = load_rows(cfg.data.source, cfg.data.split)
        rows = rows[: cfg.data.max_rows] if cfg.data.max_rows is not None else rows
        self._rows = control_rows(rows, cfg.control, source)  # bad data fails here, before any model is loaded
        self._source = source
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        lm = model if model is not None else load_causal_lm(cfg.model, torch.float32)
        self.control_ids: list[int] = []
        if cfg.control.mode == "tokens":
            self.control_ids = add_control_tokens(tokenizer, cfg.control.names)
            resize_for_controls(lm, tokenizer, self.control_ids)
        super().__init__(cfg, loss_type=loss_type, accelerator=accelerator, seed=seed,
                         per_device_batch_size=per_device_batch_size, gradient_checkpointing=gradient_checkpointing,
                         model=lm, tokenizer=tokenizer)
        if cfg.control.train == "controls":
            self._trainable = train_only_control_rows(lm, self.control_ids)

    def _load_data(self, per_device_batch_size: int) -> Any:
        from diffdpo.lm.data import TokenizeOptions, tokenize_unpaired

        d = self.cfg.data
        opts = TokenizeOptions(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                               truncation_mode=d.truncation_mode, add_eos=d.add_eos)
        ds = tokenize_unpaired(self._rows, self.tokenizer, opts, self._source)
        if len(ds) == 0:
            raise ValueError(f"{ds.report()}: no example left to train on")
        return ds

    def controls(self) -> dict[str, str]:
        """Control name -> the text written before the prompt."""
        return self.cfg.control.prefixes()

    def export(self, out_dir: Path) -> None:
        """``save_pretrained`` model (control rows written in) + tokenizer + ``controls.json``; after stage 1 also
        the peft Trainable Tokens adapter in ``control_adapter/``."""
        out_dir = Path(out_dir)
        lm = self.policy.model
        with control_rows_merged(lm):
            super().export(out_dir)
        if control_token_layer(lm) is not None:
            _save_control_adapter(lm, out_dir / CONTROL_ADAPTER_DIR)
        write_controls(out_dir, self.cfg.control, self.control_ids)


def _save_control_adapter(model: Any, out_dir: Path) -> None:
    """The Trainable Tokens adapter as ``PeftModel.save_pretrained`` writes it (keys under ``base_model.model.``), so
    ``PeftModel.from_pretrained(base resized to the tokenizer, out_dir)`` restores the control rows."""
    from safetensors.torch import load_file, save_file

    from diffdpo.adapters import save_lora_adapter

    save_lora_adapter(model, out_dir)  # peft's state-dict helper; its keys lack PeftModel's prefix
    file = Path(out_dir) / "adapter_model.safetensors"
    state = load_file(str(file))
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(file))


def write_controls(out_dir: Path, cfg: ControlConfig, control_ids: Sequence[int]) -> None:
    info = {"mode": cfg.mode, "controls": cfg.prefixes(),
            "token_ids": dict(zip(cfg.names, control_ids)) if control_ids else {}}
    (Path(out_dir) / CONTROLS_FILE).write_text(json.dumps(info, indent=1))


def _build_task(cfg: ControlLMConfig, context: TaskContext) -> ControlLMTask:
    return ControlLMTask(cfg, **context.kwargs())


TASK = TaskSpec("lm_control", ControlLMConfig, _build_task, default_beta=0.1,
                description="controllable generation: control tokens or texts before the prompt, trained by maximum "
                "likelihood (MEET stage 1: only the control tokens; stage 2 / joint: the model)")


# ------------------------------------------------------------------------------------------------
# loading a trained model and sampling under a control


def read_controls(path: str | Path) -> dict[str, str]:
    """Control name -> prefix, from a trained folder's ``controls.json``."""
    file = Path(path) / CONTROLS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONTROLS_FILE}: it is not a model trained with task lm_control "
                                "(or tiny_lm_control); give the final/ folder of such a run")
    return dict(json.loads(file.read_text())["controls"])


def check_control(name: str, controls: dict[str, str]) -> str:
    """The prefix of control ``name``; a ``ValueError`` listing the trained controls otherwise."""
    if name not in controls:
        raise ValueError(f"control {name!r} is not a trained control; the trained controls are "
                         f"{', '.join(sorted(controls))}")
    return controls[name]


def load_control_model(path: str | Path, base: str | None = None) -> tuple[Any, Any, dict[str, str]]:
    """(model, tokenizer, controls) of a trained folder: a ``save_pretrained`` model, or a peft adapter folder
    on ``base`` (default: the adapter config's ``base_model_name_or_path``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    controls = read_controls(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{str(path)!r} is a peft adapter without a base model; pass --base BASE_MODEL")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(path))
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), tokenizer, controls


def generate_with_control(model: Any, tokenizer: Any, prompts: Sequence[str], prefix: str, **kwargs: Any) -> Any:
    """:func:`diffdpo.lm.generate.sample_completions` on the prompts with ``prefix`` (a control) before each."""
    from diffdpo.lm.generate import sample_completions

    return sample_completions(model, tokenizer, [with_control(prefix, p) for p in prompts], **kwargs)


def read_prompts(value: str) -> list[str]:
    """Prompts from a ``.txt`` file (one a line), a ``.jsonl``/``.json`` file (``prompt`` column), or the text itself."""
    path = Path(value)
    if not path.is_file():
        return [value]
    if path.suffix in (".jsonl", ".json", ".parquet"):
        from diffdpo.lm.data import load_rows

        rows, _ = load_rows(path)
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)]
        if missing:
            raise ValueError(f"{path}, row {missing[0]}: no 'prompt' text")
        return [r["prompt"] for r in rows]
    return [line for line in path.read_text().splitlines() if line.strip()]


def generate_main(model_path: str, prompts: str, control: str, *, n: int = 1, max_new_tokens: int = 64, seed: int = 0,
                  temperature: float = 1.0, base: str | None = None) -> int:
    """``diffdpo generate``: one JSON line per sample (``prompt``, ``control``, ``completion``) on stdout.

    An unknown control is a ``ValueError`` (exit 2) listing the trained controls, raised before the model loads.
    """
    prefix = check_control(control, read_controls(model_path))
    texts = read_prompts(prompts)
    model, tokenizer, _ = load_control_model(model_path, base)
    done = generate_with_control(model, tokenizer, texts, prefix, n=n, max_new_tokens=max_new_tokens, seed=seed,
                                 temperature=temperature)
    for row, completion in zip(done.prompt_index.tolist(), done.texts):
        print(json.dumps({"prompt": texts[row], "control": control, "completion": completion}))
    return 0

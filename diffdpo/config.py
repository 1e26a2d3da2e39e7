"""Typed configs: dataclasses stored as YAML, overridable with ``key=value`` on the command line.

Every experiment config is a plain ``@dataclass`` whose fields carry help text in
``field(metadata={"help": ...})`` and whose ``__post_init__`` validates values. This module only
loads and merges; it knows nothing about any particular experiment.

    cfg = load_config(TrainConfig, "configs/tiny.yaml", ["optim.lr=1e-4", "max_steps=10"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def help_meta(text: str) -> dict[str, str]:
    """Field metadata carrying a help text: ``field(default=..., metadata=help_meta("..."))``."""
    return {"help": text}


class UserError(ValueError):
    """A mistake the user can fix (bad data, path, output folder or value): the command line prints its
    message on one line and exits 2, with no traceback (``--debug`` shows it)."""


class ConfigError(UserError):
    """A config file or override that does not fit the config dataclass."""


def _parse_overrides(overrides: Sequence[str]) -> list[str]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    return list(overrides)


_YAML_WORDS = {"no", "yes", "on", "off", "y", "n", "true", "false"}


def _field_type(cls: Any, dotted: str) -> Any:
    """The annotation of the (nested) dataclass field ``dotted`` of ``cls``, or ``None``."""
    import typing

    for name in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 (unresolvable annotations: no special handling)
            return None
        cls = hints.get(name)
    return cls


def _quote_words(cls: Any, overrides: Sequence[str]) -> list[str]:
    """``mixed_precision=no`` means the string ``no``: YAML would read it as ``False``. Quote such words
    for fields that are not booleans."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if value.lower() in _YAML_WORDS and _field_type(cls, key.strip()) not in (bool, None):
            item = f"{key}='{value}'"
        out.append(item)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from defaults, then the YAML file at ``path``, then ``key=value`` overrides.

    Unknown keys are errors (a typo must not be silently ignored); values are type-checked by
    OmegaConf against the dataclass annotations, then ``cls.__post_init__`` validates them.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    errors = (OmegaConfBaseException, ValueError, TypeError, yaml.YAMLError)
    file = repr(str(path)) if path is not None else None
    where = "the defaults"  # named in the error: the step that failed
    try:
        merged = OmegaConf.structured(cls)
        if path is not None:
            path, where = Path(path), file
            if not path.is_file():
                raise ConfigError(f"config file {file} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            where = "the command line" + (f" (over {file})" if file else "")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(_quote_words(cls, _parse_overrides(overrides))))
        # the dataclass's own validation (ValueError/TypeError from __post_init__) sees file and overrides together
        where = f"{file} with the command-line overrides" if file and overrides else file or "the command line"
        cfg = OmegaConf.to_object(merged)
    except errors as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid config in {where}: {' '.join(str(exc).split())}") from exc
    return cfg  # type: ignore[return-value]


def peek_key(path: str | Path | None, overrides: Sequence[str], key: str, default: Any = None) -> Any:
    """The value of top-level ``key`` in the YAML at ``path`` with ``overrides`` applied (before the full
    load: the value decides which config class to build, e.g. a training config's ``task``)."""
    import yaml

    value = default
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
        value = data.get(key, value)
    for item in _parse_overrides(overrides):
        name, _, raw = item.partition("=")
        if name.strip() == key:
            value = yaml.safe_load(raw) if raw else raw
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (for logging and saving next to checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal object."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def looks_like_hub_id(value: str) -> bool:
    """``org/name``: exactly one ``/`` and not a relative, absolute or home path."""
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and "\\" not in value


def check_model_source(value: str, key: str, *, allow_file: bool = False) -> bool:
    """Fail early, with the config key, on a model path that cannot load; returns whether it is local.

    An existing folder (or, with ``allow_file``, file) is local. A value that is not a hub id
    (:func:`looks_like_hub_id`) and does not exist is an error, never a hub lookup; a hub id is an error
    only when the hub is switched off (``HF_HUB_OFFLINE=1``).
    """
    import os

    path = Path(value).expanduser()
    if path.is_dir() or (allow_file and path.exists()):
        return True
    if path.exists():
        raise UserError(f"{key}={value!r} is a file; it must be a model folder or a hub id")
    if not looks_like_hub_id(value):
        kind = "file or folder" if allow_file else "folder"
        raise UserError(f"{key}={value!r}: no such local {kind} (a hub id looks like 'org/name')")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{key}={value!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1); "
                        "pass a local path")
    return False


def check_data_source(value: str, key: str) -> None:
    """A local-looking data source (a path or data file, not a glob or an ``org/name`` hub dataset) must exist."""
    if not isinstance(value, str) or any(c in value for c in "*?[") or Path(value).expanduser().exists():
        return
    data_ext = Path(value).suffix.lower() in (".parquet", ".jsonl", ".json", ".csv", ".arrow")
    if data_ext or not looks_like_hub_id(value):
        raise UserError(f"{key}={value!r}: no such file or folder")

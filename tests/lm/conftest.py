"""Tiny seeded causal LMs, the word-level tokenizer and preference rows of the tiny world (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffdpo.toy import tiny_lm as tiny


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


def make_model(tokenizer, seed: int = 0, **overrides):
    """A fresh tiny Llama (hidden 64, 2 layers, GQA) for this tokenizer."""
    return tiny.build_model(len(tokenizer), seed=seed, **overrides)


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="session")
def pair_rows() -> list[dict]:
    return tiny.preference_rows(16, seed=3)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> tiny.TinyWorld:
    """The tiny world with a quickly fine-tuned base policy (shared by the end-to-end tests)."""
    return tiny.build_world(tmp_path_factory.mktemp("lm") / "world", seed=0, n_pairs=256, sft_steps=200)

"""A throwaway copy of the project and the tiny BERT it trains, for benchmarks and tests.

The benchmarks build such workspaces (bench/noop.py) and the tests build the same pieces
(tests/conftest.py, tests/helpers.py, tests/flows/): both import them from here. It lives in
bench/, not tests/, so that imports point one way: tests may import bench, bench never
imports tests; and not in textgate/, the core that ships, which has no use for a random model.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textgate.config import PARAMS_FILE, BehaviourConfig

if TYPE_CHECKING:
    from transformers import BertConfig

ROOT = Path(__file__).resolve().parents[1]
# What a workspace needs of the project to run the pipeline (`textgate run`, `dvc repro`).
PROJECT_FILES = (
    "dvc.yaml",
    PARAMS_FILE,
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "tasks",
    "textgate",
    "flows",
    "bentos",
)
# Gate settings under which only the checks a run is about can bite: a tiny model's figures
# are not tuned, and a shared machine's latency is not what a workspace measures.
LENIENT_GATE: dict[str, Any] = {
    "min_accuracy": 0.0,
    "min_macro_f1": 0.0,
    "min_class_recall": 0.0,
    "max_ece": 1.0,
    "max_quantization_drop": 1.0,
    "behaviour": dict.fromkeys(BehaviourConfig.model_fields, 0.0),
    "max_p95_latency_ms": 10000,
}
# The tokenizer the tiny BERT borrows (bundled with the project's dependencies: no download).
TINY_TOKENIZER = "bundled:all-MiniLM-L6-v2"


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied, nested dicts merged key by key (`base` is not changed)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def copy_project(root: Path, names: Iterable[str] = PROJECT_FILES) -> None:
    """Copy the project's files and folders `names` (relative to the repo) under `root`."""
    for name in names:
        source, target = ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def tiny_bert_config(vocab_size: int, **overrides: Any) -> BertConfig:
    """A 2-layer BERT config with hidden size 32; `overrides` set any other field."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **overrides,
    )


def build_tiny_bert(out: Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised tiny BERT (`tiny_bert_config`) and the MiniLM tokenizer.

    The weights depend only on `seed`, so tests that train on it are stable from run to run.
    Returns `out`, a directory `from_pretrained` (and `train.base_model`) can load.
    """
    import torch
    from transformers import AutoTokenizer, BertModel

    from textgate.model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(TINY_TOKENIZER))
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(tokenizer.vocab_size)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

"""A model's geometry (its transformers config) read without downloading: BGE-M3's built in, the
stand-ins', or a local config.json."""

from __future__ import annotations

import json
from pathlib import Path

from m3lab.errors import ConfigError


def load_model_config(path: str | Path):
    """A transformers config from a config.json (or a folder holding one); no download."""
    from transformers import AutoConfig

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError([f"{path}: no such file; pass a model's config.json or the folder holding it."])
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f"{path}:{error.lineno}" if isinstance(error, json.JSONDecodeError) else str(path)
        raise ConfigError([f"{where}: not valid JSON; pass a transformers config.json."]) from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError([f"{path} has no \"model_type\"; it does not look like a transformers config.json."])
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (ValueError, TypeError) as error:
        raise ConfigError([f"{path}: transformers cannot build this config ({str(error).splitlines()[0]})."]) from None


def bge_m3_config():
    """BGE-M3's geometry (XLM-RoBERTa-large, 8,194 positions), built in: nothing is downloaded."""
    from transformers import XLMRobertaConfig

    from m3lab.standin import BGE_M3_CONFIG

    return XLMRobertaConfig(**BGE_M3_CONFIG)


def model_geometry(model: str):
    """The config of the model a run trains (its ``--model_name_or_path``), without downloading:
    BAAI/bge-m3 and the stand-ins are built in; a local folder is read; a hub id cannot be."""
    from transformers import XLMRobertaConfig

    from m3lab.standin import (
        BGE_M3_CONFIG,
        FULL_SIZE_STANDIN,
        REAL_MODEL,
        STANDIN,
        STANDIN_SIZES,
        is_standin,
    )

    if model in (REAL_MODEL, FULL_SIZE_STANDIN):
        return bge_m3_config()
    if model == STANDIN:
        return XLMRobertaConfig(**{**BGE_M3_CONFIG, **STANDIN_SIZES, "vocab_size": STANDIN_TOKENS})
    path = Path(model).expanduser()
    if path.exists():
        return load_model_config(path)
    raise ConfigError([f"--model_name_or_path {model}: m3lab reads a model's shape from its config.json and does not "
                       f"download; pass the local folder that holds it (BAAI/bge-m3 is built in).",
                       ] if not is_standin(model) else [f"{model}: no such stand-in folder; build it with "
                                                         "`python -m m3lab.standin`."])


# The stand-in tokenizer's size (m3lab.standin: 4,000 SentencePiece pieces plus its special tokens)
STANDIN_TOKENS = 4002

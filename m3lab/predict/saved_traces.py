"""Traced steps kept on disk: a rank traced once is read back, in this process or a later one.

A fit search, a lesson and the tests often trace the same run (the same configuration, card and
rank); a full-depth trace of BGE-M3 takes up to a minute on two cores. Each traced rank's figures
(the ``RankSteps`` without the trace itself) are written under ``$M3LAB_CACHE/traces/<code>/``,
where ``<code>`` fingerprints m3lab's own source files and the versions of the libraries the trace
runs (torch, transformers, DeepSpeed, FlagEmbedding, ...): a change to either starts an empty
folder, so nothing traced by other code is ever read back. The key is everything the trace is
given: the run as the trace sees it (``TraceSpec``, the model's geometry included), the card, the
rank and how it is traced.

``M3LAB_SAVED_TRACES=0`` turns it off (read and write), as the tests do wherever they patch the
predictor's own code.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import os
import pickle
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# The libraries whose code runs inside a trace: another version may trace differently
TRACED_LIBRARIES = ("torch", "transformers", "deepspeed", "FlagEmbedding", "accelerate", "bitsandbytes", "peft")


def enabled() -> bool:
    return os.environ.get("M3LAB_SAVED_TRACES", "1") != "0"


@functools.cache
def code_fingerprint() -> str:
    """m3lab's source files and the traced libraries' versions, as one short digest."""
    digest = hashlib.sha256(sys.version.split()[0].encode())
    package = Path(__file__).resolve().parent.parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    for name in TRACED_LIBRARIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{name}=={version}".encode())
    return digest.hexdigest()[:16]


def _plain(value):
    """A JSON-ready form of what a trace is given (dataclasses, enums, a transformers config)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "to_dict"):  # a transformers PretrainedConfig
        return _plain(value.to_dict())
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def key_of(job) -> str:
    """The digest of everything a ``TraceJob`` gives the trace (taken before it is traced: building
    the model adds to its config)."""
    text = json.dumps(_plain(job), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def folder() -> Path:
    from m3lab.standin import default_cache_dir

    return default_cache_dir() / "traces" / code_fingerprint()


def load(key: str):
    """The traced steps saved under ``key`` (``key_of(job)``), else None."""
    if not enabled():
        return None
    try:
        with open(folder() / f"{key}.pkl", "rb") as file:
            return pickle.load(file)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        return None


def save(key: str, steps) -> None:
    """Keep traced steps under ``key`` (written whole or not at all: processes may save side by side)."""
    if not enabled():
        return
    target = folder()
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, suffix=".tmp", delete=False) as file:
            pickle.dump(steps, file)
        os.replace(file.name, target / f"{key}.pkl")
    except OSError:  # a read-only or full disk: the trace is simply not kept
        return

"""Traced steps kept on disk: a rank traced once is read back, in this process or a later one.

A fit search, a lesson and the tests often trace the same run (the same configuration, card and
rank); a full-depth trace of BGE-M3 takes up to a minute on two cores. Each traced rank's figures
(the ``RankSteps`` without the trace itself) are written under ``$M3LAB_CACHE/traces/<code>/``,
where ``<code>`` fingerprints the source of every m3lab module a trace can run (the predictor's and
all they import, found by reading their imports) and the versions of the libraries the trace runs
(torch, transformers, DeepSpeed, FlagEmbedding, ...): a change to either starts an empty folder, so
nothing traced by other code is ever read back. The key is everything the trace is
given: the run as the trace sees it (``TraceSpec``, the model's geometry included), the card, the
rank and how it is traced.

``M3LAB_SAVED_TRACES=0`` turns it off (read and write), as the tests do wherever they patch the
predictor's own code.
"""

from __future__ import annotations

import ast
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


def _modules() -> dict[str, Path]:
    package = Path(__file__).resolve().parent.parent
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(source: str, modules: dict[str, Path]) -> set[str]:
    """The m3lab modules a source file imports, anywhere in it (a function's lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules:
                found.add(target)
    return found


def traced_code() -> list[Path]:
    """The source files a trace can run: the predictor's modules and every m3lab module they import,
    directly or not (the planner, the lessons and the command line above it are not among them)."""
    modules = _modules()
    todo = [name for name in modules if name.startswith("m3lab.predict")] + ["m3lab"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imported(modules[name].read_text(encoding="utf-8"), modules) - seen
    return sorted(modules[name] for name in seen)


@functools.cache
def code_fingerprint() -> str:
    """The traced code's source files and the traced libraries' versions, as one short digest."""
    digest = hashlib.sha256(sys.version.split()[0].encode())
    package = Path(__file__).resolve().parent.parent
    for path in traced_code():
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

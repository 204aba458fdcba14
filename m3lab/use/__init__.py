"""The model at the end of a run: what its folder holds, and the model used as BGE-M3 is used.

``model_files`` lists the folder FlagEmbedding's runner saves (the encoder's weights and tokenizer,
and the two heads it adds, ``colbert_linear.pt`` and ``sparse_linear.pt``); ``score`` loads it with
FlagEmbedding's ``BGEM3FlagModel``, encodes a query and passages with the dense, sparse and ColBERT
heads, and scores each passage as FlagEmbedding does. It runs in a child process, as training does,
so that a notebook's kernel never holds the model on the GPU. ``push_command`` is how the folder
goes to the Hugging Face hub. Retrieval on a held-out split, for a before/after, is ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from m3lab.use.evaluate import COMBINED_WEIGHTS


@dataclass(frozen=True)
class ModelFile:
    name: str
    bytes: int


@dataclass(frozen=True)
class PassageScores:
    """One passage's scores against the query: each head's, and their weighted sum."""

    passage: str
    dense: float
    sparse: float
    colbert: float

    @property
    def combined(self) -> float:
        return sum(weight * getattr(self, mode) for mode, weight in COMBINED_WEIGHTS.items())


def model_files(folder: str | Path) -> list[ModelFile]:
    """The files a run saved in ``folder`` (its checkpoints' folders left out), largest first."""
    files = [path for path in Path(folder).iterdir() if path.is_file()]
    return sorted((ModelFile(path.name, path.stat().st_size) for path in files), key=lambda f: (-f.bytes, f.name))


def score(model: str | Path, query: str, passages: list[str], max_length: int = 512,
          full_precision: bool = False) -> list[PassageScores]:
    """``query`` against each passage, with the model at ``model`` loaded by FlagEmbedding's
    BGEM3FlagModel in a child process (fp16 on a GPU unless ``full_precision``: fp32 everywhere, for
    comparing two models' scores closely)."""
    from m3lab.standin import resolve_model

    with tempfile.TemporaryDirectory(prefix="m3lab-use-") as scratch:
        request, answer = Path(scratch) / "request.json", Path(scratch) / "scores.json"
        request.write_text(json.dumps({"query": query, "passages": passages, "max_length": max_length,
                                       "full_precision": full_precision}))
        child = subprocess.run([sys.executable, "-m", "m3lab.use", str(resolve_model(str(model))), str(request),
                                str(answer)], capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"using {model} failed (exit {child.returncode}):\n" + child.stderr[-3000:])
        return [PassageScores(**row) for row in json.loads(answer.read_text())]


def _score_here(model_path: str, query: str, passages: list[str], max_length: int,
                full_precision: bool = False) -> list[PassageScores]:
    import torch
    from FlagEmbedding import BGEM3FlagModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BGEM3FlagModel(model_path, use_fp16=device == "cuda" and not full_precision, devices=device)
    heads = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=max_length)
    q, p = model.encode([query], **heads), model.encode(passages, **heads)
    return [PassageScores(text, float(q["dense_vecs"][0] @ p["dense_vecs"][i]),
                          float(model.compute_lexical_matching_score(q["lexical_weights"][0], p["lexical_weights"][i])),
                          float(model.colbert_score(q["colbert_vecs"][0], p["colbert_vecs"][i])))
            for i, text in enumerate(passages)]


def push_command(folder: str | Path, repo_id: str) -> str:
    """The shell command that uploads the model folder to the hub (needs a write token: `hf auth login`),
    the folder as this working directory sees it (relative where it lies below it)."""
    import os

    path = os.path.abspath(folder)
    if path.startswith(os.getcwd() + os.sep):
        path = os.path.relpath(path)
    return f"hf upload {shlex.quote(repo_id)} {shlex.quote(path)} . --repo-type model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m3lab.use", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("request", type=Path, help='a JSON file: {"query": ..., "passages": [...], "max_length": N, '
                                                   '"full_precision": false}')
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    request = json.loads(args.request.read_text())
    rows = _score_here(args.model, request["query"], request["passages"], request.get("max_length", 512),
                       request.get("full_precision", False))
    args.out.write_text(json.dumps([asdict(row) for row in rows]))
    return 0


__all__ = ["ModelFile", "PassageScores", "model_files", "score", "push_command", "evaluate"]

"""Retrieval evaluation on the held-out split: MRR@10, nDCG@10 and Recall@k for BGE-M3's three scores.

Queries and corpus are encoded with FlagEmbedding's own ``BGEM3FlagModel`` (dense, sparse and
ColBERT outputs at once) and scored with its own functions; "combined" is the weighted sum that
FlagEmbedding's README uses for BGE-M3 (dense 0.4, sparse 0.2, ColBERT 0.4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from m3lab.data.jsonl import load_jsonl, resolve_data_path
from m3lab.io import write_text_atomic

MODES = ("dense", "sparse", "colbert", "combined")
COMBINED_WEIGHTS = {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}


@dataclass
class RetrievalScores:
    """Per scoring mode: MRR@10, nDCG@10 (binary relevance) and Recall@k over the held-out queries."""

    model: str
    queries: int
    corpus: int
    mrr_at_10: dict[str, float] = field(default_factory=dict)
    recall: dict[str, dict[int, float]] = field(default_factory=dict)  # mode -> k -> recall@k
    # guards against upstream's known failures: the share of passages whose sparse weights are all zero
    # (FlagEmbedding #982), and the first passage's first dense values (a fine-tune that saved the base
    # model, #1547, gives the base's)
    empty_sparse_share: float = 0.0
    dense_start: list[float] = field(default_factory=list)
    ndcg_at_10: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [{"mode": mode, "MRR@10": round(self.mrr_at_10[mode], 4), "nDCG@10": round(self.ndcg_at_10[mode], 4),
                 **{f"R@{k}": round(v, 4) for k, v in self.recall[mode].items()}} for mode in MODES]

    def table(self, after: RetrievalScores | None = None, columns=("MRR@10", "nDCG@10", "R@1", "R@10", "R@100")) -> str:
        """One row per score; with ``after``, each figure as before -> after."""
        width = 15 if after else 7
        lines = [f"{'score':9} " + " ".join(f"{c:>{width}}" for c in columns) + ("   (before -> after)" if after else "")]
        for index, b in enumerate(self.rows()):
            a = after.rows()[index] if after else None
            lines.append(f"{b['mode']:9} " + " ".join(
                f"{b[c]:6.3f} -> {a[c]:5.3f}" if a else f"{b[c]:7.3f}" for c in columns))
        return "\n".join(lines)


def load_corpus(path: str | Path = "data/corpus.jsonl") -> list[str]:
    """The passage texts of a corpus JSONL file (one {"text": ...} object per line)."""
    path = resolve_data_path(path)
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):  # a BOM read past
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a corpus line ({error}); each line must be a JSON "
                             'object with a "text" string.') from None
    return texts


@dataclass(frozen=True)
class RankMetrics:
    mrr_at_10: float
    ndcg_at_10: float
    recall: dict[int, float]


def _rank_metrics(scores: np.ndarray, relevant: list[set[int]], ks: tuple[int, ...]) -> RankMetrics:
    """MRR@10, nDCG@10 (each positive relevance 1) and Recall@k, averaged over the queries."""
    order = np.argsort(-scores, axis=1, kind="stable")
    reciprocal, ndcg, recall = [], [], {k: [] for k in ks}
    discount = 1.0 / np.log2(np.arange(2, 12))  # ranks 1..10
    for row, wanted in zip(order, relevant):
        hits = np.flatnonzero(np.isin(row, list(wanted)))
        first = hits[0] + 1 if hits.size else None
        reciprocal.append(1.0 / first if first is not None and first <= 10 else 0.0)
        gains = np.isin(row[:10], list(wanted)).astype(float)
        ndcg.append(float(gains @ discount[:len(gains)] / discount[:min(len(wanted), 10)].sum()))
        for k in ks:
            recall[k].append(len(wanted & set(row[:k].tolist())) / len(wanted))
    return RankMetrics(float(np.mean(reciprocal)), float(np.mean(ndcg)), {k: float(np.mean(v)) for k, v in recall.items()})


def _held_out(eval_path, corpus_path) -> tuple[list[dict], list[str], list[set[int]]]:
    """The held-out queries, the corpus, and for each query the corpus indices of its positives."""
    records = load_jsonl(eval_path, need_negatives=False)
    corpus = load_corpus(corpus_path)
    index = {text: i for i, text in enumerate(corpus)}
    relevant = []
    for number, record in enumerate(records, start=1):
        wanted = {index[text] for text in record["pos"] if text in index}
        if not wanted:
            raise ValueError(f"{resolve_data_path(eval_path)}:{number}: none of this query's positives is in "
                             f"{resolve_data_path(corpus_path)}; add them to the corpus.")
        relevant.append(wanted)
    return records, corpus, relevant


def evaluate_retrieval(model: str | Path, eval_path: str | Path = "data/eval.jsonl",
                       corpus_path: str | Path = "data/corpus.jsonl", ks: tuple[int, ...] = (1, 5, 10, 100),
                       max_length: int = 512, device: str | None = None) -> RetrievalScores:
    """Score every held-out query against the whole corpus with each of BGE-M3's scores.

    ``model``: a folder, a hub id, or "tiny-bge-m3". The model is loaded in a child process, as
    training runs are, so that a notebook kernel never holds it on the GPU afterwards.
    """
    from m3lab.standin import resolve_model

    _held_out(eval_path, corpus_path)  # bad data fails here, with its file and line
    with tempfile.TemporaryDirectory(prefix="m3lab-evaluate-") as scratch:
        out = Path(scratch) / "scores.json"
        argv = [sys.executable, "-m", "m3lab.use.evaluate", str(resolve_model(str(model))), "--out", str(out),
                "--eval", str(resolve_data_path(eval_path)), "--corpus", str(resolve_data_path(corpus_path)),
                "--max-length", str(max_length), "--ks", *map(str, ks)] + (["--device", device] if device else [])
        child = subprocess.run(argv, capture_output=True, text=True)  # progress bars stay out of the notebook
        if child.returncode != 0:
            raise RuntimeError(f"scoring {model} failed (exit {child.returncode}):\n" + child.stderr[-3000:])
        saved = json.loads(out.read_text())
    return from_json(saved)


def from_json(saved: dict) -> RetrievalScores:
    """Scores as ``dataclasses.asdict`` wrote them (JSON turns the recall's k into strings)."""
    return RetrievalScores(saved["model"], saved["queries"], saved["corpus"], saved["mrr_at_10"],
                           {mode: {int(k): v for k, v in recall.items()} for mode, recall in saved["recall"].items()},
                           saved["empty_sparse_share"], saved["dense_start"], saved.get("ndcg_at_10", {}))


NO_CHANGE = 0.01  # MRR@10 moved by less than this: no change (50 held-out queries: one query's rank is 0.02)


def verdict(before: RetrievalScores, after: RetrievalScores, mode: str = "combined") -> list[str]:
    """Whether the fine-tune helped, in a line, by ``mode``'s MRR@10; then what to check where it did not,
    and what the guards found."""
    change = after.mrr_at_10[mode] - before.mrr_at_10[mode]
    word = "helped" if change >= NO_CHANGE else "worse" if change <= -NO_CHANGE else "no change"
    lines = [f"{word}: {mode} MRR@10 {before.mrr_at_10[mode]:.3f} -> {after.mrr_at_10[mode]:.3f} "
             f"({change:+.3f}) on {after.queries} held-out queries"]
    if word != "helped":
        lines.append("to check: the learning rate and epochs (too few steps move nothing; too high forgets), "
                     "whether the negatives are true negatives, and whether the held-out queries resemble the "
                     "training ones")
    if after.dense_start and after.dense_start == before.dense_start:
        lines.append("guard: the fine-tuned dense vectors equal the base model's: the folder holds the base "
                     "weights (did the run save? FlagEmbedding #1547)")
    if after.empty_sparse_share > 0.5:
        lines.append(f"guard: {after.empty_sparse_share:.0%} of the passages have all-zero sparse weights "
                     "(FlagEmbedding #982): was sparse_linear.pt saved and trained (--unified_finetuning True)?")
    return lines


def _score(model_path: str, eval_path: str, corpus_path: str, ks: tuple[int, ...], max_length: int,
           device: str | None) -> RetrievalScores:
    """The scoring itself, in this process: FlagEmbedding's encoder and its own three scores."""
    from FlagEmbedding import BGEM3FlagModel

    records, corpus, relevant = _held_out(eval_path, corpus_path)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = BGEM3FlagModel(str(model_path), use_fp16=device.startswith("cuda"), devices=device)
    encode = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=max_length,
                  batch_size=16)
    q = model.encode([r["query"] for r in records], **encode)
    p = model.encode(corpus, **encode)
    scores = {"dense": np.asarray(q["dense_vecs"]) @ np.asarray(p["dense_vecs"]).T}
    scores["sparse"] = np.array([[model.compute_lexical_matching_score(qw, pw) for pw in p["lexical_weights"]]
                                 for qw in q["lexical_weights"]], dtype=np.float64)
    scores["colbert"] = np.array([[float(model.colbert_score(qv, pv)) for pv in p["colbert_vecs"]]
                                  for qv in q["colbert_vecs"]], dtype=np.float64)
    scores["combined"] = sum(w * scores[mode] for mode, w in COMBINED_WEIGHTS.items())
    result = RetrievalScores(str(model_path), len(records), len(corpus),
                             empty_sparse_share=float(np.mean([not any(w.values()) for w in p["lexical_weights"]])),
                             dense_start=[round(float(v), 6) for v in np.asarray(p["dense_vecs"])[0, :8]])
    for mode in MODES:
        metrics = _rank_metrics(scores[mode], relevant, ks)
        result.mrr_at_10[mode], result.ndcg_at_10[mode], result.recall[mode] = (metrics.mrr_at_10, metrics.ndcg_at_10,
                                                                                metrics.recall)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m3lab.use.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder or hub id")
    parser.add_argument("--out", type=Path, required=True, help="where to write the scores (JSON)")
    parser.add_argument("--eval", default="data/eval.jsonl")
    parser.add_argument("--corpus", default="data/corpus.jsonl")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 100])
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    scores = _score(args.model, args.eval, args.corpus, tuple(args.ks), args.max_length, args.device)
    write_text_atomic(args.out, json.dumps(asdict(scores)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The queries a fine-tune is judged on, kept out of its training: the learner's own evaluation file
and corpus, or a share of their training file held out.

- The series' sample (``data/train.jsonl``) already has its held-out split: ``data/eval.jsonl`` (50
  queries) over ``data/corpus.jsonl`` (303 passages).
- Your own eval file (``query`` and ``pos``, as FlagEmbedding's JSONL) and corpus (``{"text": ...}`` a
  line): used as given; without a corpus, every passage of the eval and training files is the corpus.
- Otherwise a tenth of your file's lines (at least ``MIN_HELD_OUT``), drawn with a fixed seed, is held
  out: the training part, the held-out part and a corpus of every passage in the file are written
  into a folder, and the answer trains on the training part.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from m3lab.data.jsonl import REPO_ROOT, load_jsonl, resolve_data_path
from m3lab.io import write_text_atomic

SAMPLE = REPO_ROOT / "data" / "train.jsonl"
SHARE = 0.1
MIN_HELD_OUT = 10  # fewer queries than this say little: one query is a tenth of the score
MIN_TRAINING = 20
SEED = 42


@dataclass(frozen=True)
class Judged:
    """Where the answer trains and what it is judged on."""

    train: str  # the file the answer trains on
    eval: str  # the held-out queries (FlagEmbedding's JSONL: query, pos)
    corpus: str  # the passages they are retrieved from ({"text": ...} a line)
    how: str  # where the split comes from, in a sentence

    def describe(self) -> str:
        queries = len(load_jsonl(self.eval, need_negatives=False))
        passages = sum(1 for line in resolve_data_path(self.corpus).read_text(encoding="utf-8").splitlines()
                       if line.strip())
        return (f"{self.how}: training on {self.train}; judged on {queries} held-out queries ({self.eval}) over "
                f"{passages} passages ({self.corpus})")


def _passages(records: list[dict]) -> list[str]:
    """Every distinct passage of ``records``, first seen first."""
    return list(dict.fromkeys(text for record in records for text in record["pos"] + record.get("neg", [])))


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def hold_out(data: str | Path, folder: str | Path, share: float = SHARE, seed: int = SEED) -> Judged:
    """A share of ``data``'s lines held out, written with the rest and the corpus into ``folder``."""
    records = load_jsonl(data)
    held = max(MIN_HELD_OUT, round(share * len(records)))
    if len(records) - held < MIN_TRAINING:
        raise ValueError(f"{data}: {len(records)} lines are too few to hold {held} out and train on the rest "
                         f"(at least {MIN_HELD_OUT + MIN_TRAINING}); give an eval file of your own (MY_EVAL).")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held_out = sorted(order[:held])
    kept = set(held_out)
    folder = Path(folder)
    stem = Path(data).stem
    paths = {part: folder / f"{stem}.{part}.jsonl" for part in ("train", "eval", "corpus")}
    write_text_atomic(paths["train"], _jsonl([r for i, r in enumerate(records) if i not in kept]))
    write_text_atomic(paths["eval"], _jsonl([{"query": records[i]["query"], "pos": records[i]["pos"]}
                                             for i in held_out]))
    write_text_atomic(paths["corpus"], _jsonl([{"text": text} for text in _passages(records)]))
    return Judged(str(paths["train"]), str(paths["eval"]), str(paths["corpus"]),
                  f"{held} of {len(records)} lines held out (seed {seed})")


def prepare(data: str | Path, eval_file: str | Path | None = None, corpus: str | Path | None = None,
            folder: str | Path = "my-data") -> Judged:
    """Where the answer trains and what it is judged on, for the learner's ``data`` (see the module)."""
    if eval_file is None and resolve_data_path(data) == SAMPLE.resolve():
        return Judged(str(data), str(Path(data).with_name("eval.jsonl")), str(Path(data).with_name("corpus.jsonl")),
                      "the series' sample, split when it was made")
    if eval_file is None:
        return hold_out(data, folder)
    load_jsonl(eval_file, need_negatives=False)  # every bad line, with its file and line
    if corpus is None:
        corpus = Path(folder) / f"{Path(eval_file).stem}.corpus.jsonl"
        write_text_atomic(corpus, _jsonl([{"text": text} for text in _passages(
            load_jsonl(eval_file, need_negatives=False) + load_jsonl(data))]))
    return Judged(str(data), str(eval_file), str(corpus), "your own eval file")

"""Training data in FlagEmbedding's JSONL format: loading, validation and token-length statistics.

Each line is ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` with optional ``pos_scores``,
``neg_scores`` (numbers, one per passage), ``prompt`` and ``type`` (strings). Every bad line is
reported with ``file:line`` and what to do, all at once, before ``datasets`` ever sees the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]  # the repository: this file is two folders down
PASSAGE_FIELDS = ("pos", "neg")
SCORE_FIELDS = {"pos_scores": "pos", "neg_scores": "neg"}
OPTIONAL_STRING_FIELDS = ("prompt", "type")
MAX_PROBLEMS_SHOWN = 50


@dataclass(frozen=True)
class DataProblem:
    path: str
    line: int  # 0: the file as a whole (missing, empty)
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line else f"{self.path}: {self.message}"


class DataError(ValueError):
    """Bad training data; ``problems`` holds every one found."""

    def __init__(self, problems: list[DataProblem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        super().__init__(f"{len(problems)} problem(s) in the training data:\n{shown}{more}")


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as given if it exists, else relative to the repository (so ``data/train.jsonl`` works
    from the notebooks folder, and from Colab's folder beside the clone); ``repository_copy_note``
    says when that happened."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path.resolve()
    beside_repo = REPO_ROOT / path
    return beside_repo.resolve() if beside_repo.exists() else path.resolve()


def repository_copy_note(path: str | Path) -> str | None:
    """A sentence when ``path`` is not in the current folder and the repository's file of that name is
    read instead (m3lab's sample data, most likely); None when the path is read as given."""
    given = Path(path)
    if given.exists() or given.is_absolute() or not (REPO_ROOT / given).exists():
        return None
    return (f"note: there is no {given} in this folder ({Path.cwd()}); reading the m3lab repository's "
            f"{os.path.relpath(REPO_ROOT / given)} instead. Give your own file's path if you meant yours.")


def _type_name(value) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "true/false", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _record_problems(record, need_negatives: bool, knowledge_distillation: bool) -> list[str]:
    """What is wrong with one parsed line, as sentences that say what to do."""
    if not isinstance(record, dict):
        return [f"the line is {_type_name(record)}, not a JSON object; write one object per line: "
                '{"query": ..., "pos": [...], "neg": [...]}']
    found = []
    query = record.get("query")
    if "query" not in record:
        found.append('"query" is missing; every line needs the query text.')
    elif not isinstance(query, str):
        found.append(f'"query" is {_type_name(query)}; it must be a string.')
    elif not query.strip():
        found.append('"query" is empty; give the query text.')

    for name in PASSAGE_FIELDS:
        if name not in record:
            if name == "pos" or need_negatives:
                what = "at least one positive passage" if name == "pos" else \
                    "negatives (FlagEmbedding samples train_group_size - 1 of them)"
                found.append(f'"{name}" is missing; give a list with {what}.')
            continue
        passages = record[name]
        if not isinstance(passages, list):
            found.append(f'"{name}" is {_type_name(passages)}; it must be a list of strings, e.g. ["text"].')
            continue
        if not passages and (name == "pos" or need_negatives):
            found.append(f'"{name}" is an empty list; give at least one passage.')
        for i, text in enumerate(passages):
            if not isinstance(text, str):
                found.append(f'"{name}"[{i}] is {_type_name(text)}; every passage must be a string.')
            elif not text.strip():
                found.append(f'"{name}"[{i}] is an empty string; remove it or give the passage text.')

    for name, passages_name in SCORE_FIELDS.items():
        if name not in record:
            continue
        scores = record[name]
        passages = record.get(passages_name)
        if not isinstance(scores, list):
            found.append(f'"{name}" is {_type_name(scores)}; it must be a list of numbers, one per '
                         f'"{passages_name}" passage.')
            continue
        if isinstance(passages, list) and len(scores) != len(passages):
            found.append(f'"{name}" has {len(scores)} score(s) but "{passages_name}" has {len(passages)} '
                         "passage(s); give exactly one score per passage.")
        for i, score in enumerate(scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                found.append(f'"{name}"[{i}] is {_type_name(score)}; scores must be numbers.')
            elif not math.isfinite(score):
                found.append(f'"{name}"[{i}] is {score}; scores must be finite numbers.')
    if knowledge_distillation:
        for name in SCORE_FIELDS:
            if name not in record:
                found.append(f'"{name}" is missing and knowledge_distillation is on; add teacher scores '
                             "or turn knowledge_distillation off.")

    for name in OPTIONAL_STRING_FIELDS:
        if name in record and not isinstance(record[name], str):
            found.append(f'"{name}" is {_type_name(record[name])}; it must be a string.')
    return found


def _json_problem(err: json.JSONDecodeError, line: str) -> str:
    """Where in the line the JSON breaks, and what to do: a line that ends too early most likely
    lacks a closing brace, bracket or quote."""
    if err.pos >= len(line.rstrip()):
        return (f"invalid JSON: the line ends (column {len(line)}) before its object does ({err.msg}); a closing "
                "brace, bracket or quote is missing. Each line must be one complete JSON object.")
    return f"invalid JSON at column {err.pos + 1}: {err.msg}; each line must be one complete JSON object."


def validate_jsonl(path: str | Path, *, need_negatives: bool = True,
                   knowledge_distillation: bool = False) -> tuple[list[dict], list[DataProblem]]:
    """Parse ``path`` and return (records, problems); problems is empty when the file is good."""
    path = Path(path)
    shown = str(path)
    if not path.is_file():
        return [], [DataProblem(shown, 0, "the file does not exist; check the path (relative paths are "
                                          "read from the current folder, then from the m3lab repository).")]
    records: list[dict] = []
    problems: list[DataProblem] = []
    score_lines: dict[bool, int] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(DataProblem(shown, number, f"not valid UTF-8 (byte {err.start}); save the "
                                                           "file as UTF-8."))
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark (Windows editors): datasets reads past it
            if not text.strip():
                continue  # blank lines are harmless: `datasets` skips them too
            text = text.rstrip("\r\n")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                problems.append(DataProblem(shown, number, _json_problem(err, text)))
                continue
            line_problems = _record_problems(record, need_negatives, knowledge_distillation)
            problems += [DataProblem(shown, number, message) for message in line_problems]
            if not line_problems:
                records.append(record)
                has_scores = "pos_scores" in record or "neg_scores" in record
                score_lines.setdefault(has_scores, number)
    if len(score_lines) == 2:
        # datasets would fill the missing columns with null, and FlagEmbedding fails mid-training.
        problems.append(DataProblem(shown, max(score_lines.values()),
                                    "some lines have pos_scores/neg_scores and others do not (first with: "
                                    f"line {score_lines[True]}, first without: line {score_lines[False]}); "
                                    "give scores on every line or on none."))
    if not records and not problems:
        problems.append(DataProblem(shown, 0, "the file has no records; add at least one line."))
    return records, problems


def load_jsonl(paths, *, need_negatives: bool = True, knowledge_distillation: bool = False) -> list[dict]:
    """Records of one or more JSONL files (a folder: its .json and .jsonl files, as FlagEmbedding reads
    one); raises DataError listing every problem in all of them."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    records, problems = [], []
    files = []
    for path in map(resolve_data_path, paths):
        inside = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
        if path.is_dir() and not inside:
            problems.append(DataProblem(str(path), 0, "the folder holds no .jsonl or .json files; give a file, or "
                                                      "a folder of them"))
        files += inside
    for path in files:
        found, bad = validate_jsonl(path, need_negatives=need_negatives,
                                    knowledge_distillation=knowledge_distillation)
        records += found
        problems += bad
    if problems:
        raise DataError(problems)
    return records


@dataclass(frozen=True)
class TokenLengthStats:
    """Token counts of one field, special tokens included, as the collator would see them."""

    field: str
    count: int
    p50: int
    p90: int
    p95: int
    p99: int
    max: int
    max_len: int | None
    truncated_share: float  # share of texts longer than max_len
    truncated_token_share: float  # share of all tokens that truncation cuts

    def as_row(self) -> dict:
        return self.__dict__.copy()


def token_lengths(texts: list[str], tokenizer, batch_size: int = 256) -> np.ndarray:
    lengths: list[int] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], add_special_tokens=True, truncation=False)
        lengths += [len(ids) for ids in encoded["input_ids"]]
    return np.asarray(lengths, dtype=np.int64)


def _stats(name: str, lengths: np.ndarray, max_len: int | None) -> TokenLengthStats:
    p50, p90, p95, p99 = (int(np.percentile(lengths, q, method="inverted_cdf")) for q in (50, 90, 95, 99))
    cut = 0.0 if max_len is None else float(np.clip(lengths - max_len, 0, None).sum() / lengths.sum())
    share = 0.0 if max_len is None else float((lengths > max_len).mean())
    return TokenLengthStats(name, int(lengths.size), p50, p90, p95, p99, int(lengths.max()), max_len, share, cut)


def token_length_stats(records: list[dict], tokenizer, query_max_len: int | None = None,
                       passage_max_len: int | None = None) -> list[TokenLengthStats]:
    """Length statistics for queries, positives, negatives and all passages together.

    Passages are counted once each, however many lines they appear on, so a passage mined as
    a negative for fifty queries does not weigh fifty times.
    """
    queries = [r["query"] for r in records]
    pos = list(dict.fromkeys(t for r in records for t in r["pos"]))
    neg = list(dict.fromkeys(t for r in records for t in r.get("neg", [])))
    lengths = {"query": token_lengths(queries, tokenizer), "pos": token_lengths(pos, tokenizer),
               "neg": token_lengths(neg, tokenizer)}
    passages = list(dict.fromkeys(pos + neg))
    lengths["passage"] = token_lengths(passages, tokenizer)
    limits = {"query": query_max_len, "pos": passage_max_len, "neg": passage_max_len, "passage": passage_max_len}
    return [_stats(name, values, limits[name]) for name, values in lengths.items() if values.size]


def length_covering(stats: TokenLengthStats, share: float = 0.95) -> int:
    """The smallest max length that leaves ``share`` of the texts whole (from the percentiles kept)."""
    for q, value in ((0.5, stats.p50), (0.9, stats.p90), (0.95, stats.p95), (0.99, stats.p99)):
        if share <= q:
            return value
    return stats.max


def length_covering_tokens(lengths, share: float = 0.95, multiple_of: int = 8) -> int:
    """The smallest max length (a multiple of ``multiple_of``) that keeps ``share`` of all the tokens
    of these texts: truncating at it cuts at most 1 - share of them."""
    lengths = np.sort(np.asarray(lengths, dtype=np.int64))
    if lengths.size == 0:
        raise ValueError("no texts to measure")
    total = lengths.sum()
    for limit in range(multiple_of, int(lengths[-1]) + multiple_of, multiple_of):
        if np.minimum(lengths, limit).sum() >= share * total:
            return limit
    return int(-(-lengths[-1] // multiple_of) * multiple_of)


@dataclass(frozen=True)
class LineLengths:
    """One training line's texts in tokens: what a batch holding it pads to."""

    query: int
    pos: tuple[int, ...]
    neg: tuple[int, ...]


def line_lengths(records: list[dict], tokenizer) -> tuple[LineLengths, ...]:
    """Every line's query, positives and negatives in tokens (each distinct text tokenized once)."""
    texts = list(dict.fromkeys(t for r in records for t in [r["query"], *r["pos"], *r.get("neg", [])]))
    tokens = dict(zip(texts, token_lengths(texts, tokenizer).tolist()))
    return tuple(LineLengths(tokens[r["query"]], tuple(tokens[t] for t in r["pos"]),
                             tuple(tokens[t] for t in r.get("neg", []))) for r in records)

"""The bundled sample retrieval dataset: how it is built and how its hard negatives are mined.

Run ``python -m m3lab.data.sample`` to rebuild ``data/corpus.jsonl``, ``data/train.jsonl`` and
``data/eval.jsonl`` from their sources (see ``data/README.md``); the build is deterministic.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from m3lab.data.jsonl import REPO_ROOT
from m3lab.io import write_jsonl_atomic

DATA_DIR = REPO_ROOT / "data"
MULTILINGUAL_SOURCE = DATA_DIR / "source" / "multilingual.jsonl"

SEED = 20261127
EVAL_QUERIES = 50
EVAL_QUERIES_PER_OTHER_LANGUAGE = 2  # zh, de, es, fr each get two held-out queries
NEGATIVES_PER_QUERY = 10  # train_group_size up to 11 without repeated negatives
MIN_SECTION_WORDS = 30
MIN_ENTRY_WORDS = 12

_UNDERLINE = re.compile(r"^(\*+|=+|-+)$")
_ENTRY = re.compile(r"^([A-Za-z_][\w.]*)\((.*)\)\s*$")
_WORD = re.compile(r"[a-z0-9_]+")
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class Passage:
    id: str
    lang: str
    title: str
    text: str


@dataclass(frozen=True)
class LabelledQuery:
    query: str
    positive_id: str
    lang: str


def _sections(topic: str, text: str) -> list[tuple[str, str]]:
    """Split one reference topic at its underlined headings into (heading, body) pairs."""
    lines = text.splitlines()
    starts = [i - 1 for i in range(1, len(lines)) if _UNDERLINE.match(lines[i]) and lines[i - 1].strip()
              and len(lines[i]) >= len(lines[i - 1].rstrip()) - 2]
    if not starts:
        return [(topic, text.strip())]
    sections = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        heading = lines[start].strip()
        body = "\n".join(lines[start + 2:end]).strip()
        sections.append((heading, body))
    return sections


def _entries(text: str) -> list[tuple[str, str]]:
    """Definition entries such as ``str.capitalize()`` followed by their indented description."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = _ENTRY.match(line)
        if not match:
            continue
        body = []
        for following in lines[i + 1:]:
            if following and not following.startswith(" "):
                break
            body.append(following.strip())
        description = " ".join(part for part in body if part)
        found.append((match.group(1), f"{line.strip()}\n\n{description}"))
    return found


def _heading_query(heading: str) -> str:
    return re.sub(r'["“”]', "", heading).strip()


def english_passages() -> tuple[list[Passage], list[LabelledQuery]]:
    """Passages and their queries from the Python language reference shipped with CPython."""
    from pydoc_data.topics import topics

    passages: list[Passage] = []
    queries: list[LabelledQuery] = []
    seen_text: set[str] = set()
    seen_query: set[str] = set()

    def add(pid: str, title: str, text: str, query: str) -> None:
        if text in seen_text:
            return
        seen_text.add(text)
        passages.append(Passage(pid, "en", title, text))
        if query.lower() not in seen_query:
            seen_query.add(query.lower())
            queries.append(LabelledQuery(query, pid, "en"))

    for topic in sorted(topics):
        text = topics[topic]
        for n, (heading, body) in enumerate(_sections(topic, text)):
            if len(body.split()) >= MIN_SECTION_WORDS:
                add(f"en-{topic}-s{n}", heading, f"{heading}\n\n{body}", _heading_query(heading))
        for n, (name, body) in enumerate(_entries(text)):
            if len(body.split()) >= MIN_ENTRY_WORDS:
                add(f"en-{topic}-e{n}", name, body, f"What does {name}() do?")
    return passages, queries


def multilingual_passages(path: Path = MULTILINGUAL_SOURCE) -> tuple[list[Passage], list[LabelledQuery]]:
    """Passages written for this project in Chinese, German, Spanish and French."""
    passages, queries = [], []
    counters: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        n = counters[row["lang"]] = counters.get(row["lang"], 0) + 1
        pid = f"{row['lang']}-{n:02d}"
        passages.append(Passage(pid, row["lang"], row["query"], row["passage"]))
        queries.append(LabelledQuery(row["query"], pid, row["lang"]))
    return passages, queries


def bm25_terms(text: str) -> list[str]:
    """Lower-cased words for Latin scripts; single characters and bigrams for Chinese."""
    text = text.lower()
    terms = _WORD.findall(text)
    chars = _CJK.findall(text)
    terms += chars + [a + b for a, b in zip(chars, chars[1:])]
    return terms


def mine_hard_negatives(
    queries: list[LabelledQuery], passages: list[Passage], count: int = NEGATIVES_PER_QUERY, seed: int = SEED
) -> dict[str, list[str]]:
    """For each query, the ``count`` best-scoring BM25 passages that are not its positive.

    Where BM25 finds fewer than ``count`` passages sharing a term with the query (a short
    Chinese query, say), the rest are drawn at random from passages in the query's language,
    then from the whole corpus.
    """
    # Imported here: reading the bundled data (DATA_DIR) must not need the miner's package
    from rank_bm25 import BM25Okapi

    bm25 = BM25Okapi([bm25_terms(p.text) for p in passages])
    rng = random.Random(seed)
    negatives: dict[str, list[str]] = {}
    for q in queries:
        scores = bm25.get_scores(bm25_terms(q.query))
        ranked = sorted(range(len(passages)), key=lambda i: (-scores[i], passages[i].id))
        chosen = [passages[i].id for i in ranked if scores[i] > 0 and passages[i].id != q.positive_id][:count]
        for same_language_only in (True, False):
            if len(chosen) < count:
                pool = [p.id for p in passages if p.id != q.positive_id and p.id not in chosen
                        and (p.lang == q.lang or not same_language_only)]
                chosen += rng.sample(pool, min(len(pool), count - len(chosen)))
        negatives[q.query] = chosen
    return negatives


def split_queries(queries: list[LabelledQuery], seed: int = SEED) -> tuple[list[LabelledQuery], list[LabelledQuery]]:
    """Hold out EVAL_QUERIES queries, with every language represented, and train on the rest."""
    rng = random.Random(seed)
    held_out: list[LabelledQuery] = []
    for lang in sorted({q.lang for q in queries} - {"en"}):
        held_out += rng.sample([q for q in queries if q.lang == lang], EVAL_QUERIES_PER_OTHER_LANGUAGE)
    english = [q for q in queries if q.lang == "en"]
    held_out += rng.sample(english, EVAL_QUERIES - len(held_out))
    held = {q.query for q in held_out}
    return [q for q in queries if q.query not in held], held_out


def build(out_dir: Path = DATA_DIR) -> dict[str, int]:
    """Write corpus.jsonl, train.jsonl and eval.jsonl under ``out_dir``; return their sizes."""
    en_passages, en_queries = english_passages()
    ml_passages, ml_queries = multilingual_passages()
    passages = en_passages + ml_passages
    queries = en_queries + ml_queries
    by_id = {p.id: p for p in passages}
    negatives = mine_hard_negatives(queries, passages)
    train, held_out = split_queries(queries)

    def rows(split: list[LabelledQuery]) -> list[dict]:
        return [{"query": q.query, "pos": [by_id[q.positive_id].text],
                 "neg": [by_id[n].text for n in negatives[q.query]]} for q in split]

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_dir / "corpus.jsonl",
                       [{"id": p.id, "lang": p.lang, "title": p.title, "text": p.text} for p in passages])
    write_jsonl_atomic(out_dir / "train.jsonl", rows(train))
    write_jsonl_atomic(out_dir / "eval.jsonl", rows(held_out))
    return {"passages": len(passages), "train_queries": len(train), "eval_queries": len(held_out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    sizes = build(args.out_dir)
    print(", ".join(f"{k}: {v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()

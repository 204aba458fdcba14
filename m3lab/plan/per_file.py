"""A pasted per-length command, predicted file by file.

With ``--same_dataset_within_batch True`` FlagEmbedding draws each batch from one training file, at
the ``batch_size`` its lines carry (``m3lab fit --buckets`` writes such files), and pads the batch's
passages to its longest (up to ``passage_max_len``). The command's own batch size then says little:
each file is its own run. ``file_runs`` reads the files; ``tightest`` predicts each distinct
(batch, length) on the card and returns the one with the least to spare, which decides whether the
whole run fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from m3lab.config import TrainConfig


@dataclass(frozen=True)
class FileRun:
    """One training file as FlagEmbedding's same-dataset path batches it."""

    path: Path
    lines: int
    batch_size: int  # per process: the lines' own batch_size, else the command's
    longest_passage: int  # tokens, cut at the command's passage_max_len

    def config(self, run: TrainConfig) -> TrainConfig:
        return run.replace(per_device_train_batch_size=self.batch_size, passage_max_len=self.longest_passage)


def carries_batch_sizes(config: TrainConfig) -> bool:
    """Whether the run's files set their own batches (the same-dataset path and a ``batch_size`` in them)."""
    from m3lab.data.jsonl import load_jsonl

    if not config.same_dataset_within_batch or not config.train_data:
        return False
    return any("batch_size" in record for record in load_jsonl(config.train_data))


def file_runs(config: TrainConfig, tokenizer=None) -> list[FileRun]:
    """Each file of the run's training data (folders opened, as FlagEmbedding opens them), its batch
    and its longest passage, counted with ``tokenizer`` (default: m3lab's stand-in tokenizer, BGE-M3's
    vocabulary)."""
    from m3lab.data.jsonl import load_jsonl, token_lengths

    if tokenizer is None:
        from m3lab.standin import load_tokenizer

        tokenizer, _ = load_tokenizer()
    runs = []
    for given in config.train_data:
        path = Path(given)
        for file in sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]:
            records = load_jsonl([str(file)])
            passages = sorted({t for r in records for t in r["pos"] + r.get("neg", [])})
            longest = int(token_lengths(passages, tokenizer).max())
            sizes = {r.get("batch_size", config.per_device_train_batch_size) for r in records}
            runs.append(FileRun(file, len(records), max(sizes), min(longest, config.passage_max_len)))
    return runs


@dataclass
class Tightest:
    run: FileRun
    report: object  # predict.MemoryReport
    runs: list[FileRun]

    def describe(self) -> str:
        return (f"{len(self.runs)} files, each batched at its lines' batch_size (FlagEmbedding's same-dataset path): "
                f"the tightest is {self.run.path.name} (batch {self.run.batch_size} a process, passages padded to "
                f"{self.run.longest_passage} tokens); its prediction follows")


def tightest(config: TrainConfig, gpu: str, runs: list[FileRun]) -> Tightest:
    """Each distinct (batch, length) of ``runs`` predicted on ``gpu``; the one with the least to spare."""
    from m3lab.predict import predict_many

    distinct = list({(run.batch_size, run.longest_passage): run for run in runs}.values())
    reports = predict_many([run.config(config) for run in distinct], gpu)
    worst = min(range(len(distinct)), key=lambda i: (reports[i].fits, reports[i].spare_bytes))
    return Tightest(distinct[worst], reports[worst], runs)

"""Which texts share a batch: FlagEmbedding's own training datasets, read without training.

``--same_dataset_within_batch`` makes FlagEmbedding draw every batch from one training file; without
it batches mix the files. ``sample_batches`` asks FlagEmbedding's dataset classes themselves
(``AbsEmbedderSameDatasetTrainDataset`` and ``AbsEmbedderTrainDataset`` with a shuffling sampler, as
HF Trainer draws it) for the first batches of an epoch, and reports each batch's files and the
longest passage it holds: FlagEmbedding pads a batch to its longest text, so that length is what the
step's tensors are as long as (up to passage_max_len).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from m3lab.data.jsonl import load_jsonl


@dataclass
class Batch:
    files: Counter  # file name -> queries of this batch from it
    longest_passage: int  # tokens, before truncation to passage_max_len

    def describe(self, passage_max_len: int) -> str:
        files = ", ".join(f"{count} from {name}" for name, count in sorted(self.files.items()))
        return f"{files}; pads passages to {min(self.longest_passage, passage_max_len)} tokens"


def _dataset(files: list, tokenizer, same_dataset: bool, batch_size: int, group: int, passage_max_len: int,
             seed: int, instruction: str | None):
    """FlagEmbedding's training dataset for ``files``, as its runner builds it (AbsRunner.load_train_dataset)."""
    import datasets
    from FlagEmbedding.abc.finetune.embedder import (
        AbsEmbedderDataArguments,
        AbsEmbedderSameDatasetTrainDataset,
        AbsEmbedderTrainDataset,
    )

    args = AbsEmbedderDataArguments(train_data=[str(f) for f in files], train_group_size=group, query_max_len=64,
                                    passage_max_len=passage_max_len, query_instruction_for_retrieval=instruction)
    # FlagEmbedding loads the files with datasets, whose "Generating train split" bars would land in
    # a lesson's output; they are put back as they were
    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if not same_dataset:
            return AbsEmbedderTrainDataset(args, tokenizer)
        dataset = AbsEmbedderSameDatasetTrainDataset(args, default_batch_size=batch_size, seed=seed,
                                                     tokenizer=tokenizer)
        dataset.refresh_epoch()
        return dataset
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _batches(dataset, same_dataset: bool, batch_size: int, seed: int):
    """(queries, passages) of each batch in turn, drawn as training draws them: whole batches from
    the same-dataset class, else items in the order HF Trainer's RandomSampler draws them."""
    import random

    import torch

    random.seed(seed)  # the datasets pick positives and negatives with Python's random, as HF's set_seed seeds it
    if same_dataset:
        for index in range(len(dataset.batch_datas)):
            yield tuple(dataset[index][:2])
        return
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order), batch_size):
        items = [dataset[i] for i in order[start:start + batch_size]]
        yield [item[0] for item in items], [p for item in items for p in item[1]]


def sample_batches(files: list[str | os.PathLike], tokenizer, *, same_dataset: bool, batch_size: int = 4,
                   group: int = 2, passage_max_len: int = 8192, count: int = 6, seed: int = 42) -> list[Batch]:
    """The first ``count`` batches FlagEmbedding's training dataset makes from ``files``."""
    origin = {}  # query -> the file it came from
    for path in files:
        for record in load_jsonl(path):
            origin.setdefault(record["query"], Path(path).name)
    # an empty instruction keeps the queries as written (see query_as_trained)
    dataset = _dataset(files, tokenizer, same_dataset, batch_size, group, passage_max_len, seed, "")
    batches = []
    for queries, passages in islice(_batches(dataset, same_dataset, batch_size, seed), count):
        lengths = tokenizer(list(passages), add_special_tokens=True, truncation=False)["input_ids"]
        batches.append(Batch(Counter(origin.get(q, "?") for q in queries), max(len(ids) for ids in lengths)))
    return batches


def query_as_trained(files: list, tokenizer, *, same_dataset: bool, first_query: str,
                     instruction: str | None = None) -> str:
    """The text FlagEmbedding's dataset hands the model for ``first_query`` (a query of ``files``), with
    ``--query_instruction_for_retrieval`` left out (None) or given."""
    dataset = _dataset(files, tokenizer, same_dataset, 4, 2, 512, 42, instruction)
    return next(q for queries, _ in _batches(dataset, same_dataset, 4, 42) for q in queries if q.endswith(first_query))

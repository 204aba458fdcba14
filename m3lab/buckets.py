"""Per-length batches, the way BGE-M3's authors trained: the data split by length into files, each
batched at the largest size the card holds, found by the predictor before the run starts.

FlagEmbedding's same-dataset path (``--same_dataset_within_batch True``) draws every batch from one
file, at the ``batch_size`` its records carry. ``plan`` counts each line's longest passage (a batch
pads its passages to its longest one), splits the lines into buckets at powers of two up to BGE-M3's
8,192 tokens, and finds each bucket's largest per-process batch with every passage at the bucket's
longest length: the predictor's verdict on a full-depth trace, never a close call. Nothing is cut
below 8,192 tokens unless the card cannot hold a bucket's passages one query at a time (then they are
cut at the longest length it holds, and the plan says so). ``BucketPlan.write`` puts the files and
prints the command FlagEmbedding reads as they are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from m3lab.config import TrainConfig
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.platforms import Platform, platform_for

# Powers of two: memory grows about linearly with length, so a bucket half as long holds about twice
# the batch; finer buckets would pad less but split the data into files too small for a batch.
BOUNDS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
MODEL_MAX_LEN = 8192
MAX_BATCH = 512
LENGTH_STEP = 256  # the resolution of a cut, where the card holds no bucket's passages
SEARCH_ROUNDS = 5


@dataclass
class Bucket:
    """The lines whose longest passage is above ``low`` and at most ``bound`` tokens, and their batch."""

    low: int
    bound: int
    records: list[dict]
    passage_tokens: int  # of the passages these lines hold (each counted once, cut at the bound)
    batch: int = 0  # per process; 0: not yet found (or none fits)
    report: object = None  # the prediction at ``batch`` (a MemoryReport)
    single: object = None  # a quick prediction at batch 1 (its counted FLOPs give the step's time)

    @property
    def lines(self) -> int:
        return len(self.records)

    def steps(self, processes: int) -> int:
        """Optimizer steps an epoch: FlagEmbedding drops a file's last short batch."""
        return self.lines // (self.batch * processes) if self.batch else 0

    @property
    def name(self) -> str:
        return f"len-{self.low + 1:04d}-{self.bound:04d}.jsonl"


@dataclass
class BucketPlan:
    platform: Platform
    stock: bool
    base: TrainConfig  # the run but for the batch and the passage length
    tokenizer: str
    buckets: list[Bucket] = field(default_factory=list)
    cut: int | None = None  # the longest passage the card holds, where below 8,192; None: nothing cut

    @property
    def processes(self) -> int:
        return self.base.num_processes

    def epoch_steps(self) -> int:
        return sum(bucket.steps(self.processes) for bucket in self.buckets)

    def table(self) -> str:
        from m3lab import steptime

        header = f"{'bucket (tokens)':>16} {'lines':>6} {'batch':>6} {'steps':>6} {'peak':>8} {'needs':>8}  step time"
        lines = [header, "-" * len(header)]
        for bucket in self.buckets:
            report = bucket.report
            time = steptime.step_time(report) if report is not None else None
            lines.append(f"{bucket.low + 1:>7}-{bucket.bound:<8} {bucket.lines:6d} {bucket.batch:6d} "
                         f"{bucket.steps(self.processes):6d} {report.peak_allocated_bytes / GIB:6.2f} G "
                         f"{report.total_bytes / GIB:6.2f} G  "
                         + (f"{time.fastest_seconds:.1f} to {time.slowest_seconds:.1f} s" if time else "no estimate"))
        lines.append(f"per process; GiB {self.buckets[0].report.provenance}; step times estimated "
                     f"(m3lab.steptime); tokens counted with {self.tokenizer}")
        if self.cut:
            lines.append(f"{'FlagEmbedding as it is' if self.stock else 'the levers'} hold no passage beyond "
                         f"{self.cut:,} tokens even one query at a time: longer ones are cut there")
        return "\n".join(lines)

    def config(self, folder: str) -> TrainConfig:
        """The run: the bucket files in ``folder`` (as this folder sees it), each batched at its size."""
        return self.base.replace(train_data=[folder], same_dataset_within_batch=True, query_instruction_for_retrieval="",
                                 passage_max_len=self.cut or MODEL_MAX_LEN,
                                 per_device_train_batch_size=min(b.batch for b in self.buckets if b.batch),
                                 warmup_steps=math.ceil(0.1 * self.epoch_steps() * self.base.num_train_epochs))

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """One JSONL file per bucket, FlagEmbedding's format with each record's ``batch_size``."""
        import json

        from m3lab.io import write_text_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("len-*.jsonl"):
            stale.unlink()
        written = []
        for bucket in self.buckets:
            if bucket.batch:
                text = "".join(json.dumps({**record, "batch_size": bucket.batch}, ensure_ascii=False) + "\n"
                               for record in bucket.records)
                written.append(folder / bucket.name)
                write_text_atomic(written[-1], text)
        return written


def _line_length(record: dict, lengths: dict[str, int]) -> int:
    return max(lengths[text] for text in record["pos"] + record.get("neg", []))


def split(records: list[dict], lengths: dict[str, int], min_lines: int) -> list[Bucket]:
    """Lines into buckets by their longest passage; a bucket with fewer than ``min_lines`` lines goes
    into the next longer one (its lines pad further, rather than fill no batch)."""
    by_bound: dict[int, list[dict]] = {bound: [] for bound in BOUNDS}
    for record in records:
        length = min(_line_length(record, lengths), MODEL_MAX_LEN)
        by_bound[next(bound for bound in BOUNDS if length <= bound)].append(record)
    buckets, carried, low = [], [], 0
    for bound in BOUNDS:
        group = carried + by_bound[bound]
        if len(group) >= min_lines or (bound == BOUNDS[-1] and group):
            buckets.append(Bucket(low, bound, group, 0))
            carried, low = [], bound
        else:
            carried = group
    if carried and buckets:  # too few beyond the last bucket that filled: into the longest one
        buckets[-1].records += carried
    return [b for b in buckets if b.records]


def _passage_tokens(records: list[dict], lengths: dict[str, int], cut: int) -> int:
    texts = {text for record in records for text in record["pos"] + record.get("neg", [])}
    return sum(min(lengths[text], cut) for text in texts)


def _fits(report, margin: int) -> bool:
    return report.fits and report.spare_bytes >= margin


def _largest_batches(buckets: list[Bucket], base: TrainConfig, gpu, margin: int, log) -> None:
    """Each bucket's largest batch (to within a tenth), confirmed by full-depth traces run side by side:
    a quick trace of shallow copies at batches 1 and 2 draws the line the live tensors follow, and the
    first candidate is where it meets the card; then a round at a time, for every bucket at once, the
    batch doubles while it fits, or the interval left between a fit and a failure is halved."""
    from m3lab.predict import predict, predict_many

    def at(bucket: Bucket, batch: int) -> TrainConfig:
        return base.replace(passage_max_len=bucket.bound, per_device_train_batch_size=batch)

    low, high, next_try = {}, {}, {}
    for index, bucket in enumerate(buckets):
        cap = max(1, min(MAX_BATCH, bucket.lines // base.num_processes))
        one, two = (predict(at(bucket, b), gpu, exact=False) for b in (1, 2))
        bucket.single = one
        room = one.usable_bytes - margin - one.total_bytes  # what batch 1 leaves, its allocator's gaps counted
        slope = max(two.peak_allocated_bytes - one.peak_allocated_bytes, 1)
        low[index], high[index] = 0, cap + 1
        next_try[index] = max(1, min(cap, 1 + int(room // slope)))
    for _ in range(SEARCH_ROUNDS):
        todo = {i: next_try[i] for i in low if high[i] - low[i] > max(1, low[i] // 10)}
        if not todo:
            break
        reports = predict_many([at(buckets[i], batch) for i, batch in todo.items()], gpu)
        for (index, batch), report in zip(todo.items(), reports):
            if _fits(report, margin):
                low[index], buckets[index].batch, buckets[index].report = batch, batch, report
            else:
                high[index] = batch
            unbounded = high[index] == max(1, min(MAX_BATCH, buckets[index].lines // base.num_processes)) + 1
            next_try[index] = (min(high[index] - 1, 2 * batch) if unbounded and low[index] == batch
                               else (low[index] + high[index]) // 2)
        log("  batches found so far: " + ", ".join(f"{buckets[i].bound} tokens {low[i]} (below {high[i]})"
                                                  for i in low))


def _longest_that_fits(base: TrainConfig, gpu, margin: int, low: int, high: int) -> tuple[int, object] | None:
    """The longest passage (a multiple of LENGTH_STEP, above ``low``, below ``high``) that holds one
    query at a time, and its prediction."""
    from m3lab.predict import predict

    found = None
    while high - low > LENGTH_STEP:
        middle = (low + high) // 2 // LENGTH_STEP * LENGTH_STEP
        if middle <= low:
            break
        report = predict(base.replace(passage_max_len=middle, per_device_train_batch_size=1), gpu)
        if _fits(report, margin):
            low, found = middle, (middle, report)
        else:
            high = middle
    return found


def plan(data, platform: str = "colab-t4", stock: bool = False, group: int | None = None, epochs: float = 2,
         tokenizer=None, margin_gib: float = CLOSE_CALL_BYTES / GIB, log=print) -> BucketPlan:
    """Per-length batches for ``data`` on ``platform``: see the module's docstring. ``group``: the
    train_group_size of every batch (default: the data's fewest negatives plus one, at most 8, as
    BGE-M3's authors fine-tuned)."""
    from m3lab.data import load_jsonl, token_lengths
    from m3lab.fit import DataLengths, base_config, data_lengths

    where = platform_for(platform)
    data = [str(data)] if isinstance(data, (str, os.PathLike)) else [str(d) for d in data]
    records = load_jsonl(data)
    if tokenizer is None:
        from m3lab.lessons import load_tokenizer

        tokenizer, name = load_tokenizer()
    else:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    lengths_of: DataLengths = data_lengths(data, 1.0, tokenizer)
    texts = sorted({t for r in records for t in r["pos"] + r.get("neg", [])})
    lengths = dict(zip(texts, token_lengths(texts, tokenizer).tolist()))
    group = group or max(2, min(8, lengths_of.fewest_negatives + 1))
    # 8-bit AdamW, no DeepSpeed (FlagEmbedding's same-dataset path sets the micro-batch itself, which a
    # DeepSpeed JSON fixes); with the levers, lesson 08's: the efficient sparse head and the gradient cache
    base = base_config(data, where, lengths_of.longest_query, MODEL_MAX_LEN, stock).replace(
        train_group_size=group, num_train_epochs=epochs, deepspeed_stage=None, optim="adamw_bnb_8bit",
        grad_cache_chunk_size=0 if stock else 1)
    result = BucketPlan(where, stock, base, name)
    result.buckets = split(records, lengths, min_lines=2 * where.gpu.count)
    log(f"{where.describe()}: {len(records)} lines in {len(result.buckets)} buckets "
        f"({', '.join(f'{b.bound}: {b.lines}' for b in result.buckets)}); group {group}; queries whole "
        f"({lengths_of.longest_query} tokens); tokens counted with {name}")
    margin = int(margin_gib * GIB)
    _largest_batches(result.buckets, base, where.gpu, margin, log)
    held = [b for b in result.buckets if b.batch]
    if len(held) < len(result.buckets):
        _cut(result, base, where.gpu, margin, lengths)
    for bucket in result.buckets:
        bucket.passage_tokens = _passage_tokens(bucket.records, lengths, result.cut or MODEL_MAX_LEN)
    return result


def _cut(result: BucketPlan, base: TrainConfig, gpu, margin: int, lengths: dict[str, int]) -> None:
    """The buckets the card does not hold even one query at a time: their lines cut at the longest
    passage it holds, in one last bucket."""
    held = [b for b in result.buckets if b.batch]
    dropped = [b for b in result.buckets if not b.batch]
    low = held[-1].bound if held else 0
    found = _longest_that_fits(base, gpu, margin, low, dropped[0].bound)
    if found is None:
        result.cut = low or None
        if held:
            held[-1].records += [r for b in dropped for r in b.records]
        result.buckets = held
        return
    result.cut, report = found
    last = Bucket(low, result.cut, [r for b in dropped for r in b.records], 0, batch=1, report=report)
    result.buckets = held + [last]

"""Per-length batches, the way BGE-M3's authors trained: the data split by length into files, each
batched at the largest size the card holds (with the gradient cache, up to a step's token cap), found by
the predictor before the run starts.

FlagEmbedding's same-dataset path (``--same_dataset_within_batch True``) draws every batch from one
file, at the ``batch_size`` its records carry. ``plan`` counts each line's longest passage (a batch
pads its passages to its longest one), splits the lines into buckets at powers of two up to BGE-M3's
8,192 tokens, and finds each bucket's largest per-process batch with every passage at the bucket's
longest length: the predictor's verdict on a full-depth trace, never a close call. Nothing is cut
below 8,192 tokens unless the card cannot hold a bucket's passages one query at a time (then they are
cut at the longest length it holds, and the plan says so). ``BucketPlan.write`` puts the files and
prints the command FlagEmbedding reads as they are.

With m3lab's levers the encoder runs through the gradient cache in chunks of about ``CHUNK_TOKENS``
tokens (``--grad_cache_chunk_tokens``): one text at 8,192 tokens, 32 at 256, so every bucket's chunk
holds about the same activations and the longest buckets are no longer held to what one pass over
their whole batch keeps. The batch is then no longer set by memory alone: such a plan holds a step to
``STEP_TOKENS`` passage tokens, so that an epoch keeps many optimizer steps and a step stays short
beside the half-hour checkpoints. ``chunk_tokens=0`` plans without the cache (the plan before it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from m3lab.config import TrainConfig
from m3lab.data.jsonl import LineLengths
from m3lab.errors import ConfigError
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.plan.platforms import Platform, platform_for

# Powers of two: memory grows about linearly with length, so a bucket half as long holds about twice
# the batch; finer buckets would pad less but split the data into files too small for a batch.
BOUNDS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
MODEL_MAX_LEN = 8192
MAX_BATCH = 512  # per process: where the search stops
LENGTH_STEP = 256  # the resolution of a cut, where the card holds no bucket's passages
SEARCH_ROUNDS = 4  # full-depth rounds; the quick traces' candidate is usually the answer
# The gradient cache's chunk with the levers: one text at BGE-M3's longest, shorter texts several at a
# time (8,192 // the batch's padded length), as the authors sub-batched long passages by length.
CHUNK_TOKENS = 8192
# The most passage tokens one step takes (batch x group x the bucket's length): two lines of group 8
# at 8,192 tokens. Without it a chunked step would take a bucket's every line (the cache leaves memory
# nearly flat in the batch): an epoch of a few steps, and at 8,192 tokens steps longer than the
# half-hour between checkpoints. Plans without the cache are held by memory alone, as they were measured.
STEP_TOKENS = 2 * 8 * 8192


@dataclass
class Bucket:
    """The lines whose longest passage is above ``low`` and at most ``bound`` tokens, and their batch."""

    low: int
    bound: int
    records: list[dict]
    passage_tokens: int  # of the passages these lines hold (each counted once, cut at the bound)
    batch: int = 0  # per process; 0: not yet found (or none fits)
    report: object = None  # the prediction at ``batch`` (a MemoryReport)

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
    lengths: dict[str, int] = field(default_factory=dict, repr=False)  # every passage's tokens
    query_lengths: dict[str, int] = field(default_factory=dict, repr=False)  # every query's tokens

    def line_lengths(self, records: list[dict]) -> tuple[LineLengths, ...]:
        """These lines' texts in tokens: what their batches pad to (the step time's basis)."""
        return tuple(LineLengths(self.query_lengths[r["query"]], tuple(self.lengths[t] for t in r["pos"]),
                                 tuple(self.lengths[t] for t in r.get("neg", []))) for r in records)

    def step_time(self, bucket: Bucket):
        """A bucket's step at its batch, estimated at the lengths its lines pad to (None: no estimate)."""
        from m3lab.predict import steptime

        return steptime.step_time(bucket.report, lines=self.line_lengths(bucket.records)) if bucket.report else None

    def tokens_a_second(self, bucket: Bucket, time=None) -> tuple[float, float] | None:
        """The text a bucket's steps train, in tokens a second (slowest, fastest; estimated; None: no
        estimate): a line's query, a positive and group - 1 negatives (as FlagEmbedding draws them, on
        average), each cut at the plan's longest passage, its padding not counted. ``time``: the
        bucket's step time where already estimated."""
        time = time or self.step_time(bucket)
        if time is None or not bucket.lines or not time.fastest_seconds:
            return None
        cut, negatives = self.cut or MODEL_MAX_LEN, self.base.train_group_size - 1

        def mean(texts: list[str]) -> float:
            return sum(min(self.lengths[t], cut) for t in texts) / len(texts) if texts else 0.0

        per_line = sum(self.query_lengths[r["query"]] + mean(r["pos"]) + negatives * mean(r.get("neg", []))
                       for r in bucket.records) / bucket.lines
        step = per_line * bucket.batch * self.processes
        return step / time.slowest_seconds, step / time.fastest_seconds

    @property
    def processes(self) -> int:
        return self.base.num_processes

    @property
    def chunk_tokens(self) -> int:
        """The gradient cache's tokens a chunk (0: no cache)."""
        return self.base.grad_cache_chunk_tokens

    def epoch_steps(self) -> int:
        return sum(bucket.steps(self.processes) for bucket in self.buckets)

    def epoch_seconds(self) -> tuple[float, float] | None:
        """An epoch's steps, estimated (fastest, slowest; None: no estimate)."""
        return _total_seconds([(b.steps(self.processes), self.step_time(b)) for b in self.buckets if b.batch])

    def lines_left_out(self) -> int:
        """Lines an epoch does not train: each file's last short batch, which FlagEmbedding drops (it
        shuffles each file every epoch, so other lines each epoch)."""
        return sum(b.lines - b.steps(self.processes) * b.batch * self.processes for b in self.buckets)

    def table(self) -> str:
        header = (f"{'bucket (tokens)':>16} {'lines':>6} {'batch':>6} {'steps':>6} {'peak':>8} {'needs':>8}  "
                  f"{'step time':15} tokens/s")
        lines = [header, "-" * len(header)]
        for bucket in self.buckets:
            report = bucket.report
            time = self.step_time(bucket)
            rate = self.tokens_a_second(bucket, time)
            lines.append(f"{bucket.low + 1:>7}-{bucket.bound:<8} {bucket.lines:6d} {bucket.batch:6d} "
                         f"{bucket.steps(self.processes):6d} {report.peak_allocated_bytes / GIB:6.2f} G "
                         f"{report.total_bytes / GIB:6.2f} G  "
                         + (f"{f'{time.fastest_seconds:.1f} to {time.slowest_seconds:.1f} s':15} "
                            f"{rate[0]:,.0f} to {rate[1]:,.0f}" if time else "no estimate"))
        lines.append(f"group {self.base.train_group_size}; "
                     + (f"the encoder in chunks of about {self.chunk_tokens:,} tokens (the gradient cache)"
                        if self.chunk_tokens else "the encoder over the whole batch at once (no gradient cache)")
                     + (f"; LoRA (rank {self.base.lora_rank}) on the encoder, the adapter and the two heads trained"
                        if self.base.use_lora else ""))
        lines.append(f"per process; GiB {self.buckets[0].report.provenance}; step times and tokens a second (the "
                     f"text trained, padding not counted) estimated at the lengths each bucket's batches pad to; "
                     f"tokens counted with {self.tokenizer}")
        total = sum(b.lines for b in self.buckets)
        lines.append(f"lines left out of each epoch: {self.lines_left_out()} of {total} (FlagEmbedding drops each "
                     "file's last short batch, other lines each epoch; a bucket's extra lines go up to the next one)")
        if self.cut:
            lines.append(f"{'FlagEmbedding as it is' if self.stock else 'With the levers, the card'} holds one query at "
                         f"a time with passages of {self.cut:,} tokens and not {self.cut + LENGTH_STEP:,} (tried in "
                         f"steps of {LENGTH_STEP}): longer passages are cut at {self.cut:,}")
        return "\n".join(lines)

    def config(self, folder: str) -> TrainConfig:
        """The run: the bucket files in ``folder`` (as the working folder sees it), each batched at its
        size; a checkpoint at least every half hour of the slowest bucket's steps (estimated) and halfway
        at the latest, or every tenth of the run where the card has no step-time estimate."""
        from m3lab.plan import sessions

        held = [b for b in self.buckets if b.batch]
        times = [self.step_time(b) for b in held]
        total = math.ceil(self.epoch_steps() * self.base.num_train_epochs)
        if all(times):  # as sessions.plan: every half hour at the slow estimate, and halfway at the latest
            slowest = max(time.slowest_seconds for time in times)
            save_steps = max(1, min(-(-total // 2), int(sessions.CHECKPOINT_EVERY_S // slowest)))
        else:
            save_steps = max(1, int(self.epoch_steps() * self.base.num_train_epochs) // sessions.CHECKPOINTS_WITHOUT_ESTIMATE)
        return self.base.replace(train_data=[folder], same_dataset_within_batch=True, query_instruction_for_retrieval="",
                                 passage_max_len=self.cut or MODEL_MAX_LEN,
                                 per_device_train_batch_size=min(b.batch for b in held),
                                 warmup_steps=self.base.warmup_steps_for(math.ceil(self.epoch_steps() * self.base.num_train_epochs)),
                                 save_steps=save_steps, save_total_limit=sessions.KEEP_CHECKPOINTS)

    def command(self, folder: str, output_dir: str | None = None) -> str:
        """The command that trains on the files in ``folder``, as it is to be copied."""
        from m3lab import command as commands

        rendering = commands.Rendering(output_dir=output_dir or self.platform.output_dir)
        return commands.format_command(commands.render(self.config(folder), rendering))

    def resume_command(self, folder: str, output_dir: str | None = None) -> str:
        """The same run going on from its newest checkpoint (``m3lab.command.resume_command``)."""
        from m3lab import command as commands

        rendering = commands.Rendering(output_dir=output_dir or self.platform.output_dir)
        return commands.resume_command(self.config(folder), rendering, self.platform.previous_output_dirs)

    def instructions(self, folder: str, output_dir: str | None = None) -> str:
        """Where the files go, the command and its resume command, as the answer's card gives them."""
        from m3lab.plan.recipes import RESUME_NOTE

        lines = [f"# Before you run it: {self.platform.storage}."] if self.platform.storage else []
        lines += ["# Run it from this folder (the files' folder is as it sees it):", self.command(folder, output_dir), "",
                  RESUME_NOTE, self.resume_command(folder, output_dir)]
        return "\n".join(lines)

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


def _live_room(report, margin: int) -> int:
    """What a quick trace's live tensors leave of the card, the CUDA context and the margin taken."""
    return report.usable_bytes - margin - report.context_bytes - report.peak_allocated_bytes


def _largest_group(longest: TrainConfig, most: int, gpu, margin: int) -> int | None:
    """The largest train_group_size (at most ``most``, at least 2) with which the longest bucket
    holds one query at a time (one run takes one group); None if even group 2 does not. ``most`` and
    2 are traced first, side by side; then the groups between, largest first, two at a time."""
    from m3lab.predict import predict_many

    def fitting(groups: list[int]) -> list[bool]:
        reports = predict_many([longest.replace(per_device_train_batch_size=1, train_group_size=g) for g in groups],
                               gpu)
        return [report.fits_with(margin) for report in reports]

    ends = sorted({most, 2}, reverse=True)
    held = dict(zip(ends, fitting(ends)))
    if held[most] or not held[2]:
        return most if held[most] else None
    between = list(range(most - 1, 2, -1))
    for start in range(0, len(between), 2):
        tried = between[start:start + 2]
        for group, fits in zip(tried, fitting(tried)):
            if fits:
                return group
    return 2


def _quick_largest(bucket: Bucket, at, cap: int, gpu, margin: int, first_cap: bool = False) -> tuple[int, int]:
    """The largest batch (0 if none) whose live tensors, from quick traces of shallow copies, leave
    the margin and the CUDA context; and the bytes a line adds there. The cap first where ``first_cap``
    (with the gradient cache, which usually holds it); else bisection: the peak is the
    larger of a fixed cost (the embeddings' backward) and one that grows with the batch, so no line
    through two small batches finds it."""
    from m3lab.predict import predict

    peaks: dict[int, int] = {}

    def holds(batch: int) -> bool:
        report = predict(at(bucket, batch), gpu, exact=False)
        peaks[batch] = report.peak_allocated_bytes
        return _live_room(report, margin) >= 0

    low, high = 0, cap + 1
    if first_cap and holds(cap):  # the usual case with the gradient cache, whose memory hardly grows with the batch
        low = cap
        if cap > 1:
            holds(1)  # a second point: the bytes a line adds, should the full trace refuse the cap
    elif holds(1):
        low = 1
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if holds(middle) else (low, middle)
    else:
        high = 1
    per_line = ((peaks[high] - peaks[low]) // (high - low) if high in peaks and low in peaks
                else peaks[low] // max(low, 1) if low else peaks[1])
    return low, max(per_line, 1)


def _largest_batches(buckets: list[Bucket], base: TrainConfig, gpu, margin: int, max_batch: int, log) -> None:
    """Each bucket's largest batch: found on quick traces, then confirmed by full-depth traces (the
    allocator's gaps counted), every bucket's candidate traced side by side; a candidate the full
    trace refuses steps down by what it lacks, a line's worth at a time."""
    from m3lab.predict import predict_many

    def at(bucket: Bucket, batch: int) -> TrainConfig:
        return base.replace(passage_max_len=bucket.bound, per_device_train_batch_size=batch)

    todo, per_line = {}, {}
    for index, bucket in enumerate(buckets):
        cap = max(1, min(max_batch, bucket.lines // base.num_processes))
        if base.uses_grad_cache:  # memory no longer sets the batch: the step's tokens do
            cap = max(1, min(cap, STEP_TOKENS // (base.train_group_size * bucket.bound)))
        found, per_line[index] = _quick_largest(bucket, at, cap, gpu, margin, first_cap=base.uses_grad_cache)
        if found:
            todo[index] = found
    for _ in range(SEARCH_ROUNDS):
        if not todo:
            break
        reports = predict_many([at(buckets[i], batch) for i, batch in todo.items()], gpu)
        following = {}
        for (index, batch), report in zip(todo.items(), reports):
            if report.fits_with(margin):
                buckets[index].batch, buckets[index].report = batch, report
            elif batch > 1:
                lacking = margin - report.spare_bytes
                following[index] = max(1, batch - max(1, -(-lacking // per_line[index])))
        todo = following
    log("  largest batches: " + ", ".join(f"{b.bound} tokens {b.batch}" for b in buckets))


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
        if report.fits_with(margin):
            low, found = middle, (middle, report)
        else:
            high = middle
    return found


def plan(data, platform: str = "colab-t4", stock: bool = False, group: int | None = None, epochs: float = 2,
         tokenizer=None, margin_gib: float = CLOSE_CALL_BYTES / GIB, max_batch: int = MAX_BATCH,
         chunk_tokens: int | None = None, lora: bool = False, log=print) -> BucketPlan:
    """Per-length batches for ``data`` on ``platform``: see the module's docstring. ``group``: the
    train_group_size of every batch (default: the data's fewest negatives plus one, at most 8, as
    BGE-M3's authors fine-tuned); ``max_batch``: the largest batch a process may take;
    ``chunk_tokens``: the gradient cache's tokens a chunk (default ``CHUNK_TOKENS`` with the levers,
    none for ``stock``; 0: no cache); ``lora``: an adapter on the encoder instead of its weights
    (``m3lab.plan.fit.LORA``: fused AdamW, no DeepSpeed)."""
    from m3lab.data.jsonl import length_covering_tokens, load_jsonl, token_lengths
    from m3lab.plan.fit import LORA, base_config

    if chunk_tokens is None:
        chunk_tokens = 0 if stock else CHUNK_TOKENS
    if stock and (chunk_tokens or lora):
        lacks = [what for what, given in (("LoRA for M3", lora), ("gradient cache", chunk_tokens)) if given]
        flags = [flag for flag, given in (("--lora", lora), ("--grad-cache-chunk-tokens", chunk_tokens)) if given]
        raise ConfigError([f"FlagEmbedding as it is (--stock) has no {' and no '.join(lacks)}: leave out "
                           f"{' and '.join(flags)}, or --stock."])
    if chunk_tokens < 0:
        raise ConfigError([f"--grad-cache-chunk-tokens is {chunk_tokens}; give the tokens a chunk (e.g. "
                           f"{CHUNK_TOKENS}), or 0 for no gradient cache."])
    where = platform_for(platform)
    data = [str(data)] if isinstance(data, (str, os.PathLike)) else [str(d) for d in data]
    records = load_jsonl(data)
    if tokenizer is None:
        from m3lab.standin import load_tokenizer

        tokenizer, name = load_tokenizer()
    else:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    # one read of the data, each text tokenized once (queries kept whole: the longest, rounded as fit rounds it)
    texts = sorted({t for r in records for t in r["pos"] + r.get("neg", [])})
    lengths = dict(zip(texts, token_lengths(texts, tokenizer).tolist()))
    queries = sorted({r["query"] for r in records})
    query_lengths = dict(zip(queries, token_lengths(queries, tokenizer).tolist()))
    longest_query = min(length_covering_tokens(list(query_lengths.values()), 1.0), MODEL_MAX_LEN)
    group = group or max(2, min(8, min(len(r.get("neg", [])) for r in records) + 1))
    # 8-bit AdamW (LoRA: fused AdamW), no DeepSpeed (FlagEmbedding's same-dataset path sets the
    # micro-batch itself, which a DeepSpeed JSON fixes); with the levers, m3lab's sparse head and the
    # gradient cache by tokens (a chunk's texts follow each batch's length, so one run serves every bucket)
    memory = {**dict(deepspeed_stage=None, optim="adamw_bnb_8bit"), **(LORA if lora else {})}
    base = base_config(data, where, longest_query, MODEL_MAX_LEN, stock).replace(
        train_group_size=group, num_train_epochs=epochs, grad_cache_chunk_tokens=chunk_tokens, **memory)
    buckets = split(records, lengths, min_lines=2 * where.gpu.count)
    margin = int(margin_gib * GIB)
    held_group = _largest_group(base.replace(passage_max_len=buckets[-1].bound), group, where.gpu, margin)
    # where no group holds the longest bucket, group 2: the most text the card holds, the rest cut
    base = base.replace(train_group_size=held_group or 2)
    result = BucketPlan(where, stock, base, name, buckets, lengths=lengths, query_lengths=query_lengths)
    log(f"{where.describe()}: {len(records)} lines in {len(buckets)} buckets "
        f"({', '.join(f'{b.bound}: {b.lines}' for b in buckets)}); group {base.train_group_size}; queries whole "
        f"({longest_query} tokens); tokens counted with {name}"
        + ("" if held_group == group else f"; the longest bucket holds group {held_group}, not {group}"
           if held_group else "; not even group 2 holds the longest bucket one query at a time, so group 2 and "
                              "the longest passages cut"))
    _largest_batches(result.buckets, base, where.gpu, margin, max_batch, log)
    held = [b for b in result.buckets if b.batch]
    if len(held) < len(result.buckets):
        _cut(result, base, where.gpu, margin, lengths)
    if not result.buckets:
        raise ConfigError([f"{where.describe()} holds none of this data's passages, even {LENGTH_STEP} tokens at "
                           f"group {base.train_group_size} and one query at a time, with {margin_gib:g} GiB to spare "
                           "(predicted); use a bigger card, or a smaller --margin-gib."])
    _carry_up(result.buckets, lengths, base.num_processes)
    for bucket in result.buckets:
        bucket.passage_tokens = _passage_tokens(bucket.records, lengths, result.cut or MODEL_MAX_LEN)
    return result


def _carry_up(buckets: list[Bucket], lengths: dict[str, int], processes: int) -> None:
    """Each bucket's lines beyond its last whole batch (which FlagEmbedding would drop) go up into the
    next bucket, its longest lines first: they pad further there but are trained. Only the longest
    bucket's remainder is left out. Batches were found for at least the lines a bucket had; more lines
    only raise that cap."""
    held = [b for b in buckets if b.batch]
    for lower, upper in zip(held, held[1:]):
        extra = lower.lines % (lower.batch * processes)
        if extra:
            longest = set(sorted(range(lower.lines), key=lambda i: _line_length(lower.records[i], lengths))[-extra:])
            upper.records = [r for i, r in enumerate(lower.records) if i in longest] + upper.records
            lower.records = [r for i, r in enumerate(lower.records) if i not in longest]


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


@dataclass(frozen=True)
class EpochCost:
    """One way to train an epoch on the data: how much of the passages' text it sees, and how long
    it takes (estimated, a range; None where the card cannot run it)."""

    name: str
    passage_max_len: int
    tokens_kept: float  # of the passages' tokens (each passage counted once), the share trained on
    steps: int
    seconds: tuple[float, float] | None
    verdict: str  # the predictor's, for the run's largest step


def _total_seconds(times: list[tuple[int, object]]) -> tuple[float, float] | None:
    """(steps, StepTime) pairs summed: the fastest and the slowest total (None if any has no estimate)."""
    if any(time is None for _, time in times):
        return None
    return (sum(steps * t.fastest_seconds for steps, t in times), sum(steps * t.slowest_seconds for steps, t in times))


def kept(lengths: dict[str, int], cut: int) -> float:
    """The share of the passages' tokens (each passage once) that ``cut`` keeps."""
    return sum(min(n, cut) for n in lengths.values()) / max(1, sum(lengths.values()))


def epoch_costs(result: BucketPlan) -> list[EpochCost]:
    """The bucketed epoch beside the common T4 advice's truncating recipe (64/392 tokens,
    group 6, ZeRO-1, batch 1) and one fixed batch at full length (the batch the longest bucket holds,
    for every line). Figures predicted for the platform's card; every time estimated on one basis, the
    lengths its batches pad to: a bucket's own lines, or all of them for the two runs that mix them."""
    from m3lab.predict import predict, steptime

    processes, lines = result.processes, sum(b.lines for b in result.buckets)
    held = [b for b in result.buckets if b.batch]
    every_line = result.line_lengths([r for b in result.buckets for r in b.records])

    def seconds(parts: list[tuple[int, object, tuple]]) -> tuple[float, float] | None:
        return _total_seconds([(steps, steptime.step_time(report, lines=padded_to)) for steps, report, padded_to in parts])

    cut = result.cut or MODEL_MAX_LEN
    # the passages' tokens an epoch trains: cut at ``cut``, times the share of the lines it trains
    trained = sum(b.steps(processes) * b.batch * processes for b in held) / max(1, lines)
    bucketed = EpochCost("per-length batches", cut, kept(result.lengths, cut) * trained, result.epoch_steps(),
                         result.epoch_seconds(),
                         max((b.report for b in held), key=lambda r: r.total_bytes).short_verdict)
    advice = TrainConfig.common_t4_advice(train_data=result.base.train_data, num_processes=processes,
                                          negatives_cross_device=processes > 1)
    advice_report = predict(advice, result.platform.gpu)
    advice_steps = lines // processes
    truncating = EpochCost("the common T4 advice (64/392 tokens, group 6, ZeRO-1)", advice.passage_max_len,
                           kept(result.lengths, advice.passage_max_len), advice_steps,
                           seconds([(advice_steps, advice_report, every_line)]) if advice_report.fits else None,
                           advice_report.short_verdict)
    fixed_batch = held[-1].batch if held else 0
    fixed = EpochCost(f"one batch ({fixed_batch} a process) at " + ("full length" if cut == MODEL_MAX_LEN else
                                                                   f"{cut:,} tokens"), cut, kept(result.lengths, cut),
                      lines // max(1, fixed_batch * processes),
                      seconds([(lines // max(1, fixed_batch * processes), held[-1].report, every_line)])
                      if fixed_batch else None, held[-1].report.short_verdict if held else "nothing holds")
    return [truncating, fixed, bucketed]


def answer_cost(name: str, answer, lengths: dict[str, int]) -> EpochCost:
    """A fitted answer's epoch (``m3lab.plan.recipes.Answer``) on the same footing as the buckets':
    the share of the passages' tokens it keeps, its steps and its estimated time."""
    config, plan = answer.config, answer.plan
    seconds = plan.time.seconds_for(plan.steps_per_epoch) if plan.time else None
    return EpochCost(name, config.passage_max_len, kept(lengths, config.passage_max_len), plan.steps_per_epoch,
                     seconds, answer.report.short_verdict)


def cost_table(costs: list[EpochCost]) -> str:
    """The epoch's costs, one line each."""
    header = f"{'':55} {'passages to':>11} {'tokens kept':>11} {'steps':>6}  estimated epoch"
    rows = [header, "-" * len(header)]
    for cost in costs:
        low, high = (round(s / 60) for s in cost.seconds) if cost.seconds else (0, 0)
        time = (f"cannot run: {cost.verdict}" if not cost.seconds else f"about {low} min" if low == high
                else f"{low} to {high} min")
        rows.append(f"{cost.name:55} {cost.passage_max_len:>11,} {cost.tokens_kept:>10.0%} {cost.steps:>6}  {time}")
    return "\n".join(rows)


def before_after(before: BucketPlan, after: BucketPlan) -> str:
    """Two plans for the same data side by side, bucket by bucket: batch and tokens a second (estimated),
    then the group, the steps and the time of an epoch."""

    def rate(plan: BucketPlan, bound: int) -> str:
        bucket = next((b for b in plan.buckets if b.bound == bound and b.batch), None)
        found = plan.tokens_a_second(bucket) if bucket else None
        return f"{found[0]:,.0f} to {found[1]:,.0f}" if found else "-"

    def batch(plan: BucketPlan, bound: int) -> str:
        return str(next((b.batch for b in plan.buckets if b.bound == bound and b.batch), "-"))

    def minutes(plan: BucketPlan) -> str:
        seconds = plan.epoch_seconds()
        return "no estimate" if seconds is None else f"{seconds[0] / 60:.0f} to {seconds[1] / 60:.0f} min"

    bounds = sorted({b.bound for b in before.buckets} | {b.bound for b in after.buckets})
    lows = {b.bound: b.low for b in before.buckets + after.buckets}
    header = f"{'bucket (tokens)':>16} {'batch':>14}   tokens/s, estimated"
    rows = [header, "-" * (len(header) + 12)]
    for bound in bounds:
        rows.append(f"{lows[bound] + 1:>7}-{bound:<8} {batch(before, bound):>6} -> {batch(after, bound):<5}  "
                    f"{rate(before, bound)} -> {rate(after, bound)}")
    rows += [f"group: {before.base.train_group_size} -> {after.base.train_group_size}; steps an epoch: "
             f"{before.epoch_steps()} -> {after.epoch_steps()}; an epoch: {minutes(before)} -> {minutes(after)} "
             "(estimated)",
             f"batches per process; tokens a second: the text trained, padding not counted; "
             f"{after.buckets[0].report.provenance}"]
    return "\n".join(rows)

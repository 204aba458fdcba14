"""What per-length batches buy, measured: the stand-in's real epoch over the bucket files against one
fixed batch at full length, the same lines, on this machine.

``python -m m3lab.evidence.bench_buckets [DATA] [--out FILE]`` plans free Colab's per-length batches for DATA (default: the
series' sample), keeps the buckets up to ``LONGEST`` tokens (beyond, the stand-in's steps on a CPU
take over half a minute each: the 2,048-token bucket alone runs about 20 minutes), and trains the tiny stand-in on them twice with FlagEmbedding's trainer: through the
same-dataset path at the planned batches, and with one batch for every line (the batch the longest
bucket holds: what a fixed-batch run at full length must use). It prints lines and processed tokens
(passages x their padded length) per second of training steps, and their ratio. The absolute
figures are a CPU's and a toy model's; the ratio is what batching the short texts together buys
where a step's fixed costs matter.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

from m3lab.config import DEFAULT_TRAIN_DATA
from m3lab.io import write_json_atomic
from m3lab.plan import buckets
from m3lab.standin import standin_path
from m3lab.train.launch import train

LONGEST = 1024
RESULT = Path(__file__).resolve().parents[2] / "data" / "benchmarks" / "bench-buckets-cpu.json"  # the committed run


@dataclass(frozen=True)
class Throughput:
    """One measured epoch: lines and processed tokens (passages x their padded length) a second of steps."""

    name: str
    steps: int
    seconds: float
    lines_per_second: float
    tokens_per_second: float


@dataclass(frozen=True)
class BucketBench:
    """Per-length batches against one fixed batch, measured on a CPU with the stand-in."""

    date: str
    machine: str
    data: str
    longest: int
    lines: int
    bucketed: Throughput
    fixed: Throughput

    def describe(self) -> list[str]:
        lines = [f"measured on {self.machine}, the tiny stand-in, {self.date}: {self.lines} lines of {self.data} up to "
                 f"{self.longest:,} tokens, one epoch"]
        for run in (self.bucketed, self.fixed):
            lines.append(f"  {run.name:34} {run.lines_per_second:6.2f} lines/s {run.tokens_per_second:8.0f} tokens/s "
                         f"({run.steps} steps, {run.seconds:.0f} s of steps)")
        lines.append(f"  per-length batches over one batch: {self.bucketed.lines_per_second / self.fixed.lines_per_second:.2f}x "
                     f"lines/s, {self.bucketed.tokens_per_second / self.fixed.tokens_per_second:.2f}x tokens/s")
        return lines


def _throughput(name: str, result) -> Throughput:
    seconds = sum(step.step_time_s for step in result.steps)
    lines = sum(step.queries for step in result.steps)
    tokens = sum(step.passages * step.passage_tokens for step in result.steps)
    return Throughput(name, len(result.steps), seconds, lines / seconds, tokens / seconds)


def measure(data: str = DEFAULT_TRAIN_DATA) -> BucketBench:
    """Plan free Colab's buckets for ``data``, keep those up to LONGEST tokens, train both ways."""
    plan = buckets.plan(data, "colab-t4", chunk_tokens=0)  # as measured: the plan without the gradient cache
    fixed_batch = plan.buckets[-1].batch or 1  # what the longest bucket holds
    plan.buckets = [b for b in plan.buckets if b.bound <= LONGEST and b.batch]
    print(plan.table())
    with tempfile.TemporaryDirectory() as scratch:
        folder, single = Path(scratch) / "buckets", Path(scratch) / "one-file.jsonl"
        plan.write(folder)
        single.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for b in plan.buckets for r in b.records))
        cpu = dict(model=str(standin_path()), fp16=False, optim="adamw_torch", num_train_epochs=1, save_steps=None,
                   save_total_limit=None)
        bucketed = plan.config(str(folder)).replace(**cpu)
        fixed = bucketed.replace(train_data=[str(single)], same_dataset_within_batch=False,
                                 per_device_train_batch_size=fixed_batch)
        runs = Path(scratch) / "runs"
        measured = (_throughput("per-length batches", train(bucketed, runs_root=runs)),
                    _throughput(f"one batch of {fixed_batch} for every line", train(fixed, runs_root=runs)))
    import torch

    machine = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})"
    return BucketBench(datetime.date.today().isoformat(), machine, Path(data).name, LONGEST,
                       sum(b.lines for b in plan.buckets), *measured)


def load(path: str | Path = RESULT) -> BucketBench:
    """A committed result."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return BucketBench(**{**raw, "bucketed": Throughput(**raw["bucketed"]), "fixed": Throughput(**raw["fixed"])})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m3lab.evidence.bench_buckets", description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", default=DEFAULT_TRAIN_DATA)
    parser.add_argument("--out", help="write the result here as JSON (the committed one: data/benchmarks/)")
    args = parser.parse_args(argv)
    result = measure(args.data)
    print("\n".join(result.describe()))
    if args.out:
        write_json_atomic(args.out, dataclasses.asdict(result))


if __name__ == "__main__":
    main()

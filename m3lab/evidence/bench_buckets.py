"""What per-length batches buy, measured: the stand-in's real epoch over the bucket files against one
fixed batch at full length, the same lines, on this machine.

``python -m m3lab.evidence.bench_buckets [DATA]`` plans free Colab's per-length batches for DATA (default: the
series' sample), keeps the buckets up to ``LONGEST`` tokens (the stand-in on a CPU takes minutes
beyond), and trains the tiny stand-in on them twice with FlagEmbedding's trainer: through the
same-dataset path at the planned batches, and with one batch for every line (the batch the longest
bucket holds: what a fixed-batch run at full length must use). It prints lines and processed tokens
(passages x their padded length) per second of training steps, and their ratio. The absolute
figures are a CPU's and a toy model's; the ratio is what batching the short texts together buys
where a step's fixed costs matter.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from m3lab.config import DEFAULT_TRAIN_DATA
from m3lab.plan import buckets
from m3lab.standin import standin_path
from m3lab.train.launch import train

LONGEST = 2048


def _throughput(result) -> tuple[float, float, float]:
    """(lines a second, processed tokens a second, seconds of steps) of a run."""
    seconds = sum(step.step_time_s for step in result.steps)
    lines = sum(step.queries for step in result.steps)
    tokens = sum(step.passages * step.passage_tokens for step in result.steps)
    return lines / seconds, tokens / seconds, seconds


def main(data: str = DEFAULT_TRAIN_DATA) -> None:
    plan = buckets.plan(data, "colab-t4")
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
        results = {"per-length batches": train(bucketed, runs_root=Path(scratch) / "runs"),
                   f"one batch of {fixed_batch} at full length": train(fixed, runs_root=Path(scratch) / "runs")}
    print(f"measured on this machine's CPU, the tiny stand-in, {sum(b.lines for b in plan.buckets)} lines of "
          f"{data} up to {LONGEST} tokens, one epoch:")
    figures = {name: _throughput(result) for name, result in results.items()}
    for name, (lines, tokens, seconds) in figures.items():
        print(f"  {name:32} {lines:7.2f} lines/s {tokens:10.0f} tokens/s ({seconds:.0f} s of steps)")
    (bucket_lines, bucket_tokens, _), (fixed_lines, fixed_tokens, _) = figures.values()
    print(f"  ratio, per-length batches over one batch: {bucket_lines / fixed_lines:.2f}x lines/s, "
          f"{bucket_tokens / fixed_tokens:.2f}x tokens/s")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""What a training run reports, in one vocabulary: the events the training child writes, each
step's record, and how the run ended. The child writes them (``meter``), ``launch`` reads them back,
and the GPU check's files (``m3lab.evidence.measurements``) hold the same records."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Event(StrEnum):
    """One line of a rank's metrics file (``metrics-rank<N>.jsonl``)."""

    START = "start"  # the device and the model's size
    STEP = "step"  # a StepRecord
    END = "end"
    OOM = "oom"  # the step that ran out of memory, and PyTorch's message


class Outcome(StrEnum):
    """How a run ended."""

    RAN = "ok"
    OUT_OF_MEMORY = "oom"
    FAILED = "failed"
    SKIPPED = "skipped"  # the GPU check's time budget was spent before it started


@dataclass
class StepRecord:
    """One optimizer step of one rank, as measured in the training child."""

    step: int
    loss: float | None
    step_time_s: float
    peak_allocated_bytes: int
    peak_reserved_bytes: int | None  # None on a CPU
    allocated_after_step_bytes: int
    optimizer_state_bytes: int
    fp32_master_bytes: int
    memory_source: str
    # CUDA only, after the step: the allocator's reserved bytes, and the whole card's used bytes
    # (cudaMemGetInfo: every process's, plus the CUDA context and workspaces outside the allocator)
    reserved_after_step_bytes: int | None = None
    device_used_bytes: int | None = None
    # fp16 loss scaling skips the update of a step whose gradients overflowed (None: not known)
    optimizer_step_skipped: bool | None = None
    # the step's batch as the model received it (this rank's): queries, and passages x their padded tokens
    queries: int | None = None
    passages: int | None = None
    passage_tokens: int | None = None
    # where the run stands after the step (HF's epoch: steps / steps per epoch), and the sum of the model's
    # last trainable tensor: equal on every rank of a data-parallel run
    epoch: float | None = None
    weights_sum: float | None = None


__all__ = ["Event", "Outcome", "StepRecord"]

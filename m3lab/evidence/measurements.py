"""The measurement files ``python -m m3lab.evidence.gpu_check`` writes, read back as typed records, and each
measured step set beside the predictor's figure for it (``compare``).

A file holds one machine's runs: for each, its configuration, whether it ran, ran out of memory or
failed, and per rank and step the peaks of ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` (on a CPU, live tensor bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from m3lab.config import TrainConfig
from m3lab.gpus import GIB
from m3lab.train.record import Outcome, StepRecord

FORMAT = 1
TOLERANCE = {"cuda": 0.05, "cpu": 0.02}  # a GPU's max_memory_allocated; a CPU's live tensor bytes


@dataclass(frozen=True)
class MeasuredRank:
    rank: int
    device: str
    steps: tuple[StepRecord, ...]


@dataclass(frozen=True)
class RunRecord:
    """One run of a check as the file holds it."""

    name: str
    outcome: Outcome
    config: TrainConfig  # train_data is not the file the run read (the check writes its own)
    memory_limit_bytes: int | None  # the allocator's cap (a T4's budget), None: the whole card
    alone: bool  # nothing else ran on the card beside it
    oom_message: str | None
    ranks: tuple[MeasuredRank, ...]
    reason: str | None = None  # why it failed or was skipped


@dataclass(frozen=True)
class Provenance:
    """Where a file's figures were measured: a headline for labels, and its details."""

    headline: str  # "measured on NVIDIA H200 imitating a T4's kernels"
    details: str | None = None  # "memory-efficient SDPA, T4 cuBLAS workspace"

    def __str__(self) -> str:
        return f"{self.headline} ({self.details})" if self.details else self.headline

    @classmethod
    def of_device(cls, device: str | None, imitating_t4: bool) -> Provenance:
        """What the GPU check writes: a CUDA device (imitating a T4's kernels or not), or the CPU."""
        if device is None:
            return cls("measured on CPU", "live tensor bytes")
        if imitating_t4:
            return cls(f"measured on {device} imitating a T4's kernels", "memory-efficient SDPA, T4 cuBLAS workspace")
        return cls(f"measured on {device}")

    @classmethod
    def parse(cls, text: str) -> Provenance:
        """A file's provenance text read back (``str`` of a Provenance)."""
        headline, _, details = text.partition(" (")
        return cls(headline, details.removesuffix(")") or None)


@dataclass(frozen=True)
class MeasurementFile:
    path: Path
    device: str
    torch: str
    date: str
    provenance: Provenance
    predict_with_gpu: str | None  # the GPU profile the runs are predicted with; None: a CPU file
    device_total_bytes: int | None
    runs: tuple[RunRecord, ...]


def _step(step: dict) -> StepRecord:
    return StepRecord(**step)


def parse_run(record: dict) -> RunRecord:
    """A run as the check writes it (a JSON object), typed."""
    ranks = tuple(MeasuredRank(r["rank"], r.get("device", ""), tuple(_step(s) for s in r["steps"]))
                  for r in record.get("ranks", []))
    return RunRecord(record["name"], Outcome(record["status"]),
                     TrainConfig(**{**record["config"], "train_data": ["unused.jsonl"]}),
                     record.get("memory_limit_bytes"), bool(record.get("alone")), record.get("oom_message"), ranks,
                     record.get("reason"))


def load(path: Path) -> MeasurementFile:
    """A measurement file, checked: a clear error names the file and what is wrong with it."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}); regenerate it with "
                         "`python -m m3lab.evidence.gpu_check`.") from error
    missing = [k for k in ("format", "device", "torch", "date", "provenance", "runs") if k not in report]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; not a file written by m3lab.evidence.gpu_check.")
    if report["format"] != FORMAT:
        raise ValueError(f"{path}: format {report['format']}, this m3lab reads format {FORMAT}.")
    return MeasurementFile(path, report["device"], report["torch"], report["date"], Provenance.parse(report["provenance"]),
                           report.get("predict_with_gpu"), report.get("device_total_bytes"),
                           tuple(parse_run(record) for record in report["runs"]))


def skipped(step: StepRecord, steps: tuple[StepRecord, ...]) -> bool:
    """Whether fp16 loss scaling skipped this step's update; where the trainer did not say, a step
    with no optimizer states yet, in a run that has some later, counts as skipped."""
    if step.optimizer_step_skipped is not None:
        return step.optimizer_step_skipped
    return step.optimizer_state_bytes == 0 and any(s.optimizer_state_bytes for s in steps)


def step_pairs(steps: tuple[StepRecord, ...]) -> list[tuple[str, StepRecord]]:
    """The measured (first, steady) steps: the first that updated the weights and the next that did.
    A skipped update has no optimizer-step peak (and, before any update, no optimizer states), so
    it stands for neither."""
    return list(zip(("first", "steady"), [step for step in steps if not skipped(step, steps)]))


def outside_allocator_bytes(run: RunRecord) -> int | None:
    """The card's used memory minus the run's reserved memory, after its last step: the CUDA context
    and library workspaces outside the allocator (an upper bound: the check's own process may hold
    a CUDA context too). Only for a run alone on the card, where no other run's memory counts."""
    if not run.alone or run.outcome is not Outcome.RAN:
        return None
    last = run.ranks[0].steps[-1]
    if last.device_used_bytes is None or last.reserved_after_step_bytes is None:
        return None
    return last.device_used_bytes - last.reserved_after_step_bytes


@dataclass
class Comparison:
    run: str
    rank: int
    step: str  # "first" (the first step with an optimizer update) or "steady" (the one after)
    measured_step: int
    measured_bytes: int
    predicted_bytes: int
    tolerance: float
    measured_on: str  # the measurement file's provenance
    predicted_for: str  # the prediction's provenance

    @property
    def error(self) -> float:
        return self.predicted_bytes / self.measured_bytes - 1

    @property
    def within_tolerance(self) -> bool:
        return abs(self.error) <= self.tolerance

    def describe(self) -> str:
        return (f"{self.run} (rank {self.rank}, {self.step} step = step {self.measured_step}): "
                f"{self.measured_bytes / GIB:.3f} GiB {self.measured_on}, {self.predicted_bytes / GIB:.3f} GiB "
                f"{self.predicted_for} ({self.error:+.1%}, tolerance {self.tolerance:.0%})")

    def to_dict(self) -> dict:
        return {**self.__dict__, "error": round(self.error, 5)}


def compare(file: MeasurementFile, runs: list[RunRecord] | None = None) -> list[Comparison]:
    """Each measured step of each finished run beside the predictor's figure for it."""
    from m3lab.predict import bge_m3_config, predict
    from m3lab.standin import STANDIN

    gpu = file.predict_with_gpu
    tolerance = TOLERANCE["cuda" if gpu else "cpu"]
    rows = []
    for run in runs if runs is not None else file.runs:
        if run.outcome is not Outcome.RAN:
            continue
        # the stand-in's geometry is built in; every other model measured here has BGE-M3's shapes
        model_config = None if run.config.model == STANDIN else bge_m3_config()
        prediction = predict(run.config, gpu, model_config=model_config, exact=gpu is None)
        for rank in run.ranks:
            predicted = prediction.per_rank[rank.rank]
            for label, step in step_pairs(rank.steps):
                figure = predicted.first_step if label == "first" else predicted.steady_step
                rows.append(Comparison(run.name, rank.rank, label, step.step, step.peak_allocated_bytes,
                                       figure.peak_allocated_bytes, tolerance, str(file.provenance), prediction.provenance))
    return rows

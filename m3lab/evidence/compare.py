"""The GPU measurements beside the predictions: what the tests hold and the lessons show of them.

``measured_runs()`` reads the files under data/measurements/ (written by ``m3lab.evidence.gpu_check`` on a
GPU); ``against_prediction(run)`` predicts a run as the card ran it (under the same limit, the
first update skipped where fp16 loss scaling skipped it) and pairs the figures;
``measured_peaks(config)`` finds the measurements of a configuration a lesson predicts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from m3lab.config import TrainConfig
from m3lab.data.jsonl import REPO_ROOT
from m3lab.evidence import measurements
from m3lab.gpus import GIB, gpu_profile
from m3lab.train.record import Outcome, StepRecord

MEASUREMENTS = REPO_ROOT / "data" / "measurements"


@dataclass(frozen=True)
class MeasuredRun:
    """One GPU run, reduced to what is compared with the prediction."""

    name: str
    source: str  # the file's name, without .json
    provenance: measurements.Provenance
    device: str
    config: TrainConfig
    limit_bytes: int | None  # the allocator's cap (a T4's budget), None: the whole card
    device_total_bytes: int
    ran: bool  # False: out of memory
    oom_requested_bytes: int | None  # "Tried to allocate" of PyTorch's message
    oom_allocated_bytes: int | None  # "allocated by PyTorch"
    oom_unallocated_bytes: int | None  # "reserved by PyTorch but unallocated"
    first_update_skipped: bool  # DeepSpeed's fp16 loss scaling skipped the first step's update
    peak_allocated_bytes: int | None  # max_memory_allocated over the compared steps
    peak_reserved_bytes: int | None  # max_memory_reserved over the compared steps

    @property
    def label(self) -> str:
        return self.name.replace(", T4 budget", "") + (" (T4's limit)" if self.limit_bytes else "")


def _size(text: str) -> int:
    """PyTorch's format_size back to bytes ("3.82 GiB", "51.83 MiB")."""
    value, unit = text.split()
    return int(float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit])


def _compared_steps(run: measurements.RunRecord) -> tuple[list[StepRecord], bool]:
    """The two measured steps a prediction's two steps stand for, and whether the first skipped its
    update. DeepSpeed's skipped first step is simulated (the allocator's cache depends on it);
    HF AMP's GradScaler, which skips its first few, is not: its first two updated steps are compared."""
    steps = run.ranks[0].steps if run.ranks else ()
    if not steps:
        return [], False
    skipped = [measurements.skipped(s, steps) for s in steps]
    if run.config.deepspeed_stage is not None and skipped[0] and not any(skipped[1:2]):
        return list(steps[:2]), True
    return [s for s, skip in zip(steps, skipped) if not skip][:2], False


def _run(run: measurements.RunRecord, file: measurements.MeasurementFile) -> MeasuredRun:
    steps, first_skipped = _compared_steps(run)
    oom = re.search(r"Tried to allocate ([\d.]+ \w+)\..*?Of the allocated memory ([\d.]+ \w+) is allocated by "
                    r"PyTorch, and ([\d.]+ \w+) is reserved", run.oom_message or "")
    return MeasuredRun(
        name=run.name, source=file.path.stem, provenance=file.provenance, device=file.device, config=run.config,
        limit_bytes=run.memory_limit_bytes, device_total_bytes=file.device_total_bytes,
        ran=run.outcome is Outcome.RAN, oom_requested_bytes=_size(oom.group(1)) if oom else None,
        oom_allocated_bytes=_size(oom.group(2)) if oom else None,
        oom_unallocated_bytes=_size(oom.group(3)) if oom else None, first_update_skipped=first_skipped,
        peak_allocated_bytes=max((s.peak_allocated_bytes for s in steps), default=None),
        peak_reserved_bytes=max((s.peak_reserved_bytes for s in steps if s.peak_reserved_bytes is not None),
                                default=None))


@functools.cache
def measured_runs(folder: Path = MEASUREMENTS) -> tuple[MeasuredRun, ...]:
    """Every GPU run that ran or ran out of memory, from every file in ``folder`` (CPU files are
    compared by ``m3lab.evidence.measurements.compare`` and are not GPU evidence)."""
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        file = measurements.load(path)
        if file.predict_with_gpu is None:
            continue
        found += [_run(run, file) for run in file.runs
                  if run.outcome in (Outcome.RAN, Outcome.OUT_OF_MEMORY)]
    return tuple(found)


@dataclass(frozen=True)
class Evidence:
    """A measured run beside its prediction (``report``: a ``MemoryReport``)."""

    run: MeasuredRun
    report: object

    @property
    def outcome_matches(self) -> bool:
        return self.run.ran == self.report.fits

    @property
    def peak_error(self) -> float | None:
        if self.run.peak_allocated_bytes is None:
            return None
        return self.report.peak_allocated_bytes / self.run.peak_allocated_bytes - 1

    @property
    def reserved_error(self) -> float | None:
        if self.run.peak_reserved_bytes is None:
            return None
        return self.report.predicted_reserved_bytes / self.run.peak_reserved_bytes - 1

    def describe(self) -> str:
        run, report = self.run, self.report
        measured = "ran" if run.ran else "out of memory"
        text = f"{run.label}: {measured}; predicted {report.short_verdict}"
        if run.peak_allocated_bytes:
            text += (f"; peak {run.peak_allocated_bytes / GIB:.2f} measured, {report.peak_allocated_bytes / GIB:.2f}"
                     f" predicted; reserved {run.peak_reserved_bytes / GIB:.2f} measured, "
                     f"{report.predicted_reserved_bytes / GIB:.2f} predicted")
        return text


def card_of(run: MeasuredRun):
    """The T4 profile with the memory the run had: its cap plus the T4's context estimate (the
    prediction's limit is then the run's), or the whole card it ran on."""
    t4 = gpu_profile("t4")
    usable = run.limit_bytes + t4.context_bytes if run.limit_bytes else run.device_total_bytes
    return dataclasses.replace(t4, usable_bytes=usable)


def against_prediction(run: MeasuredRun) -> Evidence:
    """The run predicted as it was measured: T4 kernels, the card's or cap's memory, and the first
    update skipped where the measurement skipped it (each run predicted once per process)."""
    return Evidence(run, _predicted(run.source, run.name))


@functools.cache
def _predicted(source: str, name: str):
    from m3lab.predict import bge_m3_config, predict

    (run,) = [r for r in measured_runs() if (r.source, r.name) == (source, name)]
    return predict(run.config, card_of(run), model_config=bge_m3_config(),
                   first_update_skipped=run.first_update_skipped)


def measured_peaks(config: TrainConfig) -> list[MeasuredRun]:
    """The runs under data/measurements/ of ``config`` (the same step as the predictor sees it)."""
    from m3lab.predict import bge_m3_config
    from m3lab.predict.spec import spec_for

    def key(c: TrainConfig) -> dict:
        spec = dataclasses.asdict(spec_for(c, bge_m3_config()))
        for name in ("model_config", "training_steps", "warmup_steps", "learning_rate"):  # no memory of their own
            spec.pop(name)
        return spec

    wanted = key(config)
    return [run for run in measured_runs()
            if run.peak_allocated_bytes and run.limit_bytes is None and key(run.config) == wanted]

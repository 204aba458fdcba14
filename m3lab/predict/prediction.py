"""``predict(config, gpu)``: the peak memory of a run's training step, and whether it fits.

It traces each rank that can differ (or two shallow copies of it, extrapolated) and turns the
traces into a ``MemoryReport``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

from m3lab.errors import ConfigError
from m3lab.gpus import GPU, gpu_profile
from m3lab.predict.extrapolate import (
    EXTRAPOLATE_FROM,
    ShallowPair,
    extrapolate_rank,
    shallow_specs,
)
from m3lab.predict.pool import TraceJob, trace_in_parallel
from m3lab.predict.report import MemoryReport, PeakFigures, RankPrediction
from m3lab.predict.spec import TraceSpec, spec_for
from m3lab.predict.step import RankSteps, simulate_rank


class TrainingWouldFail(RuntimeError):
    """The traced step raised inside FlagEmbedding/DeepSpeed/transformers: a real run would too."""


def _method(spec: TraceSpec, pair: ShallowPair | None) -> str:
    if pair is None:
        return "full trace"
    shallow = pair.specs
    text = f"extrapolated from {pair.depth}- and {pair.depth + 1}-layer traces"
    if shallow[0].deepspeed != spec.deepspeed:
        text += " with DeepSpeed's gradient buckets shrunk by the parameters each copy lacks"
        if pair.bounded:
            text += (" (smaller than the largest gradient, which they reduce on its own: an upper bound on backward, "
                     "below the step's peak)")
    if shallow[0].allreduce_bucket_size != spec.allreduce_bucket_size:
        text += " with DeepSpeed's all-reduce chunks shrunk by the parameters each copy lacks"
    return text


def predict(config, gpu: str | GPU | None = "t4", *, model_config=None, record_events: bool = False,
            exact: bool | None = None, one_shot: bool = False, first_update_skipped: bool = False) -> MemoryReport:
    """Predict the peak memory of one training step of ``config`` (a ``TrainConfig``) on ``gpu``
    ("t4", "l4", ...; see m3lab.gpus; or a ``GPU``), and whether it fits: the full-depth step is
    traced with the caching allocator simulated under the card's limit. The model's shape is
    ``model_config`` (a transformers config) or read from ``config.model`` without downloading
    (BAAI/bge-m3 is built in).

    ``gpu=None`` predicts live tensor bytes on a CPU (no allocator, CPU kernels): the figure that a
    real CPU run of the same configuration measures, which the tests compare. There, deep models
    are traced at 2 and 3 layers and extrapolated (exact when the peak sits at the same point of
    the step, which the tests check against full traces). On a card the allocator's layout does not
    extrapolate, so its verdict comes from the full depth unless ``exact=False`` (a quick bound for
    searches: the live-tensor peak is exact, what the step needs an estimate); ``exact=True`` traces every layer on a CPU too. ``one_shot``: this process makes one prediction (the command line),
    see ``pool.trace_in_parallel``. ``first_update_skipped``: DeepSpeed's fp16 loss scaling skips
    the first step's update, as measured runs on random weights show.
    """
    started = time.perf_counter()
    profile = gpu_profile(gpu) if isinstance(gpu, str) else gpu
    spec = spec_for(config, model_config)
    ranks = traced_ranks(spec)
    with _failures_as_training_failures():
        full = (profile is not None if exact is None else exact) or record_events or first_update_skipped
        results, used = ({}, None) if full else _extrapolated(spec, profile, ranks, one_shot)
        todo = [rank for rank in ranks if rank not in results]
        if record_events:  # the trace itself is kept: in this process
            results.update({rank: simulate_rank(spec, profile, rank, True).peaks() for rank in todo})
        elif todo:
            jobs = [TraceJob(spec, profile, rank, first_update_skipped=first_update_skipped) for rank in todo]
            results.update(zip(todo, trace_in_parallel(jobs, one_shot)))
    return _report(spec, profile, results, used, record_events, time.perf_counter() - started)


@contextlib.contextmanager
def _failures_as_training_failures():
    """The traced step is the real code: when FlagEmbedding's, DeepSpeed's or transformers' own
    checks fail in it (e.g. ZeRO-2 + gradient checkpointing with the M3 model), a real run fails
    the same way. An error raised in m3lab's own code is m3lab's, and stays what it is."""
    try:
        yield
    except ConfigError:
        raise
    except (AssertionError, ValueError) as error:
        if _raised_in_m3lab(error):
            raise
        raise TrainingWouldFail(f"this configuration fails in the training code itself, as a real run "
                                f"would: {str(error).split(chr(10))[0][:400]}") from error


def _raised_in_m3lab(error: BaseException) -> bool:
    import traceback
    from pathlib import Path

    frames = traceback.extract_tb(error.__traceback__)
    package = str(Path(__file__).resolve().parent.parent)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package)


def predict_many(configs: list, gpu: str | GPU = "t4", *, model_config=None) -> list[MemoryReport]:
    """``predict(config, gpu)`` of each configuration, full depth, their traces side by side in the
    worker pool: how a search confirms several candidates at once."""
    started = time.perf_counter()
    profile = gpu_profile(gpu) if isinstance(gpu, str) else gpu
    specs = [spec_for(config, model_config) for config in configs]
    owners = [(index, rank) for index, spec in enumerate(specs) for rank in traced_ranks(spec)]
    with _failures_as_training_failures():
        traced = trace_in_parallel([TraceJob(specs[index], profile, rank) for index, rank in owners])
    results: list[dict[int, RankSteps]] = [{} for _ in specs]
    for (index, rank), steps in zip(owners, traced):
        results[index][rank] = steps
    seconds = time.perf_counter() - started
    return [_report(spec, profile, found, None, False, seconds) for spec, found in zip(specs, results)]


def traced_ranks(spec: TraceSpec) -> list[int]:
    """The ranks whose steps can differ: ZeRO-1/2 ranks differ only in the last partition's padding;
    without partitioning (ZeRO-0, no DeepSpeed) every rank runs the same step on the same shapes."""
    return sorted({0, spec.num_gpus - 1}) if (spec.zero_stage or 0) >= 1 else [0]


def _extrapolated(spec: TraceSpec, profile: GPU | None, ranks: list[int],
                  one_shot: bool) -> tuple[dict[int, RankSteps], ShallowPair | None]:
    """Each rank's steps extrapolated from shallow copies, where a pair stands ({} where none does)."""
    layers = getattr(spec.model_config, "num_hidden_layers", 0)
    if layers <= EXTRAPOLATE_FROM[1] + 1:
        return {}, None
    results, used = {}, None
    for pair in shallow_specs(spec):  # the cheapest first; a later pair only for the ranks an earlier did not give
        todo = [rank for rank in ranks if rank not in results]
        traced = trace_in_parallel([TraceJob(copy, profile, rank, shallow=True)
                                    for rank in todo for copy in pair.specs], one_shot)
        for rank, shallow, deeper in zip(todo, traced[::2], traced[1::2]):
            steps = extrapolate_rank(spec, pair, profile, [shallow, deeper])
            if steps is not None:
                results[rank], used = steps, pair
        if len(results) == len(ranks):
            break
    return results, used


def _report(spec: TraceSpec, profile: GPU | None, results: dict[int, RankSteps], used: ShallowPair | None,
            record_events: bool, seconds: float) -> MemoryReport:
    """The ranks' steps as a ``MemoryReport`` (the ranks not traced hold exactly what rank 0 holds)."""
    context = profile.context_bytes if profile else 0
    usable = profile.usable_bytes if profile else 0
    traced, snapshot = {}, None
    for rank, steps in results.items():
        first, steady = steps.first, steps.steady
        if record_events and rank == 0 and steps.trace is not None and steps.trace.allocator is not None:
            snapshot = steps.trace.allocator_snapshot()
        worst = max((first, steady), key=lambda s: s.peak_allocated_bytes)
        held = max(first.held_bytes, steady.held_bytes)
        traced[rank] = RankPrediction(
            peak_allocated_bytes=worst.peak_allocated_bytes,
            predicted_reserved_bytes=max(first.predicted_reserved_bytes, steady.predicted_reserved_bytes),
            held_bytes=held, context_bytes=context, total_bytes=held + context, usable_bytes=usable,
            fits=steps.out_of_memory is None, breakdown=worst.breakdown, peak_phase=worst.peak_phase,
            peak_module=worst.peak_module, peak_op=worst.peak_op, out_of_memory=steps.out_of_memory, rank=rank,
            first_step=first, steady_step=steady, model_state_bytes=steps.model_states)
    per_rank = [traced.get(r) or dataclasses.replace(traced[0], rank=r) for r in range(spec.num_gpus)]
    top = max(per_rank, key=lambda r: (r.out_of_memory is not None, r.total_bytes))
    kernel = next(iter(results.values())).kernel
    figures = {f.name: getattr(top, f.name) for f in dataclasses.fields(PeakFigures)}
    return MemoryReport(
        **figures, gpu=profile.key if profile else "cpu",
        provenance=f"predicted for {profile.name}" if profile else "predicted live tensor bytes on CPU",
        first_step_peak_bytes=top.first_step.peak_allocated_bytes,
        steady_step_peak_bytes=top.steady_step.peak_allocated_bytes, per_rank=per_rank, attention_kernel=kernel,
        seconds=seconds, extrapolated=used is not None, method=_method(spec, used),
        spec=dataclasses.replace(spec, model_config=None), snapshot=snapshot)

"""``predict(config, gpu)``: the peak memory of a run's training step, and whether it fits.

It traces each rank that can differ (or two shallow copies of it, extrapolated) and turns the
traces into a ``MemoryReport``.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from m3lab.config import ConfigError
from m3lab.gpus import GPU, gpu_profile
from m3lab.predict.extrapolate import EXTRAPOLATE_FROM, ShallowPair, extrapolate_rank, shallow_specs
from m3lab.predict.pool import TraceJob, trace_shallow_copies
from m3lab.predict.report import MemoryReport, RankPrediction
from m3lab.predict.spec import TraceSpec, spec_for
from m3lab.predict.step import RankSteps, simulate_rank


class TrainingWouldFail(RuntimeError):
    """The traced step raised inside FlagEmbedding/DeepSpeed/transformers: a real run would too."""


def _full_trace(spec: TraceSpec, profile: GPU | None, rank: int, record_events: bool) -> RankSteps:
    return simulate_rank(spec, profile, rank, record_events).peaks()


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


def predict(config, gpu: str | None = "t4", *, model_config=None, record_events: bool = False,
            exact: bool = False, one_shot: bool = False) -> MemoryReport:
    """Predict the peak memory of one training step of ``config`` (a ``TrainConfig``) on ``gpu``
    ("t4", "l4", ...; see m3lab.gpus). The model's shape is ``model_config`` (a transformers
    config) or read from ``config.model`` without downloading (BAAI/bge-m3 is built in).

    ``gpu=None`` predicts live tensor bytes on a CPU (no allocator rounding, CPU kernels): the
    figure that a real CPU run of the same configuration measures, which the tests compare.
    Deep models are traced at 2 and 3 layers and extrapolated (exact when the peak sits at the
    same point of the step, which the tests check against full traces); ``exact=True``, a
    snapshot, or DeepSpeed buckets smaller than the model trace every layer. ``one_shot``: this
    process makes one prediction (the command line), see ``pool.trace_shallow_copies``.
    """
    started = time.perf_counter()
    profile = gpu_profile(gpu) if gpu is not None else None
    spec = spec_for(config, model_config)
    world = spec.num_gpus
    # ZeRO-1/2 ranks differ only in the last partition's padding; without partitioning (ZeRO-0)
    # every rank runs the same step on the same shapes, so rank 0 stands for all
    stage = ((spec.deepspeed or {}).get("zero_optimization") or {}).get("stage", 0)
    ranks = sorted({0, world - 1}) if spec.deepspeed is not None and stage >= 1 else [0]
    layers = getattr(spec.model_config, "num_hidden_layers", 0)
    deep = layers > EXTRAPOLATE_FROM[1] + 1
    pairs = shallow_specs(spec) if deep and not exact and not record_events else []
    per_rank = []
    snapshot = None
    extrapolated = False
    used = None  # the pair extrapolated from, if any
    try:
        # The traced step is the real code; when DeepSpeed's own checks fail here, a real run
        # fails the same way (e.g. ZeRO-2 + gradient checkpointing with the M3 model).
        results = {}
        for pair in pairs:  # the cheapest first; a later pair only for the ranks an earlier did not give
            todo = [rank for rank in ranks if rank not in results]
            small = trace_shallow_copies([TraceJob(copy, profile, rank) for rank in todo for copy in pair.specs],
                                         one_shot)
            for index, rank in enumerate(todo):
                steps = extrapolate_rank(spec, pair, profile, small[index * 2:(index + 1) * 2])
                if steps is not None:
                    results[rank], used = steps, pair
            if len(results) == len(ranks):
                break
        for rank in ranks:
            if rank not in results:
                results[rank] = _full_trace(spec, profile, rank, record_events)
    except ConfigError:
        raise
    except (AssertionError, ValueError) as error:
        raise TrainingWouldFail(f"this configuration fails in the training code itself, as a real run "
                                f"would: {str(error).split(chr(10))[0][:400]}") from error
    for rank in ranks:
        steps = results[rank]
        first, steady, trace, kernel = steps.first, steps.steady, steps.trace, steps.kernel
        extrapolated = extrapolated or trace is None
        if record_events and rank == 0 and trace is not None and trace.allocator is not None:
            snapshot = trace.allocator_snapshot()
        worst = max((first, steady), key=lambda s: s.peak_allocated_bytes)
        context = profile.context_bytes if profile else 0
        reserved = max(first.predicted_reserved_bytes, steady.predicted_reserved_bytes)
        usable = profile.usable_bytes if profile else 0
        total = reserved + context
        per_rank.append(RankPrediction(
            peak_allocated_bytes=worst.peak_allocated_bytes, predicted_reserved_bytes=reserved,
            context_bytes=context, total_bytes=total, usable_bytes=usable,
            fits=total <= usable if profile else True, breakdown=worst.breakdown, peak_phase=worst.peak_phase,
            peak_module=worst.peak_module, peak_op=worst.peak_op, rank=rank, first_step=first, steady_step=steady,
            model_state_bytes=steps.model_states))
    traced = {prediction.rank: prediction for prediction in per_rank}
    per_rank = [traced.get(r) or RankPrediction(**{**asdict(traced[0]), "rank": r, "first_step": traced[0].first_step,
                                                 "steady_step": traced[0].steady_step})
                for r in range(world)]  # the ranks not traced hold exactly what rank 0 holds
    top = max(per_rank, key=lambda r: r.total_bytes)
    provenance = f"predicted for {profile.name}" if profile else "predicted live tensor bytes on CPU"
    return MemoryReport(
        gpu=profile.key if profile else "cpu", provenance=provenance,
        peak_allocated_bytes=top.peak_allocated_bytes, predicted_reserved_bytes=top.predicted_reserved_bytes,
        context_bytes=top.context_bytes, total_bytes=top.total_bytes, usable_bytes=top.usable_bytes,
        fits=top.fits, breakdown=top.breakdown, peak_phase=top.peak_phase, peak_module=top.peak_module,
        peak_op=top.peak_op, first_step_peak_bytes=top.first_step.peak_allocated_bytes,
        steady_step_peak_bytes=top.steady_step.peak_allocated_bytes, per_rank=per_rank,
        attention_kernel=kernel, seconds=time.perf_counter() - started, extrapolated=extrapolated,
        method=_method(spec, used),
        spec={k: v for k, v in asdict(spec).items() if k != "model_config"}, snapshot=snapshot)

"""The worker pool: traces (shallow copies, or the ranks of a run) side by side in spawned processes
(two on a 2-core machine).

Workers start on the first prediction that needs them and live as long as the process, so later
predictions pay no start-up; ``M3LAB_PREDICT_WORKERS=0`` traces everything in-process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from m3lab.gpus import GPU
from m3lab.predict import saved_traces
from m3lab.predict.spec import TraceSpec
from m3lab.predict.step import RankSteps, simulate_rank


@dataclass
class TraceJob:
    """One rank of a model to trace, or of a shallow copy of it (``shallow``: its allocator is not
    limited to the card, and every candidate peak comes back, for extrapolation)."""

    spec: TraceSpec
    gpu: GPU | None
    rank: int
    shallow: bool = False
    first_update_skipped: bool = False


def trace_job(job: TraceJob) -> RankSteps:
    """One rank's two steps, without the trace object (it cannot be pickled)."""
    steps = simulate_rank(job.spec, job.gpu, job.rank, limited=not job.shallow,
                          first_update_skipped=job.first_update_skipped)
    steps.trace = None
    return steps if job.shallow else steps.peaks()


_POOL = None


def _worker_pool():
    """Worker processes that trace shallow copies side by side (two on a 2-core machine).

    Started on the first call that needs them (each imports torch, DeepSpeed and FlagEmbedding
    once, a few seconds) and kept for the life of the process, so later predictions reuse them.
    ``M3LAB_PREDICT_WORKERS=0`` traces everything in this process instead.
    """
    global _POOL
    workers = int(os.environ.get("M3LAB_PREDICT_WORKERS", min(2, os.cpu_count() or 1)))
    if workers < 2:
        return None
    if _POOL is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent may hold threads (OpenMP, Jupyter) that a fork would break
        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_worker_started)
    return _POOL


def _worker_started() -> None:
    import signal

    # What DeepSpeed prints in a worker goes to stderr: the caller's stdout may be a JSON object.
    os.dup2(2, 1)
    # Ctrl-C (or Jupyter's interrupt, sent to the whole process group) is the caller's to handle;
    # a worker ends when the caller closes the pool or exits (its end of the queue then closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned workers re-run the parent's script unless it is guarded by ``if __name__ ==
    "__main__"``; they need only m3lab, so a plain script that calls predict() is hidden from them."""
    import types

    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


# What PyTorch raises in a forked child when the parent has used autograd's engine (seen with 2.11)
AUTOGRAD_AFTER_FORK = "Unable to handle autograd's threading in combination with fork-based multiprocessing"


def _forked(jobs: list[TraceJob]) -> list[RankSteps]:
    """The last job here and the others in forked helpers, side by side. The last is the longest to
    trace (the deeper copy): the helpers' start-up and the trip of their results back overlap it
    instead of adding to it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=len(jobs) - 1, mp_context=multiprocessing.get_context("fork"),
                             initializer=_worker_started) as helpers:
        futures = [helpers.submit(trace_job, job) for job in jobs[:-1]]
        last = trace_job(jobs[-1])
        results = []
        for job, future in zip(jobs[:-1], futures):
            try:
                results.append(future.result())
            except RuntimeError as error:
                if AUTOGRAD_AFTER_FORK not in str(error):
                    raise
                # This process ran autograd before forking (the command line called in a process that
                # had trained or traced): PyTorch 2.11 refuses autograd in such a child; trace it here.
                results.append(trace_job(job))
        return [*results, last]


def trace_in_parallel(jobs: list[TraceJob], one_shot: bool = False) -> list[RankSteps]:
    """``trace_job`` for each job not traced before (``saved_traces``), in the worker pool when
    there is one. ``one_shot``: the process makes this one prediction (the CLI), so rather than
    start a pool whose workers import torch, DeepSpeed and FlagEmbedding again, it forks helpers
    that start with what it imported and traces the last job itself (docs/predictor.md has the
    timings)."""
    keys = [saved_traces.key_of(job) for job in jobs]  # before tracing: a trace may add to the model's config
    found = [saved_traces.load(key) for key in keys]
    todo = [job for job, steps in zip(jobs, found) if steps is None]
    traced = iter(_traced(todo, one_shot) if todo else [])
    results = []
    for key, steps in zip(keys, found):
        if steps is None:
            steps = next(traced)
            saved_traces.save(key, steps)
        results.append(steps)
    return results


def _traced(jobs: list[TraceJob], one_shot: bool) -> list[RankSteps]:
    global _POOL
    workers = int(os.environ.get("M3LAB_PREDICT_WORKERS", min(2, os.cpu_count() or 1)))
    if one_shot and len(jobs) > 1 and workers >= 2 and hasattr(os, "fork"):
        return _forked(jobs)
    pool = _worker_pool() if len(jobs) > 1 else None
    if pool is None:
        return [trace_job(job) for job in jobs]
    from concurrent.futures.process import BrokenProcessPool

    try:
        with _main_module_hidden():
            futures = [pool.submit(trace_job, job) for job in jobs]  # starts the workers
        return [future.result() for future in futures]
    except BrokenProcessPool:  # a worker died (killed, out of host memory): start afresh next time
        _POOL = None
        return [trace_job(job) for job in jobs]


"""Estimated time of one training step on a GPU: the traced step's FLOPs over a stated throughput.

The FLOPs are counted, not guessed: the predictor's trace adds up every matrix product and
attention kernel of the step (forward, checkpointing's recompute, the gradient cache's second
pass, backward) with PyTorch's own formulas, those of ``torch.utils.flop_counter.FlopCounterMode``.
The throughput is the card's datasheet peak (``m3lab.gpus``) times ``ASSUMED_UTILISATION``, an
assumption, not a measurement: nothing here ran on a T4. Not counted: element-wise and memory-bound
kernels beyond that share, the CPU's optimizer update under offload, the all-reduce between two
GPUs, data loading. So every figure is "estimated", and says so.
"""

from __future__ import annotations

from m3lab.gpus import gpu_profile

# A training step of a BERT-sized encoder in fp16 reaches well under a card's tensor-core peak:
# attention, layer norms and the optimizer are memory-bound (a T4 has 320 GB/s), and a T4 under
# sustained load runs below its boost clock (70 W). 30% is our assumption for the estimate.
ASSUMED_UTILISATION = 0.30


def step_flops(report) -> int:
    """The FLOPs of one optimizer step on the busiest rank (all its micro-batches)."""
    return max((r.steady_step.flops for r in report.per_rank if r.steady_step is not None), default=0)


def step_seconds(report, gpu: str | None = None) -> float | None:
    """Estimated seconds per optimizer step on ``gpu`` (default: the report's own), or None when the
    card has no throughput on record or the report is a CPU prediction."""
    key = gpu or report.gpu
    if key == "cpu":
        return None
    profile = gpu_profile(key)
    half = report.spec.get("precision") in ("fp16", "bf16")
    peak = profile.peak_flops_half if half else profile.peak_flops_fp32
    if not peak:
        return None
    return step_flops(report) / (peak * ASSUMED_UTILISATION)


def describe(report, gpu: str | None = None) -> str:
    """One line: the counted FLOPs and the estimated step time, labelled as an estimate."""
    seconds = step_seconds(report, gpu)
    flops = step_flops(report) / 1e12
    if seconds is None:
        return f"{flops:.1f} TFLOP per step (counted); no step-time estimate for this device"
    name = gpu_profile(gpu or report.gpu).name  # a known card: step_seconds found its throughput
    return (f"{flops:.1f} TFLOP per step (counted in the trace): about {seconds:.1f} s per step on "
            f"{name}, estimated at {ASSUMED_UTILISATION:.0%} of its datasheet peak")

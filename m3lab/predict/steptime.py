"""Estimated time of one training step on a GPU: the traced step's FLOPs over a range of throughputs
calibrated against published measurements of that card.

The FLOPs are counted, not guessed: the predictor's trace adds up every matrix product and
attention kernel of the step (forward, checkpointing's recompute, the gradient cache's second
pass, backward) with PyTorch's own formulas, those of ``torch.utils.flop_counter.FlopCounterMode``.
The throughput is a range: the share of the card's datasheet peak that published runs of a
BERT-large-sized encoder reached on it (``PUBLISHED``), the smallest and the largest. A training
step reaches at most what inference does (backward runs the same products, and the optimizer and
the norms are memory-bound). A card with a datasheet peak but no published run here takes the shares
reached on the cards that have one (the T4's), applied to its own peak, and says it was not calibrated
on it; a card without a datasheet peak here gets no estimate. Not counted: the CPU's optimizer update under offload, the all-reduce
between two GPUs, data loading. Every figure is "estimated", and says so; none was timed on a T4.
"""

from __future__ import annotations

from dataclasses import dataclass

from m3lab.config import Precision
from m3lab.gpus import gpu_profile


def bert_large_forward_flops(tokens: int, layers: int = 24, hidden: int = 1024) -> int:
    """FLOPs of one BERT-large (or XLM-R-large) forward over a sequence of ``tokens``: per layer, the
    Q, K, V, output and two feed-forward projections (12 h² multiply-adds a token) and attention's
    Q Kᵀ and A V (2 L h a token), 2 FLOPs a multiply-add; embeddings and heads left out."""
    return layers * 2 * (12 * hidden * hidden * tokens + 2 * tokens * tokens * hidden)


@dataclass(frozen=True)
class PublishedThroughput:
    """A published measurement of a BERT-large-sized model on a card."""

    card: str  # m3lab.gpus key
    what: str
    sequences_per_second: float
    tokens: int
    source: str

    @property
    def utilisation(self) -> float:
        """The share of the card's datasheet fp16 peak these sequences a second amount to."""
        peak = gpu_profile(self.card).peak_flops_half
        return self.sequences_per_second * bert_large_forward_flops(self.tokens) / peak


_DLE_BERT = ("NVIDIA DeepLearningExamples, TensorFlow2/LanguageModeling/BERT/README.md, fine-tuning inference "
             "for SQuAD v1.1 on a Tesla T4, TensorFlow 21.02 container")
PUBLISHED = (
    PublishedThroughput("t4", "BERT-large fp16 inference, batch 1, 384 tokens", 38.88, 384, _DLE_BERT),
    PublishedThroughput("t4", "BERT-large fp16 inference, batch 8, 384 tokens", 62.99, 384, _DLE_BERT),
)


@dataclass(frozen=True)
class StepTime:
    """An estimated step time, from the slowest to the fastest published throughput."""

    flops: int
    fastest_seconds: float
    slowest_seconds: float
    card: str
    lowest_utilisation: float
    highest_utilisation: float
    calibrated_on: str  # the card whose published runs gave the shares: ``card`` itself, or the fallback's

    def describe(self) -> str:
        where = ("as published BERT-large runs on it reached" if self.calibrated_on == self.card else
                 f"as published BERT-large runs reached on {self.calibrated_on} (none is on record for {self.card})")
        return (f"{self.flops / 1e12:.1f} TFLOP per step (counted in the trace): {self.fastest_seconds:.1f} to "
                f"{self.slowest_seconds:.1f} s per step on {self.card}, estimated at {self.lowest_utilisation:.0%} to "
                f"{self.highest_utilisation:.0%} of its datasheet peak, {where}")

    def seconds_for(self, steps: int) -> tuple[float, float]:
        """(fastest, slowest) seconds for ``steps`` steps."""
        return steps * self.fastest_seconds, steps * self.slowest_seconds


def step_flops(report) -> int:
    """The FLOPs of one optimizer step on the busiest rank (all its micro-batches)."""
    return max((r.steady_step.flops for r in report.per_rank if r.steady_step is not None), default=0)


def _published_on(profile) -> list[PublishedThroughput]:
    return [p for p in PUBLISHED if gpu_profile(p.card).compute_capability == profile.compute_capability
            and gpu_profile(p.card).peak_flops_half == profile.peak_flops_half]


def step_time(report, gpu: str | None = None) -> StepTime | None:
    """The estimated time of one optimizer step on ``gpu`` (default: the report's own): from the
    published runs on that card, else (the fallback) from those on the cards that have some, applied
    to its datasheet peak. None for a CPU prediction or a card without a datasheet peak here."""
    key = gpu or report.gpu
    if key == "cpu":
        return None
    profile = gpu_profile(key)
    half = report.spec.get("precision") in (Precision.FP16, Precision.BF16)
    peak = profile.peak_flops_half if half else profile.peak_flops_fp32
    runs = _published_on(profile) or list(PUBLISHED)
    if not peak or not runs:
        return None
    shares = [run.utilisation for run in runs]
    calibrated_on = profile.name if _published_on(profile) else gpu_profile(runs[0].card).name
    flops = step_flops(report)
    return StepTime(flops, flops / (peak * max(shares)), flops / (peak * min(shares)), profile.name,
                    min(shares), max(shares), calibrated_on)


def describe(report, gpu: str | None = None) -> str:
    """One line: the counted FLOPs and the estimated step time, labelled as an estimate."""
    estimate = step_time(report, gpu)
    if estimate is None:
        return f"{step_flops(report) / 1e12:.1f} TFLOP per step (counted); no step-time estimate for this device"
    return estimate.describe()

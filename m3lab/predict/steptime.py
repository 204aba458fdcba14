"""Estimated time of one training step on a GPU: the step's FLOPs, counted in the trace and scaled to
the lengths a batch of your data really has, over a range of throughputs that published runs on the
card reached, plus, on two GPUs, the gradients' exchange between them.

**The FLOPs** are counted, not guessed: the predictor's trace adds up every matrix product and
attention kernel of the step (forward, checkpointing's recompute, the gradient cache's second
pass, backward) with PyTorch's own formulas, those of ``torch.utils.flop_counter.FlopCounterMode``.
The trace holds every text at its max length (memory's worst case). FlagEmbedding pads a batch only
to its longest text, so where the data is known the count is scaled by ``padded_share``: the
encoder's FLOPs at the padded lengths of batches drawn from the data as FlagEmbedding draws them (one
positive and group - 1 negatives a line), over those at the max lengths. Without the data the count
stays at full length, an upper bound, and says so.

**The throughput** is a share of the card's datasheet peak, a range (``ANCHORS``):
- the slow end, and the fast end where it is lower than the bound below, from a published *training*
  run on a T4: Unsloth's free-Colab BGE-M3 notebook (LoRA r=32 on the encoder, dense vector only,
  sentence-transformers' in-batch loss, batch 256, fp16, no checkpointing; 834 steps in 1,220.4 s).
  It prints no token counts: its short pairs are taken as padded to 8 to 16 tokens (queries) and 32
  to 64 (passages), which gives the range. It covers a real training step on a T4 (optimizer, data
  loading, fp16); it does not cover long texts, full fine-tuning's weight gradients, M3's sparse and
  ColBERT heads, or a run without its torch.compile'd encoder;
- the fast end is bounded by published *inference* on a T4 (NVIDIA's BERT-large figures): a training
  step runs the same products and adds memory-bound work (norms, the optimizer), so it reaches at
  most what inference does.
A card with a datasheet peak but no published figure here takes the T4's shares of its own peak and
says so; a card without a datasheet peak gets no estimate.

**Two GPUs** (Kaggle's 2 x T4) exchange every trainable parameter's gradient each step (an all-reduce
over PCIe; the T4 has no NVLink). The fast end assumes it hides behind the backward pass (DDP
overlaps them); the slow end adds it whole at ``PCIE_ALLREDUCE_BYTES_PER_S`` (an assumption: a third
of PCIe Gen3 x16's 15.75 GB/s a direction, as traffic through the host's memory gets).

Not counted: the CPU's optimizer update under offload, data loading beyond the anchor's, evaluation,
saving checkpoints. Every figure is "estimated" and says so; none was timed on a T4 here.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from m3lab.config import Precision
from m3lab.data.jsonl import LineLengths
from m3lab.gpus import gpu_profile

PCIE_ALLREDUCE_BYTES_PER_S = 5.0e9  # the slow end's all-reduce rate between two T4s (an assumption)
PADDING_SAMPLES = 400  # batches drawn to average the padded lengths


def bert_large_forward_flops(tokens: int, layers: int = 24, hidden: int = 1024) -> int:
    """FLOPs of one BERT-large (or XLM-R-large) forward over a sequence of ``tokens``: per layer, the
    Q, K, V, output and two feed-forward projections (12 h² multiply-adds a token) and attention's
    Q Kᵀ and A V (2 L h a token), 2 FLOPs a multiply-add; embeddings and heads left out."""
    return layers * 2 * (12 * hidden * hidden * tokens + 2 * tokens * tokens * hidden)


class Basis(enum.Enum):
    """What a published figure timed."""

    TRAINING = "training run"
    INFERENCE = "inference"


@dataclass(frozen=True)
class Anchor:
    """A published figure on a card, as shares of its datasheet fp16 peak (lowest, highest)."""

    card: str  # m3lab.gpus key
    basis: Basis
    what: str
    shares: tuple[float, float]
    source: str


def inference_anchor(card: str, what: str, sequences_per_second: float, tokens: int, source: str) -> Anchor:
    """Published inference of a BERT-large-sized encoder: sequences a second at ``tokens`` each."""
    share = sequences_per_second * bert_large_forward_flops(tokens) / gpu_profile(card).peak_flops_half
    return Anchor(card, Basis.INFERENCE, what, (share, share), source)


def lora_training_anchor(card: str, what: str, steps: int, seconds: float, batch: int,
                         padded: tuple[tuple[int, int], tuple[int, int]], source: str) -> Anchor:
    """A published LoRA training run of an XLM-R-large encoder on (query, passage) pairs: each step a
    forward and a backward to the inputs only (the frozen weights take no weight gradients: about
    twice the forward, the adapters' own products negligible). ``padded``: the (query, passage)
    lengths assumed, lowest and highest."""
    peak = gpu_profile(card).peak_flops_half

    def share(query: int, passage: int) -> float:
        step = 2 * batch * (bert_large_forward_flops(query) + bert_large_forward_flops(passage))
        return steps * step / seconds / peak

    (low_query, low_passage), (high_query, high_passage) = padded
    return Anchor(card, Basis.TRAINING, what, (share(low_query, low_passage), share(high_query, high_passage)), source)


_DLE_BERT = ("NVIDIA DeepLearningExamples, TensorFlow2/LanguageModeling/BERT/README.md, fine-tuning inference "
             "for SQuAD v1.1 on a Tesla T4, TensorFlow 21.02 container")
_UNSLOTH = "unslothai/notebooks, nb/BGE_M3.ipynb (commit 03b0cda), its printed train_runtime on a free Colab Tesla T4"
ANCHORS = (
    lora_training_anchor("t4", "BGE-M3, LoRA r=32, batch 256 short pairs, fp16: 834 steps in 1,220.4 s (Unsloth's "
                         "free-Colab notebook; pairs taken as padded to 8/32 to 16/64 tokens)", 834, 1220.381, 256,
                         ((8, 32), (16, 64)), _UNSLOTH),
    inference_anchor("t4", "BERT-large, batch 1, 384 tokens, fp16: 38.88 sequences/s (NVIDIA)", 38.88, 384, _DLE_BERT),
    inference_anchor("t4", "BERT-large, batch 8, 384 tokens, fp16: 62.99 sequences/s (NVIDIA)", 62.99, 384, _DLE_BERT),
)


def shares(card: str) -> tuple[float, float, str | None] | None:
    """(lowest, highest) share of the datasheet peak a training step reaches on ``card``, the training
    runs' range, its top bounded by inference; and the card whose figures were borrowed (None: the
    card's own)."""
    profile = gpu_profile(card)
    on_card = [a for a in ANCHORS if gpu_profile(a.card).compute_capability == profile.compute_capability
               and gpu_profile(a.card).peak_flops_half == profile.peak_flops_half]
    anchors = on_card or [a for a in ANCHORS if a.card == "t4"]
    training = [a for a in anchors if a.basis is Basis.TRAINING]
    inference = [a for a in anchors if a.basis is Basis.INFERENCE]
    if not training:
        return None
    low = min(a.shares[0] for a in training)
    high = max(a.shares[1] for a in training)
    if inference:
        high = min(high, max(a.shares[1] for a in inference))
    return low, max(low, high), None if on_card else gpu_profile(anchors[0].card).card_name


def padded_share(lines: Sequence[LineLengths], batch: int, group: int, query_max_len: int, passage_max_len: int,
                 multiple_of: int = 8, samples: int = PADDING_SAMPLES, seed: int = 0) -> float:
    """The encoder's FLOPs at the lengths FlagEmbedding pads a batch of these lines to (each text cut at
    its max length, the batch padded to its longest, rounded up to ``multiple_of``), over those at the
    max lengths: the mean over ``samples`` batches drawn as FlagEmbedding draws them (a line's one
    positive at random, group - 1 of its negatives, repeated where it has too few)."""
    if not lines:
        return 1.0
    rng = random.Random(seed)

    def padded(longest: int, max_len: int) -> int:
        return min(max_len, -(-longest // multiple_of) * multiple_of)

    def flops(query: int, passage: int) -> float:
        return bert_large_forward_flops(query) + group * bert_large_forward_flops(passage)

    total = 0.0
    for _ in range(samples):
        chosen = [lines[rng.randrange(len(lines))] for _ in range(batch)]
        longest_passage = 0
        for line in chosen:
            negatives = list(line.neg) * -(-(group - 1) // max(1, len(line.neg))) if line.neg else []
            picked = [rng.choice(line.pos), *rng.sample(negatives, min(group - 1, len(negatives)))]
            longest_passage = max(longest_passage, *picked)
        total += flops(padded(max(line.query for line in chosen), query_max_len),
                       padded(longest_passage, passage_max_len))
    return total / samples / flops(query_max_len, passage_max_len)


@dataclass(frozen=True)
class StepTime:
    """An estimated step time, a range (fastest, slowest), and what it rests on."""

    flops: int  # counted in the trace, every text at its max length
    padded_share: float | None  # the FLOPs' share at the data's padded lengths; None: the data unknown
    fastest_seconds: float
    slowest_seconds: float
    card: str
    lowest_share: float
    highest_share: float
    borrowed_from: str | None  # the card whose published figures gave the shares; None: this card's own
    exchange_seconds: float = 0.0  # the slow end's gradient all-reduce between GPUs, included above

    def describe(self) -> str:
        counted = (f"{self.flops * self.padded_share / 1e12:.1f} TFLOP per step at the lengths your data's batches "
                   f"pad to ({self.padded_share:.0%} of {self.flops / 1e12:.1f} at full length)"
                   if self.padded_share is not None else
                   f"{self.flops / 1e12:.1f} TFLOP per step with every text at full length (an upper bound)")
        where = ("" if self.borrowed_from is None else
                 f"; the shares reached on {self.borrowed_from} (none is on record for {self.card})")
        exchange = (f"; the slow end adds {self.exchange_seconds:.1f} s for the gradients' exchange between the GPUs"
                    if self.exchange_seconds else "")
        return (f"{counted}: {self.fastest_seconds:.1f} to {self.slowest_seconds:.1f} s per step on {self.card}, "
                f"estimated at {self.lowest_share:.0%} to {self.highest_share:.0%} of its datasheet peak (a published "
                f"training run on a T4, bounded by published inference){where}{exchange}")

    def seconds_for(self, steps: int) -> tuple[float, float]:
        """(fastest, slowest) seconds for ``steps`` steps."""
        return steps * self.fastest_seconds, steps * self.slowest_seconds


def step_flops(report) -> int:
    """The FLOPs of one optimizer step on the busiest rank (all its micro-batches)."""
    return max((r.steady_step.flops for r in report.per_rank if r.steady_step is not None), default=0)


def exchange_seconds(report) -> float:
    """One step's gradient all-reduce between the report's GPUs at the slow end's rate: every trainable
    parameter's gradient (fp32 under HF's AMP, fp16 under DeepSpeed's fp16), each GPU sending and
    receiving about its size (a ring over two). 0 on one GPU."""
    gpus = report.spec.num_gpus if report.spec else 1
    if gpus < 2 or not report.per_rank:
        return 0.0
    half = report.spec.zero_stage is not None and report.spec.precision in (Precision.FP16, Precision.BF16)
    gradient_bytes = report.per_rank[0].model_state_bytes.trainable_params * (2 if half else 4)
    return gradient_bytes * 2 * (gpus - 1) / gpus / PCIE_ALLREDUCE_BYTES_PER_S


def step_time(report, gpu: str | None = None, lines: Sequence[LineLengths] | None = None) -> StepTime | None:
    """The estimated time of one optimizer step on ``gpu`` (default: the report's own), at the padded
    lengths of ``lines`` (the data's, when known; else every text at full length). None for a CPU
    prediction or a card without a datasheet peak here."""
    key = gpu or report.gpu
    if key == "cpu":
        return None
    profile = gpu_profile(key)
    half = report.spec is not None and report.spec.precision in (Precision.FP16, Precision.BF16)
    peak = profile.peak_flops_half if half else profile.peak_flops_fp32
    found = shares(key)
    if not peak or found is None:
        return None
    low, high, borrowed_from = found
    spec = report.spec
    share = None if lines is None or spec is None else padded_share(  # per micro-batch
        lines, spec.batch_size, spec.train_group_size, spec.query_max_len, spec.passage_max_len)
    flops = step_flops(report)
    work = flops * (1.0 if share is None else share)
    exchange = exchange_seconds(report)
    return StepTime(flops, share, work / (peak * high), work / (peak * low) + exchange, profile.name, low, high,
                    borrowed_from, exchange)


def describe(report, gpu: str | None = None, lines: Sequence[LineLengths] | None = None) -> str:
    """One line: the counted FLOPs and the estimated step time, labelled as an estimate."""
    estimate = step_time(report, gpu, lines)
    if estimate is None:
        return f"{step_flops(report) / 1e12:.1f} TFLOP per step (counted); no step-time estimate for this device"
    return estimate.describe()


def basis(card: str = "t4") -> list[str]:
    """What every time estimate rests on, in lines: each published figure and its share of the card's
    datasheet peak, the range a step takes, and the two GPUs' exchange."""
    lines = []
    for anchor in ANCHORS:
        low, high = anchor.shares
        share = f"{low:.0%}" if round(low, 2) == round(high, 2) else f"{low:.0%} to {high:.0%}"
        lines.append(f"  {anchor.basis.value}, {anchor.what}: {share} of the datasheet peak")
    found = shares(card)
    if found:
        low, high, borrowed = found
        peak = gpu_profile(card).peak_flops_half
        lines.append(f"a training step on a {gpu_profile(card).card_name}, estimated: {low:.0%} to {high:.0%} of its "
                     f"{peak / 1e12:.0f} TFLOPS fp16 peak (the training run's range, its top bounded by inference"
                     + (f"; shares reached on {borrowed})" if borrowed else ")"))
    lines.append(f"two GPUs: each step's gradients exchanged over PCIe, hidden at the fast end, added at "
                 f"{PCIE_ALLREDUCE_BYTES_PER_S / 1e9:g} GB/s at the slow end (an assumption)")
    return ["published figures on a T4:", *lines]

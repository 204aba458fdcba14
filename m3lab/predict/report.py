"""A prediction's figures and what they mean: the peak, the allocator's share, the verdict.

``MemoryReport`` is what ``predict`` returns and ``m3lab predict --json`` prints; its ``provenance``
says it is predicted, and for which GPU.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.predict.allocator import OutOfMemory
from m3lab.predict.host import HostMemory, host_memory
from m3lab.predict.spec import TraceSpec


@dataclass
class StepPeak:
    peak_allocated_bytes: int
    predicted_reserved_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    peak_module: str
    peak_op: str
    flops: int = 0  # the whole step's (forward, backward, optimizer), counted in the trace
    held_bytes: int = 0  # the allocator's peak of segments holding tensors: what the step needs of the card


# PyTorch's operator names in the learner's words, first match wins (the names stay in --json and docs)
_OPERATIONS = (
    ("MaxBackward", "the sparse head's max over the vocabulary"),
    ("scatter", "the sparse head's vocabulary-sized tensor"),
    ("native_layer_norm", "a layer norm"),
    ("_foreach_sqrt", "Adam's square roots"),
    ("_foreach", "Adam's update"),
    ("embedding_dense_backward", "the word embeddings' gradient"),
    ("cat.", "joining tensors into one"),
    ("_to_copy", "a copy to another precision"),
    ("attention", "attention"),
    ("softmax", "a softmax"),
    ("gelu", "the feed-forward's activation"),
    ("mm.", "a matrix product"),
    ("linear", "a matrix product"),
)


def operation_in_words(op: str) -> str:
    """What PyTorch was doing, for a learner: ``scatter.src (autograd MaxBackward0)`` -> "the sparse
    head's max over the vocabulary"; an operator not listed keeps its name."""
    return next((words for name, words in _OPERATIONS if name in op), f"the operation {op.split(' ')[0]}")


class Verdict(Enum):
    """What the card would do: the one rule every verdict, table and plot colours by."""

    FITS = "fits"
    CLOSE_CALL = "close call"  # fits with under CLOSE_CALL_BYTES to spare
    OUT_OF_MEMORY = "out of memory"
    NO_CARD = "no card"  # predicted for a CPU: live tensor bytes only


@dataclass
class PeakFigures:
    """The figures of ``m3lab predict --json``'s contract, for the whole run or for one rank.

    ``total_bytes`` is what the step needs of the card: the most the simulated allocator holds in
    segments with tensors in them (the live tensors and the gaps between them that it cannot give
    back), with the allocator limited to the card, plus the CUDA context. ``spare_bytes`` = usable
    minus that: the one margin every verdict, table and plot uses.
    """

    peak_allocated_bytes: int
    predicted_reserved_bytes: int  # the allocator's peak reserved bytes, under the card's limit
    held_bytes: int
    context_bytes: int
    total_bytes: int
    usable_bytes: int
    fits: bool
    breakdown: dict[str, int]
    peak_phase: str
    peak_module: str
    peak_op: str
    out_of_memory: OutOfMemory | None

    @property
    def spare_bytes(self) -> int:
        return self.usable_bytes - self.total_bytes

    @property
    def peak_in_words(self) -> str:
        """What the step was doing at its peak, in the learner's words (``peak_op`` keeps PyTorch's name)."""
        return operation_in_words(self.peak_op)

    @property
    def kind(self) -> Verdict:
        """The verdict's kind: out of memory, no card, a close call, or fits."""
        if self.out_of_memory is not None:
            return Verdict.OUT_OF_MEMORY
        if not self.usable_bytes:
            return Verdict.NO_CARD
        return Verdict.CLOSE_CALL if self.spare_bytes < CLOSE_CALL_BYTES else Verdict.FITS

    def fits_with(self, margin_bytes: int) -> bool:
        """Fits on the card with at least ``margin_bytes`` to spare."""
        return self.kind in (Verdict.FITS, Verdict.CLOSE_CALL) and self.spare_bytes >= margin_bytes


@dataclass(frozen=True)
class ModelStates:
    """What one rank's model holds after its steps, in bytes (and its parameter counts)."""

    weights: int = 0
    optimizer_states: int = 0  # on the GPU
    offloaded_optimizer_states: int = 0  # fp32 masters and Adam states in host memory (ZeRO offload)
    host_peak_bytes: int = 0  # the host memory the offloaded optimizer holds at its peak
    trainable_params: int = 0
    params: int = 0


@dataclass
class RankPrediction(PeakFigures):
    rank: int = 0
    first_step: StepPeak | None = None
    steady_step: StepPeak | None = None
    model_state_bytes: ModelStates = field(default_factory=ModelStates)


@dataclass
class MemoryReport(PeakFigures):
    """A prediction; ``provenance`` says what it is, e.g. "predicted for Tesla T4 (Colab)"."""

    gpu: str = ""
    provenance: str = ""
    first_step_peak_bytes: int = 0
    steady_step_peak_bytes: int = 0
    per_rank: list[RankPrediction] = field(default_factory=list)
    attention_kernel: str = ""
    seconds: float = 0.0
    extrapolated: bool = False  # traced at 2 and 3 layers and extrapolated (see predict)
    method: str = "full trace"  # how the figures were obtained, in words
    spec: TraceSpec | None = None  # the run as traced, without its model's config
    snapshot: dict | None = field(default=None, repr=False)  # rank 0's trace, memory_viz format

    @property
    def verdict(self) -> str:
        """Fits or out of memory, as the allocator decides under the card's limit, and the margin."""
        spare = self.spare_bytes / GIB
        kind = self.kind
        if kind is Verdict.OUT_OF_MEMORY:
            oom = self.out_of_memory
            place = ", ".join(p for p in oom.where.split(":")[:2] if p)
            return (f"out of memory in step {oom.step} at {operation_in_words(oom.where.rsplit(':', 1)[-1])} ({place}): "
                    f"short by {-spare:.2f} GiB")
        if kind is Verdict.NO_CARD:
            return "no card: live tensor bytes on a CPU"
        text = f"fits, {spare:.2f} GiB to spare"
        if kind is Verdict.CLOSE_CALL:
            text += f": a close call (under {CLOSE_CALL_BYTES / GIB:.1f} GiB)"
        return text

    @property
    def short_verdict(self) -> str:
        """The verdict in a few words, for tables."""
        spare = self.spare_bytes / GIB
        kind = self.kind
        if kind is Verdict.OUT_OF_MEMORY:
            return f"OOM, short by {-spare:.2f} GiB"
        if kind is Verdict.NO_CARD:
            return "(CPU)"
        return f"fits, {spare:.2f} GiB to spare" + (" (close call)" if kind is Verdict.CLOSE_CALL else "")

    @property
    def host_peak_bytes(self) -> int:
        """Host (CPU) memory the offloaded optimizer needs at its peak; 0 without offload."""
        return max((r.model_state_bytes.host_peak_bytes for r in self.per_rank), default=0)

    @functools.cached_property
    def host(self) -> HostMemory:
        """The host RAM the whole run needs (``m3lab.predict.host``: weights counted, offload traced,
        the processes themselves estimated)."""
        return host_memory(self.per_rank)

    def summary(self) -> str:
        host = (f"; offloaded optimizer: {self.host_peak_bytes / GIB:.2f} GiB of host memory at its peak"
                if self.host_peak_bytes else "")
        return (f"{self.provenance}: peak allocated {self.peak_allocated_bytes / GIB:.2f} GiB (in {self.peak_phase}, "
                f"{self.peak_module or 'outside modules'}, {operation_in_words(self.peak_op)}); needs {self.total_bytes / GIB:.2f} GiB "
                f"of {self.usable_bytes / GIB:.2f} GiB (the allocator's segments {self.held_bytes / GIB:.2f} + CUDA "
                f"context {self.context_bytes / GIB:.2f}, estimated): {self.verdict}{host}")

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("snapshot")
        if data["spec"]:
            data["spec"].pop("model_config")
        data["verdict"] = self.verdict
        data["spare_bytes"] = self.spare_bytes
        data["host_peak_bytes"] = self.host_peak_bytes
        data["host_total_bytes"] = self.host.total_bytes
        from m3lab.predict import steptime

        data["step_flops"] = steptime.step_flops(self)
        estimate = steptime.step_time(self)  # None where no throughput is on record
        data["estimated_step_seconds"] = None if estimate is None else [estimate.fastest_seconds,
                                                                          estimate.slowest_seconds]
        data["estimated_step_basis"] = "every text at its max length (an upper bound; m3lab.predict.steptime)"
        return data

    def save_snapshot(self, path: str | Path) -> None:
        """Write the simulated allocation trace as ``torch.cuda.memory._dump_snapshot`` would;
        drop the file on https://pytorch.org/memory_viz to see it."""
        import pickle

        from m3lab.io import write_bytes_atomic

        if self.snapshot is None:
            raise ValueError("this report has no trace; predict(..., record_events=True) records one")
        write_bytes_atomic(path, pickle.dumps(self.snapshot))


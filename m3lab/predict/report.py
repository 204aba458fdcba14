"""A prediction's figures and what they mean: the peak, the allocator's share, the verdict.

``MemoryReport`` is what ``predict`` returns and ``m3lab predict --json`` prints; its ``provenance``
says it is predicted, and for which GPU.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m3lab.gpus import GIB
from m3lab.predict.host import HostMemory, host_memory

# Within this of the card's limit, the verdict rests on the caching allocator's share, which is
# simulated (full traces) or carried over from the 3-layer trace (extrapolation): say so.
NEAR_THE_LIMIT = int(1.0 * GIB)


@dataclass
class StepPeak:
    peak_allocated_bytes: int
    predicted_reserved_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    peak_module: str
    peak_op: str
    flops: int = 0  # the whole step's (forward, backward, optimizer), counted in the trace


@dataclass
class PeakFigures:
    """The figures of ``m3lab predict --json``'s contract, for the whole run or for one rank."""

    peak_allocated_bytes: int
    predicted_reserved_bytes: int
    context_bytes: int
    total_bytes: int
    usable_bytes: int
    fits: bool
    breakdown: dict[str, int]
    peak_phase: str
    peak_module: str
    peak_op: str


@dataclass
class RankPrediction(PeakFigures):
    rank: int = 0
    first_step: StepPeak | None = None
    steady_step: StepPeak | None = None
    model_state_bytes: dict[str, int] = field(default_factory=dict)


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
    spec: dict = field(default_factory=dict)
    snapshot: dict | None = field(default=None, repr=False)  # rank 0's trace, memory_viz format

    @property
    def verdict(self) -> str:
        """Fits or OOM, with what the margin rests on: live tensors are traced; the allocator's
        cache and the CUDA context are estimates."""
        spare_live = (self.usable_bytes - self.peak_allocated_bytes - self.context_bytes) / GIB
        spare = (self.usable_bytes - self.total_bytes) / GIB
        if spare_live < 0:
            return f"OOM by {-spare_live:.2f} GiB (live tensors alone)"
        if spare < 0:
            return (f"OOM by {-spare:.2f} GiB once the caching allocator's cache is counted (an estimate); "
                    f"live tensors alone leave {spare_live:.2f} GiB")
        text = f"fits with {spare:.2f} GiB to spare"
        if abs(self.usable_bytes - self.total_bytes) < NEAR_THE_LIMIT:
            text += (f" (close call: {spare_live:.2f} GiB before the caching allocator's cache, which is an "
                     "estimate, as is the CUDA context)")
        return text

    @property
    def host_peak_bytes(self) -> int:
        """Host (CPU) memory the offloaded optimizer needs at its peak; 0 without offload."""
        return max((r.model_state_bytes.get("host_peak_bytes", 0) for r in self.per_rank), default=0)

    @functools.cached_property
    def host(self) -> HostMemory:
        """The host RAM the whole run needs (``m3lab.predict.host``: weights counted, offload traced,
        the processes themselves estimated)."""
        return host_memory(self.per_rank)

    @property
    def short_verdict(self) -> str:
        """The verdict in a few words, for tables."""
        spare_live = (self.usable_bytes - self.peak_allocated_bytes - self.context_bytes) / GIB
        spare = (self.usable_bytes - self.total_bytes) / GIB
        if spare_live < 0:
            return f"OOM by {-spare_live:.2f} GiB"
        if spare < 0:
            return f"OOM by {-spare:.2f} GiB with the cache (estimated)"
        if abs(spare) * GIB < NEAR_THE_LIMIT:
            return f"close call: {spare_live:.2f} GiB left before the cache"
        return f"fits, {spare:.2f} GiB to spare"

    def summary(self) -> str:
        host = (f"; offloaded optimizer: {self.host_peak_bytes / GIB:.2f} GiB of host memory at its peak"
                if self.host_peak_bytes else "")
        return (f"{self.provenance}: peak allocated {self.peak_allocated_bytes / GIB:.2f} GiB, "
                f"reserved {self.predicted_reserved_bytes / GIB:.2f} GiB + context {self.context_bytes / GIB:.2f} GiB"
                f" = {self.total_bytes / GIB:.2f} GiB of {self.usable_bytes / GIB:.2f} GiB: {self.verdict} "
                f"(peak in {self.peak_phase}, {self.peak_module or 'outside modules'}, {self.peak_op}){host}")

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("snapshot")
        data["verdict"] = self.verdict
        data["host_peak_bytes"] = self.host_peak_bytes
        data["host_total_bytes"] = self.host.total_bytes
        from m3lab import steptime

        data["step_flops"] = steptime.step_flops(self)
        data["estimated_step_seconds"] = steptime.step_seconds(self)  # None where no throughput is on record
        return data

    def save_snapshot(self, path: str | Path) -> None:
        """Write the simulated allocation trace as ``torch.cuda.memory._dump_snapshot`` would;
        drop the file on https://pytorch.org/memory_viz to see it."""
        import pickle

        from m3lab.io import write_bytes_atomic

        if self.snapshot is None:
            raise ValueError("this report has no trace; predict(..., record_events=True) records one")
        write_bytes_atomic(path, pickle.dumps(self.snapshot))


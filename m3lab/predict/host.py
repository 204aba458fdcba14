"""The host (CPU) memory a training run needs, beside the GPU's: what a platform's RAM must hold.

Each training process holds the process itself (Python, torch, DeepSpeed, CUDA's libraries), then
the larger of two things that do not live at the same time: the model as ``from_pretrained`` loads
it (fp32 weights on the host, freed once the trainer moves them to the GPU) and DeepSpeed's
offloaded optimizer (traced: its peak). The launcher (torchrun) and the notebook's kernel come on top.
The weights are counted and the offloaded states traced; the two process figures are estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

from m3lab.gpus import GIB

# Estimates, not measurements: importing torch, DeepSpeed, transformers and FlagEmbedding took
# 0.55 GiB of resident memory on a CPU machine here (2026-11-29); CUDA's libraries and context add
# host memory that was not measured: 1.5 GiB is allowed per training process.
PROCESS_BYTES = int(1.5 * GIB)
LAUNCHER_BYTES = int(1.0 * GIB)  # torchrun's agent and the notebook's own kernel (also an estimate)
FP32_BYTES = 4  # FlagEmbedding's runner loads the model without a dtype: fp32


@dataclass
class HostMemory:
    """A run's host memory: per training process, and in all."""

    processes: int
    process_bytes: int  # estimate
    weights_load_bytes: int  # counted: fp32 weights, per process
    offloaded_peak_bytes: int  # traced: DeepSpeed's offloaded optimizer at its peak, largest rank
    launcher_bytes: int  # estimate

    @property
    def per_process_bytes(self) -> int:
        return self.process_bytes + max(self.weights_load_bytes, self.offloaded_peak_bytes)

    @property
    def total_bytes(self) -> int:
        return self.processes * self.per_process_bytes + self.launcher_bytes

    def describe(self) -> str:
        held = (f"the offloaded optimizer's {self.offloaded_peak_bytes / GIB:.2f} GiB (traced)"
                if self.offloaded_peak_bytes > self.weights_load_bytes else
                f"the fp32 weights as loaded, {self.weights_load_bytes / GIB:.2f} GiB")
        return (f"host RAM needed: {self.total_bytes / GIB:.2f} GiB = {self.processes} process(es) x "
                f"({self.process_bytes / GIB:.1f} GiB estimated + {held}) + {self.launcher_bytes / GIB:.1f} GiB "
                "for the launcher and the notebook (estimated)")


def host_memory(per_rank) -> HostMemory:
    """The host memory of a run from its predicted ranks (``MemoryReport.per_rank``)."""
    states = [rank.model_state_bytes for rank in per_rank]
    return HostMemory(
        processes=len(per_rank), process_bytes=PROCESS_BYTES,
        weights_load_bytes=max(s.params for s in states) * FP32_BYTES,
        offloaded_peak_bytes=max(s.host_peak_bytes for s in states),
        launcher_bytes=LAUNCHER_BYTES)

"""What every notebook of the series shares: the machine it runs on and the sizes it picks there,
the versions that matter, and prediction tables that say where each figure came from. Beside it:
the lessons' plots (``plots``), the learner's own run started from the lesson (``your_run``) and the main job that gathers the series' measurements into one report
(``main_job``, ``m3lab run``).

Every cell runs the same code on a T4 and in CI (a CPU): the environment only picks sizes, as
pyro's notebooks do with ``smoke_test``. On a CUDA GPU real runs train BAAI/bge-m3 in fp16 and are
measured; on a CPU they train the tiny stand-in in fp32, at small lengths and few steps.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import warnings
from dataclasses import dataclass

# Noise a learner cannot act on, kept out of the notebooks' outputs: tqdm's note that Jupyter's
# widgets are missing (the text progress bar works), printed when FlagEmbedding imports tqdm.auto.
warnings.filterwarnings("ignore", message="IProgress not found")

from m3lab.config import Hardware, TrainConfig  # noqa: E402
from m3lab.gpus import CLOSE_CALL_BYTES, GIB, gpu_profile, is_t4  # noqa: E402, F401 (lesson 01 quotes CLOSE_CALL_BYTES)
from m3lab.predict import MemoryReport, predict  # noqa: E402
from m3lab.standin import REAL_MODEL, STANDIN, load_tokenizer, resolve_model  # noqa: E402, F401 (lessons count with load_tokenizer)

PACKAGES = ("torch", "transformers", "FlagEmbedding", "deepspeed", "accelerate", "matplotlib", "m3lab")
CPU_MEMORY_CAP = 256 * 2**20  # the stand-in's "card" in the OOM demonstrations


@dataclass(frozen=True)
class Environment:
    """Where the notebook runs, and the sizes real runs take there (the only thing that differs)."""

    on_gpu: bool
    gpu_name: str | None
    gpu_count: int
    usable_bytes: int | None  # total memory of GPU 0 as torch reports it

    @property
    def model(self) -> str:
        """The model real runs use here: BGE-M3 on a GPU, the offline stand-in on a CPU."""
        return REAL_MODEL if self.on_gpu else STANDIN

    @property
    def is_t4(self) -> bool:
        return is_t4(self.gpu_name)

    @property
    def max_processes(self) -> int:
        """How many training processes real runs may use: one per GPU; two on a CPU (gloo)."""
        return self.gpu_count if self.on_gpu else 2

    @property
    def memory_limit_bytes(self) -> int | None:
        """The cap real runs get: a T4's usable memory on a bigger GPU, so that it runs out where a
        T4 would; none on a T4 (the card is the cap) or on a CPU."""
        return gpu_profile("t4").usable_bytes if self.on_gpu and not self.is_t4 else None

    @property
    def oom_limit_bytes(self) -> int | None:
        """The cap of the out-of-memory demonstrations: a T4's (as ``memory_limit_bytes``); on a CPU
        256 MiB, small enough for the stand-in to run out as BGE-M3 does on a T4."""
        return self.memory_limit_bytes if self.on_gpu else CPU_MEMORY_CAP

    @property
    def predicts_for(self) -> str | None:
        """The GPU profile that predicts this machine's own runs (None: the CPU, no emulation)."""
        return "t4" if self.on_gpu else None

    @property
    def gpu_check_model(self) -> str:
        """``m3lab.evidence.gpu_check``'s model here: the full-size stand-in on a GPU, the tiny one on a CPU."""
        return "full" if self.on_gpu else "tiny"

    def sized(self, config: TrainConfig, **cpu_sizes) -> TrainConfig:
        """``config`` as this machine runs it: with BGE-M3 on a GPU; on a CPU with the stand-in,
        in fp32 (fp16 training needs CUDA) and at ``cpu_sizes`` (lengths, group, steps, bucket...).
        Either way DeepSpeed runs torch's AdamW (``torch_adam``): its FusedAdam is a CUDA op that
        DeepSpeed compiles on first use, which needs a CUDA compiler a runtime may lack (and no CPU
        has); the two hold the same states (m3lab.predict models both)."""
        if self.on_gpu:
            return config.replace(model=self.model, torch_adam=True)
        return config.replace(model=self.model, fp16=False, bf16=False, torch_adam=True, **cpu_sizes)

    def describe(self) -> str:
        if not self.on_gpu:
            return ("no GPU: full-size figures are predicted for a T4 (m3lab.predict), and real training runs "
                    f"use {STANDIN}, a tiny offline stand-in, at small sizes, measured on the CPU")
        usable = f"{self.usable_bytes / GIB:.2f} GiB usable" if self.usable_bytes else "usable memory unknown"
        return (f"{self.gpu_count} x {self.gpu_name} ({usable}): real runs of {REAL_MODEL} are measured and "
                "drawn over the predictions" + ("" if self.is_t4 else
                                                 "; capped to a T4's 14.74 GiB to imitate one"))


def _deepspeed_on_the_cpu_quietly() -> None:
    """Without a GPU, DeepSpeed warns on stdout the first time it looks for its accelerator ("Setting
    accelerator to CPU"), in whichever cell first reads a DeepSpeed JSON or traces a run. Named here
    (DeepSpeed's own ``DS_ACCELERATOR``, unless already set), it is not looked for, and no lesson's
    checked output depends on which cell that was. The training runs the lessons start inherit it, as
    they would find the CPU anyway."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def environment() -> Environment:
    hardware = Hardware.detect()
    if hardware.device != "cuda":
        _deepspeed_on_the_cpu_quietly()
        return Environment(False, None, 0, None)
    import torch

    return Environment(True, hardware.gpu_name, hardware.gpu_count, torch.cuda.get_device_properties(0).total_memory)


def versions() -> dict[str, str]:
    """The versions that decide whether the commands run: Python and the training stack."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def predict_all(configs: dict[str, TrainConfig], gpu: str = "t4") -> dict[str, MemoryReport]:
    """A prediction for each labelled configuration (``t4x2`` is used for two-process ones)."""
    return {label: predict(config, "t4x2" if config.num_processes == 2 and gpu == "t4" else gpu)
            for label, config in configs.items()}


def prediction_table(reports: dict[str, MemoryReport]) -> str:
    """A fixed-width table of predictions: deterministic text, so nbval can hold it steady. *peak
    alloc* is the live tensors' peak; *needs* what the step needs of the card (the allocator's
    segments at their most, simulated under the card's limit, and the CUDA context); the verdict's
    spare is the card's usable memory minus that."""
    width = max([34] + [len(label) for label in reports])
    header = f"{'configuration':{width}} {'peak alloc':>10} {'needs':>8}  verdict"
    lines = [header, "-" * len(header)]
    for label, report in reports.items():
        lines.append(f"{label:{width}} {report.peak_allocated_bytes / GIB:8.2f} G {report.total_bytes / GIB:6.2f} G  "
                     f"{report.short_verdict}")
    provenances = sorted({r.provenance for r in reports.values()})
    lines.append(f"GiB, {' / '.join(provenances)}; usable {next(iter(reports.values())).usable_bytes / GIB:.2f} GiB")
    return "\n".join(lines)


def gpu_measurements(configs: dict[str, TrainConfig]) -> dict:
    """The GPU measurements under data/measurements/ of the labelled configurations, as the keyword
    arguments that mark them on a plot (``plots.breakdown_bars``, ``plots.ledger``): ``measured``
    ({label: peak allocated bytes}) and ``measured_provenance``; empty where none was measured."""
    from m3lab.evidence import compare

    found = {label: compare.measured_peaks(config) for label, config in configs.items()}
    found = {label: runs[0] for label, runs in found.items() if runs}
    if not found:
        return {}
    provenance = next(iter(found.values())).provenance.headline
    return {"measured": {label: run.peak_allocated_bytes for label, run in found.items()},
            "measured_provenance": provenance}


def print_commands(configs: dict[str, TrainConfig], lesson: str) -> None:
    """Each configuration as the flags to change in the command the path reached before ``lesson``
    (lesson 01 prints the whole baseline command and its JSON; each lesson's "path so far" lists what
    it changed), and how to check a whole command of one's own."""
    from m3lab.plan import ledger

    previous = ledger.before(lesson)
    print(f"# Flags to change in the command the path reached before lesson {lesson} "
          "(01 prints the baseline whole);")
    print("# check any whole command with: m3lab predict --gpu t4 -- <command>")
    for label, config in configs.items():
        flags = ledger.changed_flags(config, previous)
        print(f"{label}: {' '.join(flags) if flags else 'nothing changes'}")


def predict_run(config: TrainConfig, env: Environment) -> MemoryReport:
    """The prediction for a run this machine makes: BGE-M3 on a T4 profile on a GPU; on a CPU the
    stand-in's own geometry, as live tensor bytes (the figure the CPU run measures)."""
    return predict(config, env.predicts_for)


__all__ = ["Environment", "environment", "versions", "load_tokenizer", "predict_all", "prediction_table",
           "gpu_measurements", "print_commands", "predict_run", "plots", "your_run", "main_job"]

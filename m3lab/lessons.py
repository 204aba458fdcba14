"""What every notebook of the series shares: the machine it runs on, the versions that matter,
the tokenizer to count with, and prediction tables whose every figure says where it came from.

On a CUDA GPU the notebooks measure real runs of BAAI/bge-m3 and overlay them on the predictions;
on a CPU they use the predictor for full-size figures and real runs of the tiny stand-in.
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass

from m3lab.config import Hardware, TrainConfig
from m3lab.gpus import GIB, gpu_profile
from m3lab.memory import MemoryReport, predict
from m3lab.standin import REAL_MODEL, STANDIN, resolve_model

PACKAGES = ("torch", "transformers", "FlagEmbedding", "deepspeed", "accelerate", "matplotlib", "m3lab")


@dataclass(frozen=True)
class Environment:
    """Where the notebook runs: a CUDA GPU (measure) or a CPU (predict, and train the stand-in)."""

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
        return bool(self.gpu_name and "T4" in self.gpu_name)

    def describe(self) -> str:
        if not self.on_gpu:
            return ("no GPU: full-size figures are predicted for a T4 (m3lab.memory), and real training runs "
                    f"use {STANDIN}, a tiny offline stand-in, measured on the CPU")
        usable = f"{self.usable_bytes / GIB:.2f} GiB usable" if self.usable_bytes else "usable memory unknown"
        return (f"{self.gpu_count} x {self.gpu_name} ({usable}): real runs of {REAL_MODEL} are measured and "
                "drawn over the predictions" + ("" if self.is_t4 else
                                                 "; capped to a T4's 14.74 GiB to imitate one"))


def environment() -> Environment:
    hardware = Hardware.detect()
    if hardware.device != "cuda":
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


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers at all (offline machines fail at once, not after retries)."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_tokenizer():
    """(tokenizer, name): BGE-M3's own where it is cached or the hub answers, else the stand-in's."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(REAL_MODEL, local_files_only=not hub_reachable()), REAL_MODEL
    except (OSError, ValueError):
        return AutoTokenizer.from_pretrained(resolve_model(STANDIN)), STANDIN


def predict_all(configs: dict[str, TrainConfig], gpu: str = "t4") -> dict[str, MemoryReport]:
    """A prediction for each labelled configuration (``t4x2`` is used for two-process ones)."""
    return {label: predict(config, "t4x2" if config.num_processes == 2 and gpu == "t4" else gpu)
            for label, config in configs.items()}


def prediction_table(reports: dict[str, MemoryReport]) -> str:
    """A fixed-width table of predictions: deterministic text, so nbval can hold it steady."""
    header = f"{'configuration':34} {'peak alloc':>10} {'+cache+ctx':>10}  verdict"
    lines = [header, "-" * len(header)]
    for label, report in reports.items():
        verdict = report.short_verdict
        lines.append(f"{label:34} {report.peak_allocated_bytes / GIB:8.2f} G {report.total_bytes / GIB:8.2f} G  "
                     f"{verdict}")
    provenances = sorted({r.provenance for r in reports.values()})
    lines.append(f"GiB, {' / '.join(provenances)}; usable {next(iter(reports.values())).usable_bytes / GIB:.2f} GiB")
    return "\n".join(lines)


def print_commands(configs: dict[str, TrainConfig]) -> None:
    """Each configuration's torchrun command on one line, to copy. ``--deepspeed ds_stageN.json``
    names the file that ``config.deepspeed_json()`` prints (write it beside the command)."""
    import shlex

    for label, config in configs.items():
        print(f"# {label}")
        print(" ".join(shlex.quote(arg) for arg in config.command()))


def t4_memory_limit(env: Environment) -> int | None:
    """Bytes to cap a bigger GPU to, so that it runs out where a T4 would; None on a T4 or a CPU.
    (``train(memory_limit_bytes=...)`` applies it with ``torch.cuda.set_per_process_memory_fraction``.)"""
    if not env.on_gpu or env.is_t4:
        return None
    return gpu_profile("t4").usable_bytes

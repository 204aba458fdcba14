"""Measuring memory inside a running training process, step by step.

On CUDA the caching allocator's own counters (``torch.cuda.max_memory_allocated`` and
``max_memory_reserved``, reset at each step). On CPU, where PyTorch keeps no such counters, the
live tensor bytes: every tensor storage alive, counted once, tracked as operators create them and
as Python frees them. ``StepRecorder`` is the ``transformers`` callback that writes both, with loss
and step time, to a JSONL file per rank.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import TrainerCallback

from m3lab.tensors import (
    MEMORY_LIMIT_ENV,
    LiveTensorBytes,
    fp32_master_tensors,
    optimizer_state_tensors,
    tensor_bytes,
)
from m3lab.train.record import Event

METRICS_DIR_ENV = "M3LAB_METRICS_DIR"
SDPA_KERNEL_ENV = "M3LAB_SDPA_KERNEL"  # "efficient": attention as a T4 runs it, on any card


def limit_sdpa_kernels() -> None:
    """With M3LAB_SDPA_KERNEL=efficient, SDPA may not use the flash or cuDNN kernels, which a T4
    lacks: a bigger card then runs attention as a T4 does (memory-efficient kernel, math fallback)."""
    choice = os.environ.get(SDPA_KERNEL_ENV)
    if not choice:
        return
    if choice != "efficient":
        raise ValueError(f"{SDPA_KERNEL_ENV}={choice!r}: the only value m3lab knows is 'efficient'.")
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def _weights_sum(model) -> float | None:
    """The sum of the model's last trainable tensor after the step (a head's: small, so summing it costs
    no memory): data-parallel ranks hold the same weights, so the same sum to the bit; independent
    copies trained on different batches do not."""
    if model is None:
        return None
    trainable = [p for p in model.parameters() if p.requires_grad]
    return float(trainable[-1].detach().double().sum()) if trainable else None


def _bool_or_none(value) -> bool | None:
    if isinstance(value, torch.Tensor):
        return bool(value.item())
    return None if value is None else bool(value)


class StepRecorder(TrainerCallback):
    """Writes one JSON line per optimizer step: loss, step time and peak memory of this rank."""

    def __init__(self, metrics_dir: str | os.PathLike, memory_limit_bytes: int | None = None):
        self.rank = int(os.environ.get("RANK", "0"))
        self.path = Path(metrics_dir) / f"metrics-rank{self.rank}.jsonl"
        self.memory_limit_bytes = memory_limit_bytes
        self.cuda = torch.cuda.is_available()
        self.meter: LiveTensorBytes | None = None
        self._step_started = 0.0
        self._pending: dict | None = None
        self._batch: dict = {}
        self.current_step = 0

    @classmethod
    def from_env(cls) -> "StepRecorder | None":
        metrics_dir = os.environ.get(METRICS_DIR_ENV)
        if not metrics_dir:
            return None
        limit = os.environ.get(MEMORY_LIMIT_ENV)
        return cls(metrics_dir, int(limit) if limit else None)

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"rank": self.rank, **record}) + "\n")

    def apply_cuda_limit(self) -> None:
        """Cap this process's CUDA allocator, to imitate a smaller card on a bigger one."""
        if self.cuda and self.memory_limit_bytes:
            # Called before HF picks this rank's device, so name the device explicitly.
            device = int(os.environ.get("LOCAL_RANK", "0"))
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.memory_limit_bytes / total), device)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = list(model.parameters()) if model is not None else []
        self.write({
            "event": Event.START,
            "device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
            "torch": torch.__version__,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "total_params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "model_bytes": tensor_bytes(params),
        })
        if not self.cuda:
            self.meter = LiveTensorBytes(roots=params, limit_bytes=self.memory_limit_bytes)
            self.meter.__enter__()
        if model is not None:
            model.register_forward_pre_hook(self._see_batch, with_kwargs=True)

    def _see_batch(self, module, args, kwargs) -> None:
        """The batch of the step's first forward (FlagEmbedding's model takes queries and passages)."""
        queries, passages = kwargs.get("queries"), kwargs.get("passages")
        if self._batch or not isinstance(queries, Mapping) or not isinstance(passages, Mapping):  # BatchEncoding
            return
        shape = passages["input_ids"].shape
        self._batch = {"queries": int(queries["input_ids"].shape[0]), "passages": int(shape[0]),
                       "passage_tokens": int(shape[1])}

    def on_step_begin(self, args, state, control, **kwargs):
        self.current_step = state.global_step + 1
        self._batch = {}
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.meter.reset_peak()
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            memory = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                      "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                      "allocated_after_step_bytes": torch.cuda.memory_allocated(),
                      "reserved_after_step_bytes": torch.cuda.memory_reserved(),
                      "device_used_bytes": total - free,
                      "memory_source": "torch.cuda.max_memory_allocated"}
        else:
            memory = {"peak_allocated_bytes": self.meter.peak, "peak_reserved_bytes": None,
                      "allocated_after_step_bytes": self.meter.current,
                      "memory_source": "live tensor bytes (CPU)"}
        self._pending = {
            "event": Event.STEP, "step": state.global_step, "step_time_s": time.perf_counter() - self._step_started,
            **memory,
            "optimizer_state_bytes": tensor_bytes(optimizer_state_tensors(optimizer)),
            "fp32_master_bytes": tensor_bytes(fp32_master_tensors(optimizer)),
            # accelerate's optimizer wrappers (HF AMP and DeepSpeed alike) know it
            "optimizer_step_skipped": _bool_or_none(getattr(optimizer, "step_was_skipped", None)),
            "epoch": state.epoch, "weights_sum": _weights_sum(model),
            **self._batch,
        }
        # The loss arrives in on_log right after a step that logs; other steps are written now.
        if not (args.logging_steps and state.global_step % args.logging_steps == 0):
            self._flush(None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is not None and logs and "loss" in logs:
            self._flush(logs["loss"])

    def _flush(self, loss):
        if self._pending is not None:
            self.write({**self._pending, "loss": loss})
            self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        self._flush(None)
        if self.meter is not None:
            self.meter.__exit__(None, None, None)
            self.meter = None
        self.write({"event": Event.END, "global_step": state.global_step})

    def record_oom(self, error: BaseException) -> None:
        if self.meter is not None:
            self.meter.__exit__(None, None, None)
            self.meter = None
        self._pending = None
        self.write({"event": Event.OOM, "step": self.current_step, "message": str(error)})

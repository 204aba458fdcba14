"""Measuring memory inside a running training process, step by step.

On CUDA the caching allocator's own counters (``torch.cuda.max_memory_allocated`` and
``max_memory_reserved``, reset at each step). On CPU, where PyTorch keeps no such counters, the
live tensor bytes: every tensor storage alive, counted once, tracked as operators create them and
as Python frees them. ``StepRecorder`` is the ``transformers`` callback that writes both, with loss
and step time, to a JSONL file per rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import gc
import json
import os
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import TrainerCallback

from m3lab.gpus import GIB

METRICS_DIR_ENV = "M3LAB_METRICS_DIR"
MEMORY_LIMIT_ENV = "M3LAB_MEMORY_LIMIT_BYTES"
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


def tensor_storages(obj):
    """The non-empty storages behind the tensors in ``obj`` (any nesting), skipping meta tensors."""
    if isinstance(obj, torch.Tensor):
        flat = (obj,)  # most operators return one tensor: skip the (slow) general flattening
    elif isinstance(obj, (tuple, list)) and all(isinstance(item, torch.Tensor) for item in obj):
        flat = obj
    else:
        flat, _ = tree_flatten(obj)
    for item in flat:
        if isinstance(item, torch.Tensor) and not item.is_meta:
            try:
                storage = item.untyped_storage()
            except (NotImplementedError, RuntimeError):  # sparse and other storage-less tensors
                continue
            if storage.nbytes():
                yield storage


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of CPU tensor storages alive, and their peak, while it is active.

    Storages that exist before it starts are found through the garbage collector and through
    the ``roots`` given (gradients live only in C++ until asked for, so parameters are roots).
    A ``limit_bytes`` makes it raise ``torch.OutOfMemoryError`` when the live bytes pass it, so
    a CPU run can rehearse what a GPU's allocator does at its limit.
    """

    def __init__(self, roots=(), limit_bytes: int | None = None):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.limit_bytes = limit_bytes
        self._refs: dict[int, weakref.ref] = {}
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # isinstance would poke lazy deprecated modules
                self._see_all([obj])
        for root in roots:
            self._see_all([root, getattr(root, "grad", None)])

    def _forget(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def _see(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        nbytes = storage.nbytes()
        known = self.live.get(key)
        if known == nbytes:
            return
        if known is None:
            # The Python storage object lives exactly as long as the C++ storage it wraps.
            self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._forget(key))
        self.live[key] = nbytes
        self.current += nbytes - (known or 0)
        self.peak = max(self.peak, self.current)

    def _see_all(self, objects) -> None:
        for storage in tensor_storages(objects):
            self._see(storage)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._see_all((args, kwargs))
        out = func(*args, **kwargs)
        self._see_all(out)
        if self.limit_bytes is not None and self.current > self.limit_bytes:
            raise torch.OutOfMemoryError(
                f"m3lab CPU memory limit: tried to hold {self.current / GIB:.3f} GiB of live tensors "
                f"in {func} with a limit of {self.limit_bytes / GIB:.3f} GiB (set by {MEMORY_LIMIT_ENV})."
            )
        return out


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for storage in tensor_storages(list(tensors)):
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors in the state of every ``torch.optim.Optimizer`` inside ``optimizer``.

    HF Trainer hands callbacks accelerate's wrapper around DeepSpeed's ZeRO optimizer around the
    torch AdamW that holds the exp_avg / exp_avg_sq tensors; this walks the ``.optimizer`` chain.
    """
    found = []
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, torch.optim.Optimizer):
            for state in optimizer.state.values():
                found += [v for v in state.values() if isinstance(v, torch.Tensor)]
        optimizer = getattr(optimizer, "optimizer", None)
    return found


def fp32_master_tensors(optimizer) -> list[torch.Tensor]:
    """DeepSpeed's fp32 master copies: ZeRO 1/2 partitions, or the stage-0 fp16 optimizers' groups
    (``fp32_groups_flat`` in FP16_Optimizer, per-parameter ``fp32_groups`` in FP16_UnfusedOptimizer;
    each attribute is in m3lab.compat's TARGETS, checked to be assigned by its class)."""
    masters = []
    node, seen = optimizer, set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        for name in ("single_partition_of_fp32_groups", "fp32_groups_flat", "fp32_groups"):
            flat, _ = tree_flatten(vars(node).get(name) or [] if hasattr(node, "__dict__") else [])
            masters += [t for t in flat if isinstance(t, torch.Tensor)]
        node = getattr(node, "optimizer", None)
    return masters


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
            "event": "start",
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
            "event": "step", "step": state.global_step, "step_time_s": time.perf_counter() - self._step_started,
            **memory,
            "optimizer_state_bytes": tensor_bytes(optimizer_state_tensors(optimizer)),
            "fp32_master_bytes": tensor_bytes(fp32_master_tensors(optimizer)),
            # accelerate's optimizer wrappers (HF AMP and DeepSpeed alike) know it
            "optimizer_step_skipped": _bool_or_none(getattr(optimizer, "step_was_skipped", None)),
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
        self.write({"event": "end", "global_step": state.global_step})

    def record_oom(self, error: BaseException) -> None:
        if self.meter is not None:
            self.meter.__exit__(None, None, None)
            self.meter = None
        self._pending = None
        self.write({"event": "oom", "step": self.current_step, "message": str(error)})

"""Counting tensor bytes on a CPU: the storages behind tensors, the live bytes and their peak while
operators run (``LiveTensorBytes``), and the optimizer's state and fp32 master copies. The training
meter (``m3lab.train.meter``) and the predictor's trace both count with these."""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from m3lab.gpus import GIB

MEMORY_LIMIT_ENV = "M3LAB_MEMORY_LIMIT_BYTES"  # the training child's CPU "card" (m3lab.train.meter)


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

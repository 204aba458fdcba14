"""The memory predictor: the peak GPU memory of one training step, traced on a CPU with fake tensors.

``predict(config, gpu="t4")`` builds the full-size model on fake tensors (shapes and dtypes, no
data, no memory), wraps it in the real DeepSpeed engine over a fake process group (rank r of N),
and runs FlagEmbedding's own M3 forward, backward and optimizer step. Every tensor storage is
recorded as the operators create it and Python frees it, rounded as the CUDA caching allocator
rounds, and labelled (weights, gradients, optimizer states, activations, temporaries, other).
What a GPU does differently from the CPU trace is emulated: its attention kernel (T4: SDPA's
memory-efficient kernel, no flash) and its precision (fp16 weights under DeepSpeed, or fp32
weights under autocast for HF AMP). Inputs are assumed full length (every text reaches its max
length), the worst case, under which transformers drops the attention mask as it does for real.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from m3lab import compat
from m3lab.config import OPTIMIZERS  # HF Trainer --optim values, each traced by _make_optimizer
from m3lab.fake_cache_key import faster_dispatch
from m3lab.gpus import GIB, GPU, gpu_profile
from m3lab.measure import tensor_storages

CATEGORIES = ("weights", "gradients", "optimizer_states", "activations", "temporaries", "other")
SMALL_BLOCK = 1 << 20  # the caching allocator's small/large pool boundary
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20
ROUND_LARGE = 2 << 20  # allocations over 10 MiB are rounded up to 2 MiB segments
MIN_BLOCK = 512


def allocator_round(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``nbytes`` (multiples of 512)."""
    if nbytes <= 0:
        return 0
    return ((nbytes + MIN_BLOCK - 1) // MIN_BLOCK) * MIN_BLOCK


def segment_size(rounded: int) -> int:
    """Size of the cudaMalloc segment the allocator opens for a block it cannot serve from cache."""
    if rounded <= SMALL_BLOCK:
        return SMALL_SEGMENT
    if rounded < 10 * SMALL_BLOCK:
        return LARGE_SEGMENT
    return ((rounded + ROUND_LARGE - 1) // ROUND_LARGE) * ROUND_LARGE


class _Allocator:
    """A simplified CUDA caching allocator: segments are opened, split, cached and never returned.

    Blocks are served best-fit from the free blocks of their pool; a large free block is split
    when more than 1 MiB would be left (small ones when 512 B would be), and neighbours in a
    segment merge again when freed. This is how the real allocator behaves in the common case;
    it does not model streams, expandable segments or ``empty_cache``.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.out_of_memory = False  # a segment could not be opened even after emptying the cache
        self.reserved = 0
        self.peak_reserved = 0
        self.free: dict[bool, list[list]] = {True: [], False: []}  # pool -> [size, segment, offset]
        self.blocks: dict[int, tuple] = {}  # key -> (small, segment, offset, size)
        self.segments: dict[int, list] = {}  # segment -> sorted [offset, size, key-or-None]
        self._next_segment = 0
        self.bases: dict[int, tuple[int, bool]] = {}  # segment -> (address, small pool)
        self._next_address = 1 << 32
        self.events: list[dict] | None = None  # torch.cuda.memory._snapshot() trace entries
        self._clock = 0

    def _event(self, action: str, addr: int, size: int, where: str = "") -> None:
        if self.events is not None:
            self._clock += 1
            frames = [{"filename": where or "m3lab-trace", "line": 0, "name": where.rsplit(":", 1)[-1] or action}]
            self.events.append({"action": action, "addr": addr, "size": size, "stream": 0,
                                "time_us": self._clock, "frames": frames})

    def malloc(self, key: int, nbytes: int, where: str = "") -> None:
        size = allocator_round(nbytes)
        if size == 0:
            return
        small = size <= SMALL_BLOCK
        pool = self.free[small]
        best = None
        for i, (free_size, _segment, _offset) in enumerate(pool):
            if free_size >= size and (best is None or free_size < pool[best][0]):
                best = i  # best fit, as the allocator's default (no max_split_size) does
        if best is None:
            seg_size = segment_size(size)
            if self.capacity is not None and self.reserved + seg_size > self.capacity:
                # What PyTorch does before giving up: return every wholly free cached segment.
                self._release_free_segments()
                if self.reserved + seg_size > self.capacity:
                    self.out_of_memory = True
            seg = self._next_segment
            self._next_segment += 1
            self.segments[seg] = [[0, seg_size, None]]
            self.bases[seg] = (self._next_address, small)
            self._event("segment_alloc", self._next_address, seg_size)
            self._next_address += seg_size
            self.reserved += seg_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            free_size, off = seg_size, 0
        else:
            free_size, seg, off = pool.pop(best)
        remaining = free_size - size
        threshold = MIN_BLOCK if small else SMALL_BLOCK
        parts = self.segments[seg]
        index = next(i for i, part in enumerate(parts) if part[0] == off)
        if remaining >= threshold:
            parts[index] = [off, size, key]
            parts.insert(index + 1, [off + size, remaining, None])
            pool.append([remaining, seg, off + size])
        else:
            parts[index] = [off, free_size, key]
            size = free_size
        self.blocks[key] = (small, seg, off, size)
        self._event("alloc", self.bases[seg][0] + off, size, where)

    def snapshot(self) -> dict:
        """The allocator state and trace in ``torch.cuda.memory._snapshot()``'s format."""
        segments = []
        for seg, parts in self.segments.items():
            base, small = self.bases[seg]
            blocks = [{"address": base + off, "size": size, "requested_size": size,
                       "state": "inactive" if key is None else "active_allocated", "frames": []}
                      for off, size, key in parts]
            used = sum(b["size"] for b in blocks if b["state"] != "inactive")
            segments.append({"device": 0, "address": base, "total_size": sum(p[1] for p in parts),
                             "allocated_size": used, "active_size": used, "requested_size": used, "stream": 0,
                             "segment_type": "small" if small else "large", "segment_pool_id": [0, 0],
                             "is_expandable": False, "frames": [], "blocks": blocks})
        return {"segments": segments, "device_traces": [list(self.events or [])],
                "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "m3lab simulation"}}

    def _release_free_segments(self) -> None:
        for seg, parts in list(self.segments.items()):
            if len(parts) == 1 and parts[0][2] is None:
                self.reserved -= parts[0][1]
                self._event("segment_free", self.bases[seg][0], parts[0][1])
                del self.segments[seg]
                for small in (True, False):
                    self.free[small] = [f for f in self.free[small] if f[1] != seg]

    def release(self, key: int) -> None:
        block = self.blocks.pop(key, None)
        if block is None:
            return
        small, seg, off, size = block
        self._event("free_requested", self.bases[seg][0] + off, size)
        self._event("free_completed", self.bases[seg][0] + off, size)
        parts = self.segments[seg]
        pool = self.free[small]
        index = next(i for i, part in enumerate(parts) if part[0] == off)
        parts[index][2] = None
        # merge with free neighbours
        for neighbour in (index + 1, index - 1):
            if 0 <= neighbour < len(parts) and parts[neighbour][2] is None and neighbour != index:
                lo, hi = sorted((index, neighbour))
                pool[:] = [f for f in pool if not (f[1] == seg and f[2] in (parts[lo][0], parts[hi][0]))]
                parts[lo] = [parts[lo][0], parts[lo][1] + parts[hi][1], None]
                del parts[hi]
                index = lo
        pool.append([parts[index][1], seg, parts[index][0]])


def _breakdown_at(history, at: int) -> dict[str, int]:
    """Bytes per category alive at allocation ``at``, with the labels known now (gradients and
    optimizer states are recognised only after backward and step, so this is read late)."""
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for entry in history:
        if entry.born <= at and (entry.died is None or entry.died >= at):
            breakdown[entry.category] += entry.nbytes
    return breakdown


@dataclass
class _Storage:
    nbytes: int
    category: str
    phase: str
    where: str
    born: int = 0
    died: int | None = None


class MemoryTrace(TorchDispatchMode):
    """Records every storage the traced step creates and frees, with its category and origin."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # False: PyTorch then leaves out the no-compile guard it wraps around each mode's
        # __torch_dispatch__ (several Python calls per operation); a traced step compiles nothing.
        return False

    def __init__(self, rounding: bool, record_events: bool = False, capacity: int | None = None,
                 separate_host: bool = False):
        super().__init__()
        self.rounding = rounding
        # With optimizer offload the GPU's tensors live on the fake device "cpu:0" and DeepSpeed's
        # host tensors on plain "cpu"; the host ones are tallied apart and never reach the GPU figures.
        self.separate_host = separate_host
        self.host_live: dict[int, int] = {}
        self.host_current = 0
        self.host_peak = 0
        self.live: dict[int, _Storage] = {}
        self.refs: dict[int, object] = {}
        self.current = 0
        self.peak = 0
        self.phase = "setup"
        self.module = ""
        self.allocator = _Allocator(capacity) if rounding else None
        self._pending_releases: list[tuple[int, int]] = []  # (born, key), see _forget
        if self.allocator is not None and record_events:
            self.allocator.events = []
        self.clock = 0  # counts allocations; the peak is a moment on this clock
        self.peak_at = 0
        self.history: list[_Storage] = []  # storages alive at some point since the last reset
        # (phase, operation) -> (bytes, clock, where): the highest point each operation of each
        # phase reached. Extrapolation needs them all: at full depth another one may be highest.
        self.candidates: dict[tuple[str, str], tuple] = {}

    # -- bookkeeping -----------------------------------------------------------------------
    def _size(self, nbytes: int) -> int:
        return allocator_round(nbytes) if self.rounding else nbytes

    def _forget(self, key: int) -> None:
        entry = self.live.pop(key, None)
        self.refs.pop(key, None)
        if entry is None:
            return
        entry.died = self.clock
        self.current -= entry.nbytes
        if self.allocator is not None:
            # Storages freed together (between two operations) are released oldest first, not in
            # the order they die in: C++ containers (autocast's cache of cast weights) free theirs
            # in address order, which would make the simulated cache differ from run to run.
            self._pending_releases.append((entry.born, key))

    def _flush_releases(self) -> None:
        if self._pending_releases:
            for _born, key in sorted(self._pending_releases):
                self.allocator.release(key)
            self._pending_releases.clear()

    def allocator_snapshot(self) -> dict:
        """The simulated allocator's state and trace, memory_viz format (releases applied first)."""
        self._flush_releases()
        return self.allocator.snapshot()

    def _see_host(self, storage) -> None:
        key = storage._cdata
        if key in self.host_live:
            return
        self.host_live[key] = storage.nbytes()
        self.refs[key] = weakref.ref(storage, lambda _r, key=key: self._forget_host(key))
        self.host_current += storage.nbytes()
        self.host_peak = max(self.host_peak, self.host_current)

    def _forget_host(self, key: int) -> None:
        self.host_current -= self.host_live.pop(key, 0)
        self.refs.pop(key, None)

    def _category_for_new(self) -> str:
        return {"forward": "activations", "backward": "temporaries", "optimizer": "temporaries",
                "setup": "other"}.get(self.phase, "other")

    def see(self, storage, func_name: str = "") -> None:
        key = storage._cdata
        nbytes = self._size(storage.nbytes())
        entry = self.live.get(key)
        if entry is not None:
            if entry.nbytes != nbytes:  # resized in place
                self.current += nbytes - entry.nbytes
                entry.nbytes = nbytes
            return
        module = self.module
        if self.phase == "backward" and not module:
            # Backward runs outside module hooks; the autograd node says which forward op it undoes.
            node = torch._C._current_autograd_node()
            module = f"autograd {node.name()}" if node is not None else ""
        where = f"{self.phase}:{module}:{func_name}"
        self.clock += 1
        entry = _Storage(nbytes, self._category_for_new(), self.phase, where, born=self.clock)
        self.live[key] = entry
        self.history.append(entry)
        self.refs[key] = weakref.ref(storage, lambda _r, key=key: self._forget(key))
        self.current += nbytes
        if self.allocator is not None:
            self._flush_releases()
            self.allocator.malloc(key, storage.nbytes(), where)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_at = self.clock
        key = (self.phase, func_name)
        if self.current > self.candidates.get(key, (-1,))[0]:
            self.candidates[key] = (self.current, self.clock, (self.phase, module, func_name))

    def enter(self, phase: str) -> None:
        """Start a phase of the step; its peak is at least what is live as it starts."""
        self.phase = phase
        key = (phase, "(start)")
        if self.current > self.candidates.get(key, (-1,))[0]:
            self.candidates[key] = (self.current, self.clock, (phase, self.module, "(start)"))

    def breakdown_at(self, at: int) -> dict[str, int]:
        return _breakdown_at(self.history, at)

    @property
    def peak_breakdown(self) -> dict[str, int]:
        return self.breakdown_at(self.peak_at)

    def relabel(self, tensors, category: str) -> None:
        """Give the storages behind ``tensors`` a category (gradients, optimizer states, ...)."""
        for storage in tensor_storages(tensors):
            if storage._cdata in self.host_live:
                continue
            self.see(storage)
            self.live[storage._cdata].category = category

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_at = self.clock
        self.candidates = {}
        self.history = list(self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            # Half of all calls in a DeepSpeed step are `tensor.device`; answer them without
            # a trip through the fake-tensor dispatcher, which allocates nothing for them anyway.
            return args[0].fake_device
        if func is torch.ops.aten._local_scalar_dense.default:
            # A value read back to Python: overflow flags, gradient norms, Adam's step count. Fake
            # tensors hold no values; the trace takes the healthy step: integer and boolean flags
            # are 0 (no inf/NaN, no overflow), floating-point values are 1 (norms, step counts).
            return 1.0 if args[0].dtype.is_floating_point else 0
        # Everything the trace touches is created inside it, so only outputs need looking at.
        out = func(*args, **kwargs)
        if self.separate_host:
            for tensor in (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    on_host = tensor.device.index is None
                    for storage in tensor_storages(tensor):
                        self._see_host(storage) if on_host else self.see(storage, func.__name__)
            return out
        for storage in tensor_storages(out):
            self.see(storage, func.__name__)
        return out


class TrainingWouldFail(RuntimeError):
    """The traced step raised inside FlagEmbedding/DeepSpeed/transformers: a real run would too."""


# ---- what to simulate ------------------------------------------------------------------------
@dataclass
class PredictSpec:
    """Everything the trace needs, from a TrainConfig (FlagEmbedding) or the CLI (HF Trainer)."""

    trainer: str = "flagembedding-m3"  # or "hf"
    model_config: object = None  # a transformers PretrainedConfig
    batch_size: int = 1
    # flagembedding-m3
    query_max_len: int = 512
    passage_max_len: int = 512
    train_group_size: int = 8
    unified_finetuning: bool = True
    use_self_distill: bool = False
    fix_encoder: bool = False
    negatives_cross_device: bool = False
    efficient_sparse_head: bool = False
    freeze_word_embeddings: bool = False
    grad_cache_chunk_size: int = 0  # 0: off
    # hf
    task: str = "sequence-classification"
    seq_len: int = 512
    num_labels: int = 2
    # both
    precision: str = "fp32"  # fp32, fp16, bf16
    optim: str = "adamw_torch"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    deepspeed: dict | None = None  # a DeepSpeed JSON as a dict, or None
    num_gpus: int = 1
    # ZeRO-0's gradient all-reduce chunk (elements); None: DeepSpeed's fixed 5e8. Shallow copies
    # get a smaller one (see _shallow_specs); it is not a DeepSpeed JSON setting.
    allreduce_bucket_size: int | None = None


def spec_from_config(config, model_config=None) -> PredictSpec:
    """The PredictSpec of a ``TrainConfig`` (the full-size BGE-M3 geometry unless told otherwise)."""
    return PredictSpec(
        trainer="flagembedding-m3", model_config=model_config or bge_m3_config(),
        batch_size=config.per_device_train_batch_size, query_max_len=config.query_max_len,
        passage_max_len=config.passage_max_len, train_group_size=config.train_group_size,
        unified_finetuning=config.unified_finetuning, use_self_distill=config.use_self_distill,
        fix_encoder=config.fix_encoder, negatives_cross_device=config.negatives_cross_device,
        efficient_sparse_head=config.efficient_sparse_head, freeze_word_embeddings=config.freeze_word_embeddings,
        grad_cache_chunk_size=config.grad_cache_chunk_size, optim=config.optim,
        precision="fp16" if config.fp16 else ("bf16" if config.bf16 else "fp32"),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        deepspeed=config.deepspeed_config() if config.deepspeed_config_file is None
        else _read_json(config.deepspeed_config_file),
        num_gpus=config.num_processes,
    )


def _read_json(path):
    import json

    return json.loads(Path(path).read_text())


def load_model_config(path: str | Path):
    """A transformers config from a config.json (or a folder holding one); no download."""
    from transformers import AutoConfig

    import json

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a model's config.json or the folder holding it.")
    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ValueError(f"{path} has no \"model_type\"; it does not look like a transformers config.json.")
    return AutoConfig.for_model(data.pop("model_type"), **data)


def bge_m3_config():
    from transformers import XLMRobertaConfig

    from m3lab.standin import BGE_M3_CONFIG

    return XLMRobertaConfig(**BGE_M3_CONFIG)


# ---- the report ------------------------------------------------------------------------------
@dataclass
class StepPeak:
    peak_allocated_bytes: int
    predicted_reserved_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    peak_module: str
    peak_op: str


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
        return data

    def save_snapshot(self, path: str | Path) -> None:
        """Write the simulated allocation trace as ``torch.cuda.memory._dump_snapshot`` would;
        drop the file on https://pytorch.org/memory_viz to see it."""
        import pickle

        from m3lab.io import write_bytes_atomic

        if self.snapshot is None:
            raise ValueError("this report has no trace; predict(..., record_events=True) records one")
        write_bytes_atomic(path, pickle.dumps(self.snapshot))


# ---- the trace ---------------------------------------------------------------------------------
def _sdpa_emulation(kernel: str):
    """F.scaled_dot_product_attention as the GPU runs it: the memory-efficient or flash kernel.

    Both keep only the output and a log-sum-exp per row for backward, never the (L x L) scores;
    on a fake CPU tensor PyTorch would pick a CPU kernel instead, so the trace calls the CUDA
    kernels' ATen ops directly (their shape functions run on fake tensors).
    """
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if kernel == "flash" and attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, query.requires_grad or key.requires_grad, dropout_p, is_causal,
            scale=scale)[0]
    return sdpa


@contextlib.contextmanager
def _simulation(gpu: GPU | None, kernel: str, rank: int, world: int, model_config, device: str = "cpu"):
    """Fake process group (rank of world), CPU DeepSpeed accelerator, GPU kernels; all undone after."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if dist.is_initialized():
        raise RuntimeError("m3lab.memory.predict needs a process without torch.distributed initialised; "
                           "call it from a notebook or script, not inside a training run.")
    saved_env = {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(LOCAL_RANK="0", RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29400")
    saved_accelerator = get_accelerator()
    accelerator = CPU_Accelerator()
    # The trace emulates a CUDA card's precision: let DeepSpeed build its fp16/bf16 optimizers.
    accelerator.is_fp16_supported = lambda: True
    accelerator.is_bf16_supported = lambda: True
    if device != "cpu":  # DeepSpeed's "GPU" tensors go to ``device``; what it offloads, to "cpu"
        accelerator.current_device_name = lambda: device
        accelerator.device_name = lambda device_index=None: device
    set_accelerator(accelerator)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    stack = contextlib.ExitStack()
    try:
        # DeepSpeed's offload (pinned buffers) and bitsandbytes (its CUDA stream) read tensors' data
        # pointers, which fake tensors warn about; no data is read, so the warning is noise here
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        # DeepSpeed 0.19's ZeRO partitioning still calls torch's old all-gather name; nothing to act on
        warnings.filterwarnings("ignore", ".*all_gather_into_tensor. is deprecated", FutureWarning)
        stack.enter_context(faster_dispatch())
        stack.enter_context(compat.no_shared_memory_comm())
        stack.enter_context(compat.no_padding_warning())
        stack.enter_context(compat.full_length_attention_masks(model_config))
        if gpu is not None:
            stack.enter_context(compat.gpu_attention_kernel(_sdpa_emulation(kernel)))
            # torch optimizers pick their foreach (multi-tensor) path for CUDA tensors and the
            # single-tensor path on CPU; their temporaries differ, so take the GPU's path, except
            # for what an offloaded optimizer keeps in host memory (plain "cpu" when offloading).
            def gpu_default(params, differentiable, use_fused=False):
                on_host = device != "cpu" and any(
                    isinstance(p, torch.Tensor) and p.device.index is None for p in params)
                return False, not differentiable and not on_host

            stack.enter_context(compat.optimizer_paths(gpu_default))
        yield
    finally:
        stack.close()
        dist.destroy_process_group()
        ds_comm.cdb = None
        importlib.reload(ds_groups)  # DeepSpeed caches its process groups in module globals
        set_accelerator(saved_accelerator)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _FakeTokenizer:
    """What EncoderOnlyEmbedderM3Model reads from its tokenizer: XLM-R's special token ids."""

    cls_token_id, pad_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3
    padding_side = "right"


def _build_m3_model(spec: PredictSpec):
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model
    from transformers import AutoModel

    encoder = AutoModel.from_config(spec.model_config, attn_implementation=spec.attn_implementation)
    # An encoder keeps no key/value cache in training; transformers 5 warns on every checkpointed
    # trace unless the config says so (no memory changes: the cache is only for decoders)
    encoder.config.use_cache = False
    hidden = spec.model_config.hidden_size
    parts = {"model": encoder, "colbert_linear": torch.nn.Linear(hidden, hidden),
             "sparse_linear": torch.nn.Linear(hidden, 1)}
    # The keyword arguments FlagEmbedding's runner passes (m3/runner.py), at the tutorial's values.
    model = EncoderOnlyEmbedderM3Model(
        parts, tokenizer=_FakeTokenizer(), negatives_cross_device=spec.negatives_cross_device,
        temperature=0.02, sub_batch_size=None, kd_loss_type="m3_kd_loss", sentence_pooling_method="cls",
        normalize_embeddings=True, unified_finetuning=spec.unified_finetuning,
        use_self_distill=spec.use_self_distill, self_distill_start_step=0)
    from m3lab.run_m3 import M3LabArguments, apply_levers

    apply_levers(model, M3LabArguments(efficient_sparse_head=spec.efficient_sparse_head,
                                       freeze_word_embeddings=spec.freeze_word_embeddings,
                                       grad_cache_chunk_size=spec.grad_cache_chunk_size))
    if spec.gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if spec.fix_encoder:
        for name, param in model.named_parameters():
            if "colbert_linear" not in name and "sparse_linear" not in name:
                param.requires_grad = False
    return model


def _m3_inputs(spec: PredictSpec):
    def features(rows, length):
        return {"input_ids": torch.ones(rows, length, dtype=torch.long),
                "attention_mask": torch.ones(rows, length, dtype=torch.long)}

    return {"queries": features(spec.batch_size, spec.query_max_len),
            "passages": features(spec.batch_size * spec.train_group_size, spec.passage_max_len),
            "teacher_scores": None, "no_in_batch_neg_flag": False}


def _module_hooks(model, trace: MemoryTrace):
    """Forward hooks that tell the trace which module is running (for 'where the peak happens')."""
    handles, stack = [], []

    def pre(name):
        def hook(module, args):
            stack.append(name)
            trace.module = name
        return hook

    def post(module, args, output):
        if stack:
            stack.pop()
        trace.module = stack[-1] if stack else ""

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post))
    return handles


def _deepspeed_buffers(engine) -> list:
    """DeepSpeed's own working buffers (the ZeRO gradient bucket), reported under "other"."""
    optimizer = engine.optimizer
    found = [t for t in getattr(optimizer, "ipg_buffer", None) or [] if isinstance(t, torch.Tensor)]
    for bucket in (getattr(optimizer, "ipg_buckets", None) or {}).values():  # DeepSpeed >= 0.17
        found += [t for t in getattr(bucket, "buffer", None) or [] if isinstance(t, torch.Tensor)]
    return found


def _grad_tensors(optimizer, model) -> list:
    found = [p.grad for p in model.parameters() if p.grad is not None]
    for name in ("averaged_gradients",):
        value = getattr(optimizer, name, None)
        if isinstance(value, dict):
            for item in value.values():
                found += [t for t in (item or []) if isinstance(t, torch.Tensor)]
    for group in getattr(optimizer, "single_partition_of_fp32_groups", []) or []:
        if group.grad is not None:
            found.append(group.grad)
    return found


def _fill_auto(ds: dict, spec: PredictSpec) -> dict:
    """Replace DeepSpeed's "auto" values as HF Trainer fills them from its defaults."""
    import copy

    hf = {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "gradient_clipping": 1.0,
          "train_micro_batch_size_per_gpu": spec.batch_size,
          "gradient_accumulation_steps": spec.gradient_accumulation_steps,
          "train_batch_size": spec.batch_size * spec.gradient_accumulation_steps * spec.num_gpus,
          "enabled": None}
    ds = copy.deepcopy(ds)

    def walk(node):
        for key, value in list(node.items()):
            if isinstance(value, dict):
                walk(value)
            elif value == "auto":
                if key == "enabled":
                    node[key] = False
                elif key in hf:
                    node[key] = hf[key]
                else:
                    del node[key]
    walk(ds)
    if "fp16" in ds and spec.precision == "fp16":
        ds["fp16"]["enabled"] = True
    if "bf16" in ds and spec.precision == "bf16":
        ds["bf16"]["enabled"] = True
    ds.setdefault("train_micro_batch_size_per_gpu", spec.batch_size)
    ds.setdefault("gradient_accumulation_steps", spec.gradient_accumulation_steps)
    ds.pop("scheduler", None)  # the learning-rate schedule holds no tensors
    return ds


class _DeepSpeedDriver:
    """A training step as HF Trainer runs it with DeepSpeed: the engine's forward, backward, step."""

    def __init__(self, model, spec: PredictSpec):
        import deepspeed

        model.to = lambda *args, **kwargs: model  # already on the (fake) CPU; DeepSpeed's .to() would swap
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=_fill_auto(spec.deepspeed or {}, spec))
        self.optimizer = self.engine.optimizer
        if spec.allreduce_bucket_size is not None:  # the engine passes its module constant as a default
            self.engine.allreduce_gradients = functools.partial(
                type(self.engine).allreduce_gradients, self.engine, bucket_size=spec.allreduce_bucket_size)

    def loss(self, inputs):
        return self.engine(**inputs).loss

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()

    def buffers(self):
        return _deepspeed_buffers(self.engine)


class _PlainDriver:
    """A training step as HF Trainer runs it without DeepSpeed: autocast and GradScaler for
    fp16/bf16 (weights stay fp32), gradient clipping at max_grad_norm 1.0, the chosen optimizer."""

    def __init__(self, model, spec: PredictSpec):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(spec.optim, self.params, model)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.precision)
        # CPU autocast stands in for CUDA autocast: both run matmuls and linears in half precision
        # and keep reductions (softmax, layer norm, losses) in fp32.
        self.autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler("cpu") if spec.precision == "fp16" else None

    def loss(self, inputs):
        with self.autocast():
            return self.model(**inputs).loss

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self):
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        # GradScaler.step() only skips the update when found_inf (a float flag, which the trace
        # cannot read) is set; the healthy step is the optimizer's own.
        self.optimizer.step()
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def buffers(self):
        return []


@functools.cache
def _bnb_quantization_maps() -> dict:
    """bitsandbytes' 8-bit quantization maps, built from real numbers (``.tolist()``), which fake
    tensors do not have; built once outside the trace and handed to the optimizer inside it."""
    import bitsandbytes.functional as bnb_functional

    return {signed: bnb_functional.create_dynamic_map(signed=signed) for signed in (True, False)}


def _bnb_adamw_8bit(params, model):
    """What HF Trainer builds for ``--optim adamw_bnb_8bit``: bitsandbytes' AdamW with optim_bits=8,
    and, as Trainer.create_optimizer does, 32-bit states for every nn.Embedding's weight (for BGE-M3
    the 256M-parameter word embeddings: 1.9 GiB of states instead of 0.5). Its update is one fused
    kernel per parameter, so the trace sees only its states: two uint8 moments, a shared 256-entry
    map each and one fp32 absmax per block of 256 values (fp32 moments under 4,096 values)."""
    from bitsandbytes.optim import AdamW, GlobalOptimManager

    maps = _bnb_quantization_maps()
    with compat.prebuilt_quantization_maps(maps):
        optimizer = AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, optim_bits=8,
                          is_paged=False)
    manager = GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


@contextlib.contextmanager
def _bnb_manager_restored():
    """bitsandbytes keeps HF's overrides in a process-wide manager, keyed by parameter id and by
    (group, index): the trace starts from an empty one, and its entries do not outlive it."""
    from bitsandbytes.optim import GlobalOptimManager

    manager = GlobalOptimManager.get_instance()
    saved = (list(manager.module_weight_config_triple), dict(manager.pid2config), dict(manager.index2config))
    manager.module_weight_config_triple.clear()
    manager.pid2config.clear()
    manager.index2config.clear()
    try:
        yield
    finally:
        manager.module_weight_config_triple[:] = saved[0]
        manager.pid2config.clear()
        manager.pid2config.update(saved[1])
        manager.index2config.clear()
        manager.index2config.update(saved[2])


def _make_optimizer(name: str, params, model):
    """The optimizer HF Trainer builds for ``--optim NAME`` (lr does not affect memory)."""
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-5)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False)
    if name == "adamw_bnb_8bit":
        return _bnb_adamw_8bit(params, model)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _build_hf_model(spec: PredictSpec):
    from transformers import AutoModelForSequenceClassification

    if spec.task != "sequence-classification":
        raise ValueError(f"task {spec.task!r} is not modelled; use sequence-classification")
    config = spec.model_config
    config.num_labels = spec.num_labels
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=spec.attn_implementation)
    model.config.use_cache = False  # as in _build_m3_model
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inputs = {"input_ids": torch.ones(spec.batch_size, spec.seq_len, dtype=torch.long),
              "attention_mask": torch.ones(spec.batch_size, spec.seq_len, dtype=torch.long),
              "labels": torch.zeros(spec.batch_size, dtype=torch.long)}
    return model, inputs


def _import_lazy_modules(model_config) -> None:
    """Import now what the step imports lazily, so that a fresh process (a worker, the CLI) traces
    what a warm one does: the simulation patches transformers' mask helper only in modeling
    modules already imported, and modules that build constant tensors on import (peft's, via
    FlagEmbedding) would otherwise have them counted once, in the first trace of a process."""
    saved = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"  # the trace's accelerator; not left set for training runs
    try:
        import deepspeed  # noqa: F401
        import FlagEmbedding.finetune.embedder.encoder_only.m3.modeling  # noqa: F401
        import peft  # noqa: F401
        from transformers import AutoModel

        AutoModel._model_mapping[type(model_config)]
    finally:
        if saved is None:
            os.environ.pop("DS_ACCELERATOR", None)
        else:
            os.environ["DS_ACCELERATOR"] = saved


# With optimizer offload, the trace's stand-in for the GPU: a CPU device with an index, which fake
# tensors keep apart from plain "cpu" (DeepSpeed's host side) and refuse to mix, as CUDA would.
GPU_DEVICE = "cpu:0"


def _default_device(device: str):
    """Where tensors created without a device go during the trace. ``torch.device`` as a context
    adds a Python hook to every torch call (a tenth of a trace's time), so it is used only when the
    default is not already ``device``."""
    return contextlib.nullcontext() if torch.get_default_device() == torch.device(device) else torch.device(device)


def _offloads(spec: PredictSpec) -> bool:
    zero = (spec.deepspeed or {}).get("zero_optimization", {})
    return (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu"


def _simulate_rank(spec: PredictSpec, gpu: GPU | None, rank: int, record_events: bool = False):
    """Two training steps of one rank on fake tensors; returns (first, steady, model states, trace)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from m3lab.measure import fp32_master_tensors, optimizer_state_tensors

    half = spec.precision in ("fp16", "bf16")
    kernel = gpu.sdpa_kernel(half) if gpu is not None else "cpu"
    capacity = gpu.usable_bytes - gpu.context_bytes if gpu is not None else None
    _import_lazy_modules(spec.model_config)
    if spec.optim == "adamw_bnb_8bit":
        _bnb_quantization_maps()
    offload = _offloads(spec)
    trace = MemoryTrace(rounding=gpu is not None, record_events=record_events, capacity=capacity,
                        separate_host=offload)
    device = GPU_DEVICE if offload else "cpu"
    steps: list[StepPeak] = []
    bnb = _bnb_manager_restored() if spec.optim == "adamw_bnb_8bit" else contextlib.nullcontext()
    with _simulation(gpu, kernel, rank, spec.num_gpus, spec.model_config, device), bnb, FakeTensorMode(allow_non_fake_inputs=True), \
            _default_device(device), trace:
        if spec.trainer == "flagembedding-m3":
            model, inputs = _build_m3_model(spec), _m3_inputs(spec)
        else:
            model, inputs = _build_hf_model(spec)
        trace.relabel(list(model.parameters()), "weights")
        driver = (_DeepSpeedDriver if spec.deepspeed is not None else _PlainDriver)(model, spec)
        trace.relabel(list(model.parameters()), "weights")

        def label_states():
            states = optimizer_state_tensors(driver.optimizer) + fp32_master_tensors(driver.optimizer)
            trace.relabel(states, "optimizer_states")

        label_states()
        trace.relabel(tree_flatten(inputs)[0], "other")
        handles = _module_hooks(model, trace)

        def label_gradient(param):
            # A gradient is labelled the moment autograd stores it; DeepSpeed's gradient bucket,
            # created at the first gradient and gone by the step, is labelled as soon as it exists.
            trace.relabel([param.grad] if param.grad is not None else [], "gradients")
            trace.relabel(driver.buffers(), "other")

        for param in model.parameters():
            if param.requires_grad:
                handles.append(param.register_post_accumulate_grad_hook(label_gradient))
        try:
            for _ in range(2):
                trace.reset_peak()
                for _ in range(spec.gradient_accumulation_steps):
                    trace.enter("forward")
                    loss = driver.loss(inputs)
                    trace.module = ""
                    trace.enter("backward")
                    driver.backward(loss)
                    del loss
                    trace.relabel(_grad_tensors(driver.optimizer, model), "gradients")
                trace.enter("optimizer")
                driver.step()
                label_states()
                reserved = trace.allocator.peak_reserved if trace.allocator else trace.peak
                steps.append(_StepTrace(dict(trace.candidates), list(trace.history), reserved))
                trace.phase = "between steps"
        finally:
            for handle in handles:
                handle.remove()
        model_states = {"weights": sum(e.nbytes for e in trace.live.values() if e.category == "weights"),
                        "optimizer_states": sum(e.nbytes for e in trace.live.values()
                                                if e.category == "optimizer_states"),
                        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                        # offloaded: fp32 masters and Adam states in host memory, and the host's peak
                        "offloaded_optimizer_states": sum(
                            storage.nbytes() for storage in {s._cdata: s for s in tensor_storages(
                                optimizer_state_tensors(driver.optimizer) + fp32_master_tensors(driver.optimizer))
                            }.values() if storage._cdata in trace.host_live),
                        "host_peak_bytes": trace.host_peak}
    return steps[0], steps[1], model_states, trace, kernel


@dataclass
class _StepTrace:
    """What one traced step leaves: its peak candidates and the storages it saw."""

    candidates: dict[tuple[str, str], tuple]
    history: list
    reserved: int

    def top(self) -> tuple[str, str]:
        return max(self.candidates, key=lambda key: self.candidates[key][0])

    def peak(self, key=None) -> StepPeak:
        value, at, where = self.candidates[key or self.top()]
        return StepPeak(value, self.reserved, _breakdown_at(self.history, at), *where)


def _overall(step: _StepTrace) -> StepPeak:
    return step.peak()


# Extrapolating from shallow copies of the model: layers are identical, so every figure of a
# step (each category at the peak, the peak itself) grows by the same bytes per layer, as long as
# the peak stays at the same point of the step. DeepSpeed breaks that when its gradient buckets
# fill up part-way through backward, so those configurations are always traced in full.
EXTRAPOLATE_FROM = (2, 3)
DEEPSPEED_ALLREDUCE_BUCKET = 500_000_000  # stage 0's gradient all-reduce buffer (elements)
# Within this of the card's limit, the verdict rests on the caching allocator's share, which is
# simulated (full traces) or carried over from the 3-layer trace (extrapolation): say so.
NEAR_THE_LIMIT = int(1.0 * GIB)


def _with_layers(spec: PredictSpec, layers: int) -> PredictSpec:
    import copy

    model_config = copy.deepcopy(spec.model_config)
    model_config.num_hidden_layers = layers
    return PredictSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "model_config": model_config})


def _shallow_specs(spec: PredictSpec) -> list[PredictSpec] | None:
    """The two shallow copies (n and n+1 layers) to trace for extrapolation, or None when only a
    full trace will do.

    DeepSpeed copies gradients into buckets (ZeRO-1/2: ``reduce_bucket_size`` elements) and
    empties one when the next gradient does not fit. When the model has more trainable
    parameters than a bucket holds, where it empties depends on depth, so each shallow copy gets
    a bucket smaller by exactly the parameters it lacks: it then empties before the same tensor
    as the full model, and its bucket (a buffer of that many elements) grows with depth as the
    rest does. A shrunken bucket must still hold the largest gradient, or DeepSpeed would pass
    that one around the bucket (BGE-M3's 256M-element word embeddings): the copies are made deep
    enough for that (5 and 6 layers for BGE-M3 with a 5e8 bucket). ZeRO-0 on several GPUs
    all-reduces after backward in chunks of a fixed 5e8 elements, in parameter order, each chunk
    closing after the gradient that takes it past the limit; shallow copies get a chunk smaller by
    the parameters they lack, deep enough that it still closes inside a layer (6 and 7 layers for
    BGE-M3).
    """
    shallow = [_with_layers(spec, n) for n in EXTRAPOLATE_FROM]
    if spec.deepspeed is None:
        return shallow
    zero = spec.deepspeed.get("zero_optimization", {})
    trainable, largest = _trainable_params(spec)
    layers = spec.model_config.num_hidden_layers
    if zero.get("stage", 0) == 0:
        chunk = spec.allreduce_bucket_size or DEEPSPEED_ALLREDUCE_BUCKET
        if spec.num_gpus == 1 or trainable <= chunk:
            return shallow  # one GPU reduces nothing; a model within one chunk reduces in one piece
        return _shallow_allreduce_chunks(spec, chunk, trainable, layers)
    buckets = {key: int(zero.get(key, 500_000_000)) for key in ("reduce_bucket_size", "allgather_bucket_size")}
    if trainable <= min(buckets.values()):
        return shallow
    per_layer = _trainable_params(shallow[1])[0] - _trainable_params(shallow[0])[0]
    for depth in range(EXTRAPOLATE_FROM[0], layers - 2):
        # allgather_bucket_size must stay a multiple of 2 (DeepSpeed's NCCL alignment)
        scaled = [{key: (size - (layers - n) * per_layer) // 2 * 2 for key, size in buckets.items()}
                  for n in (depth, depth + 1)]
        if min(scaled[0].values()) >= largest:
            shallow = [_with_layers(spec, n) for n in (depth, depth + 1)]
            for copy, sizes in zip(shallow, scaled):
                copy.deepspeed = {**spec.deepspeed, "zero_optimization": {**zero, **sizes}}
            return shallow
    return None


def _shallow_allreduce_chunks(spec: PredictSpec, chunk: int, trainable: int, layers: int):
    """Shallow copies for ZeRO-0 on several GPUs with a model bigger than one all-reduce chunk:
    chunk n is smaller by the (layers - n) layers copy n lacks, so the first chunk closes at the
    same gradient counted from the end; it must close inside a layer (past the embeddings) and the
    rest must fit in one more chunk, or only a full trace will do."""
    before_layers, per_layer = _trainable_params_before_layers(spec)
    for depth in range(EXTRAPOLATE_FROM[0], layers - 2):
        scaled = [chunk - (layers - n) * per_layer for n in (depth, depth + 1)]
        if scaled[0] > before_layers and trainable - chunk < scaled[0]:
            shallow = [_with_layers(spec, n) for n in (depth, depth + 1)]
            for copy, size in zip(shallow, scaled):
                copy.allreduce_bucket_size = size
            return shallow
    return None


def _trainable_params_before_layers(spec: PredictSpec) -> tuple[int, int]:
    """(trainable parameters before the first encoder layer, in parameter order; those of one layer)."""
    before, per_layer, seen_layer = 0, 0, False
    for name, param in _meta_model(spec).named_parameters():
        if not param.requires_grad:
            continue
        if ".layer.0." in f".{name}":
            seen_layer = True
            per_layer += param.numel()
        elif not seen_layer:
            before += param.numel()
    return before, per_layer


def _meta_model(spec: PredictSpec):
    """The model ``spec`` trains, on the meta device (parameters without memory), for counting."""
    import dataclasses

    spec = dataclasses.replace(spec, negatives_cross_device=False)  # needs a process group; adds no parameters
    with torch.device("meta"):
        return _build_m3_model(spec) if spec.trainer == "flagembedding-m3" else _build_hf_model(spec)[0]


def _trainable_params(spec: PredictSpec) -> tuple[int, int]:
    """(trainable parameters, elements of the largest one), counted on the meta device."""
    sizes = [p.numel() for p in _meta_model(spec).parameters() if p.requires_grad]
    return sum(sizes), max(sizes, default=0)


def _line(a: int, b: int, steps: int) -> int:
    return a + steps * (b - a)


def _extrapolate_step(a: StepPeak, b: StepPeak, steps: int, layers: int, cached: int,
                      capacity: int | None) -> StepPeak:
    """One phase's peak at full depth from its peaks at the two shallow depths."""
    module = b.peak_module
    last = layers - steps  # the deeper copy's last layer
    if f"layer.{last}." in module + ".":  # the last layer of the shallow copy is the model's last
        module = module.replace(f"layer.{last}", f"layer.{layers - 1}")
    peak = _line(a.peak_allocated_bytes, b.peak_allocated_bytes, steps)
    # The allocator's cache is not linear in depth: take the cached-but-unused bytes of the
    # deeper copy (``cached``) as they are, and, as the allocator empties its cache before it
    # gives up, no more than the card holds while the live tensors themselves fit.
    reserved = peak + cached
    if capacity is not None and peak <= capacity:
        reserved = min(reserved, capacity)
    return StepPeak(peak, reserved,
                    {k: _line(a.breakdown[k], b.breakdown[k], steps) for k in a.breakdown},
                    b.peak_phase, module, b.peak_op)


def _shallow_trace(spec: PredictSpec, profile: GPU | None, rank: int):
    """One rank's two steps of a shallow copy, without the trace object (it cannot be pickled)."""
    first, steady, states, _trace, kernel = _simulate_rank(spec, profile, rank)
    return first, steady, states, None, kernel


_POOL = None


def _worker_pool():
    """Worker processes that trace shallow copies side by side (two on a 2-core machine).

    Started on the first call that needs them (each imports torch, DeepSpeed and FlagEmbedding
    once, a few seconds) and kept for the life of the process, so later predictions reuse them.
    ``M3LAB_PREDICT_WORKERS=0`` traces everything in this process instead.
    """
    global _POOL
    workers = int(os.environ.get("M3LAB_PREDICT_WORKERS", min(2, os.cpu_count() or 1)))
    if workers < 2:
        return None
    if _POOL is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent may hold threads (OpenMP, Jupyter) that a fork would break
        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_worker_started)
    return _POOL


def _worker_started() -> None:
    import signal

    # What DeepSpeed prints in a worker goes to stderr: the caller's stdout may be a JSON object.
    os.dup2(2, 1)
    # Ctrl-C (or Jupyter's interrupt, sent to the whole process group) is the caller's to handle;
    # a worker ends when the caller closes the pool or exits (its end of the queue then closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned workers re-run the parent's script unless it is guarded by ``if __name__ ==
    "__main__"``; they need only m3lab, so a plain script that calls predict() is hidden from them."""
    import types

    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _trace_shallow_copies(jobs: list[tuple]) -> list[tuple]:
    """``_shallow_trace`` for each (spec, profile, rank) job, in the worker pool when there is one."""
    global _POOL
    pool = _worker_pool() if len(jobs) > 1 else None
    if pool is None:
        return [_shallow_trace(*job) for job in jobs]
    from concurrent.futures.process import BrokenProcessPool

    try:
        with _main_module_hidden():
            futures = [pool.submit(_shallow_trace, *job) for job in jobs]  # starts the workers
        return [future.result() for future in futures]
    except BrokenProcessPool:  # a worker died (killed, out of host memory): start afresh next time
        _POOL = None
        return [_shallow_trace(*job) for job in jobs]


def _extrapolate_rank(spec: PredictSpec, depth: int, profile: GPU | None, small: list[tuple]):
    """(first, steady, model states, None, kernel) at full depth from the traces of the copies
    with ``depth`` and ``depth + 1`` layers, or None when the peak does not sit at the same
    point of the step in both copies."""
    layers = spec.model_config.num_hidden_layers
    steps = layers - depth
    # Each candidate peak (an operation of a phase) is linear in depth; the step's peak is
    # the highest candidate at full depth, which need not be the highest in the shallow copies.
    (a1, a2, a_states, _, kernel), (b1, b2, b_states, _, _) = small
    capacity = profile.usable_bytes - profile.context_bytes if profile else None

    def extrapolate(a: _StepTrace, b: _StepTrace) -> StepPeak | None:
        common = a.candidates.keys() & b.candidates.keys()
        if b.top() not in common:
            return None
        key = max(common, key=lambda k: _line(a.candidates[k][0], b.candidates[k][0], steps))
        b_top = b.peak()
        cached = max(0, b_top.predicted_reserved_bytes - b_top.peak_allocated_bytes)
        return _extrapolate_step(a.peak(key), b.peak(key), steps, layers, cached, capacity)

    first, steady = extrapolate(a1, b1), extrapolate(a2, b2)
    if first is None or steady is None:
        return None
    states = {k: _line(a_states[k], b_states[k], steps) for k in a_states}
    return first, steady, states, None, kernel


def _full_trace(spec: PredictSpec, profile: GPU | None, rank: int, record_events: bool):
    first, steady, states, trace, kernel = _simulate_rank(spec, profile, rank, record_events)
    return _overall(first), _overall(steady), states, trace, kernel


def _method(spec: PredictSpec, shallow: list[PredictSpec] | None, extrapolated: bool) -> str:
    if not extrapolated:
        return "full trace"
    depth = shallow[0].model_config.num_hidden_layers
    text = f"extrapolated from {depth}- and {depth + 1}-layer traces"
    if shallow[0].deepspeed != spec.deepspeed:
        text += " with DeepSpeed's gradient buckets shrunk by the parameters each copy lacks"
    if shallow[0].allreduce_bucket_size != spec.allreduce_bucket_size:
        text += " with DeepSpeed's all-reduce chunks shrunk by the parameters each copy lacks"
    return text


def predict(config=None, gpu: str | None = "t4", *, spec: PredictSpec | None = None,
            record_events: bool = False, exact: bool = False) -> MemoryReport:
    """Predict the peak memory of one training step of ``config`` on ``gpu`` ("t4", "l4", ...).

    ``gpu=None`` predicts live tensor bytes on a CPU (no allocator rounding, CPU kernels): the
    figure that a real CPU run of the same configuration measures, which the tests compare.
    Deep models are traced at 2 and 3 layers and extrapolated (exact when the peak sits at the
    same point of the step, which the tests check against full traces); ``exact=True``, a
    snapshot, or DeepSpeed buckets smaller than the model trace every layer.
    """
    started = time.perf_counter()
    spec = spec or spec_from_config(config)
    profile = gpu_profile(gpu) if gpu is not None else None
    world = spec.num_gpus
    # ZeRO-1/2 ranks differ only in the last partition's padding; without partitioning (ZeRO-0)
    # every rank runs the same step on the same shapes, so rank 0 stands for all
    stage = ((spec.deepspeed or {}).get("zero_optimization") or {}).get("stage", 0)
    ranks = sorted({0, world - 1}) if spec.deepspeed is not None and stage >= 1 else [0]
    layers = getattr(spec.model_config, "num_hidden_layers", 0)
    deep = layers > EXTRAPOLATE_FROM[1] + 1
    shallow = _shallow_specs(spec) if deep and not exact and not record_events else None
    per_rank = []
    snapshot = None
    extrapolated = False
    try:
        # The traced step is the real code; when DeepSpeed's own checks fail here, a real run
        # fails the same way (e.g. ZeRO-2 + gradient checkpointing with the M3 model).
        small = _trace_shallow_copies([(copy, profile, rank) for rank in ranks for copy in shallow]) if shallow else []
        results = {}
        for index, rank in enumerate(ranks):
            pair = small[index * 2:(index + 1) * 2]
            depth = shallow[0].model_config.num_hidden_layers if shallow else 0
            results[rank] = (_extrapolate_rank(spec, depth, profile, pair) if pair else None) or \
                _full_trace(spec, profile, rank, record_events)
    except AssertionError as error:
        raise TrainingWouldFail(f"this configuration fails in the training code itself, as a real run "
                                f"would: {str(error).split(chr(10))[0][:400]}") from error
    for rank in ranks:
        first, steady, model_states, trace, kernel = results[rank]
        extrapolated = extrapolated or trace is None
        if record_events and rank == 0 and trace is not None and trace.allocator is not None:
            snapshot = trace.allocator_snapshot()
        worst = max((first, steady), key=lambda s: s.peak_allocated_bytes)
        context = profile.context_bytes if profile else 0
        reserved = max(first.predicted_reserved_bytes, steady.predicted_reserved_bytes)
        usable = profile.usable_bytes if profile else 0
        total = reserved + context
        per_rank.append(RankPrediction(
            peak_allocated_bytes=worst.peak_allocated_bytes, predicted_reserved_bytes=reserved,
            context_bytes=context, total_bytes=total, usable_bytes=usable,
            fits=total <= usable if profile else True, breakdown=worst.breakdown, peak_phase=worst.peak_phase,
            peak_module=worst.peak_module, peak_op=worst.peak_op, rank=rank, first_step=first, steady_step=steady,
            model_state_bytes=model_states))
    traced = {prediction.rank: prediction for prediction in per_rank}
    per_rank = [traced.get(r) or RankPrediction(**{**asdict(traced[0]), "rank": r, "first_step": traced[0].first_step,
                                                 "steady_step": traced[0].steady_step})
                for r in range(world)]  # the ranks not traced hold exactly what rank 0 holds
    top = max(per_rank, key=lambda r: r.total_bytes)
    provenance = f"predicted for {profile.name}" if profile else "predicted live tensor bytes on CPU"
    return MemoryReport(
        gpu=profile.key if profile else "cpu", provenance=provenance,
        peak_allocated_bytes=top.peak_allocated_bytes, predicted_reserved_bytes=top.predicted_reserved_bytes,
        context_bytes=top.context_bytes, total_bytes=top.total_bytes, usable_bytes=top.usable_bytes,
        fits=top.fits, breakdown=top.breakdown, peak_phase=top.peak_phase, peak_module=top.peak_module,
        peak_op=top.peak_op, first_step_peak_bytes=top.first_step.peak_allocated_bytes,
        steady_step_peak_bytes=top.steady_step.peak_allocated_bytes, per_rank=per_rank,
        attention_kernel=kernel, seconds=time.perf_counter() - started, extrapolated=extrapolated,
        method=_method(spec, shallow, extrapolated),
        spec={k: v for k, v in asdict(spec).items() if k != "model_config"}, snapshot=snapshot)

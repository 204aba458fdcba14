"""The CUDA caching allocator, simulated under the card's limit: how PyTorch rounds requests, opens
segments, splits and merges blocks, and what it gives back before it raises out-of-memory.

Names and rules follow c10/cuda/CUDACachingAllocator.cpp (``DeviceCachingAllocator::malloc``,
``get_free_block``, ``alloc_block``, ``release_available_cached_blocks``, ``release_cached_blocks``,
``should_split``, ``free_block``) with PyTorch's defaults: no expandable segments, no
``max_split_size_mb``, no garbage-collection threshold, one stream.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# The constants of CUDACachingAllocator.cpp, under their names there.
kMinBlockSize = 512  # every request is rounded up to a multiple of this
kSmallSize = 1 << 20  # requests up to 1 MiB go to the small pool
kSmallBuffer = 2 << 20  # a small-pool segment is 2 MiB
kLargeBuffer = 20 << 20  # a large-pool request under kMinLargeAlloc opens a 20 MiB segment
kMinLargeAlloc = 10 << 20
kRoundLarge = 2 << 20  # larger requests open a segment of their own size, rounded up to 2 MiB


def allocator_round(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``nbytes`` (``round_size``)."""
    if nbytes <= 0:
        return 0
    return ((nbytes + kMinBlockSize - 1) // kMinBlockSize) * kMinBlockSize


def segment_size(rounded: int) -> int:
    """Size of the cudaMalloc segment opened for a block the cache cannot serve (``get_allocation_size``)."""
    if rounded <= kSmallSize:
        return kSmallBuffer
    if rounded < kMinLargeAlloc:
        return kLargeBuffer
    return ((rounded + kRoundLarge - 1) // kRoundLarge) * kRoundLarge


@dataclass(eq=False)
class Segment:
    """One cudaMalloc: ``live`` counts the blocks of it that tensors hold."""

    address: int
    size: int
    small: bool
    live: int = 0


@dataclass(eq=False)
class Block:
    """A piece of a segment: held by the storage ``key``, or cached (``key`` None). ``prev`` and
    ``next`` are its neighbours in the segment, as in PyTorch's Block."""

    segment: Segment
    address: int
    size: int
    key: int | None = None
    prev: Block | None = None
    next: Block | None = None

    @property
    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


@dataclass(frozen=True)
class OutOfMemory:
    """The first request the card could not hold, in the terms of PyTorch's OutOfMemoryError."""

    requested_bytes: int  # the segment cudaMalloc was asked for ("Tried to allocate")
    limit_bytes: int  # what the allocator could hold
    allocated_bytes: int  # held by tensors when it failed ("allocated by PyTorch")
    reserved_bytes: int  # held by the allocator after giving back what it could
    where: str  # "phase:module:operation"
    step: int = 0  # the training step it happened in (1 or 2); 0: before the first

    @property
    def short_by_bytes(self) -> int:
        return self.reserved_bytes + self.requested_bytes - self.limit_bytes

    @property
    def unallocated_bytes(self) -> int:
        """"Reserved by PyTorch but unallocated": free pieces of segments that tensors still hold
        (fragmentation), which no release can give back."""
        return self.reserved_bytes - self.allocated_bytes


@dataclass
class _Pool:
    """Cached blocks of one pool, ordered as PyTorch's BlockComparatorSize: by size, then address."""

    order: list[tuple[int, int]] = field(default_factory=list)
    blocks: dict[int, Block] = field(default_factory=dict)  # address -> block

    def add(self, block: Block) -> None:
        bisect.insort(self.order, (block.size, block.address))
        self.blocks[block.address] = block

    def remove(self, block: Block) -> None:
        del self.order[bisect.bisect_left(self.order, (block.size, block.address))]
        del self.blocks[block.address]

    def best_fit(self, size: int) -> Block | None:
        """``get_free_block``: the smallest cached block that holds ``size``, the lowest address first."""
        index = bisect.bisect_left(self.order, (size, 0))
        if index == len(self.order):
            return None
        block = self.blocks[self.order[index][1]]
        self.remove(block)
        return block


class Allocator:
    """The caching allocator of one device and one stream, with ``limit_bytes`` as its limit
    (the card's memory less what lies outside the allocator; None: unlimited).

    A request is served best-fit from the cached blocks of its pool; failing that, a segment is
    opened; if that would pass the limit, the allocator gives back its cached segments and tries
    again, as PyTorch does before raising out-of-memory. The first request that still does not fit
    is kept in ``out_of_memory``; the segment is opened all the same, beyond the limit, so that the
    rest of the step can be traced, with the limit grown to just what that request needs.

    ``held``: the segments that hold at least one tensor, which no release can give back; its
    peak (the segment a request opens counted) is what the step needs of the card: under the limit,
    and past an out-of-memory, the smallest limit this run of requests would have fitted.
    """

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = limit_bytes  # grows past an out-of-memory, see the class docstring
        self.out_of_memory: OutOfMemory | None = None
        self.allocated = 0
        self.reserved = 0
        self.held = 0
        self.peak_reserved = 0
        self.peak_held = 0
        self.retries = 0  # requests served only after the cache was given back
        self.pools = {True: _Pool(), False: _Pool()}  # small pool, large pool
        self.blocks: dict[int, Block] = {}  # key -> the block it holds
        self.segments: list[Segment] = []  # in address order
        self._next_address = 1 << 32
        self.events: list[dict] | None = None  # torch.cuda.memory._snapshot() trace entries
        self._clock = 0

    def reset_peaks(self) -> None:
        """As ``torch.cuda.reset_peak_memory_stats``."""
        self.peak_reserved = self.reserved
        self.peak_held = self.held

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
        small = size <= kSmallSize
        block = self.pools[small].best_fit(size)
        if block is None:
            block = self._new_segment(size, small, where)
        self._hand_out(block, size, key, where)

    def _new_segment(self, size: int, small: bool, where: str) -> Block:
        """``alloc_block``, and when it fails the two releases and retries of ``malloc``."""
        request = segment_size(size)
        if not self._alloc_block_fits(request):
            # release_available_cached_blocks frees oversize blocks only; with no max_split_size
            # there are none, so it returns false at once: release_cached_blocks and retry
            self.retries += 1
            self._release_cached_blocks()
            if not self._alloc_block_fits(request):
                if self.out_of_memory is None:
                    self.out_of_memory = OutOfMemory(request, self.limit_bytes, self.allocated, self.reserved, where)
                    self._event("oom", 0, request, where)
                # traced on as if the card were just big enough: the limit grows to what this request
                # needs, so the step's peak of held segments is what a card would need to run it
                self.limit_bytes = self.reserved + request
        segment = Segment(self._next_address, request, small)
        self._next_address += request
        self.segments.append(segment)
        self.reserved += request
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self._event("segment_alloc", segment.address, request)
        return Block(segment, segment.address, request)

    def _alloc_block_fits(self, request: int) -> bool:
        return self.limit_bytes is None or self.reserved + request <= self.limit_bytes

    def _hand_out(self, block: Block, size: int, key: int, where: str) -> None:
        """``alloc_found_block``: split off the remainder when ``should_split`` says so."""
        remaining = block.size - size
        if (remaining >= kMinBlockSize) if block.segment.small else (remaining > kSmallSize):
            rest = Block(block.segment, block.address + size, remaining, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self.pools[block.segment.small].add(rest)
        block.key = key
        self.blocks[key] = block
        self.allocated += block.size
        segment = block.segment
        segment.live += 1
        if segment.live == 1:
            self.held += segment.size
            self.peak_held = max(self.peak_held, self.held)
        self._event("alloc", block.address, block.size, where)

    def release(self, key: int) -> None:
        """``free_block``: the block goes back to its pool, merged with cached neighbours."""
        block = self.blocks.pop(key, None)
        if block is None:
            return
        self._event("free_requested", block.address, block.size)
        self._event("free_completed", block.address, block.size)
        self.allocated -= block.size
        block.key = None
        segment = block.segment
        segment.live -= 1
        if segment.live == 0:
            self.held -= segment.size
        pool = self.pools[segment.small]
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.key is None:
                pool.remove(neighbour)
                self._merge(block, neighbour)
        pool.add(block)

    @staticmethod
    def _merge(block: Block, neighbour: Block) -> None:
        """``try_merge_blocks``: ``block`` takes in its free neighbour."""
        if neighbour is block.prev:
            block.address = neighbour.address
            block.prev = neighbour.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = neighbour.next
            if block.next is not None:
                block.next.prev = block
        block.size += neighbour.size

    def _release_cached_blocks(self) -> None:
        """``release_cached_blocks``: every cached block that is a whole segment goes back to CUDA."""
        for small in (False, True):  # release_blocks(large_blocks), then release_blocks(small_blocks)
            pool = self.pools[small]
            for block in [b for b in pool.blocks.values() if not b.is_split]:
                pool.remove(block)
                self.reserved -= block.size
                self.segments.remove(block.segment)
                self._event("segment_free", block.address, block.size)

    def snapshot(self) -> dict:
        """The allocator state and trace in ``torch.cuda.memory._snapshot()``'s format."""
        segments = []
        for segment in self.segments:
            blocks, block = [], self._first_block(segment)
            while block is not None:
                blocks.append({"address": block.address, "size": block.size, "requested_size": block.size,
                               "state": "inactive" if block.key is None else "active_allocated", "frames": []})
                block = block.next
            used = sum(b["size"] for b in blocks if b["state"] != "inactive")
            segments.append({"device": 0, "address": segment.address, "total_size": segment.size,
                             "allocated_size": used, "active_size": used, "requested_size": used, "stream": 0,
                             "segment_type": "small" if segment.small else "large", "segment_pool_id": [0, 0],
                             "is_expandable": False, "frames": [], "blocks": blocks})
        return {"segments": segments, "device_traces": [list(self.events or [])],
                "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "m3lab simulation"}}

    def _first_block(self, segment: Segment) -> Block:
        candidates = [b for b in self.blocks.values() if b.segment is segment]
        candidates += [b for pool in self.pools.values() for b in pool.blocks.values() if b.segment is segment]
        block = min(candidates, key=lambda b: b.address)
        while block.prev is not None:
            block = block.prev
        return block

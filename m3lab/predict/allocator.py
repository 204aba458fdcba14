"""The CUDA caching allocator, simulated: how PyTorch rounds requests, opens segments and splits blocks.

Names and rules follow c10/cuda/CUDACachingAllocator.cpp (``round_size``, ``get_allocation_size``,
``should_split``), with no expandable segments, no ``max_split_size_mb`` and one stream.
"""

from __future__ import annotations

# The constants of CUDACachingAllocator.cpp, under their names there.
kMinBlockSize = 512  # every request is rounded up to a multiple of this
kSmallSize = 1 << 20  # requests up to 1 MiB go to the small pool
kSmallBuffer = 2 << 20  # a small-pool segment is 2 MiB
kLargeBuffer = 20 << 20  # a large-pool request under kMinLargeAlloc opens a 20 MiB segment
kMinLargeAlloc = 10 << 20
kRoundLarge = 2 << 20  # larger requests open a segment of their own size, rounded up to 2 MiB


def allocator_round(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``nbytes`` (multiples of 512)."""
    if nbytes <= 0:
        return 0
    return ((nbytes + kMinBlockSize - 1) // kMinBlockSize) * kMinBlockSize


def segment_size(rounded: int) -> int:
    """Size of the cudaMalloc segment the allocator opens for a block it cannot serve from cache."""
    if rounded <= kSmallSize:
        return kSmallBuffer
    if rounded < kMinLargeAlloc:
        return kLargeBuffer
    return ((rounded + kRoundLarge - 1) // kRoundLarge) * kRoundLarge


class Allocator:
    """A simplified CUDA caching allocator: segments are opened, split, cached and never returned.

    Blocks are served best-fit from the free blocks of their pool (ties to the lowest address);
    a large free block is split when more than 1 MiB would be left, a small one when at least
    512 B would be (``should_split``), and neighbours in a segment merge again when freed. This is how the real allocator behaves in the common case;
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
        small = size <= kSmallSize
        pool = self.free[small]
        best = None
        for i, (free_size, segment, offset) in enumerate(pool):
            # best fit, as the allocator's default (no max_split_size) does; its free blocks are
            # ordered by (size, address), and segments here are numbered in address order
            if free_size >= size and (best is None or (free_size, segment, offset) < tuple(pool[best])):
                best = i
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
        parts = self.segments[seg]
        index = next(i for i, part in enumerate(parts) if part[0] == off)
        if (remaining >= kMinBlockSize) if small else (remaining > kSmallSize):  # should_split
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


"""A replay of PyTorch's CUDA caching allocator on a stream of allocations and frees.

torch.cuda.memory_allocated counts blocks, not tensor bytes; memory_reserved counts the segments
obtained with cudaMalloc. The rules replayed here are c10/cuda/CUDACachingAllocator.cpp's defaults
(no PYTORCH_CUDA_ALLOC_CONF, no expandable segments, one stream):

* every request is rounded up to a multiple of 512 bytes (kMinBlockSize);
* requests <= 1 MiB come from the small pool, whose segments are 2 MiB (kSmallBuffer); larger ones
  from the large pool: segments of 20 MiB (kLargeBuffer) for requests < 10 MiB (kMinLargeAlloc),
  otherwise the request rounded up to 2 MiB (kRoundLarge);
* a request takes the smallest free block of its pool that fits (best fit); the block is split
  when the remainder is >= 512 bytes (small pool) or > 1 MiB (large pool) — an unsplit remainder
  stays inside the allocated block and counts as allocated;
* a freed block merges with free neighbours of its segment; segments are never returned
  (empty_cache aside), so peak reserved is reserved at the end.
When the device is nearly full the real allocator frees cached segments and retries before
raising OOM, so near the limit reserved can be lower than this replay says: the replay is an upper
bound, and auto-fit keeps a margin below the device size anyway.
"""

from __future__ import annotations

import bisect

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(n: int) -> int:
    return MIN_BLOCK if n < MIN_BLOCK else MIN_BLOCK * ((n + MIN_BLOCK - 1) // MIN_BLOCK)


def segment_size(n: int) -> int:
    if n <= SMALL_SIZE:
        return SMALL_BUFFER
    if n < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((n + ROUND_LARGE - 1) // ROUND_LARGE)


class _Block:
    __slots__ = ("addr", "free", "next", "prev", "size", "small")

    def __init__(self, small, addr, size):
        self.small, self.addr, self.size = small, addr, size
        self.free = True
        self.prev = self.next = None


class CachingAllocator:
    def __init__(self) -> None:
        self.pools = {True: [], False: []}   # small pool? -> sorted [(size, addr, id, block)]
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.n_segments = 0
        self.live: dict[int, _Block] = {}

    def _insert(self, b: _Block) -> None:
        bisect.insort(self.pools[b.small], (b.size, b.addr, id(b), b))

    def _remove(self, b: _Block) -> None:
        pool = self.pools[b.small]
        i = bisect.bisect_left(pool, (b.size, b.addr, id(b)))
        while pool[i][3] is not b:
            i += 1
        pool.pop(i)

    def malloc(self, key: int, nbytes: int) -> None:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size,))
        if i < len(pool):
            block = pool.pop(i)[3]
        else:
            seg_bytes = segment_size(size)
            self.n_segments += 1
            self.reserved += seg_bytes
            # distinct address ranges per segment, so sort keys never tie across segments
            block = _Block(small, self.n_segments << 48, seg_bytes)
        remaining = block.size - size
        if (small and remaining >= MIN_BLOCK) or (not small and remaining > SMALL_SIZE):
            rest = _Block(small, block.addr + size, remaining)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert(rest)
        block.free = False
        self.live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        block = self.live.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        block.free = True
        prev, nxt = block.prev, block.next
        if prev is not None and prev.free:
            self._remove(prev)
            block.addr, block.size = prev.addr, block.size + prev.size
            block.prev = prev.prev
            if prev.prev is not None:
                prev.prev.next = block
        if nxt is not None and nxt.free:
            self._remove(nxt)
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        self._insert(block)


def replay(events, resident=()) -> tuple[int, int]:
    """(peak allocated, peak reserved) for `resident` [(key, bytes)] — tensors that exist before
    training (weights, loaded tensor by tensor) — followed by `events`, a list of
    (key, +bytes) allocations and (key, -bytes) frees in program order."""
    a = CachingAllocator()
    for key, n in resident:
        a.malloc(key, n)
    for key, n in events:
        if n > 0:
            a.malloc(key, n)
        else:
            a.free(key)
    return a.peak_allocated, a.reserved

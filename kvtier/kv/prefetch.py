"""Read-ahead for the disk tier, and letting go of what attention has read.

Attention reads disk blocks in place, through the file's memory mapping. Without help, each
page faults in on the decode thread as attention touches it (the kernel's own read-around
fetches neighbouring pages with each fault). The :class:`Prefetcher` thread hints the blocks
the next layer will read — ``MADV_WILLNEED`` starts the kernel's read from disk without waiting
for it; with ``populate`` it also waits for the pages and maps them (``MADV_POPULATE_READ``)
— so I/O can overlap the current layer's compute. Dense attention reads every block each
step, so the next layer's disk runs are exactly what the next layer needs.

Measured on the 2-core reference machine (``kvtier bench offload``), read-ahead does not pay:
a cold step is bound by the disk's bandwidth, not by waiting, and a warm one loses cycles to
the extra thread. So it is off by default (``--prefetch`` turns it on).

After attention has used a disk run, :func:`release` drops its pages from this process's
mapping (``MADV_DONTNEED``; the file and the kernel's page cache keep the bytes), so resident
memory holds at most about a layer of disk blocks, not the whole disk tier.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import queue
import threading

PAGE = mmap.PAGESIZE
WILLNEED, DONTNEED, POPULATE_READ = mmap.MADV_WILLNEED, mmap.MADV_DONTNEED, 22  # 22: Linux >= 5.14

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_populate = True  # cleared when the kernel lacks MADV_POPULATE_READ (then pages are touched)


def advise(address: int, nbytes: int, advice: int) -> bool:
    """``madvise`` on the pages covering ``[address, address + nbytes)``; ctypes lets go of the
    GIL while the kernel works. Returns False when the kernel refused."""
    start = address - address % PAGE
    end = -(-(address + nbytes) // PAGE) * PAGE
    return _libc.madvise(start, end - start, advice) == 0


def release(base, ranges: list[tuple[int, int]]) -> None:
    """Drop the pages of ``(offset, nbytes)`` ranges of the mapping ``base`` (a uint8 tensor
    over it) from resident memory."""
    for offset, nbytes in ranges:
        advise(base.data_ptr() + offset, nbytes, DONTNEED)


class Prefetcher:
    """A thread that makes mapped disk ranges resident ahead of attention.

    ``submit`` never blocks the decode thread: when the queue is full the hint is dropped
    (attention then faults the pages in itself — slower, never wrong). ``nbytes`` counts the
    bytes read ahead.
    """

    def __init__(self, depth: int = 256, populate: bool = False):
        self.populate = populate
        self.jobs: queue.Queue = queue.Queue(depth)
        self.nbytes = 0
        self.thread = threading.Thread(target=self._run, name="kvtier-prefetch", daemon=True)
        self.thread.start()

    def submit(self, base, ranges: list[tuple[int, int]]) -> None:
        """Read ``(offset, nbytes)`` ranges of the mapping ``base`` (a uint8 tensor over it,
        which keeps the mapping alive until the thread is done) ahead."""
        try:
            self.jobs.put_nowait((base, ranges))
        except queue.Full:
            pass

    def _run(self) -> None:
        global _populate
        while True:
            base, ranges = self.jobs.get()
            address = base.data_ptr()
            for offset, nbytes in ranges:
                advise(address + offset, nbytes, WILLNEED)
            for offset, nbytes in ranges:
                if self.populate:
                    if _populate and not advise(address + offset, nbytes, POPULATE_READ):
                        _populate = False
                    if not _populate:  # touch one byte per page (torch lets go of the GIL)
                        base[offset: offset + nbytes: PAGE].sum()
                self.nbytes += nbytes
            del base

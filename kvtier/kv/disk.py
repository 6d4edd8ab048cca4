"""The disk tier: one preallocated, memory-mapped file per sequence, written by a background thread.

The file is cut into extents of ``group`` block slots, each owned by one layer. An extent holds
a header per slot, then each codec field as ``(Hkv, group, *shape)`` — the same layout as a
:class:`~kvtier.kv.blocks.BlockPool`, so a run of slots in one extent reads as a view of the
mapping and attention runs on it in place (the CPU reads the blocks where they live).

Each slot's header (64 bytes) names the block — magic, format version, layer, sequence, block
index, tokens, codec — and carries a CRC-32 of its bytes. A block is read only after its write
has finished, and its checksum is verified the first time it is read. Files are named
``kvtier-<pid>-<id>.kvblocks`` and locked while open; files no live process holds are
leftovers of a crashed run and are removed when a store opens the folder.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import struct
import threading
import uuid
import weakref
import zlib
from pathlib import Path

import torch

from kvtier.errors import KvtierError

MAGIC, VERSION = b"KVTB", 1
HEADER = struct.Struct("<4sHHIIIQI")  # magic, version, layer, sequence, block, tokens, codec, crc32
HEADER_BYTES = 64
ALIGN = 64
FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
SUFFIX = ".kvblocks"


def remove_leftovers(folder: Path) -> int:
    """Remove block files no live process holds (a crashed run's); returns the bytes freed."""
    freed = 0
    for path in folder.glob("kvtier-*" + SUFFIX):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held by a running kvtier
            continue
        freed += os.fstat(fd).st_size
        path.unlink(missing_ok=True)
        os.close(fd)
    return freed


class Writer:
    """A background thread doing the disk tier's writes, so decode does not wait on them.

    ``put`` queues a write and returns at once (it blocks only while ``depth`` writes are
    already waiting); a write that fails is recorded on its file and raised by the next read.
    """

    def __init__(self, depth: int = 64):
        self.jobs: queue.Queue = queue.Queue(depth)
        self.thread = threading.Thread(target=self._run, name="kvtier-disk-writer", daemon=True)
        self.thread.start()

    def put(self, file: DiskFile, writes: list[tuple[int, bytes]], done: threading.Event) -> None:
        self.jobs.put((file, writes, done))

    def _run(self) -> None:
        while True:
            file, writes, done = self.jobs.get()
            try:
                for offset, data in writes:
                    if file.error is None:
                        os.pwrite(file.fd, data, offset)
            except OSError as e:
                file.error = e
            finally:
                done.set()


class DiskFile:
    """One sequence's block file: grows by preallocated chunks, mapped for reading."""

    def __init__(self, folder: Path, writer: Writer, sequence: int, chunk: int = 16 << 20):
        self.path = folder / f"kvtier-{os.getpid()}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.writer, self.sequence, self.chunk = writer, sequence, chunk
        self.size = self.used = 0
        self.map: mmap.mmap | None = None
        self.base: torch.Tensor | None = None  # the whole mapping as uint8
        self.generation = 0  # bumped on each remap: views of the old mapping are stale
        self.error: OSError | None = None
        self._close = weakref.finalize(self, _remove, self.fd, self.path)

    def carve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (an extent) and return its offset; preallocates more file as needed."""
        if self.used + nbytes > self.size:
            grow = max(self.chunk, self.used + nbytes - self.size, self.size // 2)
            try:
                os.posix_fallocate(self.fd, self.size, grow)
            except OSError as e:
                if e.errno in FULL:
                    raise KvtierError(f"disk tier is full: could not preallocate {grow:,} more bytes in "
                                      f"{self.path.parent} ({os.strerror(e.errno)}); free space there or "
                                      "give the disk tier a smaller budget") from e
                raise KvtierError(f"disk tier: cannot grow {self.path}: {e}") from e
            self.size += grow
            self.base = None
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.generation += 1
        offset, self.used = self.used, self.used + nbytes
        return offset

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the mapping from ``offset`` as a uint8 tensor (no copy)."""
        return self.mapping()[offset: offset + nbytes]

    def mapping(self) -> torch.Tensor:
        """The whole mapping as a uint8 tensor (keeps the mapping alive while held)."""
        if self.base is None:
            self.base = torch.frombuffer(self.map, dtype=torch.uint8)
        return self.base

    def check(self) -> None:
        if self.error is not None:
            e = self.error
            what = "disk tier is full" if e.errno in FULL else "disk tier write failed"
            raise KvtierError(f"{what}: writing {self.path} failed ({os.strerror(e.errno)}); "
                              "free space there or give the disk tier a smaller budget")

    def close(self) -> None:
        self.base = self.map = None
        self._close()


def _remove(fd: int, path: Path) -> None:
    try:
        os.close(fd)
    finally:
        path.unlink(missing_ok=True)


class DiskPool:
    """One layer's block slots on the disk tier, with :class:`~kvtier.kv.blocks.BlockPool`'s verbs.

    Slot ``s`` lives in extent ``s // group`` at index ``s % group``; consecutive slots of one
    extent read as a view of the mapping.
    """

    def __init__(self, file: DiskFile, spec: dict, n_kv: int, group: int, layer: int, codec_id: int):
        self.file, self.spec, self.n_kv, self.group = file, spec, n_kv, group
        self.layer, self.codec_id = layer, codec_id
        self.offsets, off = {}, _round(HEADER_BYTES * group)
        for name, (shape, dtype) in spec.items():
            self.offsets[name] = off
            off = _round(off + _numel(shape) * dtype.itemsize * n_kv * group)
        self.extent_bytes = off
        self.extents: list[int] = []  # file offset of each extent
        self.free: list[int] = []
        self.top = 0
        self.pending: dict[int, threading.Event] = {}  # slot -> write finished
        self.blocks: dict[int, int] = {}  # slot -> block index (for messages)
        self.verified: set[int] = set()
        self.unchecked: set[int] = set()  # written, checksum not yet verified
        self.views: dict[int, dict[str, torch.Tensor]] = {}
        self.generation = -1

    def run_key(self, slot: int) -> int:
        """Slots of one extent read together as one view."""
        return slot // self.group

    def ranges(self, slots: list[int]) -> list[tuple[int, int]]:
        """``(file offset, nbytes)`` of the extents holding ``slots`` (what reading them touches)."""
        return [(self.extents[e], self.extent_bytes) for e in sorted({s // self.group for s in slots})]

    def slot_bytes(self) -> int:
        return sum(_numel(shape) * dtype.itemsize * self.n_kv for shape, dtype in self.spec.values())

    def put(self, fields: dict[str, torch.Tensor], blocks: list[int], tokens: int) -> list[int]:
        """Write encoded blocks ``{field: (Hkv, n, *shape)}`` (block indices ``blocks``) through the
        background writer; returns their slots. Raises when the disk is full."""
        self.file.check()
        n = len(blocks)
        slots = sorted(self.free)[:n]
        self.free = [s for s in self.free if s not in slots]
        while len(slots) < n:
            if self.top == len(self.extents) * self.group:
                self.extents.append(self.file.carve(self.extent_bytes))
            slots.append(self.top)
            self.top += 1
        cpu = {name: t.to("cpu") for name, t in fields.items()}
        for i, (slot, block) in enumerate(zip(slots, blocks)):
            writes, crc = [], 0
            for name, t in cpu.items():
                for h in range(self.n_kv):
                    data = t[h, i].contiguous().view(torch.uint8).numpy().tobytes()
                    crc = zlib.crc32(data, crc)
                    writes.append((self._at(slot, name, h), data))
            header = HEADER.pack(MAGIC, VERSION, self.layer, self.file.sequence, block, tokens,
                                 self.codec_id, crc)
            writes.append((self.extents[slot // self.group] + (slot % self.group) * HEADER_BYTES, header))
            done = threading.Event()
            self.pending[slot] = done
            self.blocks[slot] = block
            self.verified.discard(slot)
            self.unchecked.add(slot)
            self.file.writer.put(self.file, writes, done)
        return slots

    def _at(self, slot: int, name: str, head: int) -> int:
        shape, dtype = self.spec[name]
        one = _numel(shape) * dtype.itemsize
        e, i = divmod(slot, self.group)
        return self.extents[e] + self.offsets[name] + (head * self.group + i) * one

    def release(self, slots: list[int]) -> None:
        for s in slots:
            done = self.pending.pop(s, None)
            if done is not None:
                done.wait()
        self.unchecked.difference_update(slots)
        self.free.extend(slots)

    def fields_of(self, slots: list[int]) -> dict[str, torch.Tensor]:
        """``{field: (Hkv, n, *shape)}`` of ``slots``: a view of the mapping when they are
        consecutive in one extent, else a gathered copy. Waits for pending writes, verifies
        checksums on first read."""
        for s in slots:
            done = self.pending.pop(s, None)
            if done is not None:
                done.wait()
        self.file.check()
        for s in slots:
            if s not in self.verified:
                self._verify(s)
        runs, start = [], 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[i - 1] + 1 or slots[i] % self.group == 0:
                runs.append((slots[start], i - start))
                start = i
        pieces = [self._extent(s // self.group) for s, _ in runs]
        out = {}
        for name in self.spec:
            parts = [p[name][:, s % self.group: s % self.group + n] for p, (s, n) in zip(pieces, runs)]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return out

    def corrupted(self) -> set[int]:
        """The slots written and not yet read back whose checksum does not match (each is
        checked once). A failed write (disk full) raises its own error rather than passing
        for corruption."""
        bad = set()
        self.file.check()
        for s in list(self.unchecked):
            done = self.pending.pop(s, None)
            if done is not None:
                done.wait()
            self.file.check()
            try:
                self._verify(s)
            except KvtierError:
                bad.add(s)
        return bad

    def _extent(self, e: int) -> dict[str, torch.Tensor]:
        if self.generation != self.file.generation:
            self.views, self.generation = {}, self.file.generation
        if e not in self.views:
            base = self.extents[e]
            view = {}
            for name, (shape, dtype) in self.spec.items():
                n = _numel(shape) * dtype.itemsize * self.n_kv * self.group
                raw = self.file.view(base + self.offsets[name], n)
                view[name] = raw.view(dtype).view(self.n_kv, self.group, *shape)
            self.views[e] = view
        return self.views[e]

    def _verify(self, slot: int) -> None:
        e, i = divmod(slot, self.group)
        head = self.file.view(self.extents[e] + i * HEADER_BYTES, HEADER.size).numpy().tobytes()
        magic, version, layer, _, _, _, codec, crc = HEADER.unpack(head)
        fields = self._extent(e)
        got = 0
        for name in self.spec:
            for h in range(self.n_kv):
                got = zlib.crc32(fields[name][h, i].contiguous().view(torch.uint8).numpy().tobytes(), got)
        if magic != MAGIC or version != VERSION or layer != self.layer or codec != self.codec_id or got != crc:
            raise KvtierError(f"disk tier: block {self.blocks.get(slot)} of layer {self.layer} (sequence "
                              f"{self.file.sequence}) in {self.file.path} "
                              f"at offset {self.extents[e]:,} is corrupted (checksum mismatch); the cache of "
                              "this sequence cannot be used, run the request again")
        self.verified.add(slot)
        self.unchecked.discard(slot)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _round(n: int) -> int:
    return -(-n // ALIGN) * ALIGN

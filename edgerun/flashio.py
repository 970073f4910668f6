"""Reading weights from flash without filling the page cache (DESIGN §3, §5; LLM in a flash §3).

`FlashReader` opens the file with O_DIRECT: offsets, lengths and buffers must be multiples of
4 KiB, so every read goes through a per-thread aligned bounce buffer (`mmap.mmap(-1, n)` is
page-aligned) and the wanted bytes are copied out; unaligned ranges (a run of 3456-byte neuron
bundles) cost one extra partial page at each end. Filesystems that refuse O_DIRECT (tmpfs)
fall back to plain reads followed by `posix_fadvise(DONTNEED)`, so RSS stays meaningful either way.

Reads run on a small thread pool: `os.preadv` releases the GIL, so two threads keep the disk's
queue busy while the Numba kernels (nogil) compute. Never maps the file.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import EdgerunError

ALIGN = 4096
BOUNCE = 1 << 20          # bytes per aligned read; larger ranges are split (bounded memory per thread)


def align_down(n: int) -> int:
    return n - n % ALIGN


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def address(mv) -> int:
    """Memory address of a writable buffer's first byte."""
    return np.frombuffer(mv, np.uint8).ctypes.data if len(mv) else 0


def aligned_array(shape, dtype, shift: int = 0) -> np.ndarray:
    """An array starting `shift` bytes into page-aligned anonymous memory that has at least a page
    free after its end (so `FlashReader.span_jobs` can read whole pages around it)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, align_up(shift + nbytes) + ALIGN)
    return np.frombuffer(buf, dtype, count=int(np.prod(shape)), offset=shift).reshape(shape)


def coalesce(ids, unit: int, base: int = 0, gap: int = 0, limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """Sorted ids -> runs (first id, count, file offset, bytes) covering them.

    Adjacent ids are one run; ids at most `gap` apart are joined too (reading a few unneeded units
    costs less than another request), the smallest holes first, as long as the runs hold at most
    `limit` units in all (the read buffer's size)."""
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
        return []
    holes = np.diff(ids) - 1
    spare = (1 << 62 if limit is None else limit) - len(ids)
    order = np.argsort(holes, kind="stable")
    small = holes[order]
    fill = (small <= gap) & (np.cumsum(small) <= spare)      # a prefix: holes ascend, sums grow
    joined = np.zeros(len(holes), bool)
    joined[order[fill]] = True
    ends = np.flatnonzero(~joined)
    firsts, lasts = ids[np.r_[0, ends + 1]], ids[np.r_[ends, len(ids) - 1]]
    return [(int(a), int(b - a + 1), base + int(a) * unit, int(b - a + 1) * unit) for a, b in zip(firsts, lasts)]


class FlashReader:
    """Reads byte ranges of one file into caller memory, O_DIRECT when the filesystem allows it."""

    def __init__(self, path, threads: int = 2, direct: bool = True):
        self.path = str(path)
        self.threads = max(1, int(threads))
        self.direct = False
        self._fd = -1
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct = self._probe()
            except OSError:
                self.direct = False
            if not self.direct and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, flags)
            except OSError as e:
                raise EdgerunError(f"cannot open {self.path}: {e.strerror}") from None
        self.size = os.fstat(self._fd).st_size
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="edgerun-flash")
        self.bytes_read = 0      # bytes requested from the disk (incl. alignment padding)
        self.wait_seconds = 0.0  # time callers spent blocked on reads
        self._lock = threading.Lock()

    def _probe(self) -> bool:
        # some filesystems accept the flag at open() and fail the first read with EINVAL
        buf = mmap.mmap(-1, ALIGN)
        try:
            os.preadv(self._fd, [memoryview(buf)], 0)
            return True
        except OSError:
            return False
        finally:
            buf.close()

    @property
    def bounce_bytes(self) -> int:
        """Memory the reader's threads hold for aligned bounce buffers (for the memory plan)."""
        return (self.threads + 1) * BOUNCE

    def _bounce(self) -> memoryview:
        mv = getattr(self._local, "mv", None)
        if mv is None:
            self._local.buf = mmap.mmap(-1, BOUNCE)   # page-aligned anonymous memory
            mv = self._local.mv = memoryview(self._local.buf)
        return mv

    def read_into(self, offset: int, out) -> None:
        """Fill `out` (a writable bytes-like object) with the file's bytes at [offset, offset+len).
        Whole aligned pages into page-aligned memory go straight to `out`; anything else through
        the thread's bounce buffer (one copy)."""
        out = memoryview(out).cast("B")
        n = len(out)
        if offset < 0 or offset + n > self.size:
            raise EdgerunError(f"{self.path}: read of [{offset}, {offset + n}) is outside the file "
                               f"({self.size} bytes)")
        if not self.direct:
            self._plain_into(offset, out)
            return
        if offset % ALIGN == 0 and n % ALIGN == 0 and address(out) % ALIGN == 0:
            done = 0
            while done < n:
                got = self._preadv(out[done:], offset + done)
                if got <= 0:
                    raise EdgerunError(f"{self.path}: file ended at {offset + done} while reading {offset}+{n}")
                done += got
            with self._lock:
                self.bytes_read += n
            return
        bounce = self._bounce()
        done, total = 0, 0
        while done < n:
            a0 = align_down(offset + done)
            skip = offset + done - a0
            want = min(BOUNCE, align_up(skip + n - done))
            got = self._preadv(bounce[:want], a0)
            take = min(got - skip, n - done)
            if take <= 0:
                raise EdgerunError(f"{self.path}: file ended at {a0 + got} while reading {offset}+{n}")
            out[done:done + take] = bounce[skip:skip + take]
            done += take
            total += want
        with self._lock:
            self.bytes_read += total

    def span_jobs(self, offset: int, n: int, arena, pos: int, piece: int = 256 << 10, spill: bool = True) -> list:
        """Jobs (for `submit`) reading the file's [offset, offset+n) into arena[pos:pos+n], in
        pieces of about `piece` bytes so every thread gets a share. When `pos` and `offset` sit at
        the same place within a page (and `arena` is page-aligned), the whole pages around the range
        are read straight into the arena, no bounce copy: the caller leaves up to a page before
        and after the range free for that (spill=False: never, every piece is bounced)."""
        mv = memoryview(arena).cast("B")
        piece = max(ALIGN, align_down(piece))
        a0 = align_down(offset)
        start = pos - (offset - a0)                  # where file offset a0 lands in the arena
        if not (spill and self.direct) or (pos - offset) % ALIGN or start < 0 or address(mv) % ALIGN:
            return [(o, mv[pos + o - offset:pos + min(o + piece, offset + n) - offset])
                    for o in range(offset, offset + n, piece)]
        a1 = min(align_up(offset + n), align_down(self.size))
        jobs = [(o, mv[start + o - a0:start + min(o + piece, a1) - a0]) for o in range(a0, a1, piece)]
        if offset + n > a1:                           # the file's last, partial page: bounced
            jobs.append((a1, mv[start + a1 - a0:pos + n]))
        return jobs

    def _preadv(self, mv, offset: int) -> int:
        try:
            return os.preadv(self._fd, [mv], offset)
        except OSError as e:
            raise EdgerunError(f"cannot read {self.path} at {offset}: {e.strerror}") from None

    def _plain_into(self, offset: int, out: memoryview) -> None:
        done, n = 0, len(out)
        while done < n:
            got = self._preadv(out[done:], offset + done)
            if got == 0:
                raise EdgerunError(f"{self.path}: file ended at {offset + done} while reading {offset}+{n}")
            done += got
        if hasattr(os, "posix_fadvise"):
            a0 = offset - offset % mmap.PAGESIZE
            try:
                os.posix_fadvise(self._fd, a0, align_up(offset + n) - a0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        with self._lock:
            self.bytes_read += n

    def read_many(self, jobs) -> None:
        """Run `(offset, out)` reads on the pool and wait for all of them."""
        self.wait(self.submit(jobs))

    def submit(self, jobs):
        """Start `(offset, out)` reads on the pool (split evenly by bytes); returns a handle for `wait`."""
        jobs = list(jobs)
        if not jobs:
            return []
        if len(jobs) == 1 or self.threads == 1:
            return [self._pool.submit(self._run, jobs)]
        # deal jobs to threads so each gets about the same number of bytes
        shares = [[] for _ in range(self.threads)]
        sizes = [0] * self.threads
        for job in sorted(jobs, key=lambda j: -memoryview(j[1]).nbytes):
            k = sizes.index(min(sizes))
            shares[k].append(job)
            sizes[k] += memoryview(job[1]).nbytes
        return [self._pool.submit(self._run, s) for s in shares if s]

    def _run(self, jobs) -> None:
        for offset, out in jobs:
            self.read_into(offset, out)

    def wait(self, handle) -> None:
        t0 = time.perf_counter()
        for fut in handle:
            fut.result()            # re-raises a reader's EdgerunError here, in the caller
        self.wait_seconds += time.perf_counter() - t0

    def drop_cache(self) -> None:
        """Evict this file from the page cache (cold-cache benchmarks)."""
        drop_file_cache(self.path)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def drop_file_cache(path) -> None:
    """posix_fadvise(DONTNEED) over the whole file: clean pages leave the page cache."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def direct_throughput(path, chunk: int = 1 << 20, threads: int = 2, limit: int = 256 << 20) -> dict:
    """The disk's sequential read speed for this file through FlashReader (cold cache):
    `chunk`-byte reads spread over `threads` threads, up to `limit` bytes. Returns MB/s etc."""
    drop_file_cache(path)
    with FlashReader(path, threads=threads) as r:
        n = min(limit, align_down(r.size))
        bufs = [mmap.mmap(-1, chunk) for _ in range(threads)]
        jobs = [(off, memoryview(bufs[k % threads])[:min(chunk, n - off)])
                for k, off in enumerate(range(0, n, chunk))]
        t0 = time.perf_counter()
        # in rounds of `threads` reads so two jobs never share a destination buffer at once
        for i in range(0, len(jobs), threads):
            r.read_many(jobs[i:i + threads])
        dt = time.perf_counter() - t0
        direct = r.direct
    drop_file_cache(path)
    return {"bytes": n, "seconds": dt, "MBps": n / dt / 1e6, "chunk": chunk, "threads": threads, "direct": direct}

"""Memory budgets: parse `--ram`, measure RSS, give memory back (the plan itself: edgerun/plan.py).

The budget bounds the whole process (DESIGN §3): the runtime's own measured footprint
(interpreter, libraries, JIT code, tokenizer), the weights, the KV cache and the scratch
buffers. Page cache caused by reading the model is dropped as it is read (see ebin.read).
"""
from __future__ import annotations

import ctypes
import mmap
import re
import resource
import threading
import numpy as np
import psutil

from .errors import EdgerunError

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6, "MIB": 2**20,
          "G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12, "TIB": 2**40}

# Growth of the Python heap and allocator slack while running, not visible before loading.
HEADROOM_BYTES = 24 * 2**20


def parse_size(text: str | int) -> int:
    """`4GB` (10^9), `4G`/`4GiB` (2^30), `512MB`, `512M`, or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS:
        raise EdgerunError(f"cannot read memory size {text!r}: use e.g. 4GB, 4G, 4GiB, 512MB or 512M")
    return int(float(m.group(1)) * _UNITS[unit])


def lazy_zeros(shape: tuple, dtype=np.float32) -> np.ndarray:
    """Zeros whose pages become resident only as they are written, 4 KiB at a time.

    np.zeros would do for small arrays, but NumPy advises large ones into transparent huge pages:
    then writing the first positions of each layer's KV cache made every 2 MiB around them
    resident (measured: the whole 88 MiB f32 cache of a 2048 context after the first token).
    An anonymous mapping is zero-filled by the kernel on first touch and unmapped when freed."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE)
    return np.frombuffer(buf, dtype, count=count).reshape(shape)


_scratch = threading.local()


def thread_scratch(name: str, shape, align: int = 64) -> np.ndarray:
    """A float32 work buffer for kernels, one per Python thread and `name`, grown on demand and
    reused by every matrix (never allocated per call); 64-byte aligned so a 16-float table is
    one cache line. Two buffers in use at once need two names."""
    size = int(np.prod(shape))
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < size:
        raw = np.empty(size + align // 4, np.float32)
        off = (-raw.ctypes.data % align) // 4
        buf = raw[off:off + size]
        setattr(_scratch, name, buf)
    return buf[:size].reshape(shape)


def release_free_memory() -> None:
    """Give memory we no longer use back to the OS: freed heap, and the compiler's code.

    glibc raises its mmap threshold after big frees (up to 32 MiB), so many weight arrays live in
    the heap and stay resident after being freed until malloc_trim (measured: ~200 MiB of
    SmolLM2's 257 MiB without it); the tokenizer's JSON parse leaves ~25 MiB the same way."""
    trim_heap()
    release_compiler_code()


def trim_heap() -> None:
    """malloc_trim: hand the C heap's free pages (every thread's arena) back to the OS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass    # not glibc: nothing to do (or nothing we can do)


_MADV_DONTNEED = 4
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) .*?(\S*)$")


def release_compiler_code(library: str = "libllvmlite") -> int:
    """Unmap LLVM's resident code pages; returns the bytes released (0 where unsupported).

    LLVM runs only while Numba compiles a kernel or links one from its cache, but the pages it
    touched doing so (~65 MiB of libllvmlite.so) stay in our RSS for good. They are clean pages
    of a file: madvise(DONTNEED) drops them from this process (the page cache keeps the file) and
    a later compile faults back in what it uses. Only mappings without private (copy-on-write)
    pages are touched: dropping those would lose the loader's relocations."""
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0    # not Linux
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    mapping = None
    for line in text.splitlines():
        head = _MAPPING.match(line)
        if head:
            start, end, perms, path = head.groups()
            mapping = (int(start, 16), int(end, 16)) if library in path and "w" not in perms else None
            rss = 0
        elif mapping and line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif mapping and line.startswith("Anonymous:"):
            if rss and line.split()[1] == "0" and madvise(mapping[0], mapping[1] - mapping[0], _MADV_DONTNEED) == 0:
                released += rss
            mapping = None
    return released


def fmt(n: int) -> str:
    """Bytes for people: MiB below 10 GiB, else GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 10 * 2**30 else f"{n / 2**20:.1f} MiB"


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process's address space so far.

    Linux's VmHWM, not getrusage's ru_maxrss: the latter keeps the high-water mark from before
    exec(), i.e. the RSS of whatever forked us (a 1 GB pytest or IDE would read as our peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib_ceil(n: int) -> str:
    return f"{-(-n // 2**20)}MiB"

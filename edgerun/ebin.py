"""Reading and writing `.ebin` files: one model, self-described (spec: formats/ebin.md).

Layout: a 64-byte header inside a 4096-byte header area, then arrays, each starting on a
4096-byte boundary (O_DIRECT-readable, streamable), then the JSON manifest. The header points
at the manifest, so the writer streams arrays first and writes the manifest last.

The reader never maps the file: `read` copies an array into fresh anonymous memory with
`os.preadv` and then drops the page cache it caused (`posix_fadvise(DONTNEED)`), because the
runtime's --ram budget counts page cache (DESIGN.md §3).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerun.errors import EdgerunError, FormatError

MAGIC = b"EDGERUN\0"
VERSION = 1                      # highest format version this code reads and the one it writes
ALIGN = 4096                     # every array (and the manifest) starts on a multiple of this
HEADER_SIZE = 64                 # bytes of the fixed header; the rest of the first ALIGN is zeros
# magic, version, flags, manifest offset, manifest length, manifest crc32, alignment, reserved
_HEADER = struct.Struct("<8sIIQQII20x")
assert _HEADER.size == HEADER_SIZE - 4  # the last 4 bytes hold the header's own crc32

# manifest "format.features" this reader implements; "rotation": tensors with a "rotation" entry
# (formats/ebin.md § Rotated tensors) whose stored rows an older reader would use unrotated;
# "cluster-planes-2": cluster tensors in plane order 2 (formats/codec-cluster.md § Block layout)
FEATURES: frozenset[str] = frozenset({"rotation", "cluster-planes-2"})
# Bounds on the manifest: its length (the largest tokenizer.json files are ~35 MB; it is read and
# parsed before any --ram plan exists) and its nesting (edgerun writes at most 5 levels).
MAX_MANIFEST = 128 << 20
MAX_DEPTH = 32
MAX_NDIM = 8                     # dimensions of a stored array
CHUNK = 64 << 20                 # bytes per preadv/write: large reads, bounded temporary memory

# dtypes an array may have; stored little-endian. bool/complex/object/strings are rejected.
DTYPES = frozenset({"float16", "float32", "float64", "int8", "uint8", "int16", "uint16",
                    "int32", "uint32", "int64", "uint64"})

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class ArrayInfo:
    """One entry of the manifest's "arrays" table (formats/ebin.md §Arrays table)."""
    name: str
    dtype: str            # numpy name, e.g. "uint16"; bytes are little-endian
    shape: tuple
    offset: int           # absolute byte offset in the file, a multiple of ALIGN
    length: int           # bytes = prod(shape) * itemsize
    crc32: int            # zlib.crc32 of the `length` bytes

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
                "length": self.length, "crc32": self.crc32}


def _align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Drop the page cache over [offset, offset+length): our reads must not inflate memory.

    The end is rounded up to a page so the array's last partial page goes too (the kernel keeps
    partial pages); the bytes after an array are our own padding or the next array."""
    if length <= 0 or not hasattr(os, "posix_fadvise"):
        return
    start = offset - offset % _PAGE
    try:
        os.posix_fadvise(fd, start, _align_up(offset + length, _PAGE) - start,
                         os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advice only; some filesystems refuse it


def _json_default(o):
    # pack code hands us numpy scalars and tuples from configs; store them as plain JSON
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"manifest value of type {type(o).__name__} is not JSON-serializable")


# ----------------------------------------------------------------------------------- writer

class EbinWriter:
    """Streams arrays into `<path>.tmp`, then `close(manifest)` makes `<path>` appear atomically.

    Stages: __init__ (reserve the header area) → add_array* (aligned data) → close (manifest,
    header, fsync, rename, fsync dir). Any exception inside `with` removes the temporary file
    and leaves an existing `<path>` untouched.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.arrays: dict[str, ArrayInfo] = {}
        self.bytes_written = 0
        self._closed = False
        try:
            self._f = open(self.tmp_path, "wb")
        except OSError as e:
            raise EdgerunError(f"cannot write {self.tmp_path}: {e.strerror}") from None
        self._pos = 0
        self._write(b"\0" * ALIGN)   # header area; the real header is written by close()

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:        # includes KeyboardInterrupt: BaseException reaches here
            self.abort()
            return False
        if not self._closed:
            self.abort()
            raise RuntimeError(f"EbinWriter for {self.path} left without close(manifest); "
                               "nothing was written")
        return False

    # -- stages
    def _write(self, b) -> None:
        try:
            self._f.write(b)
        except OSError as e:
            raise EdgerunError(f"cannot write {self.tmp_path}: {e.strerror}") from None
        n = memoryview(b).nbytes
        self._pos += n
        self.bytes_written += n

    def _pad_to(self, pos: int) -> None:
        while self._pos < pos:
            self._write(b"\0" * min(pos - self._pos, CHUNK))

    def add_array(self, name: str, arr: np.ndarray) -> ArrayInfo:
        """Append `arr` (any shape, incl. 0-d and empty) at the next ALIGN boundary."""
        if self._closed:
            raise ValueError(f"EbinWriter for {self.path} is already closed")
        if not isinstance(name, str) or not name:
            raise ValueError(f"array name must be a non-empty str, got {name!r}")
        if name in self.arrays:
            raise ValueError(f"duplicate array name {name!r} in {self.path}")
        arr = np.asarray(arr)
        if arr.dtype.name not in DTYPES:
            raise ValueError(f"array {name!r}: dtype {arr.dtype} is not storable in .ebin "
                             f"(allowed: {', '.join(sorted(DTYPES))})")
        le = arr.dtype.newbyteorder("<")
        offset = _align_up(self._pos)
        self._pad_to(offset)
        crc = 0
        if arr.size:
            # copy in slabs along axis 0 so a non-contiguous or big-endian input never doubles
            # memory; a C-contiguous little-endian input is written straight from its buffer
            rows = arr.reshape(1) if arr.ndim == 0 else arr
            per_row = max(1, arr.nbytes // max(1, rows.shape[0]))
            step = max(1, CHUNK // per_row)
            for i in range(0, rows.shape[0], step):
                slab = np.ascontiguousarray(rows[i:i + step], dtype=le)
                mv = memoryview(slab.reshape(-1).view(np.uint8))
                crc = zlib.crc32(mv, crc)
                self._write(mv)
        info = ArrayInfo(name, arr.dtype.name, tuple(int(s) for s in arr.shape), offset,
                         int(arr.nbytes), crc)
        self.arrays[name] = info
        return info

    def close(self, manifest: dict) -> None:
        """Write `manifest` + the "arrays" table, the header, fsync, rename into place."""
        if self._closed:
            raise ValueError(f"EbinWriter for {self.path} is already closed")
        try:
            self._finish(manifest)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _finish(self, manifest: dict) -> None:
        if not isinstance(manifest, dict):
            raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
        if "arrays" in manifest:
            raise ValueError('manifest must not contain "arrays": the writer fills that table')
        full = dict(manifest)
        fmt = dict(full.get("format") or {})
        fmt.setdefault("min_reader_version", VERSION)
        fmt.setdefault("features", [])
        full["format"] = fmt
        full["arrays"] = {n: a.to_json() for n, a in self.arrays.items()}
        try:
            text = json.dumps(full, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                              default=_json_default)
        except ValueError as e:   # NaN/inf: not portable JSON
            raise ValueError(f"manifest for {self.path} is not valid JSON: {e}") from None
        body = text.encode("utf-8")
        m_off = _align_up(self._pos)
        self._pad_to(m_off)
        self._write(body)
        head = _HEADER.pack(MAGIC, VERSION, 0, m_off, len(body), zlib.crc32(body), ALIGN)
        head += struct.pack("<I", zlib.crc32(head))
        try:
            self._f.seek(0)
            self._f.write(head)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp_path, self.path)
        except OSError as e:
            raise EdgerunError(f"cannot write {self.path}: {e.strerror}") from None
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Forget everything: close and delete the temporary file (idempotent)."""
        self._closed = True
        try:
            self._f.close()
        except Exception:
            pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass


def _fsync_dir(d: Path) -> None:
    # makes the rename durable; not every platform/filesystem allows fsync on a directory
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- reader

class EbinFile:
    """An open `.ebin`: validated header and manifest; arrays are read on request.

    Every problem with the file raises FormatError naming the file (and section/array)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = -1
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(self._fd)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path} is a directory, not an .ebin file") from None
        except OSError as e:
            raise FormatError(f"cannot open {self.path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            self.close()
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise FormatError(f"{self.path} is {kind}, not an .ebin file")
        os.set_blocking(self._fd, True)
        self.file_size = st.st_size
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- validation (formats/ebin.md §Reader checks, in this order)
    def _err(self, msg: str) -> FormatError:
        return FormatError(f"{self.path}: {msg}")

    def _load(self) -> None:
        size = self.file_size
        head = self._pread(min(size, HEADER_SIZE), 0, "header")
        _drop_cache(self._fd, 0, len(head))
        if not head or not head.startswith(MAGIC[:len(head)]):
            raise self._err(_not_ebin_reason(head, size))
        if len(head) < 12:
            raise self._truncated(HEADER_SIZE, "header")
        self.version = struct.unpack_from("<I", head, 8)[0]
        if self.version > VERSION:
            raise self._err(f"written by a newer edgerun (format v{self.version}); this edgerun "
                            f"reads up to v{VERSION}: upgrade")
        if self.version < 1:
            raise self._err(f"invalid format version {self.version} in header")
        if len(head) < HEADER_SIZE:
            raise self._truncated(HEADER_SIZE, "header")
        _, _, flags, m_off, m_len, m_crc, align = _HEADER.unpack_from(head)
        (h_crc,) = struct.unpack_from("<I", head, _HEADER.size)
        if zlib.crc32(head[:_HEADER.size]) != h_crc:
            raise self._err("header is corrupted (header crc32 mismatch)")
        if flags:
            raise self._err(f"header flags 0x{flags:x} are unknown to this edgerun "
                            f"(format v{VERSION}): upgrade")
        if align < ALIGN or align & (align - 1):
            raise self._err(f"header: invalid alignment {align}")
        if m_off < align or m_len < 2 or m_len > MAX_MANIFEST:
            raise self._err(f"header: invalid manifest position (offset {m_off}, "
                            f"length {m_len})")
        if size < m_off + m_len:
            raise self._truncated(m_off + m_len, "manifest" if size > m_off else "data")
        body = self._pread(m_len, m_off, "manifest")
        _drop_cache(self._fd, m_off, m_len)
        if zlib.crc32(body) != m_crc:
            raise self._err("manifest is corrupted (crc32 mismatch)")
        manifest = self._parse_manifest(body)
        self._check_format(manifest.get("format", {}))
        self.manifest = manifest
        self.arrays = self._parse_arrays(manifest.get("arrays"), align, m_off)

    def _parse_manifest(self, body: bytes) -> dict:
        """Strict JSON (no NaN/Infinity), an object, nested at most MAX_DEPTH levels."""
        def no_constant(name):
            raise ValueError(f"{name} is not allowed (strict JSON)")
        try:
            manifest = json.loads(body.decode("utf-8"), parse_constant=no_constant)
        except RecursionError:
            raise self._err(f"manifest is nested too deeply (more than {MAX_DEPTH} levels)") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise self._err(f"manifest is not valid JSON: {e}") from None
        if not isinstance(manifest, dict):
            raise self._err("manifest is not a JSON object")
        if _depth_exceeds(manifest, MAX_DEPTH):
            raise self._err(f"manifest is nested too deeply (more than {MAX_DEPTH} levels)")
        return manifest

    def _truncated(self, need: int, where: str) -> FormatError:
        return self._err(f"is truncated (in the {where}): expected at least {need} bytes, "
                         f"found {self.file_size}")

    def _check_format(self, fmt) -> None:
        if not isinstance(fmt, dict):
            raise self._err('manifest "format" is not an object')
        need = fmt.get("min_reader_version", 1)
        if not _is_int(need):
            raise self._err(f'manifest "format.min_reader_version" must be an integer, got {need!r:.60}')
        if need > VERSION:
            raise self._err(f"needs a newer edgerun (min_reader_version {need}); this edgerun "
                            f"reads up to v{VERSION}: upgrade")
        features = fmt.get("features", [])
        if not isinstance(features, list) or not all(isinstance(x, str) for x in features):
            raise self._err(f'manifest "format.features" must be a list of names, got {features!r:.60}')
        missing = sorted(set(features) - FEATURES)
        if missing:
            raise self._err(f"uses features this edgerun does not know ({', '.join(missing)}): "
                            "upgrade")

    def _parse_arrays(self, table, align: int, limit: int) -> dict[str, ArrayInfo]:
        if not isinstance(table, dict):
            raise self._err('manifest has no "arrays" table')
        out = {}
        for name, e in table.items():
            try:
                dtype, shape = e["dtype"], e["shape"]
                off, length, crc = e["offset"], e["length"], e["crc32"]
                ok = (isinstance(dtype, str) and dtype in DTYPES and isinstance(shape, list)
                      and len(shape) <= MAX_NDIM and all(_is_int(s) and s >= 0 for s in shape)
                      and all(_is_int(v) and v >= 0 for v in (off, length, crc)) and crc < 1 << 32
                      and name)
            except (TypeError, KeyError):
                ok = False
            if not ok:
                raise self._err(f"array {name!r:.80}: malformed entry in the arrays table: {e!r:.200}")
            shape = tuple(shape)
            if length != math.prod(shape) * np.dtype(dtype).itemsize:
                raise self._err(f"array {name!r}: length {length} does not match "
                                f"shape {list(shape)} of {dtype}")
            if off % align or off < align or off + length > limit:
                raise self._err(f"array {name!r}: invalid offset {off} (length {length})")
            out[name] = ArrayInfo(name, dtype, shape, off, length, crc)
        spans = sorted((a.offset, a.end, a.name) for a in out.values() if a.length)
        for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise self._err(f"arrays {n0!r} and {n1!r} overlap")
        return out

    # -- low-level I/O
    def _pread(self, n: int, offset: int, what: str) -> bytes:
        buf = bytearray(n)
        self._pread_into(memoryview(buf), offset, what)
        return bytes(buf)

    def _pread_into(self, mv: memoryview, offset: int, what: str, crc: int | None = None):
        """Fill `mv` from `offset` in CHUNK-sized preadv calls; returns the running crc32."""
        done, n = 0, len(mv)
        while done < n:
            part = mv[done:done + CHUNK]
            try:
                got = os.preadv(self._fd, [part], offset + done)
            except OSError as e:
                raise self._err(f"cannot read the {what}: {e.strerror}") from None
            if got == 0:   # the file shrank after we opened it
                raise self._truncated(offset + n, what)
            if crc is not None:
                crc = zlib.crc32(part[:got], crc)
            done += got
        return crc

    # -- public reading API
    def info(self, name: str) -> ArrayInfo:
        try:
            return self.arrays[name]
        except KeyError:
            raise FormatError(f"{self.path}: no array named {name!r}") from None

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """A new array (anonymous memory, not a mapping) holding array `name`; its crc32 is
        checked in the same pass (FormatError naming the array) unless `verify` is False."""
        a = self.info(name)
        out = np.empty(a.shape, dtype=np.dtype(a.dtype).newbyteorder("<"))
        self._read_checked(a, out, verify)
        return out

    def read_into(self, name: str, out: np.ndarray, verify: bool = True) -> None:
        """Read array `name` into `out` (same shape and dtype, C-contiguous, writable), checking
        its crc32 in the same pass unless `verify` is False."""
        a = self.info(name)
        if out.shape != a.shape or out.dtype != np.dtype(a.dtype).newbyteorder("<"):
            raise ValueError(f"read_into {name!r}: out is {out.dtype}{list(out.shape)}, "
                             f"the array is {a.dtype}{list(a.shape)}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"read_into {name!r}: out must be C-contiguous and writable")
        self._read_checked(a, out, verify)

    def map(self, name: str, verify: bool = True) -> tuple[np.ndarray, mmap.mmap | None]:
        """Array `name` as a mapping of the file, and the mapping: only the pages a reader touches
        become resident, as clean file pages (`mmap.madvise(MADV_DONTNEED)` hands them back).
        Copy-on-write, so the array is an ordinary writable one to NumPy and Numba (a read-only
        array would be another type to compile kernels for); nothing writes to it. Its crc32 is
        checked first unless `verify` is False (one pass through a small buffer, page cache
        dropped): what the mapping then reads is what was checked, unless the file changes."""
        a = self.info(name)
        if verify:
            self.verify(names=[name], chunk=4 << 20)
        dtype = np.dtype(a.dtype).newbyteorder("<")
        if not a.length:
            return np.zeros(a.shape, dtype), None
        start = a.offset - a.offset % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self._fd, a.end - start, access=mmap.ACCESS_COPY, offset=start)
        return np.frombuffer(mm, dtype, a.length // dtype.itemsize, a.offset - start).reshape(a.shape), mm

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0 as a new array: one contiguous read (streaming).
        A part of an array has no checksum of its own: nothing is verified here."""
        a = self.info(name)
        if not a.shape or not 0 <= start <= stop <= a.shape[0]:
            raise ValueError(f"read_rows {name!r}: rows [{start}, {stop}) outside {list(a.shape)}")
        row = a.length // a.shape[0] if a.shape[0] else 0
        out = np.empty((stop - start,) + a.shape[1:], dtype=np.dtype(a.dtype).newbyteorder("<"))
        if out.size:
            off = a.offset + start * row
            self._pread_into(memoryview(out.reshape(-1).view(np.uint8)), off, f"array {name!r}")
            _drop_cache(self._fd, off, out.nbytes)
        return out

    def _read_checked(self, a: ArrayInfo, out: np.ndarray, verify: bool) -> None:
        if not a.length:
            return
        mv = memoryview(out.reshape(-1).view(np.uint8))
        crc = self._pread_into(mv, a.offset, f"array {a.name!r}", 0 if verify else None)
        _drop_cache(self._fd, a.offset, a.length)
        if verify and crc != a.crc32:
            raise self._err(f"array {a.name!r} is corrupted (crc32 mismatch)")

    def verify(self, progress=None, names=None, chunk: int = CHUNK) -> None:
        """Check the crc32 of every array (or of `names`); raise one FormatError listing all bad
        arrays.

        `progress(done_bytes, total_bytes)` is called after each chunk. Reads through one
        reusable `chunk`-byte buffer, so memory stays flat whatever the model size."""
        arrays = self.arrays.values() if names is None else [self.info(n) for n in names]
        total = sum(a.length for a in arrays)
        buf = memoryview(bytearray(min(chunk, max(total, 1))))
        done, bad = 0, []
        for a in sorted(arrays, key=lambda a: a.offset):
            crc, pos = 0, 0
            while pos < a.length:
                n = min(len(buf), a.length - pos)
                crc = self._pread_into(buf[:n], a.offset + pos, f"array {a.name!r}", crc)
                _drop_cache(self._fd, a.offset + pos, n)
                pos += n
                done += n
                if progress:
                    progress(done, total)
            if crc != a.crc32:
                bad.append(a.name)
        if progress and not total:
            progress(0, 0)
        if bad:
            raise self._err(f"{len(bad)} corrupted array(s) (crc32 mismatch): {', '.join(bad)}")

    # -- lifetime
    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"EbinFile({str(self.path)!r}, v{self.version}, {len(self.arrays)} arrays)"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _depth_exceeds(obj, limit: int) -> bool:
    """Whether parsed JSON nests more than `limit` containers deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        children = o.values() if isinstance(o, dict) else o if isinstance(o, list) else ()
        for c in children:
            if isinstance(c, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((c, depth + 1))
    return False


def _not_ebin_reason(head: bytes, size: int) -> str:
    """Why the first bytes are not an .ebin, recognizing the checkpoints people mix up."""
    if size == 0:
        return "is empty (0 bytes), not an .ebin file"
    if head.startswith(b"GGUF"):
        return "is a GGUF file, not an .ebin file: convert it with `edgerun pack`"
    if len(head) >= 9 and head[8:9] == b"{":
        return "looks like a safetensors file, not an .ebin file: convert it with `edgerun pack`"
    if head.startswith(MAGIC[:len(head)]):
        return f"is truncated: expected at least {HEADER_SIZE} bytes, found {size}"
    return f"is not an .ebin file (starts with {head[:8]!r}, expected {MAGIC!r})"

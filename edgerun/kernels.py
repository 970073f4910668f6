"""Numba kernels for the transformer forward pass (DESIGN §6).

Every kernel is `@njit(cache=True, nogil=True, fastmath=True)`, works on float32 C-contiguous
arrays, writes into a caller-provided `out` (no allocation per call) and starts with its shape
contract. Conventions follow Hugging Face Llama/Qwen2/Qwen3 (`modeling_llama.py`):
RMSNorm with the variance in float32, rotate-half RoPE, causal GQA attention.

Threads: `set_threads(n)` sets Numba's thread count; kernels with a `_par` twin pick it only when
the work is large enough to pay the ~10 µs cost of a 2-thread `prange` region (DESIGN §6).
"""
from __future__ import annotations

import atexit
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import psutil
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .errors import UnsupportedModelError
from .isa import half_to_float


def _import_numba_array_math_without_scipy() -> None:
    """Numba's array math module, imported at the first compile, imports scipy.linalg when SciPy
    is installed only to learn whether np.inner may call BLAS; that pulls in numpy.testing,
    numpy.f2py and every text codec: 16 MiB of RSS and 0.16 s of start-up (measured). No edgerun
    kernel calls BLAS, so the module is hidden for that one import (np.inner then uses Numba's
    own loop; np.dot and np.linalg still find SciPy when a kernel uses them)."""
    if "numba.np.arraymath" in sys.modules or "scipy.linalg.cython_blas" in sys.modules:
        return
    sys.modules["scipy.linalg.cython_blas"] = None          # makes `import` raise ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules["scipy.linalg.cython_blas"]


_import_numba_array_math_without_scipy()

# no_cfunc_wrapper: no kernel is used as a C callback, and skipping that wrapper saves ~7% of the
# compile time on a cold JIT cache (measured: 2.16 -> 1.97 s for the first token's kernels)
_JIT = dict(cache=True, nogil=True, fastmath=True, no_cfunc_wrapper=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True, no_cfunc_wrapper=True)

_threads = 1

# Numba's workqueue threading layer (the one left where neither TBB nor OpenMP is installed, as
# on macOS) aborts the process when two threads launch parallel regions at once. `pack`
# compresses a layer on a worker thread while the next layer's forward runs
# (calibrate.calibrate_and_store): the parallel regions either thread can reach take this lock.
PARALLEL_REGIONS = threading.Lock()


def set_threads(n: int) -> None:
    """Use `n` Numba threads (clamped to 1..NUMBA_NUM_THREADS) for the `prange` kernels."""
    global _threads
    _threads = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(_threads)


def get_threads() -> int:
    """The thread count last set with `set_threads` (1 until then)."""
    return _threads


def threaded_map(fn, items) -> list:
    """[fn(item) for item in items] on `get_threads()` Python threads when there is more than
    one. For pack-time NumPy/BLAS work on disjoint slices: BLAS runs one thread per call
    (edgerun/__init__.py) and releases the GIL, so such calls share the cores this way."""
    items = list(items)
    t = min(get_threads(), len(items))
    if t <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(t) as pool:
        return list(pool.map(fn, items))


def row_bands(n: int, min_rows: int = 1) -> list[slice]:
    """n rows as contiguous bands for threaded_map: one per kernel thread, each at least
    `min_rows` long (fewer bands when n is small)."""
    t = max(1, min(get_threads(), n // min_rows))
    return [slice(n * i // t, n * (i + 1) // t) for i in range(t)]


def threaded_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
                    min_rows: int = 32) -> np.ndarray:
    """a (..., k) @ b (k, m) with a's rows split over the kernel threads (`threaded_map`: BLAS
    itself runs one thread). `out` (..., m), contiguous, receives it when given."""
    rows = a.reshape(-1, a.shape[-1])
    if out is None:
        out = np.empty((*a.shape[:-1], b.shape[1]), np.result_type(a, b))
    flat = out.view()
    flat.shape = (-1, b.shape[1])       # raises rather than writing to a copy
    threaded_map(lambda r: np.matmul(rows[r], b, out=flat[r]), row_bands(rows.shape[0], min_rows))
    return out


# ---------------------------------------------------------------------------------------------
# Cold JIT cache. The first run after install compiles every kernel, which took 6.5 s (1 thread)
# to 12.7 s (2 threads) before the first token. The first token needs only the serial
# single-token kernels, so on a cold cache the batched prefill matmul and the parallel twins are
# compiled by a child process into Numba's on-disk cache while this one already generates
# (api.warm_up_kernels); until that child is done, `Linear` and `attention` take the serial
# paths (a prompt is a loop of matvecs), then this process loads the kernels from the cache.

# EDGERUN_DEFER_COMPILE=0: compile everything before the first token (the tests do, so that a
# kernel path never depends on a child's timing)
DEFER_COLD_COMPILE = os.environ.get("EDGERUN_DEFER_COMPILE", "1") != "0"
_pending = None          # (child process, finish) while the child compiles; None when all are ready
_pending_lock = threading.RLock()
_next_poll = 0.0
POLL_S = 0.05            # how often the kernels' dispatch asks whether the child is done


def defer_full_kernels(proc, finish) -> None:
    """Run serial kernels only until `proc` (a subprocess.Popen compiling the others into the
    JIT cache) exits; then `finish()` loads them (or compiles them here if the child failed)."""
    global _pending
    with _pending_lock:
        _pending = (proc, finish)
    atexit.register(_reap, proc)


def full_kernels_ready() -> bool:
    """True when the batched and parallel kernels may run (always, unless a child compiles them)."""
    global _pending, _next_poll
    if _pending is None:
        return True
    now = time.monotonic()
    if now < _next_poll:
        return False
    with _pending_lock:
        if _pending is None:
            return True
        _next_poll = now + POLL_S
        proc, finish = _pending
        if proc.poll() is None:
            return False
        _pending = None
    finish()
    return True


def wait_full_kernels() -> None:
    """Block until the batched and parallel kernels are ready."""
    global _next_poll
    with _pending_lock:
        if _pending is None:
            return
        _pending[0].wait()
        _next_poll = 0.0
    full_kernels_ready()


def _reap(proc) -> None:
    # at exit: let the child finish writing the cache (the next run starts warm); on Ctrl-C stop it
    try:
        proc.wait()
    except BaseException:
        proc.kill()


def default_threads() -> int:
    """Threads a model uses unless told: the physical cores this process may run on (as llama.cpp),
    but no more than the cores idle now (usable cores minus the 1-minute load average, rounded).
    A `prange` region stalls for a whole scheduler slice when another process holds one of its
    cores (DESIGN §6), so a busy 2-core machine gets 1 thread and a quiet 8-core laptop 8."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or usable
    cores = min(usable, physical)
    try:
        idle = round(usable - os.getloadavg()[0])
    except (AttributeError, OSError):          # no load average (Windows)
        idle = cores
    return max(1, min(cores, idle, numba.config.NUMBA_NUM_THREADS))


# ---------------------------------------------------------------------------------------------
# 16-bit float widening. np.float16 is not supported in nopython mode, so 16-bit weights are
# stored as uint16 and widened with LLVM instructions; the f16 form vectorizes to vcvtph2ps.

def _half_to_float(context, builder, sig, args):
    return half_to_float(builder, args[0])


@intrinsic
def f16_to_f32(typingctx, h):
    """uint16 IEEE half bits -> float32 (`edgerun.isa.half_to_float`: vcvtph2ps where the CPU has it)."""
    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None
    return types.float32(h), _half_to_float


@intrinsic
def kv_f32(typingctx, v):
    """A KV cache element as float32: float32 as is, uint16 as IEEE half bits (the f16 cache)."""
    if isinstance(v, types.Float) and v.bitwidth == 32:
        return types.float32(v), lambda context, builder, sig, args: args[0]
    if isinstance(v, types.Integer) and v.bitwidth == 16:
        return types.float32(v), _half_to_float
    return None


@intrinsic
def bf16_to_f32(typingctx, h):
    """uint16 bfloat16 bits -> float32: the bits become the high half of a float32."""
    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        wide = builder.zext(args[0], ir.IntType(32))
        wide = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def _bits_as_f32(typingctx, i):
    """Low 32 bits of an integer reinterpreted as float32 (for building 2^n in `expf`)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if i.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


@njit(inline="always", **_JIT)
def expf(x):
    # float32 -> float32 exp, relative error ~1.2e-7 (Cephes expf: 2^n * P(r), |r| <= ln2/2).
    # Unlike np.exp it vectorizes (no SVML here), 3.5x faster in the softmax; x is clamped to
    # [-87.3, 88.3] so 2^n stays a normal float32.
    x = min(max(x, np.float32(-87.3)), np.float32(88.3))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return p * _bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


# ---------------------------------------------------------------------------------------------
# Norms and elementwise ops.

@njit(**_JIT)
def rmsnorm(x, w, eps, out):
    # x (n,), w (n,) -> out (n,) = x / sqrt(mean(x^2) + eps) * w
    n = x.shape[0]
    ss = np.float32(0.0)
    for i in range(n):
        ss += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
    for i in range(n):
        out[i] = x[i] * inv * w[i]


@njit(**_JIT)
def rmsnorm_rows(X, w, eps, out):
    # X (T, n), w (n,) -> out (T, n), each row RMS-normalized (Qwen3 q/k norm: pass (T*H, D))
    T, n = X.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(n):
            ss += X[t, i] * X[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            out[t, i] = X[t, i] * inv * w[i]


SILU_BLOCK = 512


@njit(**_JIT)
def _silu_rows(gate, up, out, t0, t1):
    # rows t0:t1 of gate, up, out (T, n), C-contiguous, out may be gate -> out = gate *
    # sigmoid(gate) * up (2-D loops, no reshape: Numba's reshape costs ~0.3 s to compile on a cold
    # cache). exp first into a block buffer, then the rest: LLVM left the fused loop scalar (35 µs
    # for 8960 values on Zen 3; 14 µs in two loops, the same floats)
    n = gate.shape[1]
    e = np.empty(SILU_BLOCK, np.float32)
    for t in range(t0, t1):
        for b in range(0, n, SILU_BLOCK):
            m = min(SILU_BLOCK, n - b)
            for i in range(m):
                e[i] = expf(-gate[t, b + i])
            for i in range(m):
                out[t, b + i] = gate[t, b + i] / (np.float32(1.0) + e[i]) * up[t, b + i]


@njit(**_JIT_PAR)
def _silu_mul_par(gate, up, out, nb):
    # _silu_rows over nb bands of rows
    T = gate.shape[0]
    step = (T + nb - 1) // nb
    for b in prange(nb):
        _silu_rows(gate, up, out, b * step, min(T, (b + 1) * step))


SILU_PAR_MIN = 1 << 16      # values: a prompt chunk's rows split over the threads (1.5B, 64 x 8960: 0.9 ms serial)


def silu_mul(gate, up, out):
    """out = gate · sigmoid(gate) · up for (T, n) C-contiguous arrays (out may be gate); a prompt
    chunk's rows split over the threads."""
    T = gate.shape[0]
    if _threads > 1 and T > 1 and gate.size >= SILU_PAR_MIN and full_kernels_ready():
        with PARALLEL_REGIONS:
            _silu_mul_par(gate, up, out, min(_threads, T))
    else:
        _silu_rows(gate, up, out, 0, T)


@njit(**_JIT)
def add_inplace(x, y):
    # x, y: same shape (any ndim, C-contiguous) -> x += y (tests only; the model adds with NumPy)
    a = x.reshape(x.size)
    b = y.reshape(y.size)
    for i in range(a.shape[0]):
        a[i] += b[i]


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al. 2021, RoFormer) in Hugging Face's rotate-half layout.

@njit(**_JIT)
def rope(x, start, cos, sin):
    # x (T, H, D) in place at positions start..start+T-1, cos/sin (P, D//2): rotate pairs (i, i + D/2)
    T, H, D = x.shape
    half = D // 2
    for t in range(T):
        p = start + t
        for h in range(H):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                x1 = x[t, h, i]
                x2 = x[t, h, i + half]
                x[t, h, i] = x1 * c - x2 * s
                x[t, h, i + half] = x2 * c + x1 * s


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies (head_dim//2,) in float64, as transformers' modeling_rope_utils."""
    inv = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        # transformers `_compute_llama3_parameters`: long wavelengths divided by `factor`,
        # short ones kept, the band between interpolated smoothly.
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported "
                                "(supported: default, linear, llama3)")


def rope_tables(head_dim: int, max_pos: int, theta: float, scaling: dict | None = None):
    """cos, sin tables (max_pos, head_dim//2) float32 for `rope`, computed in float64.

    `scaling` is the config's rope_scaling / rope_parameters dict (key `rope_type` or `type`):
    None/default, linear (factor) or llama3; anything else raises UnsupportedModelError.
    """
    inv = _inv_freq(head_dim, theta, scaling)
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Causal grouped-query attention over a KV cache (Ainslie et al. 2023, GQA).

@njit(**_JIT)
def _attend(q, k_cache, v_cache, start, out, scores, g0, g1):
    # q (T, H, D); k/v_cache (Hkv, C, D) f32 or f16 bits; out (T, H, D); scores (H, C): the
    # query heads of kv heads g0..g1-1. Python calls it directly for all heads (one compiled
    # function less on a cold cache than a serial wrapper); `_attention_par` per kv head.
    T, H, D = q.shape
    group = H // k_cache.shape[0]
    scale = np.float32(1.0 / math.sqrt(D))
    for g in range(g0, g1):
        h0 = g * group
        for t in range(T):
            L = start + t + 1  # causal: positions 0..start+t
            # scores = q k^T: each K row is loaded once for all query heads sharing it (GQA)
            for p in range(L):
                for hh in range(group):
                    acc = np.float32(0.0)
                    for d in range(D):
                        acc += q[t, h0 + hh, d] * kv_f32(k_cache[g, p, d])
                    scores[h0 + hh, p] = acc * scale
            # stable softmax (max subtracted); normalization folded in before the V sum
            for hh in range(group):
                h = h0 + hh
                m = scores[h, 0]
                for p in range(1, L):
                    m = max(m, scores[h, p])
                s = np.float32(0.0)
                for p in range(L):
                    e = expf(scores[h, p] - m)
                    scores[h, p] = e
                    s += e
                inv = np.float32(1.0) / s
                for p in range(L):
                    scores[h, p] *= inv
                for d in range(D):
                    out[t, h, d] = 0.0
            # out += p v: four V rows per pass so `out` is loaded/stored a quarter as often,
            # and each block of V rows serves every query head of the group
            p = 0
            while p + 4 <= L:
                for hh in range(group):
                    h = h0 + hh
                    w0 = scores[h, p]
                    w1 = scores[h, p + 1]
                    w2 = scores[h, p + 2]
                    w3 = scores[h, p + 3]
                    for d in range(D):
                        out[t, h, d] += (w0 * kv_f32(v_cache[g, p, d]) + w1 * kv_f32(v_cache[g, p + 1, d])
                                         + w2 * kv_f32(v_cache[g, p + 2, d]) + w3 * kv_f32(v_cache[g, p + 3, d]))
                p += 4
            while p < L:
                for hh in range(group):
                    h = h0 + hh
                    w0 = scores[h, p]
                    for d in range(D):
                        out[t, h, d] += w0 * kv_f32(v_cache[g, p, d])
                p += 1


@njit(**_JIT_PAR)
def _attention_par(q, k_cache, v_cache, start, out, scores):
    # q (T, H, D), k/v_cache (Hkv, C, D), scores (H, C) -> out (T, H, D); prange over kv heads
    for g in prange(k_cache.shape[0]):
        _attend(q, k_cache, v_cache, start, out, scores, g, g + 1)


# Below this many multiply-adds (T * ctx * H * D) one thread beats a 2-thread prange region.
ATTN_PAR_MIN = 1 << 20


def attention(q, k_cache, v_cache, start, out, scores=None):
    """Causal GQA attention: out (T, H, D) = softmax(q k^T / sqrt(D) + mask) v.

    q (T, H, D) holds positions start..start+T-1; k_cache, v_cache (Hkv, C, D), float32 or the
    uint16 bits of float16 (the model's cache: half the memory, as llama.cpp's default), already hold
    positions 0..start+T-1 (C >= start+T). Query head h uses kv head h // (H // Hkv).
    `scores`: optional float32 scratch of shape (H, C), reused across calls to avoid allocating;
    allocated here when None. Parallel over kv heads when threads > 1 and the work is large.
    """
    T, H, D = q.shape
    if scores is None:
        scores = np.empty((H, k_cache.shape[1]), np.float32)
    if _threads > 1 and k_cache.shape[0] > 1 and T * (start + T) * H * D >= ATTN_PAR_MIN and full_kernels_ready():
        with PARALLEL_REGIONS:
            _attention_par(q, k_cache, v_cache, start, out, scores)
    else:
        _attend(q, k_cache, v_cache, start, out, scores, 0, k_cache.shape[0])


# ---------------------------------------------------------------------------------------------
# NumPy stand-ins for the layer ops while a cold JIT cache compiles ("Cold JIT cache" above).
# rmsnorm_rows, rope, attention and silu_mul cost ~1.5 s of compile on an empty cache (attention
# 0.9 s of it), half of a first token's; NumPy needs none. So on a cold cache the child compiles
# them with the batched kernels and the model runs these until it is done. Same contracts and
# float32 math as the kernels (summation order differs: results agree to float rounding). They
# allocate temporaries: a few MB at most, and only for the first seconds after install.

class NumpyLayerOps:
    """The layer ops of this module, computed with NumPy (no compile)."""

    @staticmethod
    def rmsnorm_rows(X, w, eps, out):
        ms = np.einsum("ti,ti->t", X, X, dtype=np.float32) / np.float32(X.shape[1])
        inv = np.float32(1.0) / np.sqrt(ms + np.float32(eps))
        np.multiply(X * inv[:, None], w, out=out)

    @staticmethod
    def rope(x, start, cos, sin):
        T, half = x.shape[0], x.shape[2] // 2
        c, s = cos[start:start + T, None, :], sin[start:start + T, None, :]
        x1, x2 = x[..., :half].copy(), x[..., half:].copy()
        x[..., :half] = x1 * c - x2 * s
        x[..., half:] = x2 * c + x1 * s

    @staticmethod
    def attention(q, k_cache, v_cache, start, out, scores=None):
        T, H, D = q.shape
        Hkv, L = k_cache.shape[0], start + T
        group = H // Hkv
        k, v = _kv_as_f32(k_cache[:, :L]), _kv_as_f32(v_cache[:, :L])          # (Hkv, L, D)
        qs = q.reshape(T, Hkv, group, D) * np.float32(1.0 / math.sqrt(D))
        for t in range(T):          # one (H, start+t+1) score matrix at a time, like the kernel
            n = start + t + 1
            s = np.matmul(qs[t], k[:, :n].transpose(0, 2, 1))                   # (Hkv, group, n)
            s -= s.max(axis=2, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=2, keepdims=True)
            out[t] = np.matmul(s, v[:, :n]).reshape(H, D)

    @staticmethod
    def silu_mul(gate, up, out):
        with np.errstate(over="ignore"):                # exp(-g) = inf for g < -88: silu -> -0
            np.multiply(gate / (np.float32(1.0) + np.exp(-gate)), up, out=out)


def _kv_as_f32(cache: np.ndarray) -> np.ndarray:
    """A KV cache slice as float32 (the f16 cache holds the uint16 bits of float16)."""
    return cache.view(np.float16).astype(np.float32) if cache.dtype == np.uint16 else cache


def layer_ops():
    """What the model calls rmsnorm_rows, rope, attention and silu_mul on: this module's kernels,
    or NumpyLayerOps while a cold JIT cache's child compiles them."""
    return _this_module if full_kernels_ready() else NumpyLayerOps


_this_module = sys.modules[__name__]

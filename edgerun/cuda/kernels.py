"""CUDA op kernels for one transformer block (numba-cuda; the CPU twins are edgerun/kernels.py).

Geometry (DESIGN §6 conventions carried to the GPU):
- a *row group*: `LANES` threads (one warp on a GPU) cooperate on one output row; a thread block
  holds `ROWS` row groups. Lanes stride over a row's columns, so the threads of a warp read
  consecutive elements (coalesced), then combine with `warp_sum` (butterfly `shfl_xor_sync`).
- norms and attention: one block per row / per (token, head); block-wide max/sum through shared
  memory.

The CUDA simulator (NUMBA_ENABLE_CUDASIM=1) has no warp shuffles, so there `warp_sum` goes
through shared memory with `syncthreads` — the only line that differs. The simulator is slow
(a Python thread per GPU thread; each barrier ~0.3 ms per thread), so `EDGERUN_CUDA_LANES`
(default 32) lets tests run the same code with fewer lanes: with 1 lane per row no barrier is
ever needed. Every reduction is reached by every thread of the block (no early return), since a
barrier skipped by some threads deadlocks.
"""
from __future__ import annotations

import math
import os

from numba import cuda, float32, int32

SIM = bool(int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0))
LANES = int(os.environ.get("EDGERUN_CUDA_LANES", "32"))     # threads per output row (≤ one warp)
if LANES not in (1, 2, 4, 8, 16, 32):
    raise ValueError(f"EDGERUN_CUDA_LANES must be a power of two <= 32, got {LANES}")
ROWS = 4                       # row groups per thread block (4 warps = 128 threads on a GPU)
TT = 4                         # tokens per row group in a matmul: each weight is decoded once per 4
ATT_WARPS = 4 if LANES == 32 else 1   # warps per (token, head) block in attention
NT_ATT = ATT_WARPS * LANES
MAX_WARPS = 4                  # shared scratch for block reductions (ROWS, ATT_WARPS <= 4)

# flags of the linear kernels
HAS_BIAS = 1                   # out += bias
ACCUMULATE = 2                 # out += W x (residual fused into o_proj / down_proj)


# ---------------------------------------------------------------------------------------------
# Reductions.

if SIM:
    @cuda.jit(device=True)
    def warp_sum(v, red, w, lane):
        # v per lane -> sum over the LANES lanes of row group w (every lane gets it); red (MAX_WARPS, 32)
        if LANES == 1:
            return v
        red[w, lane] = v
        cuda.syncthreads()
        s = float32(0.0)
        for i in range(LANES):
            s += red[w, i]
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def warp_max(v, red, w, lane):
        # v per lane -> max over the LANES lanes of row group w
        if LANES == 1:
            return v
        red[w, lane] = v
        cuda.syncthreads()
        s = red[w, 0]
        for i in range(1, LANES):
            s = max(s, red[w, i])
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def warp_barrier():
        # orders shared-memory writes of a row group before its reads
        if LANES > 1:
            cuda.syncthreads()
else:
    @cuda.jit(device=True, inline=True)
    def warp_sum(v, red, w, lane):
        # v per lane -> sum over the LANES lanes (xor butterfly stays inside each LANES segment)
        off = LANES // 2
        while off > 0:
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
            off //= 2
        return v

    @cuda.jit(device=True, inline=True)
    def warp_max(v, red, w, lane):
        # v per lane -> max over the LANES lanes
        off = LANES // 2
        while off > 0:
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, off))
            off //= 2
        return v

    @cuda.jit(device=True, inline=True)
    def warp_barrier():
        # orders shared-memory writes of a warp before its reads
        cuda.syncwarp(0xFFFFFFFF)


@cuda.jit(device=True)
def block_sum(v, red, redb, w, lane, nw):
    # v per thread -> sum over the block's nw row groups of LANES lanes; redb (MAX_WARPS,) shared
    s = warp_sum(v, red, w, lane)
    if nw == 1:
        return s
    if lane == 0:
        redb[w] = s
    cuda.syncthreads()
    s = float32(0.0)
    for i in range(nw):
        s += redb[i]
    cuda.syncthreads()
    return s


@cuda.jit(device=True)
def block_max(v, red, redb, w, lane, nw):
    # v per thread -> max over the block's nw row groups
    s = warp_max(v, red, w, lane)
    if nw == 1:
        return s
    if lane == 0:
        redb[w] = s
    cuda.syncthreads()
    s = redb[0]
    for i in range(1, nw):
        s = max(s, redb[i])
    cuda.syncthreads()
    return s


@cuda.jit(device=True)
def store_rows(acc, out, bias, flags, r, t0, red, w, lane):
    # acc (TT,) partial dots of row r for tokens t0.. -> out[t0+t, r] (= or +=) sum + bias
    T, d = out.shape
    for t in range(TT):
        s = warp_sum(acc[t], red, w, lane)
        if lane == 0 and r < d and t0 + t < T:
            if flags & HAS_BIAS:
                s += bias[r]
            if flags & ACCUMULATE:
                s += out[t0 + t, r]
            out[t0 + t, r] = s


# ---------------------------------------------------------------------------------------------
# Norms and elementwise ops.

@cuda.jit(fastmath=True)
def rmsnorm_rows(X, w, eps, out):
    # X (R, n), w (n,) -> out (R, n); one block of LANES threads per row (grid R)
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    r = cuda.blockIdx.x
    lane = cuda.threadIdx.x
    n = X.shape[1]
    ss = float32(0.0)
    for i in range(lane, n, LANES):
        ss += X[r, i] * X[r, i]
    ss = warp_sum(ss, red, 0, lane)
    inv = float32(1.0) / math.sqrt(ss / float32(n) + float32(eps))
    for i in range(lane, n, LANES):
        out[r, i] = X[r, i] * inv * w[i]


@cuda.jit(fastmath=True)
def silu_mul(gate, up, out):
    # gate, up, out (T, f) -> out = gate * sigmoid(gate) * up; one thread per element
    i = cuda.grid(1)
    T, f = gate.shape
    if i < T * f:
        t = i // f
        j = i - t * f
        g = gate[t, j]
        out[t, j] = g / (float32(1.0) + math.exp(-g)) * up[t, j]


@cuda.jit(fastmath=True)
def rope(x, start, cos, sin):
    # x (T, H, D) in place at positions start.., cos/sin (P, D//2): rotate-half pairs (i, i + D/2)
    T, H, D = x.shape
    half = D // 2
    k = cuda.grid(1)
    if k < T * H * half:
        i = k % half
        h = (k // half) % H
        t = k // (half * H)
        c = cos[start + t, i]
        s = sin[start + t, i]
        x1 = x[t, h, i]
        x2 = x[t, h, i + half]
        x[t, h, i] = x1 * c - x2 * s
        x[t, h, i + half] = x2 * c + x1 * s


@cuda.jit
def kv_write(k, v, kc, vc, start):
    # k, v (T, Hkv, D) -> kc, vc (Hkv, C, D) at positions start..start+T-1
    T, Hkv, D = k.shape
    e = cuda.grid(1)
    if e < T * Hkv * D:
        dd = e % D
        g = (e // D) % Hkv
        t = e // (D * Hkv)
        kc[g, start + t, dd] = k[t, g, dd]
        vc[g, start + t, dd] = v[t, g, dd]


# ---------------------------------------------------------------------------------------------
# Causal GQA attention (Ainslie et al. 2023) over the device KV cache.

@cuda.jit(fastmath=True)
def attention(q, kc, vc, start, out, scores):
    # q (T, H, D), kc/vc (Hkv, C, D), scores (T*H, C) scratch -> out (T, H, D); grid (T, H),
    # NT_ATT threads: warps take positions (lanes over d: coalesced K rows), threads take d for V
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    redb = cuda.shared.array(MAX_WARPS, float32)
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    w = tid // LANES
    lane = tid % LANES
    T, H, D = q.shape
    g = h // (H // kc.shape[0])
    L = start + t + 1
    row = t * H + h
    scale = float32(1.0) / math.sqrt(float32(D))
    # scores = q k^T / sqrt(D): uniform trip count so every warp reaches every reduction
    m = float32(-3.0e38)
    for p0 in range(0, L, ATT_WARPS):
        p = p0 + w
        acc = float32(0.0)
        if p < L:
            for dd in range(lane, D, LANES):
                acc += q[t, h, dd] * kc[g, p, dd]
        acc = warp_sum(acc, red, w, lane) * scale
        if p < L:
            if lane == 0:
                scores[row, p] = acc
            m = max(m, acc)
    m = block_max(m, red, redb, w, lane, ATT_WARPS)
    cuda.syncthreads()
    s = float32(0.0)
    for p in range(tid, L, NT_ATT):
        e = math.exp(scores[row, p] - m)
        scores[row, p] = e
        s += e
    s = block_sum(s, red, redb, w, lane, ATT_WARPS)
    cuda.syncthreads()          # every exp(score) written before any thread sums over them
    inv = float32(1.0) / s
    for dd in range(tid, D, NT_ATT):
        acc = float32(0.0)
        for p in range(L):
            acc += scores[row, p] * vc[g, p, dd]
        out[t, h, dd] = acc * inv


# ---------------------------------------------------------------------------------------------
# Launch helpers (grid sizes for the shapes above).

def _blocks(n: int, per: int = 128) -> int:
    return max(1, (n + per - 1) // per)


def launch_rmsnorm(X, w, eps, out):
    """X (R, n) device -> out (R, n)."""
    rmsnorm_rows[X.shape[0], LANES](X, w, float32(eps), out)


def launch_silu_mul(gate, up, out):
    """gate, up, out (T, f) device."""
    silu_mul[_blocks(gate.shape[0] * gate.shape[1]), 128](gate, up, out)


def launch_rope(x, start, cos, sin):
    """x (T, H, D) device, in place."""
    T, H, D = x.shape
    rope[_blocks(T * H * (D // 2)), 128](x, int32(start), cos, sin)


def launch_kv_write(k, v, kc, vc, start):
    """k, v (T, Hkv, D) -> caches (Hkv, C, D)."""
    T, Hkv, D = k.shape
    kv_write[_blocks(T * Hkv * D), 128](k, v, kc, vc, int32(start))


def launch_attention(q, kc, vc, start, out, scores):
    """q (T, H, D), caches (Hkv, C, D) holding 0..start+T-1, scores (>= T*H, C) -> out (T, H, D)."""
    T, H, _ = q.shape
    attention[(T, H), NT_ATT](q, kc, vc, int32(start), out, scores)

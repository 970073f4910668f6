"""SpQR codec on CUDA (numba-cuda): the kernel and `DeviceLinear` (formats/codec-spqr.md;
shared helpers in edgerun/cuda/codecs.py). Imported only by `Codec.to_device`."""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

from ...cuda.codecs import F16, CudaLinear, flags_of, launch_dims, no_bias, where
from ...cuda.kernels import LANES, MAX_WARPS, TT, store_rows


# --- spqr (formats/codec-spqr.md) ------------------------------------------------------------

@cuda.jit
def spqr_prep(X, perm, Xp):
    # X (T, n) -> Xp (T, 16, G): Xp[t, j & 15, j >> 4] = X[t, perm[j]] (0 past n), so lane g of a
    # row group reads Xp[t, pos, g]: consecutive groups, coalesced
    e = cuda.grid(1)
    T = X.shape[0]
    G = Xp.shape[2]
    n = perm.shape[0]
    if e < T * 16 * G:
        t = e // (16 * G)
        j = e - t * 16 * G
        Xp[t, j & 15, j >> 4] = X[t, int32(perm[j])] if j < n else float32(0.0)


@cuda.jit(device=True)
def _spqr_code(codes, r, base, wdt, pos, bits):
    # code of position pos (0..15) of the group whose byte in section u is codes[r, base + u*wdt]
    if bits == 4:
        return (int32(codes[r, base + (pos >> 1) * wdt]) >> (4 * (pos & 1))) & 15
    q = (int32(codes[r, base + (pos >> 2) * wdt]) >> (2 * (pos & 3))) & 3
    if bits == 3:
        q |= ((int32(codes[r, base + (4 + (pos >> 3)) * wdt]) >> (pos & 7)) & 1) << 2
    return q


@cuda.jit(fastmath=True)
def mm_spqr(codes, stq, st2, rp, oc, ov, Xp, out, bias, flags, bits, sbits, sg):
    # codes (d, 2*bits*G) u8 in 16-group chunks of byte sections, stq (d, G) u8, st2 (R, 4, G) f16,
    # CSR outliers in storage columns, Xp (T, 16, G) -> out (T, d). A lane takes a group: its
    # byte of each section (consecutive groups are consecutive bytes: coalesced), its stats,
    # then w = s (q - z) over 16 positions as s (sum q x - z sum x)
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    w, lane, r, t0 = where()
    d, G = stq.shape
    T = Xp.shape[0]
    acc = cuda.local.array(TT, float32)
    dot = cuda.local.array(TT, float32)
    sx = cuda.local.array(TT, float32)
    for t in range(TT):
        acc[t] = 0.0
    if r < d:
        rb = r // sg
        smask = (1 << sbits) - 1
        for g in range(lane, G, LANES):
            c0 = (g >> 4) << 4
            wdt = min(16, G - c0)
            base = c0 * 2 * bits + (g - c0)
            sc = int32(stq[r, g])
            s = float32(st2[rb, 0, g]) * float32(sc & smask) + float32(st2[rb, 1, g])
            z = float32(st2[rb, 2, g]) * float32(sc >> sbits) + float32(st2[rb, 3, g])
            for t in range(TT):
                dot[t] = 0.0
                sx[t] = 0.0
            for pos in range(16):
                qv = float32(_spqr_code(codes, r, base, wdt, pos, bits))
                for t in range(TT):
                    if t0 + t < T:
                        xv = Xp[t0 + t, pos, g]
                        dot[t] += qv * xv
                        sx[t] += xv
            for t in range(TT):
                acc[t] += s * (dot[t] - z * sx[t])
        for p in range(rp[r] + lane, rp[r + 1], LANES):
            wv = float32(ov[p])
            j = int32(oc[p])
            for t in range(TT):
                if t0 + t < T:
                    acc[t] += wv * Xp[t0 + t, j & 15, j >> 4]
    store_rows(acc, out, bias, flags, r, t0, red, w, lane)


class CudaSpQR(CudaLinear):
    def __init__(self, lin):
        self.shape = lin.shape
        self.bits, self.sbits, self.sg, self.G = int(lin.bits), int(lin.sbits), int(lin.sg), int(lin.G)
        perm = lin.perm.astype(np.uint16) if lin.shape[1] <= 65536 else lin.perm   # as stored
        self.codes, self.stq, self.st2, self.perm, self.rp, self.oc, self.ov = self._up(
            lin.codes, lin.stq, lin.st2.view(F16), perm, lin.rp, lin.oc, lin.ov.view(F16))
        self._Xp = None            # permuted activations (T, 16, G), grown once

    def matmul(self, X, out, bias=None, accumulate=False):
        T = X.shape[0]
        if self._Xp is None or self._Xp.shape[0] < T:
            self._Xp = cuda.device_array((T, 16, self.G), np.float32)
        Xp = self._Xp[:T]
        spqr_prep[max(1, (T * 16 * self.G + 127) // 128), 128](X, self.perm, Xp)
        grid, block = launch_dims(self.shape[0], T)
        mm_spqr[grid, block](self.codes, self.stq, self.st2, self.rp, self.oc, self.ov, Xp, out,
                             bias if bias is not None else no_bias(), flags_of(bias, accumulate),
                             int32(self.bits), int32(self.sbits), int32(self.sg))


DeviceLinear = CudaSpQR

"""SpQR codec (Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation"; DESIGN §4 "spqr").

Byte layout: formats/codec-spqr.md. In short, for W (d, n), columns permuted by `perm` and padded
to n_pad (a multiple of 16; padded columns are zero and read zero activations):
- w[i, j] = s[i, g] * (q[i, j] - z[i, g]) with g = j // group, q a 2-4 bit code; s and z are
  themselves `stat_bits`-bit codes over blocks of `stat_group` rows with fp16 step/min per block;
- plus sparse outliers (CSR: int32 row pointers, uint16 permuted column, fp16 value = w - dense).
Codes are stored in units of 8 consecutive permuted columns (one uint32 at 4 bits, a uint16 of
2-bit low parts plus a uint8 of high bits at 3 bits, a uint16 at 2 bits): the kernels loop flat
over units, read the 8 activations of a unit from `xt[t, b] = x[perm[8b + t]]` (prepared once per
call) and stay vectorized (DESIGN §6). Stats are decoded per row inside the kernel, so what is
resident is exactly what is stored.

Encode is the paper's procedure (GPTQ with error feedback through the Cholesky factor of H⁻¹,
group statistics fit at the group's first column without its likely outliers found by the
leave-one-out criterion, outliers chosen column by column inside the pass), vectorized over rows.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit, prange

from ..errors import UnsupportedModelError
from ..kernels import f16_to_f32, get_threads

_JIT = dict(cache=True, nogil=True, fastmath=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True)

DEFAULTS = dict(bits=3, group=16, stat_bits=3, stat_group=16, outlier_threshold=0.2,
                permute="act_order", percdamp=0.01, blocksize=128)
# prange over rows only for matrices at least this big (a 2-thread region costs ~10 µs, DESIGN §6)
PAR_MIN_WEIGHTS = 1 << 19
TILE_ROWS = 16          # rows dequantized per tile in matmul (16 x n_pad f32 stays in L1/L2)
MATMUL_MIN_T = 4        # below this many tokens matmul is a loop of matvecs


def _params(params: dict | None) -> dict:
    p = dict(DEFAULTS)
    p.update(params or {})
    if p["bits"] not in (2, 3, 4):
        raise UnsupportedModelError(f"spqr codec: bits must be 2, 3 or 4, got {p['bits']!r}")
    if p["group"] != 16:
        raise UnsupportedModelError(f"spqr codec: only group=16 is implemented, got {p['group']!r}")
    if not 1 <= p["stat_bits"] <= 4:          # scale and zero codes share one byte
        raise UnsupportedModelError(f"spqr codec: stat_bits must be 1..4, got {p['stat_bits']!r}")
    if p["stat_group"] < 1:
        raise UnsupportedModelError(f"spqr codec: stat_group must be >= 1, got {p['stat_group']!r}")
    if p["permute"] not in ("act_order", None, "identity"):
        raise UnsupportedModelError(f"spqr codec: permute must be 'act_order' or None, got {p['permute']!r}")
    return p


# --- encode (NumPy) ------------------------------------------------------------------------

def _minmax(x: np.ndarray, maxq: int):
    """Asymmetric min-max fit over the last axis (range widened to include 0, as GPTQ):
    scale, fractional zero with x ≈ scale * (q - zero)."""
    xmin = np.minimum(x.min(-1), 0)
    xmax = np.maximum(x.max(-1), 0)
    flat = xmax - xmin <= 1e-12
    xmin = np.where(flat, -1e-6, xmin)
    xmax = np.where(flat, 1e-6, xmax)
    scale = (xmax - xmin) / maxq
    return scale, -xmin / scale


def _qdq(x, scale, zero, maxq):
    """Quantize-dequantize x with broadcastable scale/zero (reference quant_groups semantics)."""
    q = np.clip(np.rint(x / np.maximum(scale, 1e-12) + zero), 0, maxq)
    return scale * (q - zero)


def _quant_stat(v: np.ndarray, sg: int, sbits: int):
    """Second-level quantization of one column group's stat v (d,) over blocks of sg rows:
    -> codes (d,) uint8, step (R,) fp16, min (R,) fp16, dequantized (d,) float32 exactly as decoded."""
    d = v.shape[0]
    R = -(-d // sg)
    vp = np.concatenate([v, np.repeat(v[-1:], R * sg - d)]).reshape(R, sg)
    mn, mx = vp.min(1), vp.max(1)
    step16 = ((mx - mn) / ((1 << sbits) - 1)).astype(np.float16)
    mn16 = mn.astype(np.float16)
    step, mn32 = step16.astype(np.float32), mn16.astype(np.float32)
    q = np.clip(np.rint((vp - mn32[:, None]) / np.maximum(step, 1e-30)[:, None]), 0, (1 << sbits) - 1)
    deq = (step[:, None] * q.astype(np.float32) + mn32[:, None]).astype(np.float32)
    return q.reshape(-1)[:d].astype(np.uint8), step16, mn16, deq.reshape(-1)[:d]


def _loo_outlier_mask(Wg: np.ndarray, hd: np.ndarray, maxq: int, thr: float) -> np.ndarray:
    """SpQR leave-one-out criterion for a group Wg (d, k): True where refitting the group's
    quantizer without that weight lowers the group's H-weighted error by more than thr."""
    d, k = Wg.shape
    idx = np.array([[c for c in range(k) if c != j] for j in range(k)])          # (k, k-1)
    data = Wg[:, idx]                                                             # (d, k, k-1)
    s, z = _minmax(data, maxq)
    loo = (((_qdq(data, s[..., None], z[..., None], maxq) - data) / hd[idx]) ** 2).sum(-1)
    s, z = _minmax(Wg, maxq)
    base = (((_qdq(Wg, s[:, None], z[:, None], maxq) - Wg) / hd) ** 2).sum(-1, keepdims=True)
    return base - loo > thr


def _inverse_cholesky(H: np.ndarray, percdamp: float):
    """Upper Cholesky factor U of (H + damp·I)⁻¹ (GPTQ), after zeroing dead inputs: -> U, dead."""
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += percdamp * np.mean(np.abs(np.diag(H)))
    Linv = np.linalg.inv(np.linalg.cholesky(H))
    Hinv = Linv.T @ Linv
    return np.linalg.cholesky(Hinv).T.copy(), dead


def _pack_codes(Q: np.ndarray, bits: int):
    """Codes Q (d, n_pad) uint8 -> (lo, hi), one word per 16-column group (formats/codec-spqr.md)."""
    d, n_pad = Q.shape
    q = Q.reshape(d, n_pad // 16, 16).astype(np.uint32)
    sh = np.arange(16, dtype=np.uint32)
    if bits == 4:
        return ((q[..., :8] << (4 * sh[:8])).sum(-1, dtype=np.uint32),
                (q[..., 8:] << (4 * sh[:8])).sum(-1, dtype=np.uint32))
    lo = ((q & 3) << (2 * sh)).sum(-1, dtype=np.uint32)
    if bits == 2:
        return lo, np.zeros((d, 0), np.uint8)
    return lo, (((q >> 2) & 1) << sh).sum(-1, dtype=np.uint32).astype(np.uint16)


def _unpack_codes(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of _pack_codes: -> codes (d, n_pad) int64."""
    d, G = lo.shape
    sh = np.arange(16)
    lo = lo.astype(np.int64)[..., None]
    if bits == 4:
        q = np.concatenate([(lo >> (4 * sh[:8])) & 15, (hi.astype(np.int64)[..., None] >> (4 * sh[:8])) & 15], -1)
    else:
        q = (lo >> (2 * sh)) & 3
        if bits == 3:
            q |= ((hi.astype(np.int64)[..., None] >> sh) & 1) << 2
    return q.reshape(d, G * 16)


def encode(w: np.ndarray, params: dict | None = None, hessian: np.ndarray | None = None) -> dict:
    """SpQR-quantize W (d, n) float32 given H = E[x xᵀ] (n, n) of its input (see SpQRCodec.encode)."""
    p = _params(params)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise UnsupportedModelError(f"spqr codec: weight must be 2-D, got shape {w.shape}")
    d, n = w.shape
    if n > 65536:
        raise UnsupportedModelError(f"spqr codec: at most 65536 input columns (16-bit indices), got {n}")
    bits, gs, sb, sg = p["bits"], p["group"], p["stat_bits"], p["stat_group"]
    maxq = (1 << bits) - 1
    H = np.eye(n) if hessian is None else np.asarray(hessian, dtype=np.float64)
    if H.shape != (n, n):
        raise UnsupportedModelError(f"spqr codec: hessian must be ({n}, {n}), got {H.shape}")

    perm = (np.argsort(-np.diag(H), kind="stable") if p["permute"] == "act_order"
            else np.arange(n))
    n_pad = -(-n // gs) * gs
    G = n_pad // gs
    Hp = np.eye(n_pad)
    Hp[:n, :n] = H[np.ix_(perm, perm)]
    Hp[n:, n:] = 0.0                                  # padded columns are dead inputs
    Uc, dead = _inverse_cholesky(Hp, p["percdamp"])
    udiag = np.diag(Uc).astype(np.float32)
    Uc32 = Uc.astype(np.float32)

    # Work on Wᵀ so a column is a contiguous row: every step is vectorized over the d rows.
    WT = np.zeros((n_pad, d), np.float32)
    WT[:n] = w[:, perm].T
    WT[dead] = 0.0
    Q = np.empty((n_pad, d), np.uint8)
    S = np.empty((G, d), np.float32)
    Z = np.empty((G, d), np.float32)
    R = -(-d // sg)
    qs_all = np.empty((G, d), np.uint8)
    qz_all = np.empty((G, d), np.uint8)
    st2 = np.empty((R, 4, G), np.float16)
    # outlier threshold relative to the mean H-weighted column variance (reference spqr_engine)
    thr = float(p["outlier_threshold"]) * float(np.mean(WT[:n].var(axis=1) / udiag[:n] ** 2)) \
        if p["outlier_threshold"] not in (None, float("inf")) else math.inf
    out_cols, out_rows, out_vals = [], [], []

    bs = max(gs, p["blocksize"] // gs * gs)
    for b0 in range(0, n_pad, bs):
        b1 = min(n_pad, b0 + bs)
        E = np.empty((b1 - b0, d), np.float32)
        for c in range(b0, b1):
            if c % gs == 0:
                g = c // gs
                Wg = WT[c:c + gs].T                       # (d, gs)
                if math.isfinite(thr):
                    likely = _loo_outlier_mask(Wg, udiag[c:c + gs], maxq, thr)
                    keep = ~likely
                    mean = (Wg * keep).sum(1, keepdims=True) / np.maximum(keep.sum(1, keepdims=True), 1)
                    Wg = np.where(keep, Wg, mean)
                s, z = _minmax(Wg, maxq)
                qs_all[g], st2[:, 0, g], st2[:, 1, g], S[g] = _quant_stat(s.astype(np.float32), sg, sb)
                qz_all[g], st2[:, 2, g], st2[:, 3, g], Z[g] = _quant_stat(z.astype(np.float32), sg, sb)
                s_g, z_g = S[g], Z[g]
                sdiv = np.maximum(s_g, 1e-12)
            x = WT[c]
            q = np.clip(np.rint(x / sdiv + z_g), 0, maxq)
            rec = s_g * (q - z_g)
            if math.isfinite(thr):
                err = (x - rec) / udiag[c]
                rows = np.nonzero(err * err > thr)[0]
                if rows.size:
                    # the dense code at an outlier decodes the weight as 0; the sparse value is the
                    # fp16 residual w - dense, so dense + sparse reproduces w (DESIGN §4 trap)
                    q[rows] = np.clip(np.rint(z_g[rows]), 0, maxq)
                    dense = s_g[rows] * (q[rows] - z_g[rows])
                    val = (x[rows] - dense).astype(np.float16)
                    rec[rows] = dense + val.astype(np.float32)
                    out_cols.append(np.full(rows.size, c, np.uint16))
                    out_rows.append(rows)
                    out_vals.append(val)
            Q[c] = q
            e = (x - rec) / udiag[c]
            E[c - b0] = e
            if c + 1 < b1:
                WT[c + 1:b1] -= Uc32[c, c + 1:b1, None] * e[None, :]
        if b1 < n_pad:
            WT[b1:] -= Uc32[b0:b1, b1:].T @ E

    lo, hi = _pack_codes(np.ascontiguousarray(Q.T), bits)
    if out_rows:
        rows = np.concatenate(out_rows)
        cols = np.concatenate(out_cols)
        vals = np.concatenate(out_vals)
        order = np.lexsort((cols, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
    else:
        rows = np.zeros(0, np.int64)
        cols = np.zeros(0, np.uint16)
        vals = np.zeros(0, np.float16)
    rowptr = np.zeros(d + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=d), out=rowptr[1:])
    return {
        "codes_lo": lo,
        "codes_hi": hi,
        "stat_codes": np.ascontiguousarray((qs_all | (qz_all << sb)).T),
        "stats": st2.view(np.uint16),
        "perm": perm.astype(np.uint16 if n <= 65536 else np.int32),
        "outlier_rowptr": rowptr,
        "outlier_col": cols.astype(np.uint16),
        "outlier_val": vals.view(np.uint16),
    }


def decode(parts: dict, params: dict | None = None) -> np.ndarray:
    """Reference NumPy decode -> float32 (d, n) in the original column order (tests only)."""
    p = _params(params)
    bits, sb, sg = p["bits"], p["stat_bits"], p["stat_group"]
    lo = parts["codes_lo"]
    d, G = lo.shape
    perm = parts["perm"].astype(np.int64)
    n = perm.shape[0]
    q = _unpack_codes(lo, parts["codes_hi"], bits).astype(np.float32)
    f = parts["stat_codes"].astype(np.int64)
    qs, qz = f & ((1 << sb) - 1), f >> sb
    st = parts["stats"].view(np.float16).astype(np.float32)[np.arange(d) // sg]     # (d, 4, G)
    s = st[:, 0] * qs + st[:, 1]
    z = st[:, 2] * qz + st[:, 3]
    Wp = (np.repeat(s, 16, axis=1) * q - np.repeat(s * z, 16, axis=1)).astype(np.float32)
    rows = np.repeat(np.arange(d), np.diff(parts["outlier_rowptr"]))
    Wp[rows, parts["outlier_col"].astype(np.int64)] += parts["outlier_val"].view(np.float16).astype(np.float32)
    W = np.empty((d, n), np.float32)
    W[:, perm] = Wp[:, :n]
    return W


# --- kernels -------------------------------------------------------------------------------
# Layout for the kernels (DESIGN §6): the flat loop runs over the G groups of a row, one packed
# word (or two) per group, 16 unrolled products with activations xt[t, g] = x[perm[16g + t]];
# the group's scale and zero are decoded in the same loop from one stat byte and four f32
# second-level values of the row block (widened from fp16 once per block).

@njit(**_JIT)
def _prep_x(x, perm, xt, xs):
    # x (n,) -> xt (16, G): xt[t, g] = x[perm[16g+t]] (0 past n); xs (G,) = Σ_t xt[t, g]
    n = perm.shape[0]
    for g in range(xt.shape[1]):
        acc = np.float32(0.0)
        for t in range(16):
            j = 16 * g + t
            v = x[perm[j]] if j < n else np.float32(0.0)
            xt[t, g] = v
            acc += v
        xs[g] = acc


@njit(**_JIT)
def _block_stats(st2, rb, sf):
    # fp16 second-level stats of row block rb, st2 (R, 4, G) -> sf (4, G) float32
    for k in range(4):
        for g in range(st2.shape[2]):
            sf[k, g] = f16_to_f32(st2[rb, k, g])


@njit(inline="always", **_JIT)
def _dot4(lo, hi, stq, sf, i, xt, xs, sbits):
    # row i of 4-bit SpQR · x: Σ_g s_g (q_g · x_g - z_g Σx_g); lo/hi uint32 nibbles, weights 0-7 / 8-15
    acc = np.float32(0.0)
    m = np.int32(15)
    sm = (np.int32(1) << np.int32(sbits)) - np.int32(1)
    sb = np.int32(sbits)
    for g in range(lo.shape[1]):
        v = np.int32(lo[i, g])
        w = np.int32(hi[i, g])
        dot = (np.float32(v & m) * xt[0, g] + np.float32((v >> np.int32(4)) & m) * xt[1, g]
               + np.float32((v >> np.int32(8)) & m) * xt[2, g] + np.float32((v >> np.int32(12)) & m) * xt[3, g]
               + np.float32((v >> np.int32(16)) & m) * xt[4, g] + np.float32((v >> np.int32(20)) & m) * xt[5, g]
               + np.float32((v >> np.int32(24)) & m) * xt[6, g] + np.float32((v >> np.int32(28)) & m) * xt[7, g]
               + np.float32(w & m) * xt[8, g] + np.float32((w >> np.int32(4)) & m) * xt[9, g]
               + np.float32((w >> np.int32(8)) & m) * xt[10, g] + np.float32((w >> np.int32(12)) & m) * xt[11, g]
               + np.float32((w >> np.int32(16)) & m) * xt[12, g] + np.float32((w >> np.int32(20)) & m) * xt[13, g]
               + np.float32((w >> np.int32(24)) & m) * xt[14, g] + np.float32((w >> np.int32(28)) & m) * xt[15, g])
        f = np.int32(stq[i, g])
        s = sf[0, g] * np.float32(f & sm) + sf[1, g]
        z = sf[2, g] * np.float32(f >> sb) + sf[3, g]
        acc += s * (dot - z * xs[g])
    return acc


@njit(inline="always", **_JIT)
def _dot3(lo, hi, stq, sf, i, xt, xs, sbits):
    # as _dot4 for 3-bit codes: low 2 bits of weight t at bit 2t of lo (uint32), bit 2 at bit t of hi (uint16)
    acc = np.float32(0.0)
    m = np.int32(3)
    f4 = np.int32(4)
    sm = (np.int32(1) << np.int32(sbits)) - np.int32(1)
    sb = np.int32(sbits)
    for g in range(lo.shape[1]):
        v = np.int32(lo[i, g])
        h = np.int32(hi[i, g])
        dot = (np.float32((v & m) | ((h << np.int32(2)) & f4)) * xt[0, g]
               + np.float32(((v >> np.int32(2)) & m) | ((h << np.int32(1)) & f4)) * xt[1, g]
               + np.float32(((v >> np.int32(4)) & m) | (h & f4)) * xt[2, g]
               + np.float32(((v >> np.int32(6)) & m) | ((h >> np.int32(1)) & f4)) * xt[3, g]
               + np.float32(((v >> np.int32(8)) & m) | ((h >> np.int32(2)) & f4)) * xt[4, g]
               + np.float32(((v >> np.int32(10)) & m) | ((h >> np.int32(3)) & f4)) * xt[5, g]
               + np.float32(((v >> np.int32(12)) & m) | ((h >> np.int32(4)) & f4)) * xt[6, g]
               + np.float32(((v >> np.int32(14)) & m) | ((h >> np.int32(5)) & f4)) * xt[7, g]
               + np.float32(((v >> np.int32(16)) & m) | ((h >> np.int32(6)) & f4)) * xt[8, g]
               + np.float32(((v >> np.int32(18)) & m) | ((h >> np.int32(7)) & f4)) * xt[9, g]
               + np.float32(((v >> np.int32(20)) & m) | ((h >> np.int32(8)) & f4)) * xt[10, g]
               + np.float32(((v >> np.int32(22)) & m) | ((h >> np.int32(9)) & f4)) * xt[11, g]
               + np.float32(((v >> np.int32(24)) & m) | ((h >> np.int32(10)) & f4)) * xt[12, g]
               + np.float32(((v >> np.int32(26)) & m) | ((h >> np.int32(11)) & f4)) * xt[13, g]
               + np.float32(((v >> np.int32(28)) & m) | ((h >> np.int32(12)) & f4)) * xt[14, g]
               + np.float32(((v >> np.int32(30)) & m) | ((h >> np.int32(13)) & f4)) * xt[15, g])
        f = np.int32(stq[i, g])
        s = sf[0, g] * np.float32(f & sm) + sf[1, g]
        z = sf[2, g] * np.float32(f >> sb) + sf[3, g]
        acc += s * (dot - z * xs[g])
    return acc


@njit(inline="always", **_JIT)
def _dot2(lo, stq, sf, i, xt, xs, sbits):
    # as _dot4 for 2-bit codes: weight t at bit 2t of lo (uint32)
    acc = np.float32(0.0)
    m = np.int32(3)
    sm = (np.int32(1) << np.int32(sbits)) - np.int32(1)
    sb = np.int32(sbits)
    for g in range(lo.shape[1]):
        v = np.int32(lo[i, g])
        dot = (np.float32(v & m) * xt[0, g] + np.float32((v >> np.int32(2)) & m) * xt[1, g]
               + np.float32((v >> np.int32(4)) & m) * xt[2, g] + np.float32((v >> np.int32(6)) & m) * xt[3, g]
               + np.float32((v >> np.int32(8)) & m) * xt[4, g] + np.float32((v >> np.int32(10)) & m) * xt[5, g]
               + np.float32((v >> np.int32(12)) & m) * xt[6, g] + np.float32((v >> np.int32(14)) & m) * xt[7, g]
               + np.float32((v >> np.int32(16)) & m) * xt[8, g] + np.float32((v >> np.int32(18)) & m) * xt[9, g]
               + np.float32((v >> np.int32(20)) & m) * xt[10, g] + np.float32((v >> np.int32(22)) & m) * xt[11, g]
               + np.float32((v >> np.int32(24)) & m) * xt[12, g] + np.float32((v >> np.int32(26)) & m) * xt[13, g]
               + np.float32((v >> np.int32(28)) & m) * xt[14, g] + np.float32((v >> np.int32(30)) & m) * xt[15, g])
        f = np.int32(stq[i, g])
        s = sf[0, g] * np.float32(f & sm) + sf[1, g]
        z = sf[2, g] * np.float32(f >> sb) + sf[3, g]
        acc += s * (dot - z * xs[g])
    return acc


@njit(**_JIT)
def _mv_rows(bits, lo, hi, stq, st2, rp, oc, ov, sg, sbits, xt, xs, out, r0, r1, sf):
    # SpQR W (d, n_pad) @ x (prepared as xt (16, G), xs (G,)) -> out[r0:r1]; sf (4, G) scratch
    cur = -1
    for i in range(r0, r1):
        rb = i // sg
        if rb != cur:
            _block_stats(st2, rb, sf)
            cur = rb
        if bits == 4:
            acc = _dot4(lo, hi, stq, sf, i, xt, xs, sbits)
        elif bits == 3:
            acc = _dot3(lo, hi, stq, sf, i, xt, xs, sbits)
        else:
            acc = _dot2(lo, stq, sf, i, xt, xs, sbits)
        for k in range(rp[i], rp[i + 1]):
            c = np.int32(oc[k])
            acc += f16_to_f32(ov[k]) * xt[c & 15, c >> 4]
        out[i] = acc


@njit(**_JIT_PAR)
def _mv_par(bits, lo, hi, stq, st2, rp, oc, ov, sg, sbits, xt, xs, out, sf):
    # SpQR W (d, n_pad) @ x -> out (d,); prange over sf.shape[0] row blocks, one sf (4, G) each
    d = lo.shape[0]
    nblocks = sf.shape[0]
    step = (d + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        _mv_rows(bits, lo, hi, stq, st2, rp, oc, ov, sg, sbits, xt, xs, out,
                 blk * step, min(d, (blk + 1) * step), sf[blk])


@njit(**_JIT)
def _decode_rows(bits, lo, hi, stq, st2, rp, oc, ov, sg, sbits, r0, r1, tile, sf):
    # SpQR rows r0:r1 -> tile (>= r1-r0, n_pad) float32 in permuted column order, outliers added
    sm = (np.int32(1) << np.int32(sbits)) - np.int32(1)
    cur = -1
    for i in range(r0, r1):
        rb = i // sg
        if rb != cur:
            _block_stats(st2, rb, sf)
            cur = rb
        r = i - r0
        for g in range(lo.shape[1]):
            f = np.int32(stq[i, g])
            s = sf[0, g] * np.float32(f & sm) + sf[1, g]
            sz = s * (sf[2, g] * np.float32(f >> np.int32(sbits)) + sf[3, g])
            v = np.int32(lo[i, g])
            h = np.int32(hi[i, g]) if bits != 2 else np.int32(0)
            for t in range(16):
                if bits == 4:
                    q = ((v if t < 8 else h) >> np.int32(4 * (t & 7))) & np.int32(15)
                else:
                    q = (v >> np.int32(2 * t)) & np.int32(3)
                    if bits == 3:
                        q |= ((h >> np.int32(t)) & np.int32(1)) << np.int32(2)
                tile[r, 16 * g + t] = s * np.float32(q) - sz
        for k in range(rp[i], rp[i + 1]):
            tile[r, np.int32(oc[k])] += f16_to_f32(ov[k])


@njit(**_JIT)
def _prep_X(X, perm, Xp):
    # X (T, n) -> Xp (T, n_pad) with Xp[t, j] = X[t, perm[j]] (0 past n)
    n = perm.shape[0]
    for t in range(X.shape[0]):
        for j in range(n):
            Xp[t, j] = X[t, perm[j]]
        for j in range(n, Xp.shape[1]):
            Xp[t, j] = 0.0


@njit(**_JIT)
def _tile_mm(tile, nr, Xp, out, r0):
    # tile (nr, n_pad) @ Xp (T, n_pad).T -> out[:, r0:r0+nr]; 4 rows x 4 tokens register blocks
    T = Xp.shape[0]
    n = Xp.shape[1]
    r4 = nr - nr % 4
    t4 = T - T % 4
    for r in range(0, r4, 4):
        for t in range(0, t4, 4):
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
            for j in range(n):
                w0 = tile[r, j]
                w1 = tile[r + 1, j]
                w2 = tile[r + 2, j]
                w3 = tile[r + 3, j]
                x0 = Xp[t, j]
                x1 = Xp[t + 1, j]
                x2 = Xp[t + 2, j]
                x3 = Xp[t + 3, j]
                a00 += w0 * x0
                a01 += w0 * x1
                a02 += w0 * x2
                a03 += w0 * x3
                a10 += w1 * x0
                a11 += w1 * x1
                a12 += w1 * x2
                a13 += w1 * x3
                a20 += w2 * x0
                a21 += w2 * x1
                a22 += w2 * x2
                a23 += w2 * x3
                a30 += w3 * x0
                a31 += w3 * x1
                a32 += w3 * x2
                a33 += w3 * x3
            c = r0 + r
            out[t, c] = a00
            out[t + 1, c] = a01
            out[t + 2, c] = a02
            out[t + 3, c] = a03
            out[t, c + 1] = a10
            out[t + 1, c + 1] = a11
            out[t + 2, c + 1] = a12
            out[t + 3, c + 1] = a13
            out[t, c + 2] = a20
            out[t + 1, c + 2] = a21
            out[t + 2, c + 2] = a22
            out[t + 3, c + 2] = a23
            out[t, c + 3] = a30
            out[t + 1, c + 3] = a31
            out[t + 2, c + 3] = a32
            out[t + 3, c + 3] = a33
        for t in range(t4, T):
            for rr in range(r, r + 4):
                acc = np.float32(0.0)
                for j in range(n):
                    acc += tile[rr, j] * Xp[t, j]
                out[t, r0 + rr] = acc
    for rr in range(r4, nr):
        for t in range(T):
            acc = np.float32(0.0)
            for j in range(n):
                acc += tile[rr, j] * Xp[t, j]
            out[t, r0 + rr] = acc


@njit(**_JIT)
def _mm_rows(bits, lo, hi, stq, st2, rp, oc, ov, sg, sbits, Xp, out, r0, r1, tile, sf):
    # SpQR W[r0:r1] @ Xp.T -> out[:, r0:r1], dequantizing tile.shape[0] rows at a time into tile
    tr = tile.shape[0]
    for a in range(r0, r1, tr):
        b = min(r1, a + tr)
        _decode_rows(bits, lo, hi, stq, st2, rp, oc, ov, sg, sbits, a, b, tile, sf)
        _tile_mm(tile, b - a, Xp, out, a)


@njit(**_JIT_PAR)
def _mm_par(bits, lo, hi, stq, st2, rp, oc, ov, sg, sbits, Xp, out, tiles, sf):
    # SpQR W (d, n_pad) @ Xp (T, n_pad).T -> out (T, d); prange over tiles.shape[0] row blocks
    d = lo.shape[0]
    nblocks = tiles.shape[0]
    tr = tiles.shape[1]
    step = ((d + nblocks - 1) // nblocks + tr - 1) // tr * tr
    for blk in prange(nblocks):
        _mm_rows(bits, lo, hi, stq, st2, rp, oc, ov, sg, sbits, Xp, out,
                 min(d, blk * step), min(d, (blk + 1) * step), tiles[blk], sf[blk])


@njit(**_JIT)
def _row_out(perm, tmp, out):
    # tmp (n_pad,) permuted row -> out (n,) in original order
    for j in range(perm.shape[0]):
        out[perm[j]] = tmp[j]


_tls = threading.local()


def _buf(name: str, shape: tuple) -> np.ndarray:
    """A per-Python-thread float32 scratch buffer, grown on demand and shared by every SpQRLinear."""
    size = int(np.prod(shape))
    buf = getattr(_tls, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, np.float32)
        setattr(_tls, name, buf)
    return buf[:size].reshape(shape)


class SpQRLinear:
    """A loaded SpQR weight W (d, n): matvec / matmul / row straight from the stored parts."""

    def __init__(self, parts: dict, p: dict):
        self.bits, self.sbits, self.sg = p["bits"], p["stat_bits"], p["stat_group"]
        a = {k: np.ascontiguousarray(v) for k, v in parts.items()}
        self.lo, self.hi, self.stq, self.st2 = a["codes_lo"], a["codes_hi"], a["stat_codes"], a["stats"]
        self.perm = a["perm"].astype(np.int32)
        self.rp, self.oc, self.ov = a["outlier_rowptr"], a["outlier_col"], a["outlier_val"]
        d, G = self.lo.shape
        n = self.perm.shape[0]
        self.shape = (d, n)
        self.n_pad = G * 16
        # every stored part is resident as is (stats are decoded inside the kernels)
        self.nbytes = int(sum(v.nbytes for v in parts.values()))
        self.bits_per_weight = self.nbytes * 8 / (d * n)
        self._big = d * n >= PAR_MIN_WEIGHTS
        # per-call scratch, allocated once: prepared activations, per-thread f32 block stats
        self.xt = np.zeros((16, G), np.float32)
        self.xs = np.zeros(G, np.float32)
        self.sf = np.zeros((1, 4, G), np.float32)
        self.tmp = np.zeros((1, self.n_pad), np.float32)

    def _args(self):
        return (self.bits, self.lo, self.hi, self.stq, self.st2, self.rp, self.oc, self.ov,
                self.sg, self.sbits)

    def _scratch(self, threads: int) -> np.ndarray:
        if self.sf.shape[0] < threads:
            self.sf = np.zeros((threads,) + self.sf.shape[1:], np.float32)
        return self.sf[:threads]

    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        """out (d,) = W (d, n) @ x (n,)."""
        _prep_x(x, self.perm, self.xt, self.xs)
        threads = get_threads()
        if threads > 1 and self._big:
            _mv_par(*self._args(), self.xt, self.xs, out, self._scratch(threads))
        else:
            _mv_rows(*self._args(), self.xt, self.xs, out, 0, self.shape[0], self.sf[0])

    def matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        """out (T, d) = X (T, n) @ W.T: dequantize row tiles to f32, register-blocked multiply."""
        T = X.shape[0]
        if T < MATMUL_MIN_T:
            for t in range(T):
                self.matvec(X[t], out[t])
            return
        Xp = _buf("xp", (T, self.n_pad))
        _prep_X(X, self.perm, Xp)
        threads = get_threads()
        nb = threads if threads > 1 and self.shape[0] >= 4 * TILE_ROWS else 1
        tiles = _buf("tiles", (nb, TILE_ROWS, self.n_pad))
        sf = self._scratch(nb)
        if nb > 1:
            _mm_par(*self._args(), Xp, out, tiles, sf)
        else:
            _mm_rows(*self._args(), Xp, out, 0, self.shape[0], tiles[0], sf[0])

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        _decode_rows(*self._args(), i, i + 1, self.tmp, self.sf[0])
        _row_out(self.perm, self.tmp[0], out)


class SpQRCodec:
    """SpQR weights; params {"bits": 2..4 (3), "group": 16, "stat_bits": 3, "stat_group": 16,
    "outlier_threshold": 0.2 (relative, paper's τ; inf or None = no outliers),
    "permute": "act_order" | None, "percdamp": 0.01, "blocksize": 128}."""

    name = "spqr"

    @staticmethod
    def encode(w: np.ndarray, params: dict | None = None, hessian: np.ndarray | None = None) -> dict:
        """float32 W (d, n) -> parts (formats/codec-spqr.md). `hessian` is H = E[x xᵀ] (n, n) of
        the input; the procedure needs it. Without it H = I: no error feedback between columns
        (GPTQ degenerates to round-to-nearest) and act_order keeps the identity order."""
        return encode(w, params, hessian)

    @staticmethod
    def decode(parts: dict, params: dict | None = None) -> np.ndarray:
        """Reference NumPy decode to float32 (d, n), original column order (tests only)."""
        return decode(parts, params)

    @staticmethod
    def load(parts: dict, params: dict | None = None) -> SpQRLinear:
        """A SpQRLinear over the parts (zero-copy for C-contiguous arrays)."""
        p = _params(params)
        missing = {"codes_lo", "codes_hi", "stat_codes", "stats", "perm", "outlier_rowptr",
                   "outlier_col", "outlier_val"} - set(parts)
        if missing:
            raise UnsupportedModelError(f"spqr codec: missing parts {sorted(missing)}")
        return SpQRLinear(parts, p)

    @staticmethod
    def nbytes(parts: dict) -> int:
        """Bytes of the stored parts (all of them are resident; nothing is expanded at load)."""
        return int(sum(v.nbytes for v in parts.values()))

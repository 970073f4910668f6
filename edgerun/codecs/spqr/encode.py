"""SpQR codec, pack time.

Encode is the paper's procedure (GPTQ with error feedback through the Cholesky factor of H⁻¹,
group statistics fit at the group's first column without its likely outliers found by the
leave-one-out criterion, outliers chosen column by column inside the pass), vectorized over rows.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import UnsupportedModelError
from ...kernels import row_bands, threaded_map
from ..gptq import inverse_cholesky as _inverse_cholesky
from .format import _pack_codes, params_of as _params

PASS_ROWS = 32768          # rows of W encoded per pass (`encode`)


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


def encode(w: np.ndarray, params: dict | None = None, hessian: np.ndarray | None = None) -> dict:
    """SpQR-quantize W (d, n) float32 given H = E[x xᵀ] (n, n) of its input (see SpQRCodec.encode)."""
    p = _params(params)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise UnsupportedModelError(f"spqr codec: weight must be 2-D, got shape {w.shape}")
    d, n = w.shape
    if n > 65536:
        raise UnsupportedModelError(f"spqr codec: at most 65536 input columns (16-bit indices), got {n}")
    gs, sb, sg = p["group"], p["stat_bits"], p["stat_group"]
    H = np.eye(n) if hessian is None else np.asarray(hessian)      # any float dtype: no n×n copy
    if H.shape != (n, n):
        raise UnsupportedModelError(f"spqr codec: hessian must be ({n}, {n}), got {H.shape}")

    perm = (np.argsort(-np.diag(H), kind="stable") if p["permute"] == "act_order"
            else np.arange(n))
    n_pad = -(-n // gs) * gs
    # padded columns are dead inputs
    Uc32, dead = _inverse_cholesky(H, p["percdamp"], perm=perm, size=n_pad)
    udiag = np.diag(Uc32).copy()

    # outlier threshold relative to the mean H-weighted column variance (reference spqr_engine)
    thr = float(p["outlier_threshold"]) * float(np.mean(_column_variance(w)[perm] / udiag[:n] ** 2)) \
        if p["outlier_threshold"] not in (None, float("inf")) else math.inf
    # Rows are independent (GPTQ's error feedback runs along a row; the statistics' second-level
    # groups are sg rows): a pass over PASS_ROWS rows holds their Wᵀ, not the whole matrix's (0.9
    # GB more for the 1.5B's output head, 151936 rows: the `--bpw 3.5` pack's peak, BENCHMARKS.md)
    step = max(sg, PASS_ROWS // sg * sg)
    starts = range(0, d, step)
    passes = [_gptq_rows(w[r0:r0 + step], perm, dead, Uc32, udiag, thr, p) for r0 in starts]
    codes = np.concatenate([q[0] for q in passes])
    qs_all, qz_all = (np.concatenate([q[i] for q in passes], axis=1) for i in (1, 2))
    st2 = np.concatenate([q[3] for q in passes])
    rows = np.concatenate([q[4] + r0 for q, r0 in zip(passes, starts)])
    cols = np.concatenate([q[5] for q in passes])
    vals = np.concatenate([q[6] for q in passes])
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    rowptr = np.zeros(d + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=d), out=rowptr[1:])
    return {
        "codes": codes,
        "stat_codes": np.ascontiguousarray((qs_all | (qz_all << sb)).T),
        "stats": st2.view(np.uint16),
        "perm": perm.astype(np.uint16 if n <= 65536 else np.int32),
        "outlier_rowptr": rowptr,
        "outlier_col": cols.astype(np.uint16),
        "outlier_val": vals.view(np.uint16),
    }


def _column_variance(w: np.ndarray, rows: int = 4096) -> np.ndarray:
    """Variance over rows of each column of w (d, n), in float64, `rows` rows at a time."""
    blocks = range(0, len(w), rows)
    mean = sum(w[r0:r0 + rows].sum(0, dtype=np.float64) for r0 in blocks) / len(w)
    return sum(np.square(w[r0:r0 + rows] - mean).sum(0) for r0 in blocks) / len(w)


def _gptq_rows(w: np.ndarray, perm, dead, Uc32, udiag, thr: float, p: dict):
    """One pass of `encode` over rows w (d, n): (packed codes (d, ·), stat codes qs, qz (G, d),
    second-level stats (R, 4, G), the outliers' rows, columns and fp16 values)."""
    d, n = w.shape
    bits, gs, sb, sg = p["bits"], p["group"], p["stat_bits"], p["stat_group"]
    maxq = (1 << bits) - 1
    n_pad = Uc32.shape[0]
    G = n_pad // gs
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
    out_cols, out_rows, out_vals = [np.zeros(0, np.uint16)], [np.zeros(0, np.int64)], [np.zeros(0, np.float16)]

    bs = max(gs, p["blocksize"] // gs * gs)
    bands = row_bands(d)              # the lazy updates' rows, one band per kernel thread
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
        if b1 < n_pad:    # lazy batch update of the columns after the block (a matmul per thread)
            def update(rows):
                WT[b1:, rows] -= Uc32[b0:b1, b1:].T @ E[:, rows]
            threaded_map(update, bands)

    return (_pack_codes(np.ascontiguousarray(Q.T), bits), qs_all, qz_all, st2, np.concatenate(out_rows),
            np.concatenate(out_cols), np.concatenate(out_vals))

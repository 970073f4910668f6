"""SpQR codec, the format (Dettmers et al. 2023, "SpQR"; DESIGN §4 "spqr").

Byte layout: formats/codec-spqr.md. In short, for W (d, n), columns permuted by `perm` and padded
to n_pad (a multiple of 16; padded columns are zero and read zero activations):
- w[i, j] = s[i, g] * (q[i, j] - z[i, g]) with g = j // group, q a 2-4 bit code; s and z are
  themselves `stat_bits`-bit codes over blocks of `stat_group` rows with fp16 step/min per block;
- plus sparse outliers (CSR: int32 row pointers, uint16 permuted column, fp16 value = w - dense).
Codes are stored by chunks of 16 groups in byte sections with one byte per group, so a kernel
vector lane is a group (see kernels.py): the matvec decodes 16 weights per vector op and
applies the 16 groups' scales and zeros with a few more, ≈ 2× the speed of a per-group layout.
Stats are decoded per row block inside the kernel, so what is resident is exactly what is stored
(plus, per matrix, an activation index and scratch of a few KiB).
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedModelError

DEFAULTS = dict(bits=3, group=16, stat_bits=3, stat_group=16, outlier_threshold=0.2,
                permute="act_order", percdamp=0.01, blocksize=128)


def params_of(params: dict | None) -> dict:
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


def _chunks(G: int):
    """(g0, w) of the 16-group chunks of a row: full chunks, then one tail chunk of G mod 16."""
    return [(g0, min(16, G - g0)) for g0 in range(0, G, 16)]


def _sections(block: np.ndarray, bits: int) -> list:
    """Codes of one chunk, block (d, w, 16) [row, group, position] -> its 2·bits byte sections (d, w)."""
    if bits == 4:     # section u: positions 2u (low nibble), 2u+1 (high nibble)
        return [block[..., 2 * u] | (block[..., 2 * u + 1] << 4) for u in range(8)]
    lo = [sum((block[..., 4 * u + k] & 3) << (2 * k) for k in range(4)) for u in range(4)]
    if bits == 2:     # section u: positions 4u..4u+3, two bits each
        return lo
    # 3 bits: the 2-bit sections of the low bits, then bit 2 of positions 8h..8h+7 at bits 0..7
    return lo + [sum(((block[..., 8 * h + k] >> 2) & 1) << k for k in range(8)) for h in range(2)]


def _pack_codes(Q: np.ndarray, bits: int) -> np.ndarray:
    """Codes Q (d, n_pad) uint8 -> codes (d, 2·bits·G) uint8 (formats/codec-spqr.md "codes")."""
    d, n_pad = Q.shape
    q = Q.reshape(d, n_pad // 16, 16).astype(np.uint8)
    out = [s.astype(np.uint8) for g0, w in _chunks(n_pad // 16) for s in _sections(q[:, g0:g0 + w], bits)]
    return np.ascontiguousarray(np.concatenate(out, axis=1)) if out else np.zeros((d, 0), np.uint8)


def _unpack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of _pack_codes: -> codes (d, n_pad) int64 in storage column order."""
    d = codes.shape[0]
    G = codes.shape[1] // (2 * bits)
    q = np.zeros((d, G, 16), np.int64)
    off = 0
    for g0, w in _chunks(G):
        sec = [codes[:, off + k * w: off + (k + 1) * w].astype(np.int64) for k in range(2 * bits)]
        off += 2 * bits * w
        for t in range(16):
            if bits == 4:
                q[:, g0:g0 + w, t] = (sec[t // 2] >> (4 * (t % 2))) & 15
            else:
                q[:, g0:g0 + w, t] = (sec[t // 4] >> (2 * (t % 4))) & 3
                if bits == 3:
                    q[:, g0:g0 + w, t] |= ((sec[4 + t // 8] >> (t % 8)) & 1) << 2
    return q.reshape(d, G * 16)


def _check_shapes(parts: dict, bits: int) -> tuple[int, int]:
    """(d, G) of the parts, or UnsupportedModelError when codes do not match bits and stat_codes."""
    d, G = parts["stat_codes"].shape
    codes = parts["codes"]
    if codes.dtype != np.uint8 or codes.shape != (d, 2 * bits * G) or len(parts["perm"]) > 16 * G:
        raise UnsupportedModelError(f"spqr codec: codes {codes.dtype} {codes.shape} do not match bits={bits} "
                                    f"and stat_codes {parts['stat_codes'].shape}")
    return d, G


REQUIRED_PARTS = ("codes", "stat_codes", "stats", "perm", "outlier_rowptr", "outlier_col", "outlier_val")

_params = params_of

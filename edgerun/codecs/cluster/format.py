"""Cluster codec: the format (formats/codec-cluster.md): parts, params, the bit-plane layout.

Parts: "codes" (d, nblk·4·bits) uint8 (32-weight blocks split in 4/2/1-bit planes), "codebook"
(G, 2^bits) float16 bits (one codebook per `group_rows` rows), "meta" [d, n, bits, group_rows,
PLANE_ORDER] int32, and optionally the CSR outliers "outlier_rowptr" int32, "outlier_col" uint16,
"outlier_val" float16 bits. Every part is stored and counted (`ClusterCodec.nbytes`).
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedModelError

BLOCK = 32                 # weights per block; a block is 4*bits bytes
OUTLIER_PARTS = ("outlier_rowptr", "outlier_col", "outlier_val")   # CSR, present only with outliers
# meta[4], the 1-bit plane's bit order: 2 = byte k holds weights k, k+4, ..., k+28 (one shift
# per 32-bit lane unpacks it). Packs from before 2026-12-07 have a 4-entry meta and order 1
# (bit j of a uint32 = weight j); `codes_of` converts their odd-bit codes at load.
PLANE_ORDER = 2
# what a file holding cluster tensors declares in its manifest's format.features, so that
# readers from before PLANE_ORDER refuse it ("upgrade") instead of misreading the 1-bit plane
FILE_FEATURE = "cluster-planes-2"


def _planes(bits: int) -> list[int]:
    """Field widths of a block's bit planes, lowest index bits first: 4-bit planes, 2, 1."""
    return [4] * (bits // 4) + [2] * ((bits % 4) // 2) + [1] * (bits % 2)


def default_group_rows(bits: int, n: int) -> int:
    """Smallest power of two g with codebook overhead K·16 / (g·n) ≤ 0.25 bits/weight.

    On SmolLM2 (weights from its Q4_1 GGUF) per-row codebooks were best at 2-3 bits, while at
    4 bits sharing a codebook over 2-8 rows gave equal or lower error than per-row at fewer
    bits (tools/bench_cluster.py). n = 576: 2-3 bits g = 1, 4 bits g = 2, 8 bits g = 32.
    """
    g = 1
    while (1 << bits) * 16 > 0.25 * g * n and g < 1 << 20:
        g *= 2
    return g


def pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
    """Indices (d, n) < 2^bits -> codes (d, nblk·4·bits) uint8 in the block/bit-plane layout."""
    d, n = idx.shape
    nblk = -(-n // BLOCK)
    full = np.zeros((d, nblk * BLOCK), np.uint8)
    full[:, :n] = idx
    blk = full.reshape(d, nblk, BLOCK)
    out, shift = [], 0
    for width in _planes(bits):
        f = (blk >> shift) & ((1 << width) - 1)
        if width == 4:      # byte k: weight k (low nibble), weight k+16 (high)
            out.append(f[..., :16] | (f[..., 16:] << 4))
        elif width == 2:    # byte k: weights k, k+8, k+16, k+24 at bits 0, 2, 4, 6
            out.append(f[..., 0:8] | (f[..., 8:16] << 2) | (f[..., 16:24] << 4) | (f[..., 24:32] << 6))
        else:
            out.append(_pack_one_bit(f))
        shift += width
    return np.concatenate(out, axis=-1).reshape(d, nblk * 4 * bits)


def _pack_one_bit(f: np.ndarray) -> np.ndarray:
    """(..., 32) fields in {0, 1} -> (..., 4) bytes, order 2: byte k = Σ_i f[4i + k] << i."""
    return np.packbits(f.reshape(*f.shape[:-1], 8, 4).swapaxes(-1, -2), axis=-1, bitorder="little")[..., 0]


def _unpack_one_bit(p: np.ndarray) -> np.ndarray:
    """Inverse of _pack_one_bit: (..., 4) uint8 -> (..., 32) uint8 fields."""
    return np.unpackbits(p[..., None], axis=-1, bitorder="little").swapaxes(-1, -2).reshape(*p.shape[:-1], BLOCK)


def _order_1_to_2() -> np.ndarray:
    """(4, 256) uint32: the order-2 plane (little-endian) of an order-1 plane whose byte b is v
    and whose other bytes are 0, at [b, v]."""
    table = np.zeros((4, 256), np.uint32)
    for b in range(4):
        old = np.zeros((256, 4), np.uint8)
        old[:, b] = np.arange(256)
        f = np.unpackbits(old, axis=-1, bitorder="little")          # bit j of the uint32 = weight j
        table[b] = np.ascontiguousarray(_pack_one_bit(f)).view("<u4")[:, 0]
    return table


_ORDER_1_TO_2 = _order_1_to_2()


def meta_array(d: int, n: int, bits: int, group_rows: int) -> np.ndarray:
    """The "meta" part of a weight encoded now."""
    return np.array([d, n, bits, group_rows, PLANE_ORDER], np.int32)


def codes_of(parts: dict) -> np.ndarray:
    """parts["codes"] in plane order 2: as stored, or for a pack with order 1 (4-entry meta) and
    odd bits a converted copy (the 1-bit plane is a block's last 4 bytes)."""
    codes, bits = parts["codes"], int(parts["meta"][2])
    if len(parts["meta"]) > 4 or bits % 2 == 0:
        return codes
    blk = codes.reshape(codes.shape[0], -1, 4 * bits).copy()
    old = np.ascontiguousarray(blk[..., -4:])
    new = _ORDER_1_TO_2[0][old[..., 0]]
    for b in range(1, 4):
        new |= _ORDER_1_TO_2[b][old[..., b]]
    blk[..., -4:] = new.astype("<u4").view(np.uint8).reshape(old.shape)
    return blk.reshape(codes.shape)


def unpack_indices(codes: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_indices: codes (d, nblk·4·bits) -> indices (d, n) int64."""
    d = codes.shape[0]
    nblk = codes.shape[1] // (4 * bits)
    blk = codes.reshape(d, nblk, 4 * bits).astype(np.int64)
    idx = np.zeros((d, nblk, BLOCK), np.int64)
    off = shift = 0
    for width in _planes(bits):
        if width == 4:
            p = blk[..., off:off + 16]
            f = np.concatenate([p & 15, p >> 4], axis=-1)
        elif width == 2:
            p = blk[..., off:off + 8]
            f = np.concatenate([(p >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        else:
            f = _unpack_one_bit(blk[..., off:off + 4].astype(np.uint8)).astype(np.int64)
        idx |= f << shift
        off += width * 4
        shift += width
    return idx.reshape(d, nblk * BLOCK)[:, :n]


def _check_meta(parts: dict) -> tuple[int, int, int, int]:
    try:
        d, n, bits, g, *order = (int(v) for v in parts["meta"])
        codes, cb = parts["codes"], parts["codebook"]
    except (KeyError, ValueError, TypeError):
        raise UnsupportedModelError("cluster codec: parts must hold meta [d, n, bits, group_rows, plane_order], "
                                    "codes and codebook") from None
    if order not in ([], [PLANE_ORDER]):
        raise UnsupportedModelError(f"cluster codec: plane order {order} (this edgerun reads 1 and {PLANE_ORDER})")
    nblk = -(-n // BLOCK)
    G = -(-d // g) if g > 0 else -1
    if (not 2 <= bits <= 8 or codes.dtype != np.uint8 or codes.shape != (d, nblk * 4 * bits)
            or cb.dtype != np.uint16 or cb.shape != (G, 1 << bits)):
        raise UnsupportedModelError(
            f"cluster codec: inconsistent parts (meta {d}x{n} bits={bits} group_rows={g}, "
            f"codes {codes.dtype} {codes.shape}, codebook {cb.dtype} {cb.shape})")
    sparse = [k for k in OUTLIER_PARTS if k in parts]
    if sparse:
        try:
            rp, oc, ov = (parts[k] for k in OUTLIER_PARTS)
        except KeyError:
            raise UnsupportedModelError(f"cluster codec: outlier parts {sparse} without all of {OUTLIER_PARTS}") from None
        nnz = int(rp[-1]) if rp.shape == (d + 1,) else -1
        if (rp.dtype != np.int32 or oc.dtype != np.uint16 or ov.dtype != np.uint16 or nnz < 0
                or rp[0] != 0 or np.any(np.diff(rp) < 0) or oc.shape != (nnz,) or ov.shape != (nnz,)
                or (nnz and int(oc.max()) >= n)):
            raise UnsupportedModelError(f"cluster codec: inconsistent outlier parts for a {d}x{n} weight")
    return d, n, bits, g


def _outliers(parts: dict, d: int):
    """(rowptr, col, val) of the sparse outliers; empty (all-zero row pointers) when absent."""
    if OUTLIER_PARTS[0] in parts:
        return tuple(np.ascontiguousarray(parts[k]) for k in OUTLIER_PARTS)
    return np.zeros(d + 1, np.int32), np.zeros(0, np.uint16), np.zeros(0, np.uint16)


def params_of(params: dict | None, n: int) -> tuple[int, int, float]:
    """(bits, group_rows, outlier fraction) of `params` for a weight of n columns, checked."""
    params = params or {}
    bits = int(params.get("bits", 4))
    if not 2 <= bits <= 8:
        raise UnsupportedModelError(f"cluster codec: bits={bits} is not supported (use 2..8)")
    g = int(params.get("group_rows") or default_group_rows(bits, n))
    if g < 1:
        raise UnsupportedModelError(f"cluster codec: group_rows={g} must be >= 1")
    frac = float(params.get("outliers", 0) or 0)
    if not 0 <= frac <= 0.1:
        raise UnsupportedModelError(f"cluster codec: outliers={frac} must be a fraction in [0, 0.1]")
    if frac and n > 65536:
        raise UnsupportedModelError(f"cluster codec: outliers need n <= 65536 (16-bit columns), got {n}")
    return bits, g, frac



INT8_MAX_BITS = 5          # matvecs of codebooks up to 32 entries run on int8 (formats/codec-cluster.md § Matvec)


CODEBOOK_LEVELS = 127      # unsigned 7-bit entries times int8 activations: a pair of products stays in i16


def unsigned_codebook(codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unsigned 7-bit codebooks the matvec uses for K ≤ 32: (G, 32) uint8 entries
    u = rint((c − lo) / s) (zero padded), (G,) float32 steps s = (max c − lo) / 127 (1 where all
    entries are equal) and (G,) float32 offsets lo = min c, so that c ≈ lo + s·u."""
    cb = codebook.view(np.float16).astype(np.float32)
    lo = cb.min(axis=1)
    s = (cb.max(axis=1) - lo) / np.float32(CODEBOOK_LEVELS)
    s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    u8 = np.zeros((cb.shape[0], 32), np.uint8)
    u8[:, :cb.shape[1]] = np.rint((cb - lo[:, None]) / s[:, None])
    return u8, s, lo.astype(np.float32)


def quantize_activations(x: np.ndarray, nblk: int) -> tuple[np.ndarray, np.ndarray]:
    """x (n,) as the int8 matvec sees it: per 32-column block symmetric int8 x8 (nblk·32,) with
    dx = max|x| / 127 (nblk,), rounded half away from zero in float32; columns past n are 0."""
    x = np.pad(np.asarray(x, np.float32), (0, nblk * BLOCK - len(x)))
    xb = x.reshape(nblk, BLOCK)
    m = np.abs(xb).max(axis=1)
    inv = np.where(m > 0, np.float32(127) / np.where(m > 0, m, 1), 0).astype(np.float32)
    q = np.trunc(xb * inv[:, None] + np.where(xb < 0, np.float32(-0.5), np.float32(0.5)))
    return q.astype(np.int8).reshape(-1), (m / np.float32(127)).astype(np.float32)


# The matvec's integer sums (kernels.py compiles these in: touch it when they change, or Numba's
# cache keeps the old values): a lane adds 2 pairs ≤ 127·127·2 times a block scale ≤ SCALE_MAX,
# CHUNK_BLOCKS times, < 2³¹.
SCALE_MAX = 2047
CHUNK_BLOCKS = 16


def block_scales(dx: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """The activations' block scales as integer multiples of one step: (nblk,) int16
    e = rint(dx / D) in 0..2047 and D = max dx / 2047 (float32), so the matvec sums whole chunks
    of blocks in integers and multiplies by D once (formats/codec-cluster.md § Matvec)."""
    D = np.float32(np.float32(dx.max(initial=0)) / np.float32(SCALE_MAX))
    if D == 0:
        return np.zeros(len(dx), np.int16), D
    return np.rint(dx / D).astype(np.int16), D

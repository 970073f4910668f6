"""VQ codec: the format (formats/codec-vq.md): parts, params, the code layout.

Parts: "codes" (d, ngrp·c) uint8 (groups of 8 c-bit pair codes in c bytes), "codebook"
(G, K, 2) float16 bits (K = 2^c two-dimensional centroids, one codebook per `group_rows` rows),
"scale" (d,) float16 bits (per-row scale), "perm" (n,) uint16 (column order: pair p is columns
perm[2p], perm[2p+1]), "meta" [d, n, c, group_rows] int32. Every part is stored and counted.
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedModelError

DIM = 2                    # weights per code
GROUP = 8                  # codes per group: 8 c-bit codes fill exactly c bytes
CODE_BITS = (4, 8)         # pair code widths: K = 16 .. 256 centroids (2 .. 4 bits/weight)
PARTS = ("meta", "codes", "codebook", "scale", "perm")


def layout(n: int, c: int) -> tuple[int, int, int]:
    """(pairs, code groups, bytes per row) of a row of n weights with c-bit pair codes; the
    pairs are padded to whole groups of 8 (16 columns)."""
    npairs = -(-n // DIM)
    ngrp = -(-npairs // GROUP)
    return npairs, ngrp, ngrp * c


def default_group_rows(c: int, n: int) -> int:
    """Smallest power of two g with codebook overhead K·2·16 / (g·n) ≤ 0.05 bits/weight
    (c = 6: g = 128 at n = 576, 32 at n = 1536). Sharing one codebook over 256 rows instead
    (fewer matvec tables) made some SmolLM2 down_proj matrices diverge in the GPTQ code choice
    (relative weight error 0.27 -> 1.43; perplexity 59.1 -> 156, tools/QUALITY.md)."""
    g = 1
    while (1 << c) * DIM * 16 > 0.05 * g * n and g < 1 << 20:
        g *= 2
    return g


def code_bits_of(params: dict | None) -> int:
    """The pair code width c: params "code_bits" (4..8), else 2·"bits" (bits 2..4 per weight)."""
    params = params or {}
    if params.get("code_bits") is not None:
        c = params["code_bits"]
        if not isinstance(c, (int, np.integer)) or not CODE_BITS[0] <= c <= CODE_BITS[1]:
            raise UnsupportedModelError(f"vq codec: code_bits={c!r} is not supported (use 4..8)")
        return int(c)
    bits = params.get("bits", 3)
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 4:
        raise UnsupportedModelError(f"vq codec: bits={bits!r} is not supported (use 2..4)")
    return 2 * int(bits)


def params_of(params: dict | None, n: int) -> tuple[int, int]:
    """(code bits c, group_rows) of `params` for a weight of n columns, checked."""
    c = code_bits_of(params)
    g = (params or {}).get("group_rows") or default_group_rows(c, n)
    if not isinstance(g, (int, np.integer)) or g < 1:
        raise UnsupportedModelError(f"vq codec: group_rows={g!r} must be an integer >= 1")
    if n > 65536:
        raise UnsupportedModelError(f"vq codec: at most 65536 columns (16-bit perm), got {n}")
    return c, int(g)


def pack_codes(idx: np.ndarray, c: int) -> np.ndarray:
    """Pair codes (d, npairs) < 2^c -> codes (d, ngrp·c) uint8: code k of a group of 8 at bits
    k·c .. k·c + c − 1 of the group's c bytes read as a little-endian integer."""
    d, npairs = idx.shape
    ngrp = -(-npairs // GROUP)
    full = np.zeros((d, ngrp * GROUP), np.uint64)
    full[:, :npairs] = idx
    grp = full.reshape(d, ngrp, GROUP)
    v = np.zeros((d, ngrp), np.uint64)
    for k in range(GROUP):
        v |= grp[:, :, k] << np.uint64(k * c)
    by = v[..., None].view(np.uint8).reshape(d, ngrp, 8)   # little-endian uint64 -> 8 bytes
    return np.ascontiguousarray(by[:, :, :c].reshape(d, ngrp * c))


def unpack_codes(codes: np.ndarray, c: int, npairs: int) -> np.ndarray:
    """Inverse of pack_codes: codes (d, ngrp·c) -> pair codes (d, npairs) int64."""
    d = codes.shape[0]
    ngrp = codes.shape[1] // c
    by = np.zeros((d, ngrp, 8), np.uint8)
    by[:, :, :c] = codes.reshape(d, ngrp, c)
    v = by.reshape(d, ngrp * 8).view(np.uint64).reshape(d, ngrp)
    mask = np.uint64((1 << c) - 1)
    idx = np.stack([(v >> np.uint64(k * c)) & mask for k in range(GROUP)], axis=-1)
    return idx.reshape(d, ngrp * GROUP)[:, :npairs].astype(np.int64)


def check_meta(parts: dict) -> tuple[int, int, int, int]:
    """(d, n, c, group_rows) of the parts; UnsupportedModelError naming the mismatch."""
    try:
        d, n, c, g = (int(v) for v in parts["meta"])
        codes, cb, sc, perm = parts["codes"], parts["codebook"], parts["scale"], parts["perm"]
    except (KeyError, ValueError, TypeError):
        raise UnsupportedModelError("vq codec: parts must hold meta [d, n, code_bits, group_rows], "
                                    "codes, codebook, scale and perm") from None
    ok = CODE_BITS[0] <= c <= CODE_BITS[1] and d >= 1 and 1 <= n <= 65536 and g >= 1
    G = -(-d // g) if g > 0 else -1
    if (not ok or codes.dtype != np.uint8 or codes.shape != (d, layout(n, c)[2])
            or cb.dtype != np.uint16 or cb.shape != (G, 1 << c, DIM)
            or sc.dtype != np.uint16 or sc.shape != (d,) or perm.dtype != np.uint16 or perm.shape != (n,)):
        raise UnsupportedModelError(
            f"vq codec: inconsistent parts (meta {d}x{n} code_bits={c} group_rows={g}, codes {codes.dtype} "
            f"{codes.shape}, codebook {cb.dtype} {cb.shape}, scale {sc.dtype} {sc.shape}, perm {perm.dtype} {perm.shape})")
    return d, n, c, g


def pair_columns(perm: np.ndarray, npairs: int) -> np.ndarray:
    """(npairs, 2) int64 input columns of each pair; n (one past the last column, a zero input)
    pads an odd n."""
    n = len(perm)
    cols = np.full(npairs * DIM, n, np.int64)
    cols[:n] = perm
    return cols.reshape(npairs, DIM)

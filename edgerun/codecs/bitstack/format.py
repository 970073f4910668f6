"""BitStack codec, the format (formats/codec-bitstack.md): parts "meta" [d, n, rank, blocks]
int32, "inv_scale" (n,) float32 and one uint8 byte array per residual block "block.i" (packed
signs | u fp16 | v fp16, 64-byte aligned); params, the block layout and prefix checks."""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedModelError

MAX_RANK = 16              # rank of a block's factors (the spec's limit)
MAX_JOINT = 8              # the rounding tries all 2^J sign patterns of an entry


def _f16(a: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bits (uint16), saturating instead of overflowing to inf."""
    return np.ascontiguousarray(np.clip(a, -65504.0, 65504.0), np.float16).view(np.uint16)


def _from_f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def block_layout(d: int, n: int, k: int) -> tuple[int, int, int]:
    """(u offset, v offset, total bytes) of one "block.i" byte array (formats/codec-bitstack.md):
    signs (d, ceil(n/8)) | pad to 64 | u (d, k) fp16 | pad to 64 | v (n, k) fp16."""
    sb = d * ((n + 7) // 8)
    uo = -(-sb // 64) * 64
    vo = -(-(uo + 2 * d * k) // 64) * 64
    return uo, vo, vo + 2 * n * k


def _block_views(blob: np.ndarray, d: int, n: int, k: int):
    """(signs (d, nb) u8, u (d, k) u16, v (n, k) u16) views into one block's bytes."""
    uo, vo, total = block_layout(d, n, k)
    if blob.dtype != np.uint8 or blob.ndim != 1 or blob.size != total:
        raise UnsupportedModelError(
            f"bitstack codec: a block of a {d}x{n} rank-{k} matrix must be {total} uint8 bytes, "
            f"got {blob.dtype} {blob.shape}")
    nb = (n + 7) // 8
    signs = blob[: d * nb].reshape(d, nb)
    u = blob[uo: uo + 2 * d * k].view(np.uint16).reshape(d, k)
    v = blob[vo: vo + 2 * n * k].view(np.uint16).reshape(n, k)
    return signs, u, v


def _meta(parts: dict) -> tuple[int, int, int, int]:
    try:
        d, n, k, K = (int(x) for x in parts["meta"])
    except (KeyError, ValueError, TypeError):
        raise UnsupportedModelError("bitstack codec: parts must hold meta [d, n, rank, blocks]") from None
    inv = parts.get("inv_scale")
    if inv is None or inv.dtype != np.float32 or inv.shape != (n,):
        raise UnsupportedModelError(f"bitstack codec: inv_scale must be float32 ({n},)")
    return d, n, k, K


def _available(parts: dict, K: int, blocks: int | None) -> int:
    m = K if blocks is None else int(blocks)
    if not 0 <= m <= K:
        raise UnsupportedModelError(f"bitstack codec: blocks={m} is out of range 0..{K}")
    missing = [i for i in range(m) if f"block.{i}" not in parts]
    if missing:
        raise UnsupportedModelError(f"bitstack codec: block.{missing[0]} is not loaded (asked for {m} blocks)")
    return m


def params_of(params: dict | None) -> tuple[int, int, float, str, int]:
    """(blocks, rank, overshoot, signs, joint) of `params`, checked."""
    params = params or {}
    K, k = int(params.get("blocks", 16)), int(params.get("rank", 16))
    gain = float(params.get("overshoot", 1.0))
    signs = params.get("signs", "sign")
    joint = int(params.get("joint", 0))
    if (not 1 <= K <= 64 or not 1 <= k <= MAX_RANK or not 0.5 <= gain <= 2.0 or signs not in ("sign", "gptq")
            or not 0 <= joint <= min(K, MAX_JOINT)):
        raise UnsupportedModelError(f"bitstack codec: blocks={K} (1..64), rank={k} (1..{MAX_RANK}), "
                                    f"overshoot={gain} (0.5..2), signs={signs!r} (sign, gptq) and "
                                    f"joint={joint} (0..min(blocks, {MAX_JOINT})) required")
    return K, k, gain, signs, joint


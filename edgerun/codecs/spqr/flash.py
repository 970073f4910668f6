"""SpQR in the flash layout (formats/flash-layout.md § "Compressed codecs"): a layer's gate, up
and down matrices, encoded exactly as a standard pack encodes them, cut into per-neuron bundles
plus resident shared parts; and the kernels that run the FFN on a set of bundles.

A bundle (stored neuron p, original neuron n = perm[p]) is `bundle_bytes` uint8:
  gate.codes   gate codes row n        2·b·G bytes   (G = ceil(d / 16) groups of the d inputs)
  gate.stq     gate stat_codes row n   G bytes
  up.codes     up codes row n          2·b·G bytes
  up.stq       up stat_codes row n     G bytes
  down.codes   down column n: its d codes (storage column j = pos[p] of down), packed as one spqr
               codes row of ceil(d / 16) groups (formats/codec-spqr.md "codes")   2·b·ceil(d/16) bytes
Resident per layer (shared by many neurons, or tiny): the second-level stats of gate and up
(one fp16 set per 16 rows: they span 16 neurons), their column permutations, all of down's
stats and stat codes (a down group spans 16 neurons), `pos` (down storage column of each stored
neuron) and the outliers as CSR over stored neurons (their count per neuron is very uneven: on
SmolLM2 spqr:4 a down column holds 0.5 on average and up to 448, so a fixed-size bundle slot
would triple the bundle).

The arithmetic is the codec's (formats/codec-spqr.md § Matvec): one token quantizes x per group
of 16 storage columns to int8 for gate and up, and h the same way in down's storage order; chunks
of `matmul_min_t` tokens or more decode bundles to float32 tiles. Only the summation order differs
from SpQRLinear, so a flash pack computes what the standard pack computes, up to float rounding.
One token runs on the codec's own int8 LLVM-IR kernels (kernels.py): gate and up rows through
SpQRLinear's row code (`_dot_rows`), down columns 16 at a time, one down group (`_dot_columns`).
A row's floats do not depend on which other bundles share its call, so every streaming mode
computes the same floats as the resident bundles (tests/test_streaming.py).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ...errors import FormatError
from ...kernels import f16_to_f32
from .format import _pack_codes, _unpack_codes, params_of
from .kernels import (MATMUL_MIN_T, XC_FLOATS, _decode_row, _dot_columns, _dot_rows, _outliers_dot, _prep_x,
                      _widen_stats, _x_index)

_JIT = dict(cache=True, nogil=True, fastmath=True, no_cfunc_wrapper=True)

SHARED = ("gate.stats", "gate.perm", "gate.outlier_rowptr", "gate.outlier_col", "gate.outlier_val",
          "up.stats", "up.perm", "up.outlier_rowptr", "up.outlier_col", "up.outlier_val",
          "down.stats", "down.stat_codes", "down.pos", "down.outlier_rowptr", "down.outlier_row",
          "down.outlier_val")


def bundle_parts(params: dict, d: int) -> dict:
    """name -> [byte offset, length] of the parts of one bundle."""
    b = params_of(params)["bits"]
    G = -(-d // 16)
    out, off = {}, 0
    for name, n in (("gate.codes", 2 * b * G), ("gate.stq", G), ("up.codes", 2 * b * G), ("up.stq", G),
                    ("down.codes", 2 * b * G)):
        out[name] = [off, n]
        off += n
    return out


def _csr_take(rowptr, idx, val, rows, bound):
    """The CSR rows `rows` (in that order) of (rowptr, idx, val) as a new CSR, without the entries
    whose idx >= bound (outliers in padding columns: they multiply a zero input)."""
    rowptr = rowptr.astype(np.int64)
    counts = np.diff(rowptr)[rows]
    take = np.concatenate([np.arange(rowptr[r], rowptr[r + 1]) for r in rows] + [np.zeros(0, np.int64)])
    owner = np.repeat(np.arange(len(rows)), counts)
    live = idx[take].astype(np.int64) < bound
    take, owner = take[live], owner[live]
    ptr = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(np.bincount(owner, minlength=len(rows)), out=ptr[1:])
    return ptr, idx[take], val[take]


def cut(gate: dict, up: dict, down: dict, params: dict, perm: np.ndarray) -> tuple[np.ndarray, dict]:
    """Encoded parts of gate, up (f, d) and down (d, f), and the stored order `perm` (stored p ->
    neuron n) -> bundles (f, bundle_bytes) uint8 and the shared arrays (SHARED)."""
    b = params_of(params)["bits"]
    f, G = gate["stat_codes"].shape
    d = down["stat_codes"].shape[0]
    perm = np.asarray(perm, np.int64)
    dperm = down["perm"].astype(np.int64)                  # down storage column j -> neuron
    pos = np.empty(f, np.int64)
    pos[dperm] = np.arange(f)                              # neuron -> down storage column
    Q = _unpack_codes(down["codes"], b)                    # (d, f_pad) storage order
    col = np.zeros((f, 16 * G), np.uint8)
    col[:, :d] = Q[:, pos[perm]].T
    del Q
    rows = (gate["codes"][perm], gate["stat_codes"][perm], up["codes"][perm], up["stat_codes"][perm],
            _pack_codes(col, b))
    bundles = np.ascontiguousarray(np.concatenate(rows, axis=1))
    shared = {}
    for name, parts in (("gate", gate), ("up", up)):
        shared[f"{name}.stats"], shared[f"{name}.perm"] = parts["stats"], parts["perm"]
        ptr, c, v = _csr_take(parts["outlier_rowptr"], parts["outlier_col"], parts["outlier_val"], perm, d)
        shared[f"{name}.outlier_rowptr"], shared[f"{name}.outlier_col"], shared[f"{name}.outlier_val"] = ptr, c, v
    # down's outliers (row i, storage column j) regrouped by stored neuron
    rp = down["outlier_rowptr"].astype(np.int64)
    orow = np.repeat(np.arange(d), np.diff(rp))
    ocol = down["outlier_col"].astype(np.int64)
    live = ocol < f                    # an outlier in a padding column multiplies a zero input
    orow, ocol, oval = orow[live], ocol[live], down["outlier_val"][live]
    inv = np.empty(f, np.int64)
    inv[perm] = np.arange(f)
    owner = inv[dperm[ocol]]
    order = np.lexsort((orow, owner))
    ptr = np.zeros(f + 1, np.int32)
    np.cumsum(np.bincount(owner, minlength=f), out=ptr[1:])
    shared.update({"down.stats": down["stats"], "down.stat_codes": down["stat_codes"],
                   "down.pos": pos[perm].astype(np.int32), "down.outlier_rowptr": ptr,
                   "down.outlier_row": orow[order].astype(np.uint16), "down.outlier_val": oval[order]})
    return bundles, shared


# ------------------------------------------------------------------------------ kernels
# The codec's own int8 kernels (kernels.py), pointed at bundles: a gate / up row is a spqr row
# anywhere in memory (_dot_rows, the IR of SpQRLinear's _dot_block), and the down columns of 16
# bundles that share a down group (16 storage columns of down_proj) are one vpmaddubsw stream
# (_dot_columns): two columns' codes of an output row go into one byte pair, against their two
# int8 activations, accumulated in i16 per output row, then that group's scales and zeros once.

QUAD = 4                # bundles a _dot_rows call takes: rows in pairs share x loads, and a tail
                        # chunk of 4 groups (d = 576) packs 4 rows into one vector, as SpQRLinear


@njit(inline="always", **_JIT)
def _row(wa, wb, c):
    # code c >= 0: row c of wa (window / resident); c < 0: row -1-c of wb (read scratch)
    return wa[c] if c >= 0 else wb[-1 - c]


@njit(inline="always", **_JIT)
def _quad(bits, wa, wb, codes, ids, sel, s, blk, G, sbits, coff, soff, xc, xb, sf, rp, oc, ov, t4, out):
    # out[k] = one row (gate or up: codes at coff, stat bytes at soff) of bundles k = sel[s : s +
    # QUAD] · x, outliers included; xc / xb the prepared x, sf its widened stats, CSR rp, oc, ov
    k0, k1, k2, k3 = sel[s], sel[s + 1], sel[s + 2], sel[s + 3]
    _dot_rows(wa, wb, (codes[k0], codes[k1], codes[k2], codes[k3]), coff, soff, xc, sf,
              (blk[ids[k0]], blk[ids[k1]], blk[ids[k2]], blk[ids[k3]]), t4, G, sbits, bits)
    for q in range(QUAD):
        k = sel[s + q]
        out[k] = _outliers_dot(rp, oc, ov, ids[k], xc, xb, t4[q])


@njit(inline="always", **_JIT)
def _one(bits, wa, wb, codes, ids, sel, s, blk, G, sbits, coff, soff, xc, xb, sf, rp, oc, ov, t4, out):
    # bundle k = sel[s] through the QUAD code, repeated: with fast-math, code for fewer rows
    # may round differently, and a row's floats must not depend on its neighbours (the
    # streaming modes split the same bundles into different calls)
    k = sel[s]
    c, b = codes[k], blk[ids[k]]
    _dot_rows(wa, wb, (c, c, c, c), coff, soff, xc, sf, (b, b, b, b), t4, G, sbits, bits)
    out[k] = _outliers_dot(rp, oc, ov, ids[k], xc, xb, t4[0])


@functools.cache
def _bundle_kernels(bits: int) -> tuple:
    """(rows, act, down) for one bit width: `bits` is a closure constant, so the IR emits that
    width only (as kernels.matvec_kernels). They close over `bits` alone: a closure over other
    compiled functions gets a new cache key in every process (Numba pickles its cells), so it
    would compile at every load."""

    @njit(**_JIT)
    def rows(wa, wb, codes, ids, sel, blk, G, sbits, m, t4, out):
        # out[k] = row m of bundle codes[k] (stored neuron ids[k]) · x for k in sel;
        # m = (codes offset, stat bytes offset, xc, xb, widened stats (blocks, C + 1, 4, 16), CSR)
        coff, soff, xc, xb, sf, rp, oc, ov = m
        n = sel.shape[0]
        s = 0
        while s + QUAD <= n:
            _quad(bits, wa, wb, codes, ids, sel, s, blk, G, sbits, coff, soff, xc, xb, sf, rp, oc, ov, t4, out)
            s += QUAD
        while s < n:
            _one(bits, wa, wb, codes, ids, sel, s, blk, G, sbits, coff, soff, xc, xb, sf, rp, oc, ov, t4, out)
            s += 1

    @njit(**_JIT)
    def act(wa, wb, codes, ids, sel, blk, G, sbits, mg, mu, t4, g, u, h):
        # h[k] = silu(gate_n · x) · (up_n · x) for k in sel: both rows of QUAD bundles at a time
        gc, gs, gx, gxb, gsf, grp, goc, gov = mg
        uc, us, ux, uxb, usf, urp, uoc, uov = mu
        n = sel.shape[0]
        s = 0
        while s + QUAD <= n:
            _quad(bits, wa, wb, codes, ids, sel, s, blk, G, sbits, gc, gs, gx, gxb, gsf, grp, goc, gov, t4, g)
            _quad(bits, wa, wb, codes, ids, sel, s, blk, G, sbits, uc, us, ux, uxb, usf, urp, uoc, uov, t4, u)
            s += QUAD
        while s < n:
            _one(bits, wa, wb, codes, ids, sel, s, blk, G, sbits, gc, gs, gx, gxb, gsf, grp, goc, gov, t4, g)
            _one(bits, wa, wb, codes, ids, sel, s, blk, G, sbits, uc, us, ux, uxb, usf, urp, uoc, uov, t4, u)
            s += 1
        for s in range(n):
            k = sel[s]
            h[k] = g[k] / (np.float32(1.0) + np.exp(-g[k])) * u[k]

    @njit(**_JIT)
    def down(wa, wb, codes, ids, h, pos, coff, zero, hs, addr, x8, dx, xs, stq, st, acc, G, sbits, drp, dor, dov,
             out):
        # out (d,) = Σ_k h[k] · down column of bundle k, h quantized per 16 storage columns of
        # down_proj as SpQRLinear quantizes down's input; columns without a bundle read `zero`
        hs[:] = 0.0
        addr[:] = zero.ctypes.data
        pa, pb = wa.ctypes.data + coff, wb.ctypes.data + coff      # (no array view per bundle)
        for k in range(codes.shape[0]):
            j = pos[ids[k]]
            hs[j] = h[k]
            c = codes[k]
            addr[j] = pa + c * wa.strides[0] if c >= 0 else pb + (-1 - c) * wb.strides[0]
        quant16(hs, x8, dx, xs)
        acc[:] = 0.0
        _dot_columns(addr, x8, dx, xs, stq, st, acc, G, sbits, bits)
        for i in range(out.shape[0]):
            out[i] = acc[i & 15, i >> 4]
        for k in range(codes.shape[0]):        # outliers, by stored neuron: output row and value
            p = ids[k]
            j = pos[p]
            c = dx[j >> 4] * np.float32(x8[j])
            if c != 0.0:
                for e in range(drp[p], drp[p + 1]):
                    out[np.int64(dor[e])] += c * f16_to_f32(dov[e])

    return rows, act, down


@njit(cache=True, nogil=True, no_cfunc_wrapper=True, fastmath=False)   # set: a fastmath caller would pass it on
def quant16(v, x8, dx, xs):
    # v (16·Gf,) in storage order -> per group g of 16: int8 x8, dx[g] = max|v| / 127 and
    # xs[g] = dx[g]·Σ x8 (formats/codec-spqr.md § Matvec; reference.quantize_activations)
    for g in range(dx.shape[0]):
        m = np.float32(0.0)
        for t in range(16):
            m = max(m, abs(v[16 * g + t]))
        inv = np.float32(127.0) / m if m > 0 else np.float32(0.0)
        s = 0
        for t in range(16):
            a = v[16 * g + t]
            q = np.int32(np.trunc(a * inv + (np.float32(-0.5) if a < 0 else np.float32(0.5))))
            x8[16 * g + t] = q
            s += q
        dx[g] = m / np.float32(127.0)
        xs[g] = np.float32(s) * dx[g]


@njit(**_JIT)
def _prep(x, xidx, xc):
    # x (d,) -> xc, x quantized as the row kernels read it (kernels._prep_x)
    _prep_x(x, xidx, xc)


@njit(**_JIT)
def widen_all(st2, G, sf):
    # every row block's fp16 stats -> sf (blocks, C + 1, 4, 16) as the row kernels read them
    for rb in range(sf.shape[0]):
        _widen_stats(st2, rb, G, sf[rb])


@njit(**_JIT)
def widen_bundles(wa, wb, codes, ids, a, b, nid, off, G, bits, sbits, sg, sfg, sfu, gperm, uperm,
                  grp, goc, gov, urp, uoc, uov, pos, dstq, dst, drp, dor, dov, q, tile):
    # bundles codes[a:b] -> tile (>= b-a, 3, d) float32: gate row, up row, down column (decoded);
    # sfg / sfu the widened stats of gate / up (widen_all), dstq / dst down's stats in output-row
    # lanes (_dot_columns), q (16G,) float32 scratch
    d = tile.shape[2]
    T = dst.shape[2]
    for k in range(a, b):
        r = _row(wa, wb, codes[k])
        p = ids[k]
        rb = nid[p] // sg
        for m in range(2):
            sf, perm = (sfg, gperm) if m == 0 else (sfu, uperm)
            _decode_row(r, off[2 * m], r, off[2 * m + 1], sf[rb], G, sbits, bits, q, 0)
            for j in range(d):         # q: position-major (kernels._decode_row)
                tile[k - a, m, perm[j]] = q[(j & 15) * G + (j >> 4)]
            rp, oc, ov = (grp, goc, gov) if m == 0 else (urp, uoc, uov)
            for e in range(rp[p], rp[p + 1]):
                tile[k - a, m, perm[np.int64(oc[e])]] += f16_to_f32(ov[e])
        j = pos[p]
        g = j >> 4
        _codes_row(r, off[4], G, bits, q)
        for i in range(d):
            gi, t = i >> 4, i & 15
            c = dstq[g, t, gi]
            tt = t if T > 1 else 0
            s = f16_to_f32(dst[g, 0, tt, gi]) * np.float32(c & ((1 << sbits) - 1)) + f16_to_f32(dst[g, 1, tt, gi])
            z = f16_to_f32(dst[g, 2, tt, gi]) * np.float32(c >> sbits) + f16_to_f32(dst[g, 3, tt, gi])
            tile[k - a, 2, i] = s * (q[i] - z)
        for e in range(drp[p], drp[p + 1]):
            tile[k - a, 2, np.int64(dor[e])] += f16_to_f32(dov[e])


@njit(**_JIT)
def _codes_row(r, base, G, bits, q):
    # the codes of one spqr codes row at r[base:] (formats/codec-spqr.md "codes") -> q (16G,)
    # float32, storage order
    for g0 in range(0, G, 16):
        w = min(16, G - g0)
        o = base + 2 * bits * g0
        for k in range(w):
            j = 16 * (g0 + k)
            for t in range(16):
                if bits == 4:
                    v = (r[o + (t >> 1) * w + k] >> (4 * (t & 1))) & 15
                else:
                    v = (r[o + (t >> 2) * w + k] >> (2 * (t & 3))) & 3
                    if bits == 3:
                        v |= ((r[o + (4 + (t >> 3)) * w + k] >> (t & 7)) & 1) << 2
                q[j + t] = np.float32(v)


def lane_stats(stat_codes: np.ndarray, stats: np.ndarray, sg: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """down_proj's stat_codes (d, Gf) and fp16 stats (R, 4, Gf) rearranged once at load into the
    output-row lanes _dot_columns reads, zero-padded to Gp = 16·ceil(G / 16) lanes (whole-vector
    loads in the tail chunk): (Gf, 16, Gp) [g, t, gi] = stat byte of row 16gi + t, and
    (Gf, 4, T, Gp) [g, plane, t, gi] = its block's stats, T = 1 when stat_group is a multiple of 16
    (as many bytes as stored, plus the padding), else 16 (one copy per row)."""
    Gf = stat_codes.shape[1]
    G = -(-d // 16)
    Gp = -(-G // 16) * 16
    sc = np.zeros((16 * Gp, Gf), np.uint8)
    sc[:d] = stat_codes
    stq = np.ascontiguousarray(sc.reshape(Gp, 16, Gf).transpose(2, 1, 0))
    rows = np.arange(16 * G)
    if sg % 16 == 0:
        blk = (rows[::16] // sg)[None, :]                          # (1, G)
    else:
        blk = np.minimum(rows // sg, stats.shape[0] - 1).reshape(G, 16).T      # (16, G) [t, gi]
    st = np.zeros((Gf, 4, blk.shape[0], Gp), np.uint16)
    st[..., :G] = stats[blk].transpose(3, 2, 0, 1)                # (T, G, 4, Gf) -> (Gf, 4, T, G)
    return stq, st


def _check_shared(a: dict, nid: np.ndarray, sg: int, d: int, f: int) -> None:
    """What the kernels index with (they do not check bounds): shapes, permutations, CSR row
    pointers and indices in range; FormatError naming the array otherwise."""
    G, Gf = -(-d // 16), -(-f // 16)
    shapes = {"gate.stats": (-(-f // sg), 4, G), "up.stats": (-(-f // sg), 4, G), "gate.perm": (d,), "up.perm": (d,),
              "down.stats": (-(-d // sg), 4, Gf), "down.stat_codes": (d, Gf), "down.pos": (f,)}
    missing = set(SHARED) - set(a)
    if missing:
        raise FormatError(f"spqr flash bundles: shared arrays {sorted(missing)} are missing")
    for k, shape in shapes.items():
        if a[k].shape != shape:
            raise FormatError(f"spqr flash bundles: shared array {k} is {list(a[k].shape)}, expected {list(shape)}")
    for k in SHARED:
        want = np.int32 if k.endswith(("rowptr", "pos")) else np.uint8 if k.endswith("stat_codes") else np.uint16
        if a[k].dtype != want:
            raise FormatError(f"spqr flash bundles: shared array {k} is {a[k].dtype}, expected {np.dtype(want)}")
    ok = {"perm": np.array_equal(np.sort(nid), np.arange(f)), "down.pos": np.array_equal(np.sort(a["down.pos"]), np.arange(f))}
    for k in ("gate.perm", "up.perm"):
        ok[k] = np.array_equal(np.sort(a[k].astype(np.int64)), np.arange(d))
    for m, idx, bound in (("gate", "col", d), ("up", "col", d), ("down", "row", d)):
        rp, ix = a[f"{m}.outlier_rowptr"].astype(np.int64), a[f"{m}.outlier_{idx}"]
        ok[f"{m}.outliers"] = (rp.shape == (f + 1,) and rp[0] == 0 and (np.diff(rp) >= 0).all()
                               and rp[-1] == len(ix) == len(a[f"{m}.outlier_val"]) and (ix.astype(np.int64) < bound).all())
    bad = [k for k, v in ok.items() if not v]
    if bad:
        raise FormatError(f"spqr flash bundles: {', '.join(bad)} out of range (not a permutation, or bad CSR)")


class SpQRBundles:
    """One layer's bundle kernels (streaming.ffn_rows calls them): `prepare(x)` once per token,
    then `act` on sets of bundles, `down`; `widen` for chunks of `matmul_min_t` tokens or more.
    `scratch`: a dict shared by all layers (the per-token buffers are allocated once).

    At load, down_proj's stat codes and stats are rearranged into output-row lanes (lane_stats:
    the same bytes when stat_group is a multiple of 16) and the stored copies dropped."""

    matmul_min_t = MATMUL_MIN_T

    def __init__(self, shared: dict, nid: np.ndarray, params: dict, d: int, f: int, scratch: dict):
        p = params_of(params)
        self.bits, self.sbits, self.sg = p["bits"], p["stat_bits"], p["stat_group"]
        a = {k: np.ascontiguousarray(v) for k, v in shared.items()}
        self.nid = np.ascontiguousarray(nid, np.int64)
        self.blk = self.nid // self.sg             # stored neuron -> its gate / up stat block
        self.G = G = -(-d // 16)
        _check_shared(a, self.nid, p["stat_group"], d, f)
        self.dstq, self.dst = lane_stats(a.pop("down.stat_codes"), a.pop("down.stats"), self.sg, d)
        self.a = a
        self.off = np.array([o for o, _ in bundle_parts(p, d).values()], np.int64)
        self.gate_bytes = int(self.off[2])          # gate.codes and gate.stq lead the bundle
        self.pos = a["down.pos"].astype(np.int64)
        self.xidx = {m: _x_index(a[f"{m}.perm"], G) for m in ("gate", "up")}
        self.all = np.arange(f, dtype=np.int64)
        key = (d, f, self.sg)
        if key not in scratch:
            scratch[key] = {k: np.zeros(shape, dt) for k, (shape, dt) in self._scratch_shapes(d, f, self.sg).items()}
        s = self.s = scratch[key]
        # act-order sorts gate's and up's columns by the Hessian they share: one prepared x for both
        self.xc = {"gate": "gate", "up": "gate" if np.array_equal(a["gate.perm"], a["up.perm"]) else "up"}
        self._m = {m: (self.off[2 * i], self.off[2 * i + 1], s[f"xc.{self.xc[m]}"], s[f"xc.{self.xc[m]}"].view(np.int8),
                       s[f"sf.{m}"], a[f"{m}.outlier_rowptr"], a[f"{m}.outlier_col"], a[f"{m}.outlier_val"])
                   for i, m in enumerate(("gate", "up"))}
        self._rows, self._act, self._down = _bundle_kernels(self.bits)

    @staticmethod
    def _scratch_shapes(d: int, f: int, sg: int) -> dict:
        """name -> (shape, dtype) of the per-token scratch shared by the layers of one shape."""
        G, Gf = -(-d // 16), -(-f // 16)
        C = -(-G // 16) + 1                   # + the packed tail's chunk (kernels._x_index)
        sf = ((-(-f // sg), C, 4, 16), np.float32)
        return {"xc.gate": ((C, XC_FLOATS), np.float32), "xc.up": ((C, XC_FLOATS), np.float32),
                "sf.gate": sf, "sf.up": sf, "t4": ((QUAD,), np.float32),
                "g": ((f,), np.float32), "u": ((f,), np.float32), "q": ((16 * G,), np.float32),
                "zero": ((8 * G,), np.uint8), "hs": ((16 * Gf,), np.float32), "addr": ((16 * Gf,), np.int64),
                "x8": ((16 * Gf,), np.int8), "dx": ((Gf,), np.float32), "xs": ((Gf,), np.float32),
                "acc": ((16, 16 * (C - 1)), np.float32)}

    @classmethod
    def scratch_bytes(cls, d: int, f: int, sg: int = 16) -> int:
        """The bytes of the shared per-token scratch (the plan counts them)."""
        return sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in cls._scratch_shapes(d, f, sg).values())

    def prepare(self, x):
        """Once per token: x quantized to int8 per 16 storage columns of gate and up (their
        perms), and their fp16 block stats widened (the rows of a set of bundles span any block)."""
        s, a = self.s, self.a
        x = np.ascontiguousarray(x, np.float32)
        for m in ("gate", "up"):
            if self.xc[m] == m:
                _prep(x, self.xidx[m], s[f"xc.{m}"])
            widen_all(a[f"{m}.stats"], self.G, s[f"sf.{m}"])

    def act(self, wa, wb, codes, ids, sel, x, h):
        s = self.s
        self._act(wa, wb, codes, ids, sel, self.blk, self.G, self.sbits, self._m["gate"], self._m["up"],
                  s["t4"], s["g"], s["u"], h)

    def gate_scores(self, gb, x, out):
        """out (f,) = the gate pre-activations of all neurons (criterion gate:S) from `gb`, the
        first `gate_bytes` of every bundle (gate.codes, gate.stq), kept resident."""
        self.prepare(x)
        self._rows(gb, gb, self.all, self.all, self.all, self.blk, self.G, self.sbits, self._m["gate"],
                   self.s["t4"], out)

    def down(self, wa, wb, codes, ids, h, out):
        s, a = self.s, self.a
        self._down(wa, wb, codes, ids, h, self.pos, self.off[4], s["zero"], s["hs"], s["addr"], s["x8"], s["dx"],
                   s["xs"], self.dstq, self.dst, s["acc"], self.G, self.sbits, a["down.outlier_rowptr"],
                   a["down.outlier_row"], a["down.outlier_val"], out)

    def widen(self, wa, wb, codes, ids, a0, b0, tile):
        a, s = self.a, self.s
        for m in ("gate", "up"):
            widen_all(a[f"{m}.stats"], self.G, s[f"sf.{m}"])
        widen_bundles(wa, wb, codes, ids, a0, b0, self.nid, self.off, self.G, self.bits, self.sbits, self.sg,
                      s["sf.gate"], s["sf.up"], a["gate.perm"], a["up.perm"],
                      a["gate.outlier_rowptr"], a["gate.outlier_col"], a["gate.outlier_val"],
                      a["up.outlier_rowptr"], a["up.outlier_col"], a["up.outlier_val"], self.pos,
                      self.dstq, self.dst, a["down.outlier_rowptr"], a["down.outlier_row"],
                      a["down.outlier_val"], s["q"], tile)

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
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ...errors import FormatError
from ...kernels import f16_to_f32
from .format import _pack_codes, _unpack_codes, params_of
from .kernels import MATMUL_MIN_T

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

@njit(inline="always", **_JIT)
def _row(wa, wb, c):
    # code c >= 0: row c of wa (window / resident); c < 0: row -1-c of wb (read scratch)
    return wa[c] if c >= 0 else wb[-1 - c]


@njit(**_JIT)
def _unpack_row(r, base, G, bits, q):
    # codes of one row (formats/codec-spqr.md "codes") at r[base:] -> q (16G,) storage order
    for g0 in range(0, G, 16):
        w = min(16, G - g0)
        o = base + 2 * bits * g0
        for k in range(w):
            j = 16 * (g0 + k)
            if bits == 4:
                for s in range(8):
                    v = r[o + s * w + k]
                    q[j + 2 * s] = v & 15
                    q[j + 2 * s + 1] = v >> 4
            else:
                for s in range(4):
                    v = r[o + s * w + k]
                    for t in range(4):
                        q[j + 4 * s + t] = (v >> (2 * t)) & 3
                if bits == 3:
                    for h in range(2):
                        v = r[o + (4 + h) * w + k]
                        for t in range(8):
                            q[j + 8 * h + t] |= ((v >> t) & 1) << 2


@njit(inline="always", **_JIT)
def _sz(st, rb, g, c, sbits):
    # (scale, zero) of stat byte c in group g of row block rb (fp16 second-level stats)
    qs = c & ((1 << sbits) - 1)
    qz = c >> sbits
    s = f16_to_f32(st[rb, 0, g]) * np.float32(qs) + f16_to_f32(st[rb, 1, g])
    z = f16_to_f32(st[rb, 2, g]) * np.float32(qz) + f16_to_f32(st[rb, 3, g])
    return s, z


@njit(**_JIT)
def quant_groups(v, perm, G, xt, dx, s8):
    # v (n,) -> per group g of 16 storage columns (v[perm[16g + t]], 0 past n): int8 codes as
    # float32 in xt[t, g] (16, G), step dx (G,) and code sums s8 (G,) (formats/codec-spqr.md § Matvec)
    n = perm.shape[0]
    for g in range(G):
        m = np.float32(0.0)
        for t in range(16):
            j = 16 * g + t
            if j < n:
                m = max(m, abs(v[perm[j]]))
        inv = np.float32(127.0) / m if m > 0 else np.float32(0.0)
        s = np.float32(0.0)
        for t in range(16):
            j = 16 * g + t
            a = v[perm[j]] if j < n else np.float32(0.0)
            q = np.float32(np.trunc(a * inv + (np.float32(-0.5) if a < 0 else np.float32(0.5))))
            xt[t, g] = q
            s += q
        dx[g] = m / np.float32(127.0)
        s8[g] = s


@njit(inline="always", **_JIT)
def _chunk_codes(r, o, w, bits, qt):
    # the codes of one 16-group chunk at r[o:] (formats/codec-spqr.md "codes") -> qt[t, k] = code
    # of position t in group k (16, 16) float32: loops over k, the chunk's vector lanes
    if bits == 4:
        for s in range(8):
            for k in range(w):
                v = r[o + s * w + k]
                qt[2 * s, k] = np.float32(v & 15)
                qt[2 * s + 1, k] = np.float32(v >> 4)
    else:
        for s in range(4):
            for t in range(4):
                for k in range(w):
                    qt[4 * s + t, k] = np.float32((r[o + s * w + k] >> (2 * t)) & 3)
        if bits == 3:
            for h in range(2):
                for t in range(8):
                    for k in range(w):
                        qt[8 * h + t, k] += np.float32(((r[o + (4 + h) * w + k] >> t) & 1) * 4)


@njit(inline="always", **_JIT)
def _chunk_dot(r, o, w, bits, xt, g0, qt, dots):
    # dots[k] = Σ_t code(t, group g0+k) · xt[t, g0+k] over one chunk; 4 bits straight from the
    # bytes (slices: contiguous lanes the compiler vectorizes), 2 and 3 bits through qt
    d = dots[:w]
    d[:] = 0.0
    if bits == 4:
        for s in range(8):
            seg = r[o + s * w: o + s * w + w]
            xa = xt[2 * s, g0:g0 + w]
            xb = xt[2 * s + 1, g0:g0 + w]
            for k in range(w):
                v = seg[k]
                d[k] += np.float32(v & 15) * xa[k] + np.float32(v >> 4) * xb[k]
    else:
        _chunk_codes(r, o, w, bits, qt)
        for t in range(16):
            xa = xt[t, g0:g0 + w]
            q = qt[t, :w]
            for k in range(w):
                d[k] += q[k] * xa[k]


@njit(inline="always", **_JIT)
def _row_dot(r, cbase, sbase, st, rb, G, bits, sbits, xt, dx, s8, rp, oc, ov, p, qt, dots):
    # one gate/up row of a bundle · the quantized activations (+ its outliers)
    acc = np.float32(0.0)
    for g0 in range(0, G, 16):
        w = min(16, G - g0)
        _chunk_dot(r, cbase + 2 * bits * g0, w, bits, xt, g0, qt, dots)
        for k in range(w):
            g = g0 + k
            s, z = _sz(st, rb, g, r[sbase + g], sbits)
            acc += s * dx[g] * (dots[k] - z * s8[g])
    for k in range(rp[p], rp[p + 1]):
        j = np.int64(oc[k])
        acc += f16_to_f32(ov[k]) * dx[j >> 4] * xt[j & 15, j >> 4]
    return acc


@njit(**_JIT)
def bundle_act(wa, wb, codes, ids, sel, nid, off, G, bits, sbits, sg, gst, ust, xg, dxg, sxg, xu, dxu, sxu,
               grp, goc, gov, urp, uoc, uov, qt, dots, h):
    # h[k] = silu(gate_n · x) · (up_n · x) for k in sel, bundle codes[k] of stored neuron ids[k]
    for s in range(sel.shape[0]):
        k = sel[s]
        r = _row(wa, wb, codes[k])
        p = ids[k]
        rb = nid[p] // sg
        g = _row_dot(r, off[0], off[1], gst, rb, G, bits, sbits, xg, dxg, sxg, grp, goc, gov, p, qt, dots)
        u = _row_dot(r, off[2], off[3], ust, rb, G, bits, sbits, xu, dxu, sxu, urp, uoc, uov, p, qt, dots)
        h[k] = g / (np.float32(1.0) + np.exp(-g)) * u


@njit(**_JIT)
def gate_rows(gb, nid, off, G, bits, sbits, sg, gst, xg, dxg, sxg, grp, goc, gov, qt, dots, g):
    # g (f,) = gate_n · x of every stored neuron p, from gb (f, >= off[2]): the bundles' gate parts
    for p in range(gb.shape[0]):
        g[p] = _row_dot(gb[p], off[0], off[1], gst, nid[p] // sg, G, bits, sbits, xg, dxg, sxg, grp, goc, gov, p,
                        qt, dots)


@njit(**_JIT)
def down_stats(dst, dsq, sg, sbits, S, SZ):
    # down's scale and scale·zero of (neuron group g, row i = 16·gi + t) -> S, SZ [g, t, gi] (Gf, 16, G)
    d, Gf = dsq.shape
    S[:] = 0.0
    SZ[:] = 0.0
    for i in range(d):
        rb = i // sg
        for g in range(Gf):
            s, z = _sz(dst, rb, g, dsq[i, g], sbits)
            S[g, i & 15, i >> 4] = s
            SZ[g, i & 15, i >> 4] = s * z


@njit(**_JIT)
def bundle_down(wa, wb, codes, ids, h, pos, off, G, bits, S, SZ, hs, xt, dx, s8, drp, dor, dov, qt, acc, out):
    # out (d,) = Σ_k h[k] · down column of bundle k, h quantized as SpQRLinear quantizes down's
    # input; accumulated in acc[t, gi] (row 16·gi + t) so the chunk's lanes are contiguous
    d = out.shape[0]
    hs[:] = 0.0
    for k in range(codes.shape[0]):
        hs[pos[ids[k]]] = h[k]
    ident = np.arange(hs.shape[0])
    quant_groups(hs, ident, S.shape[0], xt, dx, s8)
    acc[:] = 0.0
    for k in range(codes.shape[0]):
        p = ids[k]
        j = pos[p]
        g = j >> 4
        c = dx[g] * xt[j & 15, g]
        if c == 0.0:
            continue
        r = _row(wa, wb, codes[k])
        for g0 in range(0, G, 16):
            w = min(16, G - g0)
            o = off[4] + 2 * bits * g0
            if bits == 4:         # straight from the bytes, as _chunk_dot
                for s in range(8):
                    seg = r[o + s * w: o + s * w + w]
                    for h2 in range(2):
                        a = acc[2 * s + h2, g0:g0 + w]
                        sc = S[g, 2 * s + h2, g0:g0 + w]
                        sz = SZ[g, 2 * s + h2, g0:g0 + w]
                        for kk in range(w):
                            a[kk] += c * (sc[kk] * np.float32((seg[kk] >> (4 * h2)) & 15) - sz[kk])
            else:
                _chunk_codes(r, o, w, bits, qt)
                for t in range(16):
                    a = acc[t, g0:g0 + w]
                    sc = S[g, t, g0:g0 + w]
                    sz = SZ[g, t, g0:g0 + w]
                    for kk in range(w):
                        a[kk] += c * (sc[kk] * qt[t, kk] - sz[kk])
        for e in range(drp[p], drp[p + 1]):
            i = np.int64(dor[e])
            acc[i & 15, i >> 4] += c * f16_to_f32(dov[e])
    for i in range(d):
        out[i] = acc[i & 15, i >> 4]


@njit(**_JIT)
def widen_bundles(wa, wb, codes, ids, a, b, nid, off, G, bits, sbits, sg, gst, ust, gperm, uperm,
                  grp, goc, gov, urp, uoc, uov, pos, dst, dsq, drp, dor, dov, q, tile):
    # bundles codes[a:b] -> tile (>= b-a, 3, d) float32: gate row, up row, down column (decoded)
    d = tile.shape[2]
    for k in range(a, b):
        r = _row(wa, wb, codes[k])
        p = ids[k]
        rb = nid[p] // sg
        for m in range(2):
            st, perm = (gst, gperm) if m == 0 else (ust, uperm)
            _unpack_row(r, off[2 * m], G, bits, q)
            for j in range(d):
                g = j >> 4
                s, z = _sz(st, rb, g, r[off[2 * m + 1] + g], sbits)
                tile[k - a, m, perm[j]] = s * (np.float32(q[j]) - z)
            rp, oc, ov = (grp, goc, gov) if m == 0 else (urp, uoc, uov)
            for e in range(rp[p], rp[p + 1]):
                tile[k - a, m, perm[np.int64(oc[e])]] += f16_to_f32(ov[e])
        j = pos[p]
        _unpack_row(r, off[4], G, bits, q)
        for i in range(d):
            s, z = _sz(dst, i // sg, j >> 4, dsq[i, j >> 4], sbits)
            tile[k - a, 2, i] = s * (np.float32(q[i]) - z)
        for e in range(drp[p], drp[p + 1]):
            tile[k - a, 2, np.int64(dor[e])] += f16_to_f32(dov[e])


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
    `scratch`: a dict shared by all layers (the per-token buffers are allocated once)."""

    matmul_min_t = MATMUL_MIN_T

    def __init__(self, shared: dict, nid: np.ndarray, params: dict, d: int, f: int, scratch: dict):
        p = params_of(params)
        self.bits, self.sbits, self.sg = p["bits"], p["stat_bits"], p["stat_group"]
        a = {k: np.ascontiguousarray(v) for k, v in shared.items()}
        self.a, self.nid = a, np.ascontiguousarray(nid, np.int64)
        self.G = -(-d // 16)
        Gf = -(-f // 16)
        _check_shared(a, self.nid, p["stat_group"], d, f)
        self.off = np.array([o for o, _ in bundle_parts(p, d).values()], np.int64)
        self.gate_bytes = int(self.off[2])          # gate.codes and gate.stq lead the bundle
        self.pos = a["down.pos"].astype(np.int64)
        key = (d, f)
        if key not in scratch:
            G = self.G
            scratch[key] = dict(q=np.zeros(16 * G, np.uint8), qt=np.zeros((16, 16), np.float32),
                                dots=np.zeros(16, np.float32), acc=np.zeros((16, G), np.float32),
                                xg=np.zeros((16, G), np.float32), dxg=np.zeros(G, np.float32),
                                sxg=np.zeros(G, np.float32), xu=np.zeros((16, G), np.float32),
                                dxu=np.zeros(G, np.float32), sxu=np.zeros(G, np.float32),
                                S=np.zeros((Gf, 16, G), np.float32), SZ=np.zeros((Gf, 16, G), np.float32),
                                hs=np.zeros(16 * Gf, np.float32), x8=np.zeros((16, Gf), np.float32),
                                dx=np.zeros(Gf, np.float32), s8=np.zeros(Gf, np.float32))
        self.s = scratch[key]

    @staticmethod
    def scratch_bytes(d: int, f: int) -> int:
        """The bytes of the shared per-token scratch (the plan counts them)."""
        G, Gf = -(-d // 16), -(-f // 16)
        return 16 * G + 4 * (16 * 17 + 16 * G + 2 * 18 * G + 2 * Gf * 16 * G + 16 * Gf + 16 * Gf + 2 * Gf)

    def prepare(self, x):
        s, a = self.s, self.a
        quant_groups(x, a["gate.perm"], self.G, s["xg"], s["dxg"], s["sxg"])
        quant_groups(x, a["up.perm"], self.G, s["xu"], s["dxu"], s["sxu"])

    def act(self, wa, wb, codes, ids, sel, x, h):
        s, a = self.s, self.a
        bundle_act(wa, wb, codes, ids, sel, self.nid, self.off, self.G, self.bits, self.sbits, self.sg,
                   a["gate.stats"], a["up.stats"], s["xg"], s["dxg"], s["sxg"], s["xu"], s["dxu"], s["sxu"],
                   a["gate.outlier_rowptr"], a["gate.outlier_col"], a["gate.outlier_val"],
                   a["up.outlier_rowptr"], a["up.outlier_col"], a["up.outlier_val"], s["qt"], s["dots"], h)

    def gate_scores(self, gb, x, out):
        """out (f,) = the gate pre-activations of all neurons (criterion gate:S) from `gb`, the
        first `gate_bytes` of every bundle (gate.codes, gate.stq), kept resident."""
        s, a = self.s, self.a
        self.prepare(x)
        gate_rows(gb, self.nid, self.off, self.G, self.bits, self.sbits, self.sg, a["gate.stats"], s["xg"], s["dxg"],
                  s["sxg"], a["gate.outlier_rowptr"], a["gate.outlier_col"], a["gate.outlier_val"], s["qt"], s["dots"],
                  out)

    def down(self, wa, wb, codes, ids, h, out):
        s, a = self.s, self.a
        down_stats(a["down.stats"], a["down.stat_codes"], self.sg, self.sbits, s["S"], s["SZ"])
        bundle_down(wa, wb, codes, ids, h, self.pos, self.off, self.G, self.bits, s["S"], s["SZ"], s["hs"],
                    s["x8"], s["dx"], s["s8"], a["down.outlier_rowptr"], a["down.outlier_row"],
                    a["down.outlier_val"], s["qt"], s["acc"], out)

    def widen(self, wa, wb, codes, ids, a0, b0, tile):
        a = self.a
        widen_bundles(wa, wb, codes, ids, a0, b0, self.nid, self.off, self.G, self.bits, self.sbits, self.sg,
                      a["gate.stats"], a["up.stats"], a["gate.perm"], a["up.perm"],
                      a["gate.outlier_rowptr"], a["gate.outlier_col"], a["gate.outlier_val"],
                      a["up.outlier_rowptr"], a["up.outlier_col"], a["up.outlier_val"], self.pos,
                      a["down.stats"], a["down.stat_codes"], a["down.outlier_rowptr"], a["down.outlier_row"],
                      a["down.outlier_val"], self.s["q"], tile)

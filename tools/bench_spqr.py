"""Time the SpQR codec on SmolLM2-135M shapes: encode, matvec, a whole token, matmul.

    python tools/bench_spqr.py [--quick] [--only encode|matvec|token|matmul|pack] [--bits 3 4]
    python tools/bench_spqr.py --only pack [--pack /tmp/edgerun-quality/spqr_4.ebin]

encode: seconds per matrix with a synthetic correlated Hessian (the real one comes from
calibration; the cost does not depend on its values). matvec: each shape run over enough
distinct copies (>= 256 MB) that weights stream from DRAM; GB/s of stored bytes (codes, stats,
perm, outliers) and ns per weight. token: every matvec of one SmolLM2 token (30 layers + tied
lm_head, ~134M weights), each matrix distinct. pack: the same on a real .ebin's layers (any codec),
ms per token by kind (q k v o gate up down, 30 layers each). matmul: prefill of T tokens (--T, default 64), with
the dense f16 kernel on the same weights for comparison, GFLOP/s = 2*T*d*n / time.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from edgerun import kernels
from edgerun.codecs.dense import DenseCodec
from edgerun.codecs.spqr import SpQRCodec

from benchlib import LM_HEAD, TOKEN_SHAPES, matvec_over_copies, median_time, token_of_matvecs  # tools/benchlib.py

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def _hessian(n, rng):
    M = rng.standard_normal((n, n)) / np.sqrt(n) + np.eye(n)
    X = rng.standard_normal((2048, n)) @ M * np.exp(rng.standard_normal(n) * 0.5)
    return X.T @ X / len(X)


def _parts(shape, bits, rng, hessian=None):
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return SpQRCodec.encode(w, {"bits": bits}, hessian)


def _copy(parts, bits):
    return SpQRCodec.load({k: v.copy() for k, v in parts.items()}, {"bits": bits})


def bench_encode(bits_list, rng):
    print("\n## encode (GPTQ pass with outliers, synthetic Hessian)")
    print(f"{'shape':>13} {'bits':>4} {'s':>7} {'outliers':>9} {'bits/w':>7}")
    for shape in SHAPES + [LM_HEAD]:
        H = _hessian(shape[1], rng) if shape != LM_HEAD else None
        for bits in bits_list:
            w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
            t0 = time.perf_counter()
            parts = SpQRCodec.encode(w, {"bits": bits}, H)
            t = time.perf_counter() - t0
            lin = SpQRCodec.load(parts, {"bits": bits})
            frac = parts["outlier_col"].size / w.size
            print(f"{str(shape):>13} {bits:>4} {t:7.2f} {frac:9.2%} {lin.bits_per_weight:7.3f}")


def bench_matvec(bits_list, threads_list, reps, rng):
    print("\n## matvec (weights streamed from DRAM)")
    print(f"{'shape':>12} {'bits':>4} {'thr':>3} {'us':>8} {'GB/s':>6} {'ns/w':>6}")
    for shape in SHAPES:
        for bits in bits_list:
            parts = _parts(shape, bits, rng)
            one = SpQRCodec.load(parts, {"bits": bits})
            lins = [one] + [_copy(parts, bits) for _ in range(int(np.ceil(256e6 / one.nbytes)) - 1)]
            x = rng.standard_normal(shape[1]).astype(np.float32)
            out = np.empty(shape[0], np.float32)
            for th in threads_list:
                kernels.set_threads(th)
                t = matvec_over_copies(lins, x, out, reps)
                print(f"{str(shape):>12} {bits:>4} {th:>3} {t*1e6:8.1f} {one.nbytes/t/1e9:6.1f} "
                      f"{t*1e9/(shape[0]*shape[1]):6.3f}")


def bench_token(bits_list, threads_list, reps, rng):
    print("\n## one SmolLM2 token of matvecs (30 layers + lm_head, all distinct)")
    print(f"{'bits':>4} {'thr':>3} {'MB':>6} {'ms':>7} {'GB/s':>6}")
    for bits in bits_list:
        proto = {s: _parts(s, bits, rng) for s in set(TOKEN_SHAPES)}
        lins = [_copy(proto[s], bits) for s in TOKEN_SHAPES]
        run, nbytes = token_of_matvecs(lins, rng)
        for th in threads_list:
            kernels.set_threads(th)
            run()
            t = median_time(run, max(5, reps // 20))
            print(f"{bits:>4} {th:>3} {nbytes/1e6:6.0f} {t*1e3:7.2f} {nbytes/t/1e9:6.1f}")
        del lins


def bench_pack(path, threads_list, reps, rng):
    import edgerun
    print(f"\n## one token of a real pack's layer matvecs, ms by kind ({path})")
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    m = edgerun.load(path, context=256)
    layers = m._transformer.layers
    xs = {n: rng.standard_normal(n).astype(np.float32) for n in (576, 1536)}
    print(f"{'thr':>3} " + " ".join(f"{k:>6}" for k in kinds) + f" {'total':>7}")
    for th in threads_list:
        kernels.set_threads(th)
        rows = []
        for _ in range(max(10, reps // 10)):
            t = dict.fromkeys(kinds, 0.0)
            for L in layers:
                for k in kinds:
                    w = getattr(L, k)
                    x, out = xs[w.shape[1]], np.empty(w.shape[0], np.float32)
                    t0 = time.perf_counter()
                    w.matvec(x, out)
                    t[k] += time.perf_counter() - t0
            rows.append(t)
        med = {k: np.median([r[k] for r in rows[3:]]) * 1e3 for k in kinds}
        tot = np.median([sum(r.values()) for r in rows[3:]]) * 1e3
        print(f"{th:>3} " + " ".join(f"{med[k]:6.3f}" for k in kinds) + f" {tot:7.3f}")


def bench_matmul(bits_list, threads_list, reps, rng, T=64):
    print(f"\n## matmul (prefill T={T}; dense f16 on the same weights for comparison)")
    print(f"{'shape':>12} {'codec':>6} {'thr':>3} {'ms':>8} {'GFLOP/s':>8}")
    for shape in SHAPES:
        X = rng.standard_normal((T, shape[1])).astype(np.float32)
        out = np.empty((T, shape[0]), np.float32)
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        lins = [("f16", DenseCodec.load(DenseCodec.encode(w, {"dtype": "f16"}), {"dtype": "f16"}))]
        lins += [(f"spqr{b}", SpQRCodec.load(SpQRCodec.encode(w, {"bits": b}), {"bits": b})) for b in bits_list]
        for name, lin in lins:
            for th in threads_list:
                kernels.set_threads(th)
                lin.matmul(X, out)
                t = median_time(lambda: lin.matmul(X, out), max(3, reps // 20))
                print(f"{str(shape):>12} {name:>6} {th:>3} {t*1e3:8.3f} {2*T*shape[0]*shape[1]/t/1e9:8.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", choices=["encode", "matvec", "token", "matmul", "pack"], default=None)
    ap.add_argument("--pack", default="/tmp/edgerun-quality/spqr_4.ebin", help="the .ebin of --only pack")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--T", type=int, default=64, help="prefill tokens for --only matmul")
    args = ap.parse_args()
    reps = 50 if args.quick else 300
    rng = np.random.default_rng(0)
    threads = [1, 2] if kernels.numba.config.NUMBA_NUM_THREADS >= 2 else [1]
    if args.only in (None, "encode"):
        bench_encode(args.bits, rng)
    if args.only in (None, "matvec"):
        bench_matvec(args.bits, threads, reps, rng)
    if args.only in (None, "token"):
        bench_token(args.bits, threads, reps, rng)
    if args.only == "pack":
        bench_pack(args.pack, threads, reps, rng)
    if args.only in (None, "matmul"):
        bench_matmul(args.bits, threads, reps, rng, args.T)
    kernels.set_threads(1)


if __name__ == "__main__":
    main()

"""Time the dense matvec / matmul and the attention kernel on SmolLM2-135M shapes.

    python tools/bench_kernels.py [--quick]

matvec: each shape is run over enough distinct copies (>= 256 MB) that weights stream from
DRAM as in a real token, not from cache; reported as median time and GB/s of weight bytes.
"token": every matvec of one SmolLM2 token (30 layers + tied lm_head, ~134M weights), each
matrix distinct. attention: decode (T=1) at context 128/512/2048, H=9, Hkv=3, D=64.
matmul: prefill chunks T=1..64, GFLOP/s = 2*T*d*n / time, next to np.matmul with OpenBLAS set
to 1 and 2 threads in the same run (through OpenBLAS's set_num_threads via ctypes).
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os

import numpy as np

from edgerun import kernels
from edgerun.codecs import get_codec
from edgerun.codecs.dense import kernels as dense

from benchlib import TOKEN_SHAPES, matvec_over_copies, median_time, token_of_matvecs  # tools/benchlib.py

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]


def _linears(shape, dtype, total_bytes, rng):
    codec = get_codec("dense")
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    one = codec.load(codec.encode(w, {"dtype": dtype}), {"dtype": dtype})
    copies = max(1, int(np.ceil(total_bytes / one.nbytes)))
    return [one] + [codec.load({"weight": one.W.copy()}, {"dtype": dtype}) for _ in range(copies - 1)]


def bench_matvec(dtypes, threads_list, reps, rng):
    print("\n## matvec (weights streamed from DRAM)")
    print(f"{'shape':>12} {'dtype':>5} {'thr':>3} {'us':>9} {'GB/s':>7}")
    for shape in SHAPES:
        for dt in dtypes:
            lins = _linears(shape, dt, 256e6, rng)
            x = rng.standard_normal(shape[1]).astype(np.float32)
            out = np.empty(shape[0], np.float32)
            for th in threads_list:
                kernels.set_threads(th)
                t = matvec_over_copies(lins, x, out, reps)
                print(f"{str(shape):>12} {dt:>5} {th:>3} {t*1e6:9.1f} {lins[0].nbytes/t/1e9:7.1f}")


def bench_token(dtypes, threads_list, reps, rng):
    print("\n## one SmolLM2 token of matvecs (30 layers + lm_head, all distinct)")
    print(f"{'dtype':>5} {'thr':>3} {'MB':>6} {'ms':>7} {'GB/s':>7}")
    codec = get_codec("dense")
    for dt in dtypes:
        lins = []
        for shape in TOKEN_SHAPES:
            w = rng.standard_normal(shape, dtype=np.float32) * 0.05
            lins.append(codec.load(codec.encode(w, {"dtype": dt}), {"dtype": dt}))
        run, nbytes = token_of_matvecs(lins, rng)
        for th in threads_list:
            kernels.set_threads(th)
            run()
            t = median_time(run, max(5, reps // 20))
            print(f"{dt:>5} {th:>3} {nbytes/1e6:6.0f} {t*1e3:7.2f} {nbytes/t/1e9:7.1f}")
        del lins


def bench_attention(threads_list, reps, rng):
    print("\n## attention decode (T=1, H=9, Hkv=3, D=64)")
    print(f"{'ctx':>5} {'thr':>3} {'us':>8}")
    H, Hkv, D = 9, 3, 64
    for ctx in (128, 512, 2048):
        k = rng.standard_normal((Hkv, ctx, D)).astype(np.float32)
        v = rng.standard_normal((Hkv, ctx, D)).astype(np.float32)
        q = rng.standard_normal((1, H, D)).astype(np.float32)
        out = np.empty_like(q)
        scores = np.empty((H, ctx), np.float32)
        for th in threads_list:
            kernels.set_threads(th)
            kernels.attention(q, k, v, ctx - 1, out, scores)
            t = median_time(lambda: kernels.attention(q, k, v, ctx - 1, out, scores), reps)
            print(f"{ctx:>5} {th:>3} {t*1e6:8.1f}")
    print("\n## attention prefill chunk (T=128 at start 0, and T=512 at start 0)")
    for T in (128, 512):
        k = rng.standard_normal((Hkv, T, D)).astype(np.float32)
        v = rng.standard_normal((Hkv, T, D)).astype(np.float32)
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        out = np.empty_like(q)
        scores = np.empty((H, T), np.float32)
        for th in threads_list:
            kernels.set_threads(th)
            kernels.attention(q, k, v, 0, out, scores)
            t = median_time(lambda: kernels.attention(q, k, v, 0, out, scores), max(3, reps // 50))
            print(f"T={T:>4} {th:>3} {t*1e3:8.2f} ms")


def _blas_set_threads():
    """OpenBLAS's set_num_threads from NumPy's bundled library (ctypes), or None if not found."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                return fn
    return None


MATMUL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def bench_matmul(dtypes, threads_list, reps, rng):
    print("\n## prefill matmul, GFLOP/s = 2*T*d*n / median time (SmolLM2 shapes)")
    print("blas1/blas2: np.matmul(X, W.T) on f32 weights with OpenBLAS at 1/2 threads;")
    print("<dtype>/<thr>: DenseLinear.matmul (Numba, no BLAS); T < MATMUL_MIN_T loops matvecs.")
    set_blas = _blas_set_threads()
    cols = ["blas1", "blas2"] + [f"{dt}/{th}" for dt in dtypes for th in threads_list]
    print(f"{'shape':>12} {'T':>3} " + " ".join(f"{c:>8}" for c in cols))
    codec = get_codec("dense")
    for shape in MATMUL_SHAPES:
        w = rng.standard_normal(shape).astype(np.float32) * 0.05
        lins = {dt: codec.load(codec.encode(w, {"dtype": dt}), {"dtype": dt}) for dt in dtypes}
        for T in (1, 2, 3, 4, 8, 16, 32, 64):
            X = rng.standard_normal((T, shape[1])).astype(np.float32)
            out = np.empty((T, shape[0]), np.float32)
            flops = 2 * T * shape[0] * shape[1]
            n_reps = max(20, reps // 2)
            row = []
            for bt in (1, 2):
                if set_blas is None:
                    row.append(float("nan"))
                    continue
                set_blas(bt)
                np.matmul(X, w.T, out=out)
                row.append(flops / median_time(lambda: np.matmul(X, w.T, out=out), n_reps) / 1e9)
            if set_blas is not None:
                set_blas(1)
            for dt in dtypes:
                for th in threads_list:
                    kernels.set_threads(th)
                    lins[dt].matmul(X, out)
                    row.append(flops / median_time(lambda: lins[dt].matmul(X, out), n_reps) / 1e9)
            print(f"{str(shape):>12} {T:>3} " + " ".join(f"{v:8.1f}" for v in row), flush=True)
    print("\n## T < 4: loop of matvecs vs the register-blocked kernel (1 thread, GFLOP/s)")
    print(f"{'shape':>12} {'T':>3} {'dtype':>5} {'matvecs':>8} {'kernel':>8}")
    kernels.set_threads(1)
    for shape in MATMUL_SHAPES:
        w = rng.standard_normal(shape).astype(np.float32) * 0.05
        for dt in dtypes:
            lin = codec.load(codec.encode(w, {"dtype": dt}), {"dtype": dt})
            tiles = dense._tiles(1, 0 if dt == "f32" else shape[1])
            for T in (2, 3, 4):
                X = rng.standard_normal((T, shape[1])).astype(np.float32)
                out = np.empty((T, shape[0]), np.float32)
                flops = 2 * T * shape[0] * shape[1]

                def mv():
                    for t in range(T):
                        lin.matvec(X[t], out[t])
                mv()
                lin._mm(X, lin.W, out, 0, shape[0], tiles[0])
                a = flops / median_time(mv, reps) / 1e9
                b = flops / median_time(lambda: lin._mm(X, lin.W, out, 0, shape[0], tiles[0]), reps) / 1e9
                print(f"{str(shape):>12} {T:>3} {dt:>5} {a:8.1f} {b:8.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", choices=["matvec", "token", "attention", "matmul"], default=None)
    args = ap.parse_args()
    reps = 50 if args.quick else 300
    rng = np.random.default_rng(0)
    dtypes = ["f32", "f16", "bf16"]
    threads = [1, 2] if kernels.numba.config.NUMBA_NUM_THREADS >= 2 else [1]
    if args.only in (None, "matvec"):
        bench_matvec(dtypes, threads, reps, rng)
    if args.only in (None, "token"):
        bench_token(dtypes, threads, reps, rng)
    if args.only in (None, "attention"):
        bench_attention(threads, reps, rng)
    if args.only in (None, "matmul"):
        bench_matmul(dtypes, threads, reps, rng)
    kernels.set_threads(1)


if __name__ == "__main__":
    main()

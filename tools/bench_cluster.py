"""Benchmark the cluster codec (edgerun/codecs/cluster/): encode speed, matvec GB/s of packed
bytes and ns/weight on SmolLM2-135M shapes at 1 and 2 threads, prefill matmul, and the relative
reconstruction error on a real SmolLM2 weight.

    python tools/bench_cluster.py [--bits 3,4,8] [--gguf /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf]
    python tools/bench_cluster.py --bits 3 --shapes 17920x1536,1536x8960 --skip matmul,encode,real

A whole token of SmolLM2 (30 layers × (q,o 576x576; k,v 192x576; gate,up 1536x576; down 576x1536)
+ lm_head 49152x576) is ≈ 134M weights; the "token ms" column sums those matvecs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from edgerun import kernels
from edgerun.codecs.cluster import ClusterCodec

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
PER_TOKEN = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30, (49152, 576): 1}


def _time(fn, min_s=0.3):
    fn()
    best, t_end = float("inf"), time.perf_counter() + min_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_kernels(bits_list, threads_list, shapes=SHAPES):
    rng = np.random.default_rng(0)
    print("bits thr shape          bpw   us/matvec  GB/s(packed)  ns/weight")
    for bits in bits_list:
        for threads in threads_list:
            kernels.set_threads(threads)
            token_s = 0.0
            for d, n in shapes:
                w = rng.standard_normal((d, n), dtype=np.float32)
                # encode only a slice for the huge shape, then tile its parts (speed is layout-bound)
                parts = ClusterCodec.encode(w, {"bits": bits})
                L = ClusterCodec.load(parts, {})
                x = rng.standard_normal(n, dtype=np.float32)
                out = np.zeros(d, np.float32)
                t = _time(lambda: L.matvec(x, out))
                token_s += t * PER_TOKEN.get((d, n), 1)
                print(f"{bits:4d} {threads:3d} {d:5d}x{n:<5d} {L.bits_per_weight:7.3f} {t * 1e6:9.1f} "
                      f"{parts['codes'].nbytes / t / 1e9:11.2f} {t / (d * n) * 1e9:10.3f}")
            print(f"  bits={bits} threads={threads}: whole-token matvecs {token_s * 1e3:.2f} ms "
                  f"({1 / token_s:.0f} tok/s bound)")
    kernels.set_threads(1)


def bench_matmul(bits_list, T=128):
    rng = np.random.default_rng(1)
    print(f"\nprefill matmul, T={T} tokens")
    for bits in bits_list:
        for threads in (1, 2):
            kernels.set_threads(threads)
            tot = 0.0
            for d, n in SHAPES[:4]:
                L = ClusterCodec.load(ClusterCodec.encode(rng.standard_normal((d, n), dtype=np.float32),
                                                          {"bits": bits}), {})
                X = rng.standard_normal((T, n), dtype=np.float32)
                out = np.zeros((T, d), np.float32)
                t = _time(lambda: L.matmul(X, out))
                tot += t * PER_TOKEN[(d, n)]          # PER_TOKEN counts all 30 layers
                print(f"  bits={bits} thr={threads} {d}x{n}: {t * 1e3:7.2f} ms  "
                      f"{2 * T * d * n / t / 1e9:6.1f} GFLOP/s")
            print(f"  bits={bits} thr={threads}: 30 layers' linears {tot * 1e3:.0f} ms "
                  f"-> {T / tot:.0f} prompt tok/s bound (no lm_head, no attention)")
    kernels.set_threads(1)


def bench_encode(bits_list):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((1536, 576), dtype=np.float32)
    H = np.diag(rng.random(576) + 0.1)
    print("\nencode speed (1536x576, with hessian, 2 threads)")
    kernels.set_threads(2)
    for bits in bits_list:
        ClusterCodec.encode(w[:8], {"bits": bits}, H)     # compile
        t0 = time.perf_counter()
        ClusterCodec.encode(w, {"bits": bits}, H)
        dt = time.perf_counter() - t0
        print(f"  bits={bits}: {w.size / dt / 1e6:.2f} M weights/s -> SmolLM2 (134M) ≈ {134e6 * dt / w.size:.0f} s")
    kernels.set_threads(1)


def bench_real(bits_list, gguf):
    from edgerun.convert.gguf import GGUFSource
    name = "model.layers.3.mlp.up_proj.weight"
    w = np.asarray(GGUFSource(gguf).read(name), np.float32)
    print(f"\nreal weight {name} {w.shape} (Q4_1-dequantized source)")
    for bits in bits_list:
        for g in (None, 4, 16):
            p = {"bits": bits} if g is None else {"bits": bits, "group_rows": g}
            parts = ClusterCodec.encode(w, p)
            e = np.linalg.norm(ClusterCodec.decode(parts) - w) / np.linalg.norm(w)
            L = ClusterCodec.load(parts)
            print(f"  bits={bits} group_rows={int(parts['meta'][3]):3d}: {L.bits_per_weight:6.3f} bits/weight, "
                  f"relative error {e:.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="3,4,8")
    ap.add_argument("--gguf", default="/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--skip", default="", help="comma list of: kernels,matmul,encode,real")
    ap.add_argument("--shapes", default=None, help="matvec shapes DxN,... (default: SmolLM2's)")
    a = ap.parse_args()
    bits = [int(b) for b in a.bits.split(",")]
    skip = set(a.skip.split(","))
    if "kernels" not in skip:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else SHAPES
        bench_kernels(bits, (1, 2), shapes)
    if "matmul" not in skip:
        bench_matmul(bits)
    if "encode" not in skip:
        bench_encode(bits)
    if "real" not in skip:
        bench_real(bits, a.gguf)


if __name__ == "__main__":
    main()

"""One token's feed-forward block, spqr flash bundles vs SpQRLinear, on the same weights.

    PYTHONPATH=. python tools/bench_flash_ffn.py ~/.cache/edgerun/bench/spqr4.ebin [--layer 0 --threads 1,2]

Takes one layer's gate / up / down of a standard spqr pack, cuts them into bundles as
`pack --layout flash` does (codecs/spqr/flash.py `cut`, a shuffled neuron order), and times per
token (wall and process CPU time), alternating in one process (the host is noisy): the bundle path (streaming.ffn_rows, every
neuron resident, criterion off) and the standard path (gate and up stacked as the model stacks
them, silu, down). Prints the medians per token, and checks both agree.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from edgerun import streaming
from edgerun.codecs import get_codec
from edgerun.ebin import EbinFile
from edgerun.kernels import set_threads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pack")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    spqr = get_codec("spqr")
    with EbinFile(a.pack) as e:
        ts = e.manifest["tensors"]
        names = [f"model.layers.{a.layer}.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
        parts = [{k: e.read(n) for k, n in ts[name]["parts"].items()} for name in names]
        params = ts[names[0]]["params"]
    lins = [spqr.load(p, params) for p in parts]
    gu = type(lins[0]).stack(lins[:2])
    f, d = lins[0].shape
    perm = np.random.default_rng(0).permutation(f)
    bundles, shared = spqr.flash_cut(*parts, params, perm)
    kern = spqr.flash_kernels(shared, perm, params, d, f, {})
    ids = np.arange(f, dtype=np.int64)
    x = np.random.default_rng(1).standard_normal((1, d)).astype(np.float32)
    out = np.zeros((1, d), np.float32)
    guo, h, ref = np.zeros(2 * f, np.float32), np.zeros(f, np.float32), np.zeros(d, np.float32)

    def flash():
        streaming.ffn_rows(kern, bundles, bundles, ids, ids, x, out)

    def standard():
        gu.matvec(x[0], guo)
        g, u = guo[:f], guo[f:]
        np.multiply(g / (1.0 + np.exp(-g)), u, out=h)
        lins[2].matvec(h, ref)

    weights = 3 * f * d
    print(f"layer {a.layer}: gate/up {f}x{d}, down {d}x{f}, {params}; bundle {bundles.shape[1]} B")
    for th in [int(t) for t in a.threads.split(",")]:
        set_threads(th)
        flash(), standard()
        err = np.abs(out[0] - ref).max() / np.abs(ref).max()
        res = {"flash bundles": [], "SpQRLinear": []}
        cpu = {k: [] for k in res}
        for _ in range(a.rounds):
            for name, fn in (("flash bundles", flash), ("SpQRLinear", standard)):
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(a.reps):
                    fn()
                res[name].append((time.perf_counter() - t0) / a.reps)
                cpu[name].append((time.process_time() - c0) / a.reps)
        med = {k: float(np.median(v)) for k, v in res.items()}
        for k, v in med.items():
            print(f"  {th} thread(s)  {k:14s} {v * 1e6:8.1f} µs/token wall ({v * 1e9 / weights:.3f} ns/weight), "
                  f"{np.median(cpu[k]) * 1e6:8.1f} µs CPU (all threads)")
        print(f"  {th} thread(s)  flash / standard = {med['flash bundles'] / med['SpQRLinear']:.2f}x wall, "
              f"{np.median(cpu['flash bundles']) / np.median(cpu['SpQRLinear']):.2f}x CPU"
              f"  (max |diff| / max |out| = {err:.1e})")


if __name__ == "__main__":
    main()

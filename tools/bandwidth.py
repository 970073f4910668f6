"""Decode speed as a share of the memory-bandwidth limit (issue #10's "≥ 50 % of the bandwidth
limit": bytes read per token ÷ measured DRAM bandwidth).

    python tools/bandwidth.py spqr4=~/.cache/edgerun/bench/spqr4.ebin [-t 2] [--rounds 3]

Per pack, bytes read per decode token = every stored array of the weights a token multiplies:
all tensors except the token embedding, of which a token reads one row (a tied embedding is
the output head, so it is read in full). Flash packs count their FFN bundles too (resident
decode, criterion off). The KV cache (a few MB at these context lengths) is left out, so the share is a
slight underestimate.

DRAM bandwidth: the best of `--rounds` timed passes of a Numba prange sum over a float32
array of `--mib` MiB (far larger than the caches), with the same thread count as decode.
Rounds alternate bandwidth and decode, so a busy host slows both alike; the shares are
computed per round and the median is reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from numba import njit, prange, set_num_threads

PROMPT = "The history of the city begins with a small settlement on the river, where"


@njit(parallel=True, fastmath=True, cache=True)
def _sum(a):
    # read-only pass over a (only its time matters, not the float32 sum's rounding): a plain
    # reduction, which LLVM vectorizes with several partial sums under fastmath on every target.
    # (An 8-element slice sum per step read 38.8 GB/s for an AVX2 target on a Zen 5 but 7.3 GB/s
    # for its native znver5 target, an LLVM codegen quirk.)
    s = np.float32(0.0)
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def dram_gbps(buf: np.ndarray, threads: int) -> float:
    """GB/s of one read pass over `buf` with `threads` threads (the best of 3)."""
    set_num_threads(threads)
    _sum(buf[:64])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        _sum(buf)
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def bytes_per_token(path: str) -> int:
    """Bytes a decode token reads, from the pack's array table: every stored array but the
    token embedding's (one row of it; all of it when tied: it is the head) and the flash
    sparsity predictor's (unused with the criterion off)."""
    from edgerun.ebin import EbinFile
    with EbinFile(path) as f:
        m = f.manifest
        embed = m["tensors"]["model.embed_tokens.weight"]
        skip = set() if m["config"].get("tie_word_embeddings") else set(embed["parts"].values())
        read = sum(a.length for name, a in f.arrays.items() if name not in skip and ".predictor" not in name)
        return read + sum(f.info(p).length for p in skip) // embed["shape"][0]


def decode_tps(model, n: int = 48) -> float:
    t0, done = None, 0
    for _ in model.stream_tokens(model.tokenizer.encode(PROMPT), max_tokens=n, temperature=0):
        if t0 is None:
            t0 = time.perf_counter()        # the first token comes from the prefill
        else:
            done += 1
    return done / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("packs", nargs="+", metavar="LABEL=PATH")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mib", type=int, default=1024, help="bandwidth buffer size (default %(default)s MiB)")
    args = p.parse_args(argv)
    import edgerun
    packs = dict(a.split("=", 1) for a in args.packs)
    buf = np.ones(args.mib << 18, np.float32)
    models = {k: edgerun.load(os.path.expanduser(v), context=256, threads=args.threads) for k, v in packs.items()}
    sizes = {k: bytes_per_token(os.path.expanduser(v)) for k, v in packs.items()}
    for m in models.values():
        decode_tps(m, 8)                    # compiles (or loads) every kernel before timing
    bw, shares, tps = [], {k: [] for k in packs}, {k: [] for k in packs}
    for r in range(args.rounds):
        g = dram_gbps(buf, args.threads)
        bw.append(g)
        for k, m in models.items():
            s = decode_tps(m)
            tps[k].append(s)
            shares[k].append(sizes[k] * s / 1e9 / g)
        print(f"round {r + 1}: DRAM {g:.1f} GB/s  " + "  ".join(
            f"{k} {tps[k][-1]:.1f} tok/s ({shares[k][-1]:.0%})" for k in packs), file=sys.stderr)
    print(f"DRAM read bandwidth, {args.threads} threads, {args.mib} MiB: median {statistics.median(bw):.1f} GB/s "
          f"(rounds: {', '.join(f'{x:.1f}' for x in bw)})")
    print("| pack | bytes read / token | decode tok/s (median) | GB/s read | share of DRAM bandwidth (median) |")
    print("|---|---|---|---|---|")
    for k in packs:
        t = statistics.median(tps[k])
        print(f"| {k} | {sizes[k] / 1e6:.1f} MB | {t:.1f} | {sizes[k] * t / 1e9:.1f} | "
              f"{statistics.median(shares[k]):.0%} |")


if __name__ == "__main__":
    main()

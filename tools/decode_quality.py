"""Perplexity through the decode path (one token a time: matvecs) next to the prefill path
(chunks: matmuls) on the same windows, to measure what the matvecs' int8 activations cost.

    python tools/decode_quality.py PACK.ebin [PACK.ebin ...] [--windows 4] [--context 256]

edgerun's prefill multiplies float32 activations by the decoded weights; its decode matvecs of
the spqr and cluster (K ≤ 32) codecs quantize the activations to int8 first (one scale per 16 or
32 inputs, formats/codec-spqr.md and codec-cluster.md § Matvec). Same protocol as
edgerun.evaluate (tools/data/wikitext2_heldout.txt, second half of each window scored); the
decode path feeds the window's own tokens one at a time (teacher forcing).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import edgerun
from edgerun.evaluate import perplexity, windows

HELDOUT = Path(__file__).parent / "data" / "wikitext2_heldout.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packs", nargs="+")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    text = HELDOUT.read_text()
    print(f"{'pack':<40} {'prefill ppl':>12} {'decode ppl':>11} {'ratio':>7}  (windows {args.windows} x {args.context})")
    for path in args.packs:
        m = edgerun.load(path, context=args.context, threads=args.threads)
        tw = windows(m.tokenizer, text, args.context, args.windows)
        tr = m._transformer

        def decode_logits(ids):
            return np.stack([tr.forward([tok], pos).copy() for pos, tok in enumerate(ids)])

        t0 = time.perf_counter()
        pre = perplexity(m.logits, tw)
        t1 = time.perf_counter()
        dec = perplexity(decode_logits, tw)
        t2 = time.perf_counter()
        print(f"{Path(path).name:<40} {pre.ppl:>12.4f} {dec.ppl:>11.4f} {dec.ppl / pre.ppl:>7.4f}  "
              f"({t1 - t0:.0f} s, {t2 - t1:.0f} s)", flush=True)
        m.close()


if __name__ == "__main__":
    main()

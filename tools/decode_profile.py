"""Where a decode token's time goes: wall time per linear (by codec, bits and shape) and per
layer op, summed over greedy decode steps of one loaded pack (in process, timers around
`model._linear` and HostOps' ops; the prefill is not counted).

    python tools/decode_profile.py model.ebin [-t 2] [-n 64]

Stacked linears (q/k/v, gate/up joined) show as one matrix of their summed rows. Timer overhead is
~1 µs per call; "the rest" is everything between the timed calls (Python, sampling)."""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import edgerun
import edgerun.model as M

PROMPT = "The history of the city begins with a small settlement on the river, where"


def label(w) -> str:
    inner = getattr(w, "inner", w)                      # a RotatedLinear's codec Linear
    bits = getattr(inner, "bits", None)
    name = type(inner).__name__ + (f":{bits}" if bits is not None else "")
    return f"{name}{' rotated' if inner is not w else ''} {tuple(w.shape)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ebin")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--tokens", type=int, default=64)
    args = ap.parse_args()
    spent = defaultdict(float)
    timing = [False]

    def timed(key, fn, *a, **k):
        if not timing[0]:
            return fn(*a, **k)
        t = time.perf_counter()
        r = fn(*a, **k)
        spent[key] += time.perf_counter() - t
        return r

    linear = M._linear
    M._linear = lambda w, x, out, bias=None: timed(label(w), linear, w, x, out, bias)
    for op in ("rmsnorm", "rope", "attention", "silu_mul"):
        fn = getattr(M.HostOps, op)
        setattr(M.HostOps, op, lambda self, *a, _fn=fn, _op=op, **k: timed(_op, _fn, self, *a, **k))
    m = edgerun.load(args.ebin, context=512, threads=args.threads)
    ids = m.tokenizer.encode(PROMPT)
    list(m.stream_tokens(ids, max_tokens=8, temperature=0))          # first calls, caches
    n, start = 0, None
    for _ in m.stream_tokens(ids, max_tokens=args.tokens + 1, temperature=0):
        if start is None:                                              # the prefill's token
            timing[0], start = True, time.perf_counter()
        else:
            n += 1
    total = time.perf_counter() - start
    print(f"{args.ebin}: {n} decode tokens, {n / total:.1f} tok/s, {1000 * total / n:.1f} ms/token, "
          f"{args.threads} threads")
    for key, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"{1000 * s / n:8.2f} ms/token  {key}")
    print(f"{1000 * (total - sum(spent.values())) / n:8.2f} ms/token  the rest")


if __name__ == "__main__":
    main()

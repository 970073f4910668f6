"""Where a decode token's time goes: wall time per linear (by codec, bits and shape) and per
layer op, summed over greedy decode steps of one loaded pack (in process, timers around
`model._linear` and HostOps' ops; the prefill is not counted). With --prompt, the same for the
prefill of tools/bench.py's 128-token prompt instead (median of -n prefills, per prompt).

    python tools/decode_profile.py model.ebin [-t 2] [-n 64]
    python tools/decode_profile.py model.ebin --prompt [-t 2] [-n 5]

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
    ap.add_argument("-n", "--tokens", type=int, default=64, help="decode tokens, or prefills with --prompt")
    ap.add_argument("--prompt", action="store_true", help="profile the prefill of a 128-token prompt")
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
    if args.prompt:
        return prefill_profile(m, args, spent, timing)
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


def prefill_profile(m, args, spent, timing) -> None:
    import statistics
    import sys
    from pathlib import Path

    from edgerun import kernels
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import PROMPT_TEXT, PROMPT_TOKENS   # tools/bench.py
    kernels.wait_full_kernels()
    ids = m.tokenizer.encode(PROMPT_TEXT)[:PROMPT_TOKENS]
    m.stop_ids = []
    walls, per_op = [], defaultdict(list)
    for rep in range(args.tokens + 1):          # the first run unmeasured (first calls, caches)
        spent.clear()
        m.reset()
        timing[0] = rep > 0
        t = time.perf_counter()
        for _ in m.stream_tokens(ids, max_tokens=1, temperature=0):
            pass
        if rep:
            walls.append(time.perf_counter() - t)
            for key, sec in spent.items():
                per_op[key].append(sec)
            per_op["the rest"].append(walls[-1] - sum(spent.values()))
    wall = statistics.median(walls)
    print(f"{args.ebin}: prefill of {len(ids)} tokens, {len(ids) / wall:.1f} tok/s, {1000 * wall:.0f} ms, "
          f"{args.threads} threads (medians of {args.tokens})")
    for key, secs in sorted(per_op.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"{1000 * statistics.median(secs):8.1f} ms  {key}")


if __name__ == "__main__":
    main()

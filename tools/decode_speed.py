"""Decode tok/s of packs in one process, interleaved rounds, greedy, 2 threads: a quick stand-in for
tools/bench.py (no llama.cpp, no separate processes) when comparing codecs on a busy host.

    PYTHONPATH=. python tools/decode_speed.py vq:3=a.ebin cluster:4=b.ebin

Decode tok/s = tokens after the first (which the prefill produces) / their time."""
import sys, time
import edgerun
packs = dict(a.split("=") for a in sys.argv[1:])
models = {k: edgerun.load(v, context=256, threads=2) for k, v in packs.items()}
prompt = "The history of the city begins with a small settlement on the river, where"
res = {k: [] for k in packs}
for rnd in range(3):
    for k, m in models.items():
        t0 = None; n = 0
        for tok in m.stream_tokens(m.tokenizer.encode(prompt), max_tokens=48, temperature=0):
            if t0 is None:
                t0 = time.perf_counter()
            else:
                n += 1
        res[k].append(n / (time.perf_counter() - t0))
for k, v in res.items():
    print(f"{k:12s} decode tok/s per round: " + ", ".join(f"{x:.1f}" for x in v) + f"  best {max(v):.1f}")

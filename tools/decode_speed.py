"""Decode tok/s of packs in one process, interleaved rounds, greedy: a quick stand-in for
tools/bench.py (no llama.cpp, no separate processes) when comparing codecs on a busy host.

    PYTHONPATH=. python tools/decode_speed.py vq:3=a.ebin cluster:4=b.ebin [--threads 2]

Decode tok/s = tokens after the first (which the prefill produces) / their time. Also prints the
process CPU time per decoded token (all threads), steadier than wall time when other processes
share the cores."""
import sys, time
import edgerun
args = sys.argv[1:]
threads = 2
if "--threads" in args:
    i = args.index("--threads")
    threads = int(args[i + 1])
    del args[i:i + 2]
packs = dict(a.split("=") for a in args)
models = {k: edgerun.load(v, context=256, threads=threads) for k, v in packs.items()}
prompt = "The history of the city begins with a small settlement on the river, where"
res = {k: [] for k in packs}
cpu = {k: [] for k in packs}
for rnd in range(3):
    for k, m in models.items():
        t0 = None; n = 0
        for tok in m.stream_tokens(m.tokenizer.encode(prompt), max_tokens=48, temperature=0):
            if t0 is None:
                t0, c0 = time.perf_counter(), time.process_time()
            else:
                n += 1
        res[k].append(n / (time.perf_counter() - t0))
        cpu[k].append((time.process_time() - c0) / n * 1e3)
print(f"{threads} thread(s)")
for k, v in res.items():
    print(f"{k:12s} decode tok/s per round: " + ", ".join(f"{x:.1f}" for x in v) + f"  best {max(v):.1f}"
          f"  | CPU ms/token: " + ", ".join(f"{x:.2f}" for x in cpu[k]) + f"  best {min(cpu[k]):.2f}")

"""Flash-streaming benchmark (issue #5): quality vs sparsity, and cold-cache decode speed of the
naive / layer / window FFN streaming at memory budgets, each run in its own subprocess.

    python tools/bench_flash.py quality model-flash.ebin [--ctx 256 --windows 8 --threads 1]
    python tools/bench_flash.py speed model-flash.ebin [--tokens 32 --criterion off --rounds 3]
    python tools/bench_flash.py disk model-flash.ebin
    python tools/bench_flash.py gaps model-flash.ebin --budget BYTES --criterion gate:0.2

Every speed run goes through `edgerun.load(ram=budget, stream=mode, criterion=...)` as a user's
does. Budgets are the runtime's measured baseline RSS (interpreter, libraries, JIT code, KV,
scratch, the plan's heap headroom) plus 75% and 50% of the weight bytes. Every run drops the
file's page cache first (posix_fadvise DONTNEED; checked with `fincore` when present) and
reports peak RSS (VmHWM) against the budget.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "tools/data/wikitext2_heldout.txt"
HEADROOM = 24 * 2**20       # edgerun.memory.HEADROOM_BYTES: heap growth the plan reserves


def build(path, context, budget=None, mode="auto", criterion="off", window=4, baseline=None):
    """Load the non-FFN weights, attach the streamed FFN within what the budget leaves for it."""
    from edgerun import streaming
    from edgerun.api import tokenizer_from_manifest, warm_up_kernels
    from edgerun.config import ModelConfig
    from edgerun.ebin import EbinFile
    from edgerun.memory import HEADROOM_BYTES, current_rss
    from edgerun.model import RunState, Transformer, Weights
    from edgerun.plan import mapped_parts
    with EbinFile(path) as e:
        man = e.manifest
        cfg = ModelConfig.from_dict(man["config"])
        warm_up_kernels(e)             # includes streaming.warm_up for flash packs
        runtime = current_rss() if baseline is None else baseline
        w = Weights.from_ebin(e, cfg, mapped=mapped_parts(man, cfg))   # as edgerun.load
    scratch, kv = RunState.nbytes(cfg, context, 64)
    ffn_budget = 1 << 40 if budget is None else budget - runtime - w.nbytes - scratch - kv - HEADROOM_BYTES
    tf = Transformer(cfg, w, context, 64)
    plan = streaming.attach(tf, path, man, ffn_budget, mode=mode, window=window, criterion=criterion)
    return tf, plan, tokenizer_from_manifest(man), {"runtime": runtime, "resident_weights": w.nbytes,
                                                    "kv": kv, "scratch": scratch, "ffn_budget": ffn_budget}


def quality(args):
    from edgerun import kernels
    from edgerun.evaluate import perplexity, windows
    kernels.set_threads(args.threads)
    text = HELDOUT.read_text(encoding="utf-8")
    for crit in args.criteria.split(","):
        tf, plan, tok, _ = build(args.model, args.ctx, criterion=crit)
        wins = windows(tok, text, args.ctx, args.windows)
        t0 = time.perf_counter()
        p = perplexity(lambda ids: tf.forward(ids, 0, all_logits=True), wins)
        print(json.dumps({"criterion": crit, "ppl": round(p.ppl, 4), "stderr_nll": round(p.stderr, 4),
                          "neurons_used": round(plan.stats.neurons_used / max(plan.stats.tokens, 1) / plan.layers
                                                / plan.neurons, 4) if crit != "off" else 1.0,
                          "protocol": f"{p.windows} windows of {p.context}, second half scored",
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def run_one(args):
    """One measurement (in a fresh subprocess) through `edgerun.load`, as a user runs it: load
    within --ram, drop the file's page cache, prefill a prompt, decode args.tokens greedily."""
    import numpy as np

    from edgerun import api, streaming
    from edgerun.flashio import drop_file_cache
    from edgerun.memory import peak_rss
    # benchmark knobs edgerun.load does not take (it uses the defaults): the window's k and the gap
    knobs = {"window": args.window, "gap": None if args.gap < 0 else args.gap, "prefetch": bool(args.prefetch)}
    streaming.plan_streaming = functools.partial(streaming.plan_streaming, **knobs)
    streaming.attach = functools.partial(streaming.attach, **knobs)
    m = api.load(args.model, ram=args.budget or None, context=args.ctx, threads=args.threads,
                 stream=args.mode, criterion=args.criterion)
    tf, plan = m._transformer, m.stream_plan
    drop_file_cache(args.model)
    ids = m.tokenizer.encode("The history of the city begins in the early middle ages, when")
    t0 = time.perf_counter()
    logits = tf.forward(ids, 0)
    st = plan.stats
    b0, r0, n0, w0, l0, u0 = st.bytes_read, st.reads, st.tokens, st.read_seconds, st.neurons_loaded, st.neurons_used
    t1 = time.perf_counter()
    pos = len(ids)
    for _ in range(args.tokens):
        nxt = int(np.argmax(logits))
        logits = tf.forward([nxt], pos)
        pos += 1
    t2 = time.perf_counter()
    n = st.tokens - n0
    nbytes = st.bytes_read - b0
    print(json.dumps({"mode": plan.mode, "prefetch": plan.prefetch, "criterion": plan.criterion, "window": plan.window, "gap": plan.gap,
                      "capacity": plan.capacity, "budget": args.budget or None, "peak_rss": peak_rss(),
                      "decode_tok_s": round(args.tokens / (t2 - t1), 2), "prefill_s": round(t1 - t0, 3),
                      "MB_read_per_token": round(nbytes / n / 1e6, 3),
                      "reads_per_token": round((st.reads - r0) / n, 1),
                      "achieved_MBps": round(nbytes / (t2 - t1) / 1e6, 1),
                      "ms_waiting_per_token": round((st.read_seconds - w0) / n * 1e3, 2),
                      "hit_rate": round(1 - (st.neurons_loaded - l0) / max(st.neurons_used - u0, 1), 4),
                      "ffn_MB": round(plan.total_bytes / 1e6, 2), "runtime": m.plan.runtime,
                      "resident_weights": m.weight_bytes, "kv": m.plan.kv_cache, "scratch": m.plan.scratch}),
          flush=True)


def sub(model, **kw):
    cmd = [sys.executable, __file__, "one", str(model)] + [f"--{k}={v}" for k, v in kw.items()]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed", **kw}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cached_pages(path) -> str:
    if not shutil.which("fincore"):
        return "n/a"
    out = subprocess.run(["fincore", "-n", "-o", "RES", str(path)], capture_output=True, text=True)
    return out.stdout.strip()


def disk(args):
    """The disk's own O_DIRECT read throughput through FlashReader at the request sizes streaming
    issues (a bundle, gap-coalesced runs, 256 KiB pieces of a layer's misses, naive's 1 MiB)."""
    from edgerun.flashio import direct_throughput
    for chunk in (4096, 16 << 10, 64 << 10, 256 << 10, 1 << 20):
        for threads in (1, 2):
            r = direct_throughput(args.model, chunk, threads, limit=(64 << 20) if chunk < 65536 else 256 << 20)
            print(json.dumps({"disk_direct_read": {k: round(v, 4) if isinstance(v, float) else v
                                                   for k, v in r.items()}}), flush=True)


def speed(args):
    """Interleaved rounds: resident, then at +75% and +50% budgets (--fractions) naive / layer / window, each
    in a fresh process after dropping the file's page cache; medians over the rounds."""
    from statistics import median

    from edgerun.flashio import drop_file_cache
    common = {"tokens": args.tokens, "ctx": args.ctx, "threads": args.threads}
    base = sub(args.model, budget=0, mode="auto", criterion="off", **common)   # fully resident
    print(json.dumps({"resident": base}), flush=True)
    weights = base["resident_weights"] + _ffn_bytes(args.model)
    baseline = base["runtime"] + base["kv"] + base["scratch"]
    runs = {}
    for rnd in range(args.rounds):
        drop_file_cache(args.model)
        runs.setdefault("resident", []).append(sub(args.model, budget=0, mode="auto", criterion="off", **common))
        print(json.dumps({"resident": runs["resident"][-1], "round": rnd}), flush=True)
        for frac in args.fractions:
            budget = int(baseline + HEADROOM + frac * weights)
            for mode in ("naive", "layer", "window"):
                crit = args.criterion if mode == "window" else "off"
                drop_file_cache(args.model)
                cached = cached_pages(args.model)
                r = sub(args.model, budget=budget, mode=mode, criterion=crit, window=args.window, gap=args.gap,
                        **common)
                r.update({"budget_fraction": frac, "cached_before": cached, "round": rnd,
                          "rss_within_budget": r.get("peak_rss", 1 << 62) <= budget})
                print(json.dumps(r), flush=True)
                runs.setdefault(f"{mode}@{frac}", []).append(r)
    res = median(r["decode_tok_s"] for r in runs["resident"])
    summary = {"resident_tok_s": res, "weights_MB": round(weights / 1e6, 1), "baseline_MB": round(baseline / 1e6, 1)}
    for frac in args.fractions:
        tok = {m: median(r.get("decode_tok_s", 0) for r in runs[f"{m}@{frac}"]) for m in ("naive", "layer", "window")}
        summary[f"+{int(frac * 100)}%"] = {**tok, "window/naive": round(tok["window"] / max(tok["naive"], 1e-9), 2),
                                           "window/resident": round(tok["window"] / res, 3),
                                           "all_rss_within_budget": all(r.get("rss_within_budget") for m in
                                                                        ("naive", "layer", "window")
                                                                        for r in runs[f"{m}@{frac}"])}
    print(json.dumps({"summary": summary}), flush=True)


def _ffn_bytes(path) -> int:
    """Bytes of the FFN bundles and, for compressed codecs, their shared parts (neither is in the
    manifest's `tensors`)."""
    from edgerun.ebin import EbinFile
    with EbinFile(path) as e:
        return sum(e.arrays[L["bundles"]].length + sum(e.arrays[n].length for n in L.get("shared", {}).values())
                   for L in e.manifest["flash"]["layers"])


def gaps(args):
    """Coalescing gap sweep for a criterion (window mode, one budget): tok/s and bytes per token."""
    for rnd in range(args.rounds):
        for gap in (0, 2, 8, 18, 48, 128):
            from edgerun.flashio import drop_file_cache
            drop_file_cache(args.model)
            r = sub(args.model, budget=args.budget, mode="window", criterion=args.criterion, window=args.window,
                    gap=gap, tokens=args.tokens, ctx=args.ctx, threads=args.threads)
            r["round"] = rnd
            print(json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["quality", "speed", "disk", "gaps", "one"])
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--criteria", default="off,gate:0.3,gate:0.5,lowrank:0.3,lowrank:0.5")
    ap.add_argument("--criterion", default="lowrank:0.5")
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--gap", type=int, default=-1, help="coalescing gap in bundles (-1: the default)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads (the reader always has 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fractions", type=lambda v: [float(x) for x in v.split(",")], default=[0.75, 0.5],
                    help="speed: budgets = baseline + these fractions of the weight bytes")
    ap.add_argument("--prefetch", type=int, default=1, help="0: window/layer read no layer ahead (to measure it)")
    args = ap.parse_args()
    {"quality": quality, "speed": speed, "disk": disk, "gaps": gaps, "one": run_one}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Flash-streaming benchmark (issue #5): quality vs sparsity, and cold-cache decode speed of the
naive / layer / window FFN streaming at memory budgets, each run in its own subprocess.

    python tools/bench_flash.py quality model-flash.ebin [--ctx 256 --windows 8]
    python tools/bench_flash.py speed model-flash.ebin [--tokens 32 --criterion lowrank:0.5]

Budgets are the runtime's measured baseline RSS (interpreter, libraries, JIT code, KV, scratch)
plus 75% and 50% of the weight bytes. Every run drops the file's page cache first
(posix_fadvise DONTNEED; checked with `fincore` when present) and reports peak RSS (ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "tools/data/wikitext2_heldout.txt"


def build(path, context, budget=None, mode="auto", criterion="off", window=4, baseline=None):
    """Load the non-FFN weights, attach the streamed FFN within what the budget leaves for it."""
    from edgerun.api import tokenizer_from_manifest, warm_up_kernels
    from edgerun.config import ModelConfig
    from edgerun.ebin import EbinFile
    from edgerun.memory import HEADROOM_BYTES, current_rss
    from edgerun.model import RunState, Transformer, Weights
    from edgerun import streaming
    with EbinFile(path) as e:
        man = e.manifest
        cfg = ModelConfig.from_dict(man["config"])
        warm_up_kernels(man)
        _warm_streaming(man)
        runtime = current_rss() if baseline is None else baseline
        w = Weights.from_ebin(e, cfg)
    scratch, kv = RunState.nbytes(cfg, context, 64)
    ffn_budget = 1 << 40 if budget is None else budget - runtime - w.nbytes - scratch - kv - HEADROOM_BYTES
    tf = Transformer(cfg, w, context, 64)
    plan = streaming.attach(tf, path, man, ffn_budget, mode=mode, window=window, criterion=criterion)
    return tf, plan, tokenizer_from_manifest(man), {"runtime": runtime, "resident_weights": w.nbytes,
                                                    "kv": kv, "scratch": scratch, "ffn_budget": ffn_budget}


def _warm_streaming(man):
    """Compile the bundle kernels for this dtype before measuring the baseline."""
    import numpy as np
    from edgerun import streaming
    dt = man["flash"]["dtype"]
    buf = streaming.kernel_view(np.zeros((2, 3, 8), streaming.STORED[dt]), dt)
    codes = np.arange(2, dtype=np.int64)
    x, h, out = np.ones(8, np.float32), np.zeros(2, np.float32), np.zeros(8, np.float32)
    streaming.bundle_act(buf, buf, codes, codes, x, h)
    streaming.bundle_down(buf, buf, codes, h, out)
    streaming.widen_bundles(buf, buf, codes, 0, 2, np.zeros((2, 3, 8), np.float32))
    streaming.copy_rows(buf, codes, buf.copy(), codes)


def quality(args):
    from edgerun.evaluate import perplexity, windows
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
    """One measurement (in a fresh subprocess): prefill a prompt, decode args.tokens greedily."""
    import numpy as np
    from edgerun.flashio import drop_file_cache
    from edgerun.memory import peak_rss
    budget = None if args.budget == 0 else args.budget
    tf, plan, tok, mem = build(args.model, args.ctx, budget, args.mode, args.criterion, args.window,
                               baseline=args.baseline or None)
    drop_file_cache(args.model)
    ids = tok.encode("The history of the city begins in the early middle ages, when")
    t0 = time.perf_counter()
    logits = tf.forward(ids, 0)
    stats = plan.stats
    b0, r0, n0 = stats.bytes_read, stats.read_seconds, stats.tokens
    t1 = time.perf_counter()
    pos = len(ids)
    for _ in range(args.tokens):
        nxt = int(np.argmax(logits))
        logits = tf.forward([nxt], pos)
        pos += 1
    t2 = time.perf_counter()
    n = stats.tokens - n0
    print(json.dumps({"mode": plan.mode, "criterion": plan.criterion, "window": plan.window,
                      "capacity": plan.capacity, "budget": budget, "peak_rss": peak_rss(),
                      "decode_tok_s": round(args.tokens / (t2 - t1), 2), "prefill_s": round(t1 - t0, 3),
                      "MB_read_per_token": round((stats.bytes_read - b0) / n / 1e6, 3),
                      "MBps_while_waiting": round((stats.bytes_read - b0) / max(stats.read_seconds - r0, 1e-9) / 1e6, 1),
                      "ffn_resident_MB": round(plan.total_bytes / 1e6, 2), **mem}), flush=True)


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


def speed(args):
    from edgerun.flashio import direct_throughput
    for chunk in (4096 * 4, 1 << 16, 1 << 20):
        print(json.dumps({"disk_direct_read": direct_throughput(args.model, chunk, 2)}), flush=True)
    base = sub(args.model, budget=0, mode="auto", criterion="off", tokens=args.tokens)   # fully resident
    print(json.dumps({"resident": base}), flush=True)
    weights = base["resident_weights"] + base["ffn_resident_MB"] * 1e6
    baseline = base["runtime"] + base["kv"] + base["scratch"]
    for frac in (0.75, 0.5):
        budget = int(baseline + 24 * 2**20 + frac * weights)
        for mode in ("naive", "layer", "window"):
            from edgerun.flashio import drop_file_cache
            drop_file_cache(args.model)
            r = sub(args.model, budget=budget, mode=mode, criterion=args.criterion if mode == "window" else "off",
                    window=args.window, tokens=args.tokens, baseline=base["runtime"])
            r.update({"budget_fraction": frac, "cached_before": cached_pages(args.model),
                      "rss_within_budget": r.get("peak_rss", 1 << 62) <= budget})
            print(json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["quality", "speed", "one"])
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--criteria", default="off,gate:0.3,gate:0.5,lowrank:0.3,lowrank:0.5")
    ap.add_argument("--criterion", default="lowrank:0.5")
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--baseline", type=int, default=0)
    args = ap.parse_args()
    {"quality": quality, "speed": speed, "one": run_one}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Prompt (prefill) cost on a busy host: CPU seconds as well as wall time.

    python tools/bench_prompt.py prompt MODEL.ebin|MODEL.gguf [-t 1] [-r 3]
    python tools/bench_prompt.py layer MODEL.ebin [-t 1] [--layer 10] [-T 64] [--blas]

prompt: tools/bench.py's 128-token prompt, prefilled r times after one unmeasured run (edgerun:
reset() + 1 generated token; a .gguf runs in llama.cpp, eval() of the ids); prompt tok/s and
process CPU seconds per prompt (median, best). CPU time is what a shared host does not blur:
wall time there depends on who else holds the cores.
layer: one layer's linears as the model runs them (q/k/v and gate/up stacked, Linear.stack),
`matmul` of T random tokens, best of 7 in process CPU ms and GFLOP/s (2·T·d·n / time); --blas
adds the same product as the decoded float32 matrix times X in NumPy's BLAS (single-threaded
only when OPENBLAS_NUM_THREADS=1 is set).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import PROMPT_TEXT, PROMPT_TOKENS  # noqa: E402  (tools/bench.py)


def _timed(f):
    c0, t0 = time.process_time(), time.perf_counter()
    f()
    return time.perf_counter() - t0, time.process_time() - c0


def prompt(model: str, threads: int, reps: int) -> str:
    if model.endswith(".gguf"):
        import llama_cpp
        llm = llama_cpp.Llama(model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, logits_all=False,
                              verbose=False)
        ids = llm.tokenize(PROMPT_TEXT.encode(), add_bos=False, special=False)[:PROMPT_TOKENS]

        def run():
            llm.reset()
            llm.eval(ids)
        name = "llama.cpp"
    else:
        import edgerun
        from edgerun import kernels
        m = edgerun.load(model, threads=threads, context=2048)
        kernels.wait_full_kernels()
        ids = m.tokenizer.encode(PROMPT_TEXT)[:PROMPT_TOKENS]
        m.stop_ids = []

        def run():
            m.reset()
            for _ in m.stream_tokens(ids, max_tokens=1, temperature=0):
                pass
        name = "edgerun"
    runs = [_timed(run) for _ in range(reps + 1)][1:]
    tps = [len(ids) / w for w, _ in runs]
    cpu = [c for _, c in runs]
    return (f"{name} {Path(model).name} -t {threads}: prompt tok/s median {statistics.median(tps):.1f} best "
            f"{max(tps):.1f}; CPU s per {len(ids)}-token prompt median {statistics.median(cpu):.2f} best {min(cpu):.2f}")


def layer(model: str, threads: int, index: int, T: int, blas: bool) -> str:
    import numpy as np

    from edgerun import kernels
    from edgerun.codecs import get_codec
    from edgerun.ebin import EbinFile
    from edgerun.model import load_tensor
    kernels.set_threads(threads)
    e = EbinFile(model)
    entries = e.manifest["tensors"]

    def get(name):
        entry = entries[f"model.layers.{index}.{name}.weight"]
        parts = {p: e.read(a) for p, a in entry["parts"].items()}
        return load_tensor(entry, parts), entry, parts
    attn = [get(f"self_attn.{k}_proj") for k in "qkvo"]
    ffn = [get(f"mlp.{k}_proj") for k in ("gate", "up", "down")]
    groups = {"qkv": attn[:3], "o": attn[3:], "gate_up": ffn[:2], "down": ffn[2:]}
    rng = np.random.default_rng(0)
    lines, total = [], [0.0, 0.0]
    for label, ws in groups.items():
        lin = ws[0][0] if len(ws) == 1 else type(ws[0][0]).stack([w for w, _, _ in ws])
        if lin is None:
            raise SystemExit(f"{label}: these linears do not stack (Linear.stack); the model runs them apart")
        d, n = lin.shape
        X = rng.standard_normal((T, n), dtype=np.float32)
        out = np.empty((T, d), np.float32)

        def best(f):
            f()
            return min(_timed(f)[1] for _ in range(7))
        t = best(lambda: lin.matmul(X, out))
        total[0] += t
        line = f"  {label:8s} {d:6d}x{n:<5d} matmul {t * 1e3:7.2f} ms CPU {2 * T * d * n / t / 1e9:6.1f} GFLOP/s"
        if blas:
            W = np.concatenate([get_codec(en["codec"]).decode(p, en["params"]) for _, en, p in ws])
            tb = best(lambda: np.matmul(X, W.T, out=out))
            total[1] += tb
            line += f" | f32 BLAS {tb * 1e3:7.2f} ms {2 * T * d * n / tb / 1e9:6.1f} GFLOP/s"
            del W
        lines.append(line)
    head = f"layer {index} of {Path(model).name}, T = {T}, -t {threads}: matmuls {total[0] * 1e3:.1f} ms CPU"
    return "\n".join([head + (f", f32 BLAS {total[1] * 1e3:.1f} ms" if blas else "")] + lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("prompt", "layer"))
    p.add_argument("model")
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("-r", "--reps", type=int, default=3)
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("-T", type=int, default=64, help="tokens per matmul (the model's prefill chunk is 64)")
    p.add_argument("--blas", action="store_true")
    a = p.parse_args()
    print(prompt(a.model, a.threads, a.reps) if a.what == "prompt" else layer(a.model, a.threads, a.layer, a.T, a.blas),
          flush=True)


if __name__ == "__main__":
    main()

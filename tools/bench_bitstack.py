"""Benchmark the bitstack LUT matvec on SmolLM2-135M shapes (DESIGN §6, issue #4 speed target).

    python tools/bench_bitstack.py [--layers 30] [--reps 5] [--blocks 1,2,3,4,8,16] [--rank 2] [--encode]

Prints ns per weight per block for each shape, and the whole token's linear matvecs (30 layers
of q, k, v, o, gate, up, down; lm_head excluded) in ms at each block count, at 1 and 2 threads.
Blocks are synthesized (random signs and fp16 factors): the kernel's speed does not depend on
the values, and 30 distinct layers keep the working set out of cache as in a real model.
--rank is the factors' rank (2, as `edgerun pack --codec bitstack` writes). With --encode, also
times BitStackCodec.encode per shape (16 blocks at --rank).

    python tools/bench_bitstack.py --quality [--gguf PATH] [--layer 5]

instead prints the weight error ‖W − Ŵ‖/‖W‖ of real SmolLM2 matrices at equal bits/weight for
several ranks and overshoots (formats/codec-bitstack.md, "Choosing rank, overshoot and signs").

    python tools/bench_bitstack.py --curve model.ebin [--bpw 4.5,5.14,6] [--chunks 8] [--order order.json]

instead measures the size/quality curve of a BitStack pack: `m.resize(weights=bpw x parameters / 8)`
then perplexity on tools/data/wikitext2_heldout.txt under `edgerun eval`'s protocol (windows of
512, the first --chunks of them) — the numbers tools/QUALITY.md gives for fixed-size packs.
--order replaces the pack's global block order ([[name, block], ...] JSON, as --reorder writes).

    python tools/bench_bitstack.py --reorder model.ebin -o order.json

instead estimates every matrix's sensitivity (bitstack_runtime.sensitivity_order: ΔNLL of its
5 -> 4 block step on the calibration windows `edgerun pack` uses, default text and tokens) and
writes the resulting global order: what a current pack stores, for a pack made before.

    python tools/bench_bitstack.py --versus bs.ebin --with spqr:4=spqr_4.ebin --with cluster:4=c4.ebin [--gguf SRC]

instead compares matrix by matrix at equal bits/weight: each pack's output error
√(tr(E H Eᵀ)/tr(W H Wᵀ)) (E = decoded − source weights, H from 4096 tokens of the calibration
text) against the BitStack pack's at the same bits (its blocks 2..8, interpolated in log error),
on layers --layers-at (default 3,8,15,22,29); prints the ratio per matrix type.

    python tools/bench_bitstack.py --residual [--layers-at 3,15] [--gguf SRC]

instead measures, per matrix (output error as --versus), what BitStack blocks give below 4 per
matrix against cluster:2-5, and cluster:2/3 with BitStack blocks of its residual on top
(formats/codec-bitstack.md, "Below 4 blocks").

    python tools/bench_bitstack.py --attribute bs.ebin --with cluster:4=c4.ebin --bpw 4.57 [--chunks 12]

instead finds which matrices carry BitStack's loss against another pack of the same model: the
held-out perplexity of the BitStack pack at --bpw with one group of linears (one type in every
layer, or every type of five layers) taken from the other pack.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from edgerun import kernels
from edgerun.codecs import get_codec, gptq
from edgerun.codecs.bitstack import BitStackCodec, block_layout

# (name, d, n) of one SmolLM2-135M layer
SHAPES = [("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576),
          ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536)]
HELDOUT = Path(__file__).parent / "data" / "wikitext2_heldout.txt"    # tools/QUALITY.md's text


def counted_params(m) -> int:
    """The parameters that bits/weight divides by: every tensor, a tied output head once."""
    return sum(math.prod(e["shape"]) for name, e in m.manifest["tensors"].items()
               if name != "lm_head.weight" or not m.config.tie_word_embeddings)


def synth_parts(d: int, n: int, K: int, rng, k: int = 2) -> dict:
    uo, vo, total = block_layout(d, n, k)
    parts = {"meta": np.array([d, n, k, K], np.int32), "inv_scale": np.ones(n, np.float32)}
    for i in range(K):
        blob = rng.integers(0, 256, total, dtype=np.uint8)
        blob[uo: uo + 2 * d * k] = (rng.standard_normal(d * k) * 0.05).astype(np.float16).view(np.uint8)
        blob[vo: vo + 2 * n * k] = (rng.standard_normal(n * k) * 0.05).astype(np.float16).view(np.uint8)
        parts[f"block.{i}"] = blob
    return parts


def quality(gguf: str, layer: int) -> None:
    """Relative weight error at 3, 4.5, 6 and 8 bits/weight (blocks interpolated in log error)."""
    from edgerun.convert.pack import open_source
    with open_source(gguf) as src:
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            w = src.read(f"model.layers.{layer}.{name}.weight")
            for k in (1, 2, 4, 8):
                bpb = block_layout(*w.shape, k)[2] * 8 / w.size
                for gain in (1.0, 1.25, 1.3):
                    parts = BitStackCodec.encode(w, {"blocks": int(8 / bpb) + 2, "rank": k, "overshoot": gain})
                    K = int(parts["meta"][3])
                    errs = [np.linalg.norm(BitStackCodec.decode(parts, {}, blocks=m) - w) / np.linalg.norm(w)
                            for m in range(1, K + 1)]
                    at = [np.exp(np.interp(b, bpb * np.arange(1, K + 1), np.log(errs))) for b in (3, 4.5, 6, 8)]
                    print(f"{name:17s} {w.shape[0]}x{w.shape[1]} rank {k:2d} overshoot {gain:4.2f}: error at "
                          f"3/4.5/6/8 bits/weight " + " ".join(f"{e:.3f}" for e in at), flush=True)


def reorder(path: str, out: str, threads: int) -> None:
    """Write the estimated-sensitivity global order of a pack's blocks to `out` (JSON)."""
    import json

    import edgerun
    from edgerun.bitstack_runtime import sensitivity_order
    from edgerun.calibrate import calibration_sequences, default_calibration_text
    from edgerun.convert.pack import CALIB_SEQ_LEN, DEFAULT_CALIB_TOKENS, ORDER_WINDOWS
    from edgerun.ebin import EbinFile
    from edgerun.model import Transformer
    with edgerun.load(path, ram="64GB", context=256, threads=threads) as m, EbinFile(path) as f:
        tensors, bsec = f.manifest["tensors"], f.manifest["bitstack"]
        scores = bsec["importance"]
        parts = {n: {p: f.read(a) for p, a in tensors[n]["parts"].items()} for n in scores}
        token_windows = calibration_sequences(m.tokenizer, default_calibration_text(), DEFAULT_CALIB_TOKENS,
                                              CALIB_SEQ_LEN)[-ORDER_WINDOWS:]
        tf = Transformer(m.config, m._transformer.w, CALIB_SEQ_LEN, chunk=128, layers=m._transformer.layers)
        t = time.perf_counter()
        order, delta = sensitivity_order(tf, parts, scores, token_windows)
    with open(out, "w") as fh:
        json.dump({"order": [[n, i] for n, i in order], "delta": delta}, fh)
    print(f"wrote {out} ({len(order)} blocks, sensitivity estimated in {time.perf_counter() - t:.0f} s)")


def use_order(m, order_file: str) -> None:
    """Replace a loaded BitStack model's global order (shrunk to one block per matrix first)."""
    import json

    from edgerun.bitstack_runtime import BlockOrder
    from edgerun.ebin import EbinFile
    with open(order_file) as fh:
        order = json.load(fh)["order"]
    stack = m._stack
    with EbinFile(m.path) as f:
        stack.resize(f, stack.order.minimum)
        stack.order = BlockOrder(dict(m.manifest, bitstack=dict(m.manifest["bitstack"], order=order)), f.arrays)


def curve(path: str, bpws: list[float], chunks: int, threads: int, order_file: str | None = None) -> None:
    """Perplexity of a BitStack pack resized to each bits/weight (whole-model weight bytes)."""
    import edgerun
    from edgerun.evaluate import perplexity, windows
    text = HELDOUT.read_text(encoding="utf-8")
    with edgerun.load(path, ram="64GB", context=512, threads=threads) as m:
        if order_file:
            use_order(m, order_file)
        params = counted_params(m)
        token_windows = windows(m.tokenizer, text, 512, chunks)
        for bpw in bpws:
            wb = m.resize(weights=int(bpw * params / 8))
            t = time.perf_counter()
            r = perplexity(m.logits, token_windows)
            print(f"{Path(path).name}: {wb * 8 / params:.3f} bits/weight ({wb} bytes of weights, "
                  f"{m.blocks[0]}/{m.blocks[1]} blocks): {r} [{time.perf_counter() - t:.0f} s]", flush=True)


def source_linears(gguf: str, layers: list[int]) -> tuple[dict, dict]:
    """(W, H): the source's linear weights (float64) of `layers` and their input Hessians from
    the calibration pass on the source weights (4096 tokens of the calibration text)."""
    from edgerun.calibrate import calibrate_and_store, f32_linear, source_calibration_sequences
    from edgerun.config import ModelConfig
    from edgerun.convert.pack import CALIB_SEQ_LEN, open_source
    W, H = {}, {}

    def store(name, w, hessian=None):
        if name.startswith("model.layers.") and hessian is not None and int(name.split(".")[2]) in layers:
            W[name], H[name] = w.astype(np.float64), hessian
        return f32_linear(w) if w.ndim == 2 else w

    with open_source(gguf) as src:
        calibrate_and_store(src, ModelConfig.from_dict(src.meta.config),
                            source_calibration_sequences(src.meta, None, 4096, CALIB_SEQ_LEN), store)
    return W, H


def relative_error(E, w, h) -> float:
    """√(tr(E H Eᵀ) / tr(W H Wᵀ)): a weight error's share of the layer's output energy."""
    return math.sqrt(gptq.output_error(E, h) / gptq.output_error(w, h))


def residual(gguf: str, layers: list[int]) -> None:
    """Below 4 blocks: cluster:B, the stock BitStack stack (joint 4), and cluster:2/3 with
    BitStack blocks of its residual on top (block by block, or the first 2 joint), each as
    (bits/weight, output error); geometric mean error ratios of the pairs at about equal bits."""
    W, H = source_linears(gguf, layers)
    cl, bs = get_codec("cluster"), get_codec("bitstack")
    stock = bs.params_from_arg(6)
    pairs = [("bs2", "c2"), ("bs3", "c3"), ("c2+1", "c3"), ("bs4", "c4"), ("c3+1", "c4"), ("c2+2j", "c4"),
             ("bs5", "c5"), ("c3+2j", "c5")]
    ratios = {p: [] for p in pairs}
    for name, w in W.items():
        h, (d, n) = H[name], w.shape
        blk = block_layout(d, n, stock["rank"])[2]
        res = {}
        for b in (2, 3, 4, 5):
            p = {"bits": b, "outliers": 0.003 if b >= 4 else 0}
            parts = cl.encode(w.astype(np.float32), p, h)
            deq = cl.decode(parts, p).astype(np.float64)
            base = cl.nbytes(parts)
            res[f"c{b}"] = (base * 8 / w.size, relative_error(deq - w, w, h))
            for J in (0, 2) if b <= 3 else ():
                bp = dict(stock, blocks=3, joint=J)
                bparts = bs.encode((w - deq).astype(np.float32), bp, h)
                for m in (1, 2, 3):
                    dq = deq + bs.decode(bparts, bp, blocks=m)
                    res[f"c{b}+{m}" + ("j" if J else "")] = ((base + m * blk + 4 * n) * 8 / w.size,
                                                             relative_error(dq - w, w, h))
        bparts = bs.encode(w.astype(np.float32), stock, h)
        for m in range(2, 7):
            res[f"bs{m}"] = ((m * blk + 4 * n) * 8 / w.size, relative_error(bs.decode(bparts, stock, blocks=m) - w, w, h))
        print(name, " ".join(f"{k} {b:.2f}/{e:.4f}" for k, (b, e) in sorted(res.items(), key=lambda kv: kv[1][0])),
              flush=True)
        for a, b in pairs:
            ratios[a, b].append((res[a][1] / res[b][1], res[a][0] - res[b][0]))
    for (a, b), r in ratios.items():
        e, db = np.array(r).T
        print(f"{a} / {b}: output error x{np.exp(np.mean(np.log(e))):.2f} ({e.min():.2f}-{e.max():.2f}), "
              f"bits/weight {np.mean(db):+.2f}")


def versus(path: str, others: dict[str, str], gguf: str, layers: list[int]) -> None:
    """Per matrix type: BitStack's output error at each other pack's bits/weight, as a ratio to it."""
    from edgerun.ebin import EbinFile
    W, H = source_linears(gguf, layers)

    def error(f, name, blocks=None):
        e = f.manifest["tensors"][name]
        parts = {p: f.read(a) for p, a in e["parts"].items()}
        codec = get_codec(e["codec"])
        E = codec.decode(parts, e["params"], **({} if blocks is None else {"blocks": blocks})) - W[name]
        bits = (codec.nbytes(parts) if blocks is None else
                blocks * block_layout(*E.shape, int(parts["meta"][2]))[2] + 4 * E.shape[1] + 16) * 8 / E.size
        return bits, relative_error(E, W[name], H[name])

    files = {label: EbinFile(p) for label, p in others.items()}
    ratios = {}                                 # (type, label) -> [ratio per layer]
    with EbinFile(path) as bs:
        for name in W:
            curve = np.array([error(bs, name, m) for m in range(2, 9)])
            kind = name.split(".")[-2]
            for label, f in files.items():
                bits, e = error(f, name)
                mine = np.exp(np.interp(bits, curve[:, 0], np.log(curve[:, 1])))
                ratios.setdefault((kind, label), []).append(mine / e)
                print(f"{name}: {label} {bits:.2f} bits/weight error {e:.4f}, bitstack {mine:.4f} ({mine / e:.2f}x)",
                      flush=True)
    for f in files.values():
        f.close()
    print("\nBitStack's output error / the pack's, at the pack's bits/weight (geometric mean over layers "
          + ",".join(map(str, layers)) + ")")
    print("| matrix | " + " | ".join(others) + " |\n|---|" + "---:|" * len(others))
    for kind in dict.fromkeys(k for k, _ in ratios):
        print(f"| {kind} | " + " | ".join(f"{np.exp(np.mean(np.log(ratios[kind, lb]))):.2f}x" for lb in others) + " |")


def attribute(path: str, other: str, bpw: float, chunks: int, threads: int) -> None:
    """Which matrices carry BitStack's loss: perplexity of the pack at `bpw` with one group of
    linears (a type in every layer, or every type of 5 layers) taken from another pack instead."""
    import edgerun
    from edgerun.evaluate import perplexity, windows
    from edgerun.model import LAYER_TENSORS
    text = HELDOUT.read_text(encoding="utf-8")
    fields = ["q", "k", "v", "o", "gate", "up", "down"]
    with edgerun.load(path, ram="64GB", context=512, threads=threads) as bs, \
            edgerun.load(other, ram="64GB", context=512, threads=threads) as ot:
        params = counted_params(bs)
        wb = bs.resize(weights=int(bpw * params / 8))
        print(f"{Path(path).name} at {wb * 8 / params:.3f} bits/weight ({bs.blocks[0]}/{bs.blocks[1]} blocks), "
              f"groups from {Path(other).name}")
        token_windows = windows(bs.tokenizer, text, 512, chunks)
        n = bs.config.num_layers
        groups = {"none": [], "all": [(i, f) for i in range(n) for f in fields]}
        groups.update({LAYER_TENSORS[f]: [(i, f) for i in range(n)] for f in fields})
        groups.update({f"layers {g}-{min(g + 5, n) - 1}": [(i, f) for i in range(g, min(g + 5, n)) for f in fields]
                       for g in range(0, n, 5)})
        mine, theirs = bs._transformer.layers, ot._transformer.layers
        for label, group in groups.items():
            kept = [(i, f, getattr(mine[i], f)) for i, f in group]
            for i, f in group:
                setattr(mine[i], f, getattr(theirs[i], f))
            print(f"| {label} | {perplexity(bs.logits, token_windows).ppl:.2f} |", flush=True)
            for i, f, lin in kept:
                setattr(mine[i], f, lin)


def time_calls(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blocks", default="1,2,3,4,6,8,12,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--encode", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--curve", metavar="EBIN", default=None)
    ap.add_argument("--bpw", default="4.5,5.14,6")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--order", default=None)
    ap.add_argument("--reorder", metavar="EBIN", default=None)
    ap.add_argument("-o", "--output", default="order.json")
    ap.add_argument("--versus", metavar="EBIN", default=None)
    ap.add_argument("--with", dest="others", action="append", default=[], metavar="LABEL=EBIN")
    ap.add_argument("--layers-at", default="3,8,15,22,29")
    ap.add_argument("--attribute", metavar="EBIN", default=None)
    ap.add_argument("--residual", action="store_true")
    a = ap.parse_args()
    if a.residual:
        from edgerun.default_model import default_gguf
        return residual(a.gguf or str(default_gguf()), [int(i) for i in a.layers_at.split(",")])
    if a.attribute:
        if len(a.others) != 1:
            ap.error("--attribute needs one --with LABEL=EBIN to take linears from")
        return attribute(a.attribute, a.others[0].split("=", 1)[-1], float(a.bpw.split(",")[0]), a.chunks,
                         int(a.threads.split(",")[-1]))
    if a.versus:
        from edgerun.default_model import default_gguf
        return versus(a.versus, dict(o.split("=", 1) for o in a.others), a.gguf or str(default_gguf()),
                      [int(i) for i in a.layers_at.split(",")])
    if a.reorder:
        return reorder(a.reorder, a.output, int(a.threads.split(",")[-1]))
    if a.curve:
        return curve(a.curve, [float(b) for b in a.bpw.split(",")], a.chunks, int(a.threads.split(",")[-1]), a.order)
    if a.quality:
        from edgerun.default_model import default_gguf
        return quality(a.gguf or str(default_gguf()), a.layer)
    levels = [int(b) for b in a.blocks.split(",")]
    K = max(levels)
    rng = np.random.default_rng(0)
    codec = BitStackCodec()

    if a.encode:
        for name, d, n in SHAPES:
            w = (rng.standard_normal((d, n)) * 0.05).astype(np.float32)
            X = rng.standard_normal((256, n)).astype(np.float32)
            H = X.T @ X / 256
            t = time.perf_counter()
            codec.encode(w, {"blocks": 16, "rank": a.rank}, H)
            print(f"encode {name:5s} {d}x{n}: {time.perf_counter() - t:.2f} s (16 blocks)")

    parts = [{name: synth_parts(d, n, K, rng, a.rank) for name, d, n in SHAPES} for _ in range(a.layers)]
    layers = [{name: codec.load(p[name], {}) for name in p} for p in parts]

    def set_all(m):
        for layer, p in zip(layers, parts):
            for name, lin in layer.items():
                lin.set_blocks(m, p[name])

    xs = {n: rng.standard_normal(n).astype(np.float32) for n in (576, 1536)}
    outs = {d: np.empty(d, np.float32) for d in (192, 576, 1536)}
    for _, d, n in SHAPES:
        print(f"{d}x{n}: block = {block_layout(d, n, a.rank)[2]} bytes "
              f"({block_layout(d, n, a.rank)[2] * 8 / (d * n):.3f} bits/weight)")

    for threads in (int(t) for t in a.threads.split(",")):
        kernels.set_threads(threads)
        print(f"\n--- {threads} thread(s) ---")
        # per shape: one matrix, m blocks, ns per weight per block (min of many: in-cache, and
        # robust to other processes; the per-block sum x 30 layers is a quiet-machine token time)
        per_block = 0.0
        for name, d, n in SHAPES:
            lin = layers[0][name]
            row = []
            for m in (1, 4):
                lin.set_blocks(m, parts[0][name])
                s = time_calls(lambda: lin.matvec(xs[n], outs[d]), a.reps * 20)
                row.append(f"m={m}: {s * 1e9 / (d * n * m):.3f} ns/w/blk ({s * 1e6:.0f} us)")
                if m == 4:
                    per_block += s / 4
            print(f"{name:5s} {d}x{n}  " + "  ".join(row))

        print(f"sum of per-shape times: {per_block * a.layers * 1e3:.2f} ms per block per token")

        def token():
            for layer in layers:
                for name, d, n in SHAPES:
                    layer[name].matvec(xs[n], outs[d])

        total_w = a.layers * sum(d * n for _, d, n in SHAPES)
        for m in levels:
            set_all(m)
            wbytes = sum(lin.nbytes for layer in layers for lin in layer.values())
            s = time_calls(token, a.reps)
            print(f"blocks={m:2d}: token {s * 1e3:7.2f} ms  ({wbytes / 1e6:6.1f} MB, "
                  f"{wbytes * 8 / total_w:.2f} bits/w, {s * 1e9 / (total_w * m):.3f} ns/w/blk)")
    kernels.set_threads(1)


if __name__ == "__main__":
    main()

"""Perplexity of a model whose tensor groups are re-encoded with one codec (issue #3 quality loop).

    python tools/codec_quality.py SRC --codec cluster:4 --groups ffn,attention [--windows 8]
        [--hessians sequential|none|cache:/tmp/smollm2_H.npz] [--param outliers=0.003 ...]
        [--rotate 64]

SRC is an f16/f32 .ebin or a GGUF (packed to f16 in a temporary .ebin first). The dense model is
loaded with `edgerun.load`; the tensors of `--groups` (attention, ffn, embed, head) are encoded
with the codec and swapped in; every other tensor stays as stored. Hessians H = E[x xᵀ]:
- `sequential` (default): `edgerun.calibrate.calibrate_and_store` exactly as `edgerun pack` does
  (bundled calibration text, the uncompressed model's activations, layer by layer);
- `cache:PATH`: the same Hessians, collected once and saved to PATH (float32 npz, ~0.4 GB for
  SmolLM2), then reused: fast for comparing encoder variants;
- `none`: no calibration (round-to-codebook with unweighted k-means etc.).
`--rotate B` (an experiment, not a format yet): each matrix W (d, n) is encoded as W·R with R a
block-diagonal randomized Hadamard rotation (blocks of B columns, QuIP#/QuaRot incoherence) and
its Hessian as RᵀHR, then decoded and rotated back (W ≈ decode·Rᵀ) into a float32 matrix.
Perplexity follows edgerun.evaluate's protocol on tools/data/wikitext2_heldout.txt (held out:
not the calibration text). Prints bits/weight of the encoded groups (every stored byte) and the
encode time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

import edgerun
from edgerun.calibrate import (SHARED_INPUT, calibrate_and_store, calibration_sequences,
                               default_calibration_text, f32_linear)
from edgerun.codecs import get_codec
from edgerun.convert.pack import CALIB_SEQ_LEN, DEFAULT_CALIB_TOKENS, parse_rule, tensor_group
from edgerun.evaluate import perplexity, windows
from edgerun.ebin import EbinFile
from edgerun.model import LAYER_TENSORS, Weights

HELDOUT = Path(__file__).parent / "data" / "wikitext2_heldout.txt"
SUFFIX_FIELD = {name: field for field, name in LAYER_TENSORS.items()}


def dense_ebin(src: str) -> str:
    """SRC itself when it is an .ebin, else an f16 pack of it in the temp dir (made once)."""
    if not src.endswith(".gguf"):
        return src
    out = Path(tempfile.gettempdir()) / (Path(src).stem + ".f16.ebin")
    if not out.exists():
        from edgerun.convert.pack import pack
        print(f"packing {src} -> {out} (f16)", flush=True)
        pack(src, out, dtype="f16")
    return str(out)


class ModelSource:
    """A calibration source over an already loaded dense model (float32 copies on demand)."""

    def __init__(self, tensors: dict, tied: bool):
        self.tensors = tensors
        self.names = [n for n in tensors if not (tied and n == "lm_head.weight")]
        self.dense = get_codec("dense")

    def tensor_names(self):
        return list(self.names)

    def read(self, name):
        t = self.tensors[name]
        if hasattr(t, "W"):                    # a DenseLinear
            return np.ascontiguousarray(self.dense.decode({"weight": t.W}, {"dtype": t.dtype}), np.float32)
        return np.array(t, np.float32)

    def read_rows(self, name, rows):
        return self.read(name)[rows]


def rotation(n: int, block: int, name: str) -> np.ndarray:
    """R (n, n) float64, orthogonal: block-diagonal H_block · diag(±1) / sqrt(block), H the
    Sylvester Hadamard matrix (block a power of 2 dividing n), signs seeded by the tensor name."""
    H = np.ones((1, 1))
    while H.shape[0] < block:
        H = np.block([[H, H], [H, -H]])
    signs = np.random.default_rng(zlib.crc32(name.encode())).choice([-1.0, 1.0], n)
    R = np.zeros((n, n))
    for b in range(0, n, block):
        R[b:b + block, b:b + block] = H * signs[b:b + block] / np.sqrt(block)
    return R


def hessian_key(name: str) -> str:
    """Tensors reading the same input share one Hessian: the key names that input."""
    if not name.startswith("model.layers."):
        return "head"
    i, rest = name[len("model.layers."):].split(".", 1)
    return f"{i}.{SHARED_INPUT[SUFFIX_FIELD[rest]]}"


def cached_hessians(path: str, source, cfg, seqs) -> dict:
    """{hessian_key: H float32}: loaded from `path`, or collected on the dense model and saved."""
    if os.path.exists(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    hs = {}

    def record(name, w, h):
        if h is not None:
            hs.setdefault(hessian_key(name), h.astype(np.float32))
        return f32_linear(w) if w.ndim == 2 else w
    t0 = time.perf_counter()
    calibrate_and_store(source, cfg, seqs, record)
    np.savez(path, **hs)
    print(f"collected {len(hs)} Hessians in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    return hs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("--codec", default="cluster:4", help="rule as in pack recipes: cluster:4, spqr:3, f16")
    ap.add_argument("--groups", default="ffn", help="comma list of attention, ffn, embed, head")
    ap.add_argument("--param", action="append", default=[], help="extra codec param KEY=VALUE")
    ap.add_argument("--hessians", default="sequential", help="sequential | none | cache:PATH")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS)
    ap.add_argument("--rotate", type=int, default=0, metavar="B",
                    help="encode W·R (block-B randomized Hadamard) and rotate back (a power of 2; 0: off)")
    a = ap.parse_args(argv)

    rule = parse_rule(a.codec)
    for kv in a.param:
        k, _, v = kv.partition("=")
        try:
            rule["params"][k] = int(v)
        except ValueError:
            rule["params"][k] = float(v) if v.replace(".", "", 1).replace("e-", "", 1).isdigit() else v
    groups = set(a.groups.split(","))
    codec = get_codec(rule["codec"])

    m = edgerun.load(dense_ebin(a.src))
    tf = m._transformer
    cfg = tf.cfg
    # the stored tensors, one per name (the loaded model joined q/k/v and gate/up)
    with EbinFile(dense_ebin(a.src)) as f:
        tf.w = Weights.from_ebin(f, cfg)
    tensors = tf.w.tensors
    source = ModelSource(tensors, cfg.tie_word_embeddings)
    seqs = calibration_sequences(m.tokenizer, default_calibration_text(), a.calib_tokens, CALIB_SEQ_LEN)
    replaced, stats = {}, {"params": 0, "bytes": 0, "seconds": 0.0}

    def store(name, w, h):
        group = tensor_group(name, w.ndim)
        if group not in groups and not (group == "embed" and "head" in groups and cfg.tie_word_embeddings):
            return tensors[name] if w.ndim == 2 else w
        t0 = time.perf_counter()
        R = rotation(w.shape[1], a.rotate, name) if a.rotate and w.shape[1] % a.rotate == 0 else None
        if R is not None:
            w = (w.astype(np.float64) @ R).astype(np.float32)
            h = None if h is None else R.T @ h @ R
        if h is None or rule["codec"] == "dense":
            parts = codec.encode(w, rule["params"])
        else:
            parts = codec.encode(w, rule["params"], hessian=h)
        stats["seconds"] += time.perf_counter() - t0
        stats["params"] += w.size
        stats["bytes"] += sum(p.nbytes for p in parts.values())
        if R is None:
            replaced[name] = codec.load(parts, rule["params"])
        else:
            replaced[name] = f32_linear((codec.decode(parts, rule["params"]).astype(np.float64) @ R.T).astype(np.float32))
        return replaced[name]

    t0 = time.perf_counter()
    if a.hessians == "sequential":
        calibrate_and_store(source, cfg, seqs, store)
    else:
        hs = {} if a.hessians == "none" else cached_hessians(a.hessians.split(":", 1)[1], source, cfg, seqs)
        for name in source.tensor_names():
            if name.startswith("model.layers.") or name.endswith("embed_tokens.weight"):
                w = source.read(name)
                h = hs.get(hessian_key(name)) if w.ndim == 2 else None
                if name.endswith("embed_tokens.weight") and not cfg.tie_word_embeddings:
                    h = None
                store(name, w, None if h is None else h.astype(np.float64))
    wall = time.perf_counter() - t0
    tensors.update(replaced)
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    tf.layers = [tf.w.layer(i) for i in range(cfg.num_layers)]

    win = windows(m.tokenizer, HELDOUT.read_text(encoding="utf-8"), a.context, a.windows)
    res = perplexity(m.logits, win)
    bpw = stats["bytes"] * 8 / max(stats["params"], 1)
    print(f"{a.codec} {' '.join(a.param)} groups={a.groups} hessians={a.hessians} rotate={a.rotate}: "
          f"{bpw:.3f} bits/weight over {stats['params'] / 1e6:.1f}M weights, encode {stats['seconds']:.0f} s "
          f"(wall {wall:.0f} s)\n  {res}", flush=True)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

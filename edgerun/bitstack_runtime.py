"""BitStack at run time: how many residual blocks fit a budget, and growing or shrinking the
loaded prefix of the global block order in place (BitStack, Wang et al. 2024; DESIGN §4).

The pack writes every BitStack block in one global order (level by level, most useful first),
so the model at any size is a prefix of that order: `counts(n)` says how many blocks each
matrix has in the first n, and growing from n to n' reads exactly the blocks n..n'-1. Blocks
are read into their own anonymous mappings and copied into the kernels' layout by the codec
(edgerun/codecs/bitstack/); a shrink copies the kept prefix, so the dropped suffix's memory
goes back to the OS (with the caller's malloc_trim for allocations glibc keeps on its heap).
"""
from __future__ import annotations

import mmap
from collections import Counter

import numpy as np

from .errors import BudgetError
from .memory import fmt


class BlockOrder:
    """The manifest's global block order and the byte size of every prefix."""

    def __init__(self, manifest: dict, arrays: dict | None = None):
        """`arrays`: the EbinFile's ArrayInfo table (default: the manifest's own "arrays" table)."""
        tensors = manifest["tensors"]
        length = ((lambda a: arrays[a].length) if arrays is not None  # noqa: E731
                  else (lambda a: int(manifest["arrays"][a]["length"])))
        self.order = [(name, int(i)) for name, i in manifest["bitstack"]["order"]]
        self.stacked = sorted({name for name, _ in self.order})
        sizes = [length(tensors[name]["parts"][f"block.{i}"]) for name, i in self.order]
        self.prefix_bytes = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.block_arrays = {tensors[name]["parts"][f"block.{i}"] for name, i in self.order}
        self.fixed_bytes = sum(length(a) for e in tensors.values() for a in e["parts"].values()
                               if a not in self.block_arrays)
        self.curve = manifest["bitstack"].get("curve")

    @property
    def total(self) -> int:
        return len(self.order)

    @property
    def minimum(self) -> int:
        """One block per matrix: with fewer, some matrix would be zero."""
        return len(self.stacked)

    def weight_bytes(self, n: int) -> int:
        return self.fixed_bytes + int(self.prefix_bytes[n])

    def prefix_for(self, weight_budget: int) -> int:
        """The longest prefix whose weights fit `weight_budget` bytes (at least the minimum)."""
        n = int(np.searchsorted(self.prefix_bytes, weight_budget - self.fixed_bytes, side="right")) - 1
        return max(self.minimum, min(n, self.total))

    def counts(self, n: int) -> dict[str, int]:
        """Blocks per matrix in the first n of the order."""
        c = Counter(name for name, _ in self.order[:n])
        return {name: c.get(name, 0) for name in self.stacked}

    def check(self, weight_budget: int, other_bytes: int) -> None:
        if weight_budget < self.weight_bytes(self.minimum):
            need = other_bytes + self.weight_bytes(self.minimum)
            raise BudgetError(f"the smallest BitStack size of this model needs {fmt(need)} in all "
                              f"(one block per matrix: {fmt(self.weight_bytes(self.minimum))} of weights); "
                              f"raise --ram to at least {-(-need // 2**20)}MiB", minimum_bytes=need)


def read_anonymous(ebin, name: str) -> np.ndarray:
    """An array read into its own anonymous mapping (freed to the OS as soon as it is dropped,
    unlike small heap allocations that glibc keeps)."""
    info = ebin.arrays[name]
    buf = mmap.mmap(-1, max(info.length, 1))
    arr = np.frombuffer(buf, dtype=info.dtype, count=info.length // np.dtype(info.dtype).itemsize)
    ebin.read_into(name, arr)
    return arr.reshape(info.shape)


class BlockStack:
    """The loaded prefix of a model's BitStack blocks, resizable in place."""

    def __init__(self, order: BlockOrder, manifest: dict, linears: dict, loaded: int):
        self.order, self.manifest, self.linears, self.loaded = order, manifest, linears, loaded

    def resize(self, ebin, n: int) -> None:
        """Load blocks until the first n are resident, or drop the suffix beyond n."""
        n = max(self.order.minimum, min(int(n), self.order.total))
        if n > self.loaded:
            new = {}
            for name, i in self.order.order[self.loaded:n]:
                array = self.manifest["tensors"][name]["parts"][f"block.{i}"]
                new.setdefault(name, {})[f"block.{i}"] = read_anonymous(ebin, array)
            counts = self.order.counts(n)
            for name, parts in new.items():
                self.linears[name].set_blocks(counts[name], parts)
        elif n < self.loaded:
            for name, m in self.order.counts(n).items():
                self.linears[name].set_blocks(m)
        self.loaded = n

    @property
    def weight_bytes(self) -> int:
        return self.order.weight_bytes(self.loaded)


def prefix_reader(ebin, order: BlockOrder, n: int):
    """A `read_parts` for `Weights.from_ebin` that reads only the first n blocks of the order."""
    counts = order.counts(n)

    def read_parts(name: str, entry: dict) -> dict:
        m = counts.get(name)
        parts = {}
        for part, array in entry["parts"].items():
            if m is None or not part.startswith("block."):
                parts[part] = ebin.read(array)
            elif int(part.split(".")[1]) < m:
                parts[part] = read_anonymous(ebin, array)
        return parts

    return read_parts


def size_quality_curve(transformer, linears: dict, order: list, block_sizes: dict, fixed_bytes: int,
                       token_windows, levels: int) -> list[list[float]]:
    """[[weight bytes, perplexity], ...] at each whole level (every matrix with m blocks), measured
    on calibration windows with the pack-time model; shrinks `linears` level by level."""
    from .evaluate import perplexity
    stacked = sorted(linears)
    curve = []
    for m in range(levels, 0, -1):
        for name in stacked:
            linears[name].set_blocks(min(m, linears[name].blocks))
        size = fixed_bytes + sum(block_sizes[name] * linears[name].blocks for name in stacked)
        result = perplexity(lambda ids: transformer.forward(ids, 0, all_logits=True), token_windows)
        curve.append([int(size), round(result.ppl, 3)])
    return curve[::-1]


# --- global order from measured sensitivity ----------------------------------------------------

def _token_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Summed NLL of window[1:] given (len, vocab) logits."""
    lg = logits[:-1].astype(np.float64)
    top = lg.max(axis=1, keepdims=True)
    logz = np.log(np.exp(lg - top).sum(axis=1)) + top[:, 0]
    return float(np.sum(logz - lg[np.arange(len(lg)), window[1:]]))


def measured_sensitivity(transformer, parts: dict[str, dict], token_windows: np.ndarray,
                         level: int, progress=None) -> dict[str, float]:
    """ΔNLL (nats per token on `token_windows`) when one matrix alone drops from `level` to
    level-1 blocks while every other stacked matrix keeps `level` (BitStack §3.2 measures
    perplexity per extra block; this is that measurement at one neighbourhood, per matrix).

    `parts[name]` are the BitStack parts of `model.layers.{i}.*` matrices; the transformer's
    other weights are used as they are. Matrices run as dense float32 decodes (BLAS), and each
    measurement restarts from the cached input of the matrix's own layer."""
    from .codecs import get_codec
    from .codecs.bitstack import BitStackCodec
    from .kernels import rmsnorm_rows
    from .model import LAYER_TENSORS, _linear
    dense = get_codec("dense")

    def linear(p, m):
        return dense.load(dense.encode(BitStackCodec.decode(p, {}, blocks=m), {"dtype": "f32"}), {"dtype": "f32"})

    field_of = {v: f for f, v in LAYER_TENSORS.items()}
    where = {}
    for name in parts:
        _, _, i, rest = name.split(".", 3)
        where[name] = (int(i), field_of[rest])
    tf, cfg = transformer, transformer.cfg
    saved = [(i, f, getattr(tf.layers[i], f)) for i, f in set(where.values())]
    for name, (i, f) in where.items():
        setattr(tf.layers[i], f, linear(parts[name], level))
    T, chunk = token_windows.shape[1], tf.chunk
    spans = [(c, min(c + chunk, T)) for c in range(0, T, chunk)]
    head, norm = tf.w["lm_head.weight"], tf.w["model.norm.weight"]
    logits = np.empty((T, cfg.vocab_size), np.float32)

    def run(x, first, window):
        for i in range(first, cfg.num_layers):
            for c0, c1 in spans:
                tf.block(i, x[c0:c1], c0)
        for c0, c1 in spans:
            normed = tf.state.xb[:c1 - c0]
            rmsnorm_rows(x[c0:c1], norm, cfg.rms_norm_eps, normed)
            _linear(head, normed, logits[c0:c1])
        return _token_nll(logits, window)

    try:
        inputs = []                      # inputs[w][i] = hidden state entering layer i
        base = 0.0
        for window in token_windows:
            x = np.empty((T, cfg.hidden_size), np.float32)
            for t, tok in enumerate(window):
                tf.w["model.embed_tokens.weight"].row(int(tok), x[t])
            per = []
            for i in range(cfg.num_layers):
                per.append(x.copy())
                for c0, c1 in spans:
                    tf.block(i, x[c0:c1], c0)
            inputs.append(per)
            base += run(x, cfg.num_layers, window)
        count = token_windows.size - len(token_windows)
        out = {}
        for name, (i, f) in sorted(where.items(), key=lambda kv: kv[1]):
            keep = getattr(tf.layers[i], f)
            setattr(tf.layers[i], f, linear(parts[name], level - 1))
            total = sum(run(inputs[w][i].copy(), i, window) for w, window in enumerate(token_windows))
            setattr(tf.layers[i], f, keep)
            out[name] = (total - base) / count
            if progress is not None:
                progress(len(out), len(where))
        return out
    finally:
        for i, f, lin in saved:
            setattr(tf.layers[i], f, lin)


SENSITIVITY_LEVEL = 5     # measure each matrix's 5 -> 4 block step (~5.6 -> 4.5 bits/weight on SmolLM2)
SENSITIVITY_WINDOW = 2    # ... averaged over the same matrix type in layers within ±2 (noise: see below)
SENSITIVITY_FLOOR = 0.02  # a smoothed ΔNLL <= 0 counts as this fraction of the median positive one


def smoothed_sensitivity(delta: dict[str, float], window: int = SENSITIVITY_WINDOW) -> dict[str, float]:
    """Each `model.layers.{i}.{group}.{type}.weight`'s ΔNLL replaced by the mean over the same
    type in layers i-window..i+window. One block of one matrix moves the NLL of a few calibration
    windows by ~1e-3 nats, about the noise of the measurement (a fifth of the raw values are
    negative); neighbouring layers of one type behave alike, so the mean keeps the signal."""
    def key(name):
        parts = name.split(".")
        return parts[-2], int(parts[2])
    keys = {name: key(name) for name in delta}
    return {name: float(np.mean([delta[o] for o, (t, i) in keys.items() if t == typ and abs(i - layer) <= window]))
            for name, (typ, layer) in keys.items()}


def sensitivity_order(transformer, parts: dict[str, dict], scores: dict[str, list[float]],
                      token_windows: np.ndarray, level: int = SENSITIVITY_LEVEL,
                      progress=None) -> tuple[list[tuple[str, int]], dict[str, float]]:
    """The global block order with the output-error proxy put in loss units per matrix:
    alpha = (smoothed measured ΔNLL of the matrix's block `level`-1) / (its proxy score), then
    `order_blocks` on alpha x scores (level by level). Returns (order, the raw
    measured ΔNLL per matrix).

    The proxy tr(E H Eᵀ) compares blocks of one matrix, not matrices: how much a layer's output
    error costs downstream differs by orders of magnitude between layers and types. BitStack
    (§3.2) measures perplexity per block; one measured step per matrix calibrates the exchange
    rate instead (formats/codec-bitstack.md, "Global order")."""
    from .codecs.bitstack import order_blocks
    level = min(level, min(len(s) for s in scores.values()))
    delta = measured_sensitivity(transformer, parts, token_windows, level, progress)
    smooth = smoothed_sensitivity(delta)
    positive = [v for v in smooth.values() if v > 0]
    floor = SENSITIVITY_FLOOR * (float(np.median(positive)) if positive else 1.0)
    scaled = {}
    for name, s in scores.items():
        alpha = max(smooth[name], floor) / max(s[level - 1], 1e-30)
        scaled[name] = [alpha * v for v in s]
    sizes = {name: p["block.0"].nbytes for name, p in parts.items()}
    return order_blocks(sizes, scaled), delta

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


def size_quality_curve(transformer, linears: dict, block_sizes: dict, fixed_bytes: int,
                       token_windows, levels: int, progress=None) -> list[list[float]]:
    """[[weight bytes, perplexity], ...] at each whole level (every matrix with m blocks), measured
    on calibration windows with the pack-time model; shrinks `linears` level by level.
    `progress(done, levels)` after each level."""
    from .evaluate import perplexity
    stacked = sorted(linears)
    curve = []
    if progress is not None:
        progress(0, levels)
    for m in range(levels, 0, -1):
        for name in stacked:
            linears[name].set_blocks(min(m, linears[name].blocks))
        size = fixed_bytes + sum(block_sizes[name] * linears[name].blocks for name in stacked)
        result = perplexity(lambda ids: transformer.forward(ids, 0, all_logits=True), token_windows)
        curve.append([int(size), round(result.ppl, 3)])
        if progress is not None:
            progress(len(curve), levels)
    return curve[::-1]


# --- global order from estimated sensitivity ---------------------------------------------------

def fisher_sensitivity(transformer, parts: dict[str, dict], token_windows: np.ndarray,
                       level: int, progress=None) -> dict[str, float]:
    """Estimated ΔNLL (nats per token on `token_windows`) when one matrix alone drops from `level`
    to level-1 blocks while every stacked matrix keeps `level`: ½ Σ_t (g_tᵀ B x_t)² over the
    positions t, B the matrix's block level-1, x_t its inputs and g_t the NLL's gradients at its
    outputs (edgerun/backprop.py: one forward and one reverse pass serve every matrix).

    This replaced measuring that ΔNLL, a forward from the matrix's layer to the logits per matrix:
    ~22 min for a 1.5B model's 196 matrices against 1.7, and on SmolLM2 the order it gives is as good
    (held-out perplexity within ±2 % at 4.5-6 bits/weight; formats/codec-bitstack.md)."""
    from .backprop import dense_rows, linear_gradients
    from .codecs.bitstack import BitStackCodec
    from .codecs.bitstack.reference import decode_block
    from .kernels import threaded_matmul
    from .model import LAYER_TENSORS

    def name(i, field):
        return f"model.layers.{i}.{LAYER_TENSORS[field]}"

    def dense(i, field):
        p = parts.get(name(i, field))
        return None if p is None else dense_rows(BitStackCodec.load(p, {}, blocks=level))

    count = token_windows.size - len(token_windows)
    out = {}
    if progress is not None:      # the forward half comes first: show the bar from the start
        progress(0, len(parts))

    def visit(i, field, X, G):
        p = parts.get(name(i, field))
        if p is None:
            return
        change = threaded_matmul(X, decode_block(p, level - 1).T)   # the outputs' change, (positions, d)
        out[name(i, field)] = 0.5 * float(np.sum(np.einsum("td,td->t", G, change) ** 2)) / count
        if progress is not None:
            progress(len(out), len(parts))

    linear_gradients(transformer, token_windows, visit, dense)
    return out


SENSITIVITY_LEVEL = 5     # estimate each matrix's 5 -> 4 block step (~5.6 -> 4.5 bits/weight on SmolLM2)
SENSITIVITY_WINDOW = 2    # ... averaged over the same matrix type in layers within ±2 (noise: see below)
SENSITIVITY_FLOOR = 0.02  # a smoothed ΔNLL below this fraction of the median counts as that


def smoothed_sensitivity(delta: dict[str, float], window: int = SENSITIVITY_WINDOW) -> dict[str, float]:
    """Each `model.layers.{i}.{group}.{type}.weight`'s ΔNLL replaced by the mean over the same
    type in layers i-window..i+window. One block of one matrix moves the NLL of a few calibration
    windows by ~1e-3 nats, about the noise of an estimate from 1024 tokens; neighbouring layers of
    one type behave alike, so the mean keeps the signal (SmolLM2 at 4.57 bits/weight: 40.8 with
    it, 41.6 without)."""
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
    alpha = (smoothed estimated ΔNLL of the matrix's block `level`-1) / (its proxy score), then
    `order_blocks` on alpha x scores (level by level). Returns (order, the raw estimated ΔNLL
    per matrix).

    The proxy tr(E H Eᵀ) compares blocks of one matrix, not matrices: how much a layer's output
    error costs downstream differs by orders of magnitude between layers and types. BitStack
    (§3.2) measures perplexity per block; one estimated step per matrix calibrates the exchange
    rate instead (formats/codec-bitstack.md, "Global order")."""
    from .codecs.bitstack import order_blocks
    level = min(level, min(len(s) for s in scores.values()))
    delta = fisher_sensitivity(transformer, parts, token_windows, level, progress)
    smooth = smoothed_sensitivity(delta)
    positive = [v for v in smooth.values() if v > 0]
    floor = SENSITIVITY_FLOOR * (float(np.median(positive)) if positive else 1.0)
    scaled = {}
    for name, s in scores.items():
        alpha = max(smooth[name], floor) / max(s[level - 1], 1e-30)
        scaled[name] = [alpha * v for v in s]
    sizes = {name: p["block.0"].nbytes for name, p in parts.items()}
    return order_blocks(sizes, scaled), delta

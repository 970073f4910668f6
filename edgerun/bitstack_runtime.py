"""BitStack at run time: how many residual blocks fit a budget, and growing or shrinking the
loaded prefix of the global block order in place (BitStack, Wang et al. 2024; DESIGN §4).

The pack writes every BitStack block in one global order (level by level, most useful first),
so the model at any size is a prefix of that order: `counts(n)` says how many blocks each
matrix has in the first n, and growing from n to n' reads exactly the blocks n..n'-1. Blocks
are read into their own anonymous mappings and copied into the kernels' layout by the codec
(edgerun/codecs/bitstack.py); a shrink copies the kept prefix, so the dropped suffix's memory
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

    def __init__(self, manifest: dict, arrays: dict):
        tensors = manifest["tensors"]
        self.order = [(name, int(i)) for name, i in manifest["bitstack"]["order"]]
        self.stacked = sorted({name for name, _ in self.order})
        sizes = [arrays[tensors[name]["parts"][f"block.{i}"]].length for name, i in self.order]
        self.prefix_bytes = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        block_arrays = {tensors[name]["parts"][f"block.{i}"] for name, i in self.order}
        self.fixed_bytes = sum(arrays[a].length for e in tensors.values() for a in e["parts"].values()
                               if a not in block_arrays)
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

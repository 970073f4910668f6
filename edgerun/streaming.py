"""Feed-forward neurons streamed from flash (DESIGN §5; Alizadeh et al. 2023, "LLM in a flash").

Layout (formats/flash-layout.md): per layer one array of neuron bundles, bundle j = [gate row j,
up row j, down column j] (3·d values of the stored dtype, or a compressed codec's bytes of the
three with its shared parts resident: the codec's `flash_cut` / `flash_kernels`), neurons ordered
by how often they are active on calibration text, plus the permutation and a low-rank activation
predictor.

At run time a `FlashFFN` is each layer's feed-forward component (edgerun/model.py), built from the
plan (edgerun/plan.py) with the model. Modes:
- resident: the whole bundle array is read once (fit first: nothing streams);
- window:   a per-layer buffer holds the `capacity` neurons most likely needed (sized from the
            budget; starts with the most frequent, then LRU over the last k tokens); each token
            reads only the missing bundles, coalesced into runs across small gaps, on a thread
            pool. Criterion off: every neuron is needed, so layer l+1's misses are read into the
            second scratch buffer while layer l computes (the last layer prefetches layer 0;
            a budget without room for two buffers reads into one, not overlapped);
            with a criterion the misses are known only from the layer's input, and their read
            overlaps computing the window's neurons;
- layer:    every token reads each whole layer, the next layer's read overlapping this one's
            compute (AirLLM-style baseline; a window of capacity 0);
- naive:    every token re-reads every FFN weight, synchronously (the paper's naive baseline).

Criteria (SwiGLU has no exact zeros, so sparsity is a calibrated threshold, CATS: Lee et al. 2024):
- "off":          every neuron (streaming then changes memory, not math);
- "gate:S":       gate rows resident, exact |silu(gate x)| > the layer's threshold for sparsity S;
- "lowrank:S":    a rank-r predictor ĝ = A (B x) (whitened SVD of the gate on calibration inputs,
                  training-free) thresholded at its own calibrated quantile for sparsity S.
Selected neurons are computed exactly; the others contribute zero.
"""
from __future__ import annotations

import math
import mmap
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from numba.extending import overload

from . import kernels
from .codecs import codec_class, get_codec
from .errors import BudgetError, EdgerunError, FormatError, UnsupportedModelError
from .flashio import ALIGN, BOUNCE, FlashReader, aligned_array, coalesce
from .kernels import bf16_to_f32, f16_to_f32

_JIT = dict(cache=True, nogil=True, fastmath=True, no_cfunc_wrapper=True)

LAYOUT_VERSION = 2           # 2: compressed codecs' byte bundles; dense packs are still written as 1
SPARSITY_GRID = [round(0.05 * i, 2) for i in range(20)]     # thresholds stored for S = 0 .. 0.95
PREDICTOR_RANK = 64
CALIB_TOKENS = 4096
CALIB_SEQ_LEN = 256
FREQ_SPARSITY = 0.5          # a neuron is "active" for the frequency ordering above this quantile
MATMUL_MIN_T = 2             # a chunk of this many tokens or more uses the batched (BLAS) path
TILE = 256                   # bundles widened per BLAS tile
SLACK = 3 * ALIGN            # a read buffer's pages beyond its bundles (flashio.aligned_array)
MIN_PIECE = 256 << 10        # a run is split across reader threads in pieces of at least this many bytes
# Coalescing (flashio.coalesce): this disk's direct reads cost ~GAP_SECONDS per request plus their
# bytes at ~GAP_BANDWIDTH (tools/bench_flash.py disk), so a gap of up to that many bytes is read through.
GAP_SECONDS = 45e-6
GAP_BANDWIDTH = 1.4e9
STORED = {"f16": np.uint16, "bf16": np.uint16, "f32": np.float32}


def parse_criterion(text: str) -> tuple[str, float]:
    """"off" | "gate:S" | "lowrank:S" (0 <= S < 1 the target sparsity) -> (kind, S)."""
    text = (text or "off").strip()
    if text == "off":
        return "off", 0.0
    kind, _, s = text.partition(":")
    try:
        sparsity = float(s)
    except ValueError:
        sparsity = -1.0
    if kind not in ("gate", "lowrank") or not 0.0 <= sparsity < 1.0:
        raise EdgerunError(f"criterion {text!r}: use off, gate:S or lowrank:S with 0 <= S < 1 (e.g. lowrank:0.5)")
    return kind, sparsity


def threshold(grid_values, sparsity: float) -> float:
    """The calibrated threshold for `sparsity`, interpolated on SPARSITY_GRID."""
    return float(np.interp(sparsity, SPARSITY_GRID, grid_values))


# ------------------------------------------------------------------------------ kernels

def widen(v):
    """Stored weight value -> float32: uint16 = f16 bits, int16 = bf16 bits (a runtime view of the
    stored uint16, so one kernel serves the three dtypes), float32 as is."""


@overload(widen, inline="always")
def _widen_impl(v):
    from numba import types
    if v == types.uint16:
        return lambda v: f16_to_f32(v)
    if v == types.int16:
        return lambda v: bf16_to_f32(v)
    if v == types.float32:
        return lambda v: v


@njit(inline="always", **_JIT)
def _row(wa, wb, c):
    # code c >= 0: row c of wa (window / resident); c < 0: row -1-c of wb (read scratch)
    return wa[c] if c >= 0 else wb[-1 - c]


@njit(**_JIT)
def bundle_act(wa, wb, codes, sel, x, h):
    # wa (R, 3, d), wb (S, 3, d) bundles, codes (n,) int64, sel (m,) positions, x (d,) -> h[sel] = silu(g·x)*(u·x)
    d = x.shape[0]
    for s in range(sel.shape[0]):
        k = sel[s]
        r = _row(wa, wb, codes[k])
        g = np.float32(0.0)
        u = np.float32(0.0)
        for j in range(d):
            g += widen(r[0, j]) * x[j]
            u += widen(r[1, j]) * x[j]
        h[k] = g / (np.float32(1.0) + kernels.expf(-g)) * u


@njit(**_JIT)
def bundle_down(wa, wb, codes, h, out):
    # wa (R, 3, d), wb (S, 3, d), codes (n,), h (n,) -> out (d,) = Σ_k h[k] · down column of bundle k, in k order
    d = out.shape[0]
    for j in range(d):
        out[j] = np.float32(0.0)
    for k in range(codes.shape[0]):
        hk = h[k]
        if hk == 0.0:
            continue
        r = _row(wa, wb, codes[k])
        for j in range(d):
            out[j] += hk * widen(r[2, j])


@njit(**_JIT)
def widen_bundles(wa, wb, codes, a, b, tile):
    # bundles codes[a:b] of (wa, wb) -> tile (>= b-a, 3, d) float32
    d = wa.shape[2]
    for k in range(a, b):
        r = _row(wa, wb, codes[k])
        for p in range(3):
            for j in range(d):
                tile[k - a, p, j] = widen(r[p, j])


@njit(**_JIT)
def copy_rows(src, src_rows, dst, dst_rows):
    # src (R, 3, d) rows src_rows (n,) -> dst (R2, 3, d) rows dst_rows (n,)
    for k in range(src_rows.shape[0]):
        dst[dst_rows[k]] = src[src_rows[k]]


def kernel_view(buf: np.ndarray, dtype: str) -> np.ndarray:
    """The array the kernels read: bf16 bits are viewed as int16 so `widen` picks bf16."""
    return buf.view(np.int16) if dtype == "bf16" else buf


class DenseBundles:
    """The bundle kernels of dense (f32/f16/bf16) bundles `(f, 3, d)`: the interface a codec's
    `flash_kernels` also provides (`ids`, the stored neuron of each bundle, is unused here)."""

    matmul_min_t = MATMUL_MIN_T

    def prepare(self, x):
        pass

    def act(self, wa, wb, codes, ids, sel, x, h):
        bundle_act(wa, wb, codes, sel, x, h)

    def down(self, wa, wb, codes, ids, h, out):
        bundle_down(wa, wb, codes, h, out)

    def widen(self, wa, wb, codes, ids, a, b, tile):
        widen_bundles(wa, wb, codes, a, b, tile)


def ffn_rows(kern, wa, wb, codes, ids, x, out, mask=None, h=None, hit=None, wait=None):
    """out (T, d) = Σ over bundles `codes` (of wa / wb; stored neurons `ids`) of
    down·(silu(gate x)·(up x)) with `kern`'s kernels (DenseBundles or a codec's), masked per
    token by `mask` (T, n) bool; always in the order of `codes`, so every mode gives the same floats.
    Below kern.matmul_min_t tokens: per token (the codec's matvec arithmetic), the first token's
    `hit` bundles computed before `wait()` returns (the reads of the others overlap that work);
    a larger chunk: widened tiles + BLAS after `wait()`."""
    T, d = x.shape
    n = len(codes)
    if T < kern.matmul_min_t:
        h = np.empty(n, np.float32) if h is None else h[:n]
        for t in range(T):
            kern.prepare(x[t])
            sel = np.arange(n, dtype=np.int64) if mask is None else np.flatnonzero(mask[t]).astype(np.int64)
            h[:] = 0.0
            if hit is not None and t == 0:
                kern.act(wa, wb, codes, ids, sel[hit[sel]], x[t], h)
                sel = sel[~hit[sel]]
            if wait is not None and t == 0:
                wait()
            kern.act(wa, wb, codes, ids, sel, x[t], h)
            kern.down(wa, wb, codes, ids, h, out[t])
        return
    if wait is not None:
        wait()
    out[:] = 0.0
    tile = np.empty((TILE, 3, d), np.float32)
    for a in range(0, n, TILE):
        b = min(n, a + TILE)
        kern.widen(wa, wb, codes, ids, a, b, tile)
        t = tile[:b - a]
        g = x @ t[:, 0].T
        hh = g / (1.0 + np.exp(-g)) * (x @ t[:, 1].T)
        if mask is not None:
            hh *= mask[:, a:b]
        out += hh @ t[:, 2]


# ------------------------------------------------------------------------------ window bookkeeping

class NeuronWindow:
    """Which neurons of one layer sit in which slot of the window buffer (LLM in a flash §3.3).

    slot_of[neuron] = slot or -1; neuron_at[slot] = neuron; last[slot] = the step the neuron was
    last used. The window starts full with the most frequent neurons (ids 0..capacity-1: bundles
    are stored in calibration-frequency order) and stays full: a neuron unused for k tokens is only
    dropped when a missing one takes its slot (`victims` + `replace`), so no slot is ever empty
    and a token never misses more than `neurons - capacity` neurons (the read scratch's size)."""

    def __init__(self, neurons: int, capacity: int):
        self.capacity = capacity
        self.slot_of = np.full(neurons, -1, np.int64)
        self.slot_of[:capacity] = np.arange(capacity)
        self.neuron_at = np.arange(capacity, dtype=np.int64)
        self.last = np.zeros(capacity, np.int64)

    def missing(self) -> np.ndarray:
        """Sorted ids of the neurons not in the window."""
        return np.flatnonzero(self.slot_of < 0)

    def touch(self, slots, step: int) -> None:
        self.last[slots] = step

    def victims(self, oldest: int, n: int) -> np.ndarray:
        """Up to n slots whose neuron was last used before step `oldest`: least recently used
        first, and among equals the least frequent (highest id) first."""
        stale = np.flatnonzero(self.last < oldest)
        if len(stale) > n:
            order = np.lexsort((-self.neuron_at[stale], self.last[stale]))
            stale = np.sort(stale[order[:n]])
        return stale

    def replace(self, slots, neurons, step: int) -> None:
        """Put `neurons` (absent) into `slots` (their neurons leave the window)."""
        self.slot_of[self.neuron_at[slots]] = -1
        self.neuron_at[slots] = neurons
        self.slot_of[neurons] = slots
        self.last[slots] = step

    def check(self) -> None:
        """Invariants (tests): the maps are inverse bijections and the window is full."""
        occ = self.neuron_at
        assert (occ >= 0).all() and len(set(occ.tolist())) == self.capacity
        assert (self.slot_of[occ] == np.arange(self.capacity)).all()
        assert (self.slot_of >= 0).sum() == self.capacity


# ------------------------------------------------------------------------------ plan

@dataclass
class FlashStats:
    tokens: int = 0
    bytes_read: int = 0            # requested from the file (incl. gap bundles read by coalescing)
    reads: int = 0                 # coalesced runs requested
    read_seconds: float = 0.0      # time the forward pass was blocked waiting for reads
    neurons_used: int = 0          # summed over layers and tokens
    neurons_loaded: int = 0        # of those, not in the window (read for this token)

    def since(self, before: "FlashStats") -> "FlashStats":
        """What happened after the snapshot `before` (a copy taken earlier): one reply's reads."""
        return FlashStats(**{k: getattr(self, k) - getattr(before, k) for k in self.__dataclass_fields__})

    def copy(self) -> "FlashStats":
        return FlashStats(**vars(self))

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.neurons_loaded / max(self.neurons_used, 1)

    def line(self) -> str:
        t = max(self.tokens, 1)
        return (f"{self.bytes_read / t / 1e6:.2f} MB read/token in {self.reads / t:.0f} reads, "
                f"{self.read_seconds / t * 1e3:.1f} ms/token waiting, window hit rate {self.hit_rate:.1%}")


@dataclass
class StreamingPlan:
    mode: str                  # resident | window | layer | naive
    criterion: str
    window: int                # k tokens
    capacity: int              # window slots per layer
    layers: int
    neurons: int               # per layer
    bundle_bytes: int
    dtype: str                 # what a bundle stores: f16 / bf16 / f32, or the codec rule (spqr:4)
    resident_bytes: dict       # what this module keeps in memory, by kind
    read_per_token: int        # expected bytes read per decoded token (upper bound for window)
    scratch_rows: int = 0      # bundles per read buffer (the most a token can miss in one layer)
    gap: int = 0               # coalescing: missing ids at most this many bundles apart are one read
    prefetch: bool = True      # criterion off: read layer l+1's misses while layer l computes
    threads: int = 2           # reader threads
    stats: FlashStats = field(default_factory=FlashStats)
    reader: FlashReader | None = None      # set by `attach`: the open file the bundles stream from
    bundle_shape: tuple = ()   # one bundle as an array: (3, d) of the dense dtype, or (bundle_bytes,) uint8
    bundle_dtype: object = np.uint16

    def buffer(self, rows: int) -> np.ndarray:
        """An uninitialized array of `rows` bundles."""
        return np.empty((rows,) + self.bundle_shape, self.bundle_dtype)

    @property
    def total_bytes(self) -> int:
        return sum(self.resident_bytes.values())

    def lines(self) -> list[str]:
        from .memory import fmt
        out = [(f"  FFN {self.mode}: {self.layers} layers x {self.neurons} neurons x {self.bundle_bytes} B bundles "
                f"({self.dtype}), criterion {self.criterion}")]
        if self.mode == "window":
            out.append(f"  window: {self.capacity} of {self.neurons} neurons per layer (most frequent first; "
                       f"LRU over the last {self.window} tokens), reads coalesced across gaps of {self.gap}")
        for k, v in self.resident_bytes.items():
            out.append(f"    {k:<62} {fmt(v):>12}")
        out.append(f"  expected reads per token {'(at most) ' if self.mode == 'window' else ''}"
                   f"{self.read_per_token / 1e6:.2f} MB")
        return out


def bundle_format(fl: dict) -> tuple[tuple, object, int, str]:
    """A flash section's bundle: (array shape of one bundle, its dtype, bytes, label). Dense packs
    (layout v1) store (3, d) values; compressed codecs (v2) `bundle_bytes` codec bytes."""
    if fl.get("codec", "dense") == "dense":
        dt = STORED[fl["dtype"]]
        return (3, fl["hidden_size"]), dt, 3 * fl["hidden_size"] * np.dtype(dt).itemsize, fl["dtype"]
    B = int(fl["bundle_bytes"])
    return (B,), np.uint8, B, codec_class(fl["codec"]).describe(fl["params"])


def shared_bytes(fl: dict) -> int:
    """Resident bytes of a compressed pack's shared parts (all layers) and its kernels' scratch."""
    if fl.get("codec", "dense") == "dense":
        return 0
    return int(fl["shared_bytes"]) + codec_class(fl["codec"]).flash_scratch_bytes(fl["hidden_size"],
                                                                                   fl["intermediate_size"])


def _gate_bytes(fl: dict) -> int:
    """Bytes of a compressed bundle's gate parts ("gate.*", which lead the bundle)."""
    return sum(n for k, (_, n) in fl["bundle_parts"].items() if k.startswith("gate."))


class _KernelGate:
    """The resident gate parts of a compressed pack's bundles as a `matvec` / `matmul` for the
    gate criterion (the codec's arithmetic: `kern.gate_scores`)."""

    def __init__(self, kern, rows: np.ndarray):
        self.kern, self.rows = kern, rows

    def matvec(self, x, out):
        self.kern.gate_scores(self.rows, x, out)

    def matmul(self, X, out):
        for t in range(X.shape[0]):
            self.matvec(X[t], out[t])


def _flash(manifest: dict) -> dict:
    fl = manifest.get("flash")
    if not fl:
        raise UnsupportedModelError("this .ebin has no flash layout: repack it with `edgerun pack --layout flash`")
    if fl.get("version", 0) > LAYOUT_VERSION:
        raise UnsupportedModelError(f"flash layout v{fl['version']} is newer than this edgerun (v{LAYOUT_VERSION})")
    return fl


def _buffers(mode: str, L: int, f: int, B: int, capacity: int, prefetch: bool = True) -> dict:
    """The bundle buffers of a streaming mode with `capacity` window slots per layer: the window,
    and the read scratch (window and layer: two buffers when reads are prefetched, so layer l+1's
    read lands in one while layer l computes from the other, else one; each holds the most one
    layer can miss, f - capacity)."""
    if mode == "naive":
        return {"FFN read scratch (one layer)": f * B + SLACK}
    label = "2 x the missing neurons of a layer" if prefetch else "the missing neurons of a layer"
    out = {f"FFN read scratch ({label})": (2 if prefetch else 1) * (max(f - capacity, 1) * B + SLACK)}
    if mode == "window":
        out["window buffers"] = L * capacity * B
    return out


def _fit_capacity(left: int, L: int, f: int, B: int, prefetch: bool = True) -> int:
    """The most window slots per layer whose buffers fit `left` bytes (their size is linear in
    the capacity: each slot adds L bundles of window and removes 1 or 2 of scratch), or -1."""
    size = [sum(_buffers("window", L, f, B, c, prefetch).values()) for c in (0, f)]
    if min(size) > left:
        return -1
    if size[1] <= left:
        return f
    return int((left - size[0]) // ((size[1] - size[0]) / f))


def default_gap(bundle_bytes: int) -> int:
    """Missing bundles this many apart or closer are read as one run. A request costs about
    GAP_SECONDS more than its bytes at GAP_BANDWIDTH (measured on this machine's disk with
    `tools/bench_flash.py disk`); reading up to that many bytes of unneeded bundles is cheaper."""
    return max(0, int(GAP_SECONDS * GAP_BANDWIDTH // bundle_bytes))


def plan_streaming(manifest: dict, cfg, ffn_budget: int, mode: str = "auto", window: int = 4,
                   criterion: str = "lowrank:0.5", threads: int = 2, gap: int | None = None,
                   prefetch: bool = True) -> StreamingPlan:
    """How the FFN runs within `ffn_budget` bytes (everything the FFN needs in memory: bundles,
    window buffers, read scratch, predictor, I/O buffers). mode "auto" is fit-first: resident if
    every bundle fits, else window; "window", "layer", "naive" force that streaming mode (benchmarks).
    `gap`: coalescing distance in bundles (None: `default_gap`). Criterion off reads the next
    layer's bundles while this one computes (two read buffers) when the budget has room for it,
    else with one buffer, not overlapped; `prefetch` False forces that (to measure what the
    overlap gains)."""
    fl = _flash(manifest)
    kind, sparsity = parse_criterion(criterion)
    L, f, d = cfg.num_layers, fl["intermediate_size"], fl["hidden_size"]
    shape, bdt, B, label = bundle_format(fl)
    full = L * f * B
    fmt = dict(bundle_shape=shape, bundle_dtype=bdt)
    shared = {"FFN shared parts (stats, outliers) and scratch": shared_bytes(fl)} if shared_bytes(fl) else {}
    gap = default_gap(B) if gap is None else int(gap)
    act = 4 * (3 * f + 2 * TILE * 3 * d)          # per-token activations, masks, a BLAS tile
    if mode not in ("auto", "resident", "window", "layer", "naive"):
        raise EdgerunError(f"--stream must be auto, resident, window, layer or naive, not {mode!r}")
    if ffn_budget >= full + act and mode in ("auto", "resident"):
        return StreamingPlan("resident", criterion, window, f, L, f, B, label,
                             {"FFN bundles (resident)": full, "FFN activations": act, **shared}, 0, threads=threads,
                             **fmt)
    if mode == "resident":
        raise BudgetError(f"the FFN needs {full + act} bytes resident but its budget is {ffn_budget}")
    mode = "window" if mode == "auto" else mode
    if mode != "window" and kind != "off":
        raise EdgerunError(f"--stream {mode} reads every neuron: it takes no criterion ({criterion!r})")
    fixed = {"I/O bounce buffers": (threads + 1) * BOUNCE, "FFN activations": act, **shared}
    if kind == "lowrank":
        fixed["predictor (low-rank, f16)"] = L * (f + d) * fl["predictor_rank"] * 2
    elif kind == "gate":
        fixed["gate rows (resident)"] = L * f * (_gate_bytes(fl) if shared else d * np.dtype(bdt).itemsize)
    def buffers(prefetch):
        cap = max(0, _fit_capacity(ffn_budget - sum(fixed.values()), L, f, B, prefetch)) if mode == "window" else 0
        return cap, _buffers(mode, L, f, B, cap, prefetch)

    prefetch = prefetch and kind == "off"         # only criterion off knows the next layer's misses
    capacity, bufs = buffers(prefetch)
    if prefetch and sum(fixed.values()) + sum(bufs.values()) > ffn_budget:
        prefetch = False                          # no room to overlap the reads: one buffer
        capacity, bufs = buffers(False)
    fixed.update(bufs)
    need = sum(fixed.values())
    if ffn_budget < need:
        short = -(-(need - ffn_budget) // 2**20)
        raise BudgetError(f"streaming the FFN ({mode}) needs at least {need / 2**20:.1f} MiB, {short} MiB more than "
                          f"--ram leaves for it: raise --ram by {short} MiB (`edgerun info` prints the minimum)")
    missing = f - capacity if kind == "off" else min(f - capacity, math.ceil((1 - sparsity) * f))
    per_token = L * (f if mode != "window" else missing) * B
    return StreamingPlan(mode, criterion, window, capacity, L, f, B, label, fixed, per_token,
                         scratch_rows=max(f - capacity, 1) if mode != "naive" else f, gap=gap, prefetch=prefetch,
                         threads=threads, **fmt)


def minimum_plan(manifest: dict, cfg, criterion: str = "off", threads: int = 2) -> StreamingPlan:
    """The smallest streaming plan (window mode with the fewest bytes): what `--ram` must leave
    for the FFN at least (`edgerun info`)."""
    fl = _flash(manifest)
    L, f = cfg.num_layers, fl["intermediate_size"]
    B = bundle_format(fl)[2]
    probe = plan_streaming(manifest, cfg, 1 << 62, "window", criterion=criterion, threads=threads)
    other = probe.total_bytes - sum(_buffers("window", L, f, B, probe.capacity, probe.prefetch).values())
    least = min(sum(_buffers("window", L, f, B, c, False).values()) for c in (0, f))
    return plan_streaming(manifest, cfg, other + least, "window", criterion=criterion, threads=threads)


# ------------------------------------------------------------------------------ runtime

class _Shared:
    """What all layers share: the reader, the read buffers, the read in flight, stats."""

    def __init__(self, reader: FlashReader, plan: StreamingPlan, d: int):
        self.reader, self.plan = reader, plan
        nbuf = {"resident": 0, "naive": 1}.get(plan.mode, 2 if plan.prefetch else 1)
        # criterion off reads bundles capacity.. of each layer (one run): start the rows where that
        # run's file offset sits within a page, so its pages are read straight into the buffer
        self.shift = plan.capacity * plan.bundle_bytes % ALIGN
        self.scratch = [aligned_array((plan.scratch_rows,) + plan.bundle_shape, plan.bundle_dtype, self.shift)
                        for _ in range(nbuf)]
        self.pending = None       # _Read in flight (the next layer's prefetch), at most one
        self.h = np.empty(plan.neurons, np.float32)
        self.stats = plan.stats
        self.ffns = []


def _arena(a: np.ndarray):
    """The page-aligned memory (an mmap) an `aligned_array` view lives in."""
    while not isinstance(a, mmap.mmap):
        a = a.obj if isinstance(a, memoryview) else a.base
    return a


@dataclass
class _Read:
    """Bundles `ids` (sorted; gap bundles included) of `layer` going to rows 0.. of scratch[buf]."""
    layer: int
    buf: int
    ids: np.ndarray
    handle: list


class FlashFFN:
    """One layer's feed-forward over its bundles in the .ebin: `ffn(ops, layer, x, h)` adds
    `compute(x (T, d), out (T, d))` to h (host arrays: this component runs on the CPU)."""

    def __init__(self, i: int, entry: dict, arrays: dict, plan: StreamingPlan, shared: _Shared,
                 predictor=None, gate=None, thresholds=None, kern=None):
        self.i, self.plan, self.sh = i, plan, shared
        info = arrays[entry["bundles"]]
        self.offset, self.f = info.offset, plan.neurons
        self.kern = DenseBundles() if kern is None else kern     # the bundle kernels (DenseBundles or the codec's)
        self.B = plan.bundle_bytes
        self.kind, self.sparsity = parse_criterion(plan.criterion)
        self.all_ids = np.arange(self.f, dtype=np.int64)      # criterion off: every neuron, every token
        self.predictor, self.gate, self.thr = predictor, gate, thresholds
        self.resident = None
        self.window = None
        self.wbuf = plan.buffer(1)
        if plan.mode in ("window", "layer"):
            self.window = NeuronWindow(self.f, plan.capacity)
        self.step = 0

    def _view(self, buf):
        return kernel_view(buf, self.plan.dtype)

    # -- selection
    def select(self, x):
        """(union of active neuron ids sorted, mask (T, n) over the union or None)."""
        if self.kind == "off":
            return self.all_ids, None
        T = x.shape[0]
        g = np.empty((T, self.f), np.float32)
        if self.kind == "gate":
            self.gate.matmul(x, g) if T > 1 else self.gate.matvec(x[0], g[0])
        else:
            a, b = self.predictor
            z = np.empty((T, b.shape[0]), np.float32)
            b.matmul(x, z) if T > 1 else b.matvec(x[0], z[0])
            a.matmul(z, g) if T > 1 else a.matvec(z[0], g[0])
        act = np.abs(g / (1.0 + np.exp(-g))) > self.thr
        union = np.flatnonzero(act.any(axis=0)).astype(np.int64)
        return union, act[:, union]

    # -- the hook
    def __call__(self, ops, L, x, h):
        out = ops.st.xb2[:x.shape[0]]
        self.compute(x, out)
        h += out

    def compute(self, x, out):
        """out (T, d) = down(silu(gate x) * up x) over the selected neurons."""
        T = x.shape[0]
        st = self.sh.stats
        if self.i == 0:
            st.tokens += T
        ids, mask = self.select(x)
        st.neurons_used += len(ids) * T if mask is None else int(mask.sum())
        mode = self.plan.mode
        if mode == "resident":
            r = self._view(self.resident)
            ffn_rows(self.kern, r, r, ids, ids, x, out, mask, self.sh.h)
        elif mode == "naive":
            buf = self._view(self._read_layer_now())
            ffn_rows(self.kern, buf, buf, ids, ids, x, out, mask, self.sh.h)
        else:
            self._streamed(ids, x, out, mask)

    def load_resident(self, reader: FlashReader) -> None:
        self.resident = self.plan.buffer(self.f)
        reader.read_into(self.offset, self.resident.reshape(-1).view(np.uint8))

    def load_window(self, reader: FlashReader) -> None:
        """Fill the window with the `capacity` most frequent neurons (stored first)."""
        c = self.plan.capacity
        self.wbuf = self.plan.buffer(max(c, 1))
        if c:
            reader.read_into(self.offset, self.wbuf[:c].reshape(-1).view(np.uint8))

    def _read_layer_now(self):
        """naive: read the whole layer now, synchronously, one request per MiB, as a plain
        sequential reader would (the paper's baseline)."""
        sh, st = self.sh, self.sh.stats
        buf = sh.scratch[0]
        t0 = time.perf_counter()
        step = max(1, (1 << 20) // self.B)
        for a in range(0, self.f, step):
            c = min(step, self.f - a)
            sh.reader.read_into(self.offset + a * self.B, buf[a:a + c].reshape(-1).view(np.uint8))
            st.reads += 1
        st.read_seconds += time.perf_counter() - t0
        st.bytes_read += self.f * self.B
        st.neurons_loaded += self.f
        return buf

    # -- streamed reads (window and layer modes)
    def _submit(self, ids, buf: int) -> _Read:
        """Start reading bundles `ids` (sorted) into rows 0.. of scratch[buf], coalesced into runs
        across holes of up to plan.gap bundles (smallest first, while the buffer has room); a long
        run is split so every reader thread has a share."""
        sh, st, rows = self.sh, self.sh.stats, self.plan.scratch_rows
        runs = coalesce(ids, self.B, gap=self.plan.gap, limit=rows)
        scratch = sh.scratch[buf]
        arena = _arena(scratch)
        jobs, pos, got = [], 0, []
        for first, count, _, _ in runs:
            piece = max(MIN_PIECE, -(-count * self.B // sh.reader.threads))
            jobs += sh.reader.span_jobs(self.offset + first * self.B, count * self.B, arena, sh.shift + pos * self.B,
                                        piece, spill=len(runs) == 1)
            got.append(np.arange(first, first + count))
            pos += count
        st.reads += len(runs)
        st.bytes_read += pos * self.B
        read_ids = np.concatenate(got) if got else np.empty(0, np.int64)
        return _Read(self.i, buf, read_ids, sh.reader.submit(jobs))

    def _claim(self, miss) -> tuple[_Read, np.ndarray]:
        """The read holding this layer's missing bundles: the prefetch started during the previous
        layer when it covers them, else a read started now. Returns it and the rows of `miss`."""
        sh = self.sh
        p, sh.pending = sh.pending, None
        if p is not None and p.layer == self.i:
            rows = np.searchsorted(p.ids, miss)
            if len(miss) == 0 or (rows[-1] < len(p.ids) and (p.ids[rows] == miss).all()):
                return p, rows
        if p is not None:                    # a stale prefetch (a cancelled forward): let it land
            sh.reader.wait(p.handle)
        r = self._submit(miss, 0)
        return r, np.searchsorted(r.ids, miss)

    def _prefetch_next(self, buf: int) -> None:
        """Criterion off: the next layer needs every neuron, so its misses are known now: start
        reading them into the other buffer while this layer computes (the last layer prefetches
        layer 0 of the next token)."""
        if self.kind != "off" or not self.plan.prefetch:
            return
        nxt = self.sh.ffns[(self.i + 1) % self.plan.layers]
        self.sh.pending = nxt._submit(nxt.window.missing(), buf)

    def _streamed(self, ids, x, out, mask):
        w, sh, st = self.window, self.sh, self.sh.stats
        slots = w.slot_of[ids]
        hit = slots >= 0
        miss = ids[~hit]
        read, rows = self._claim(miss)
        self._prefetch_next(1 - read.buf)
        codes = slots.copy()
        codes[~hit] = -1 - rows

        def wait():
            t0 = time.perf_counter()
            sh.reader.wait(read.handle)
            st.read_seconds += time.perf_counter() - t0

        ffn_rows(self.kern, self._view(self.wbuf), self._view(sh.scratch[read.buf]), codes, ids, x, out, mask, sh.h,
                 hit, wait)
        st.neurons_loaded += len(miss)
        # window update: used neurons are fresh; misses take the slots of neurons unused for k tokens
        self.step += 1
        w.touch(slots[hit], self.step)
        if len(miss) and self.kind != "off":
            victims = w.victims(self.step - self.plan.window + 1, len(miss))
            if len(victims):
                w.replace(victims, miss[:len(victims)], self.step)   # ids ascending = most frequent first
                copy_rows(sh.scratch[read.buf], rows[:len(victims)], self.wbuf, victims)


def warm_up(manifest: dict) -> None:
    """Compile (or load from the JIT cache) the bundle kernels for this pack's dtype, at both the
    decode and the prefill paths, so no compiler runs during the first token (called with the
    other kernels' warm-up, before the runtime's memory is measured: api.warm_up_kernels)."""
    fl = _flash(manifest)
    codes = np.array([0, -1], np.int64)
    if fl.get("codec", "dense") == "dense":
        d, kern = 8, DenseBundles()
        buf = kernel_view(np.zeros((2, 3, d), STORED[fl["dtype"]]), fl["dtype"])
    else:        # a random 32-neuron layer in the pack's codec and params: the same kernel signatures
        d, f = 16, 32
        rng = np.random.default_rng(0)
        codec = get_codec(fl["codec"])
        parts = [codec.encode(rng.standard_normal(s).astype(np.float32), fl["params"]) for s in ((f, d), (f, d), (d, f))]
        bundles, shared = codec.flash_cut(*parts, fl["params"], np.arange(f))
        kern = codec.flash_kernels(shared, np.arange(f), fl["params"], d, f, {})
        buf = bundles
    x, out = np.ones((4, d), np.float32), np.zeros((4, d), np.float32)
    for T in (1, max(kern.matmul_min_t, 2)):
        ffn_rows(kern, buf, buf, codes, np.array([0, 1], np.int64), x[:T], out[:T], hit=np.array([True, False]))
    copy_rows(buf, codes[:1], buf.copy(), codes[:1])


def attach(transformer, ebin_path, manifest: dict, ffn_budget: int, mode: str = "auto", window: int = 4,
           criterion: str = "lowrank:0.5", threads: int = 2, gap: int | None = None,
           prefetch: bool = True) -> StreamingPlan:
    """Give every layer of a built `transformer` a FlashFFN over the flash-layout bundles of
    `ebin_path` within `ffn_budget` bytes (tests and tools; the API builds the model with them);
    returns the plan (with live `stats`)."""
    plan = plan_streaming(manifest, transformer.cfg, ffn_budget, mode=mode, window=window, criterion=criterion,
                          threads=threads, gap=gap, prefetch=prefetch)
    for L, ffn in zip(transformer.layers, flash_ffns(ebin_path, manifest, plan)):
        L.ffn = ffn
    return plan


def flash_ffns(ebin_path, manifest: dict, plan: StreamingPlan) -> list:
    """Carry out `plan`: every layer's FlashFFN, with the plan's reader open (`plan.reader`) and
    its buffers filled. Every bundle array's crc32 is checked once here (FormatError naming it)."""
    fl = _flash(manifest)
    kind, sparsity = parse_criterion(plan.criterion)
    reader = FlashReader(ebin_path, threads=plan.threads)
    try:
        ffns = _open(ebin_path, fl, plan, reader, kind, sparsity)
    except BaseException:
        reader.close()          # its threads and file descriptor
        raise
    plan.reader = reader
    return ffns


def _open(ebin_path, fl: dict, plan: StreamingPlan, reader: FlashReader, kind: str, sparsity: float) -> list:
    from .ebin import EbinFile
    d = fl["hidden_size"]
    shared = _Shared(reader, plan, d)
    dense = get_codec("dense")
    scratch = {}                # per-token buffers of a codec's kernels, shared by the layers
    with EbinFile(ebin_path) as ebin:
        arrays = ebin.arrays
        ffns = []
        for i, entry in enumerate(fl["layers"]):
            pred = gate = thr = None
            kern = None         # dense (v1) bundles: DenseBundles
            if "shared" in entry:
                kern = codec_class(fl["codec"]).flash_kernels(
                    {k: ebin.read(name) for k, name in entry["shared"].items()}, ebin.read(entry["perm"]),
                    fl["params"], d, plan.neurons, scratch)
            if kind == "lowrank":
                p = {"dtype": "f16"}
                pred = (dense.load({"weight": ebin.read(entry["predictor_a"])}, p),
                        dense.load({"weight": ebin.read(entry["predictor_b"])}, p))
                thr = threshold(entry["thresholds"]["lowrank"], sparsity)
            elif kind == "gate":
                full = plan.buffer(plan.neurons)
                reader.read_into(arrays[entry["bundles"]].offset, full.reshape(-1).view(np.uint8))
                if kern is None:
                    gate = dense.load({"weight": np.ascontiguousarray(full[:, 0])}, {"dtype": fl["dtype"]})
                else:
                    gate = _KernelGate(kern, np.ascontiguousarray(full[:, :_gate_bytes(fl)]))
                del full
                thr = threshold(entry["thresholds"]["gate"], sparsity)
            ffn = FlashFFN(i, entry, arrays, plan, shared, pred, gate, thr, kern)
            info = arrays[entry["bundles"]]
            if plan.mode == "resident":
                ffn.load_resident(reader)
                if zlib.crc32(ffn.resident.reshape(-1).view(np.uint8)) != info.crc32:
                    raise FormatError(f"{ebin_path}: array {info.name!r} is corrupted (crc32 mismatch)")
            else:
                # Streamed bundles are read a few at a time for the whole run, and the format has
                # one crc32 per array, not per bundle: check each layer's bundles once here, in one
                # sequential pass through a bounce-sized buffer (page cache dropped as it goes).
                ebin.verify(names=[info.name], chunk=BOUNCE)
                if plan.mode == "window":
                    ffn.load_window(reader)
            ffns.append(ffn)
    shared.ffns = ffns
    return ffns


# ------------------------------------------------------------------------------ pack time

FFN_NAMES = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def is_ffn_weight(name: str) -> bool:
    """The tensors the flash layout stores as bundles instead of as matrices."""
    return name.startswith("model.layers.") and name.endswith(FFN_NAMES)


def make_bundles(gate, up, down, perm, dtype: str) -> np.ndarray:
    """gate, up (f, d), down (d, f) float32 -> (f, 3, d) stored bundles in `perm` order."""
    enc = get_codec("dense").encode
    b = np.stack([gate[perm], up[perm], down.T[perm]], axis=1)
    return enc(b.reshape(len(perm), -1), {"dtype": dtype})["weight"].reshape(b.shape)


def _abs_silu(A: np.ndarray, B: np.ndarray, out: np.ndarray, rows: int = 256) -> None:
    """out = |silu(A @ B)|, the product written into `out` and the activation applied in place
    by row chunks: the same floats as the whole-array expression, whose temporaries made
    layer_stats peak at 864 MiB for the 1.5B model's (4096, 8960) pre-activations (now 387 MiB)."""
    np.matmul(A, B, out=out)
    for r0 in range(0, out.shape[0], rows):
        G = out[r0:r0 + rows]
        G[:] = np.abs(G / (1.0 + np.exp(-G)))


def _gram(w: np.ndarray, rows: int = 1024) -> np.ndarray:
    """wᵀ w in float64, summed over row chunks: no float64 copy of w."""
    G = np.zeros((w.shape[1], w.shape[1]))
    for r0 in range(0, w.shape[0], rows):
        c = w[r0:r0 + rows].astype(np.float64)
        G += c.T @ c
    return G


def layer_stats(X: np.ndarray, gate: np.ndarray, rank: int = PREDICTOR_RANK) -> dict:
    """From one layer's calibration FFN inputs X (N, d) and gate (f, d): frequency order, the
    |silu(gate x)| thresholds on SPARSITY_GRID, and a rank-r predictor A (f, r), B (r, d) minimizing
    E‖gate x − A B x‖² (rank-r SVD of gate·L with L Lᵀ = E[x xᵀ]: A = U_r S_r, B = V_rᵀ L⁻¹) with its own thresholds."""
    N, d = X.shape
    S = np.empty((N, gate.shape[0]), np.float32)
    _abs_silu(X, gate.T, S)
    freq = (S > np.quantile(S, FREQ_SPARSITY)).mean(axis=0)
    perm = np.argsort(-freq, kind="stable").astype(np.int32)
    thr = np.quantile(S, SPARSITY_GRID, overwrite_input=True).tolist()
    del S                               # 147 MiB on the 1.5B model: gone before the predictor's work
    H = _gram(X) / N
    H += np.eye(d) * 1e-4 * np.trace(H) / d
    Lc = np.linalg.cholesky(H)
    r = min(rank, d)
    # M = gate·L is never formed (two float64 (f, d) arrays, 220 MiB on the 1.5B model): its top-r
    # right singular vectors are the top eigenvectors of Mᵀ M = Lᵀ (gateᵀ gate) L, and U_r S_r = M V_r
    _, V = np.linalg.eigh(Lc.T @ _gram(gate) @ Lc)
    Vr = V[:, ::-1][:, :r]
    A = gate @ (Lc @ Vr).astype(np.float32)                          # U_r S_r
    Bm = np.linalg.solve(Lc.T, Vr).T.astype(np.float32)              # V_rᵀ L⁻¹
    # thresholds of the predictor as the runtime will compute it (f16 factors)
    A16, B16 = A.astype(np.float16).astype(np.float32), Bm.astype(np.float16).astype(np.float32)
    P = np.empty((N, gate.shape[0]), np.float32)
    _abs_silu(X @ B16.T, A16.T, P)
    pthr = np.quantile(P, SPARSITY_GRID, overwrite_input=True).tolist()
    return {"perm": perm, "thresholds": {"gate": thr, "lowrank": pthr}, "A": A, "B": Bm,
            "frequency": freq[perm]}


def ffn_inputs(source, cfg, sequences: np.ndarray):
    """Yield (layer, X (N, d), gate, up, down) with X the FFN inputs of the dense model (float32
    from the source) on calibration `sequences`, one layer at a time (calibrate.py's scheme)."""
    from .calibrate import f32_linear
    from .model import LAYER_TENSORS, Layer, Transformer, Weights
    n_seq, seq_len = sequences.shape
    chunk = 64
    tf = Transformer(cfg, Weights({"model.embed_tokens.weight": None}, cfg), context=seq_len, chunk=chunk,
                     layers=[None] * cfg.num_layers)
    hidden = source.read("model.embed_tokens.weight")[sequences]
    available = set(source.tensor_names())
    for i in range(cfg.num_layers):
        names = {f: f"model.layers.{i}.{n}" for f, n in LAYER_TENSORS.items()}
        w = {f: source.read(n) for f, n in names.items() if n in available}
        if any(f in w for f in ("gate_bias", "up_bias", "down_bias")):
            raise UnsupportedModelError("the flash layout does not store FFN biases yet")
        loaded = {f: f32_linear(v) if v.ndim == 2 else v for f, v in w.items()}
        layer = Layer(**{f: loaded.get(f) for f in LAYER_TENSORS})
        gate, up, down = w["gate"], w["up"], w["down"]
        seen = []

        def record(ops, L, xb, h, gate=gate, up=up, down=down, seen=seen):
            seen.append(xb.copy())
            g = xb @ gate.T
            h += ((g / (1.0 + np.exp(-g)) * (xb @ up.T)) @ down.T).astype(np.float32)

        layer.ffn = record
        tf.layers[i] = layer
        for s in range(n_seq):
            for c in range(0, seq_len, chunk):
                tf.block(i, hidden[s, c:c + chunk], c)
        tf.layers[i] = None
        yield i, np.concatenate(seen), gate, up, down


def write_flash(source, cfg, meta, writer, rule: dict, calib_text: str | None = None,
                calib_tokens: int = CALIB_TOKENS, progress=None) -> tuple[dict, int, int]:
    """Write every layer's bundles, permutation and predictor (pack --layout flash); returns the
    manifest's "flash" section, the FFN parameter count and the bytes written."""
    if rule["codec"] != "dense":
        raise UnsupportedModelError(f"--layout flash stores dense FFN weights for now, not {rule['codec']}")
    from .calibrate import source_calibration_sequences
    dtype = rule["params"]["dtype"]
    seq_len = CALIB_SEQ_LEN
    sequences = source_calibration_sequences(meta, calib_text, calib_tokens, seq_len)
    layers, params, nbytes = [], 0, 0
    if progress is not None:
        progress(0, cfg.num_layers)
    for i, X, gate, up, down in ffn_inputs(source, cfg, sequences):
        st = layer_stats(X, gate)
        base = f"model.layers.{i}.mlp."
        arrays = {"bundles": make_bundles(gate, up, down, st["perm"], dtype), "perm": st["perm"],
                  "predictor_a": st["A"][st["perm"]].astype(np.float16).view(np.uint16),
                  "predictor_b": st["B"].astype(np.float16).view(np.uint16)}
        entry = {"thresholds": st["thresholds"]}
        for k, arr in arrays.items():
            writer.add_array(base + k.replace("_", "."), arr)
            entry[k] = base + k.replace("_", ".")
            nbytes += arr.nbytes
        layers.append(entry)
        params += gate.size + up.size + down.size
        if progress is not None:
            progress(i + 1, cfg.num_layers)
    section = {"version": 1, "codec": "dense", "dtype": dtype,          # dense bundles: unchanged since v1
               "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
               "bundle": ["gate_proj row", "up_proj row", "down_proj column"],
               "predictor_rank": min(PREDICTOR_RANK, cfg.hidden_size), "sparsity_grid": SPARSITY_GRID,
               "frequency_sparsity": FREQ_SPARSITY,
               "calibration": {"tokens": int(sequences.size), "sequence_length": seq_len,
                               "text": "bundled WikiText-2 train excerpt" if calib_text is None else "user file"},
               "layers": layers}
    return section, params, nbytes


class CalibratedFlash:
    """`pack --layout flash` when the recipe calibrates (a compressed codec anywhere): a `store`
    for calibrate.calibrate_and_store that takes the FFN tensors out of the standard pack. One
    calibration pass gives both the codec's Hessians (GPTQ) and this layout's statistics: `observe`
    keeps the first `calib_tokens` FFN inputs of each layer, and once the layer's gate, up and
    down are stored, its order, thresholds and predictor come from them (layer_stats) and the
    encoded matrices are cut into bundles by the codec (`flash_cut`; formats/flash-layout.md §
    "Compressed codecs"). The FFN matrices are encoded exactly as in a standard pack with the
    same calibration, so both packs hold the same weights. `observe` sees layer i + 1 while layer
    i is stored (on calibrate's worker thread): the inputs are kept per layer."""

    def __init__(self, cfg, writer, rule: dict, store, calibration: dict, calib_tokens: int = CALIB_TOKENS):
        self.cfg, self.writer, self.rule, self.store = cfg, writer, rule, store
        self.codec = get_codec(rule["codec"])
        if rule["codec"] != "dense":
            self.codec.flash_bundle_parts(rule["params"], cfg.hidden_size)     # refuses a codec without bundles now
        self.calibration, self.calib_tokens = calibration, calib_tokens
        self.X = {}                   # layer -> its first calib_tokens FFN input rows
        self.w, self.parts = {}, {}
        self.layers, self.params, self.nbytes, self.shared_bytes = [], 0, 0, 0

    def observe(self, layer: int, key: str, X: np.ndarray) -> None:
        kept = self.X.setdefault(layer, [])
        rows = sum(len(x) for x in kept)
        if key == "mlp_in" and rows < self.calib_tokens:
            kept.append(np.array(X[:self.calib_tokens - rows], np.float32))

    def __call__(self, name: str, w, hessian=None):
        if not is_ffn_weight(name):
            return self.store(name, w, hessian)
        field = name.rsplit(".", 2)[-2].split("_")[0]          # ...mlp.gate_proj.weight -> gate
        parts = self.codec.encode(w, self.rule["params"], hessian=hessian)
        self.parts[field] = parts
        if field == "gate" or self.rule["codec"] == "dense":    # a codec's bundles come from its parts
            self.w[field] = w
        self.params += w.size
        loaded = self.codec.load(parts, self.rule["params"])
        if len(self.parts) == 3:
            self._write_layer(int(name.split(".")[2]))
        return loaded

    def _write_layer(self, i: int) -> None:
        st = layer_stats(np.concatenate(self.X.pop(i)), self.w["gate"])
        base = f"model.layers.{i}.mlp."
        arrays = {"perm": st["perm"], "predictor_a": st["A"][st["perm"]].astype(np.float16).view(np.uint16),
                  "predictor_b": st["B"].astype(np.float16).view(np.uint16)}
        shared = {}
        if self.rule["codec"] == "dense":
            arrays["bundles"] = make_bundles(self.w["gate"], self.w["up"], self.w["down"], st["perm"],
                                             self.rule["params"]["dtype"])
        else:
            arrays["bundles"], shared = self.codec.flash_cut(self.parts["gate"], self.parts["up"], self.parts["down"],
                                                             self.rule["params"], st["perm"])
        entry = {"thresholds": st["thresholds"]}
        for k, arr in arrays.items():
            entry[k] = base + k.replace("_", ".")
            self.writer.add_array(entry[k], arr)
            self.nbytes += arr.nbytes
        if shared:
            entry["shared"] = {}
            for k, arr in shared.items():
                entry["shared"][k] = base + "flash." + k
                self.writer.add_array(entry["shared"][k], arr)
                self.nbytes += arr.nbytes
                self.shared_bytes += arr.nbytes
        self.layers.append(entry)
        self.w, self.parts = {}, {}

    def section(self) -> dict:
        """The manifest's "flash" section."""
        cfg, rule = self.cfg, self.rule
        sec = {"version": LAYOUT_VERSION, "codec": rule["codec"], "params": rule["params"]}
        if rule["codec"] == "dense":
            sec = {"version": 1, "codec": "dense", "dtype": rule["params"]["dtype"]}
        else:
            sec["bundle_parts"] = self.codec.flash_bundle_parts(rule["params"], cfg.hidden_size)
            sec["bundle_bytes"] = sum(n for _, n in sec["bundle_parts"].values())
            sec["shared_bytes"] = self.shared_bytes
        sec.update({"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                    "bundle": ["gate_proj row", "up_proj row", "down_proj column"],
                    "predictor_rank": min(PREDICTOR_RANK, cfg.hidden_size), "sparsity_grid": SPARSITY_GRID,
                    "frequency_sparsity": FREQ_SPARSITY,
                    "calibration": {**self.calibration, "tokens": min(self.calibration["tokens"], self.calib_tokens),
                                    "hessian_tokens": self.calibration["tokens"]},
                    "layers": self.layers})
        return sec

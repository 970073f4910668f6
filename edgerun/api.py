"""The Python API a desktop app embeds: load, logits, stream, generate, chat, cancel, close."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import traceback
from collections import deque
from pathlib import Path

import numpy as np
import psutil
from numba.core import event as numba_event

from . import isa, kernels
from .ebin import EbinFile
from .errors import Cancelled, EdgerunError
from .generate import Generator, Stats
from .memory import current_rss, fmt, parse_size, release_free_memory
from .bitstack_runtime import BlockStack, prefix_reader
from .model import KV_DTYPES, Transformer, Weights, load_tensor
from .plan import PREFILL_CHUNKS, plan
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .validate import check_model

DEFAULT_CONTEXT = 2048
# Texts of end-of-turn tokens used by common chat templates; generation also stops on them
# (llama.cpp does the same) because some checkpoints list only the base EOS in their config.
END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
# `--ram auto` leaves this much of the memory available now to the rest of the system.
AUTO_HEADROOM_FRACTION = 0.10
AUTO_HEADROOM_MIN = 256 * 2**20


def auto_budget() -> int:
    """`--ram auto`: what this process holds now plus what is available, less headroom."""
    vm = psutil.virtual_memory()
    return current_rss() + max(0, vm.available - max(AUTO_HEADROOM_MIN, int(vm.total * AUTO_HEADROOM_FRACTION)))


def load(path, ram=None, context: int | None = None, threads: int | None = None, verbose: bool = False,
         on_progress=None, log=None, stream: str | None = None, criterion: str | None = None,
         device: str = "auto", gpu_layers="all", vram=None, kv_dtype: str = "f16") -> "Model":
    """Open an .ebin and load it within `ram` (e.g. "1GB"; None/"auto": the memory available now).

    Packs with `--layout flash` stream their feed-forward neurons from the file when the whole
    model does not fit (`stream`: auto | resident | window | layer | naive; `criterion`: off |
    gate:S | lowrank:S, the neuron-selection rule, default off = exact).

    `device`: auto (a CUDA GPU when numba-cuda finds one, else the CPU, saying why) | cuda | cpu;
    `gpu_layers`: "all", N (the first N layers) or "auto" (as many as fit `vram`, e.g. "6GB").
    `kv_dtype`: the KV cache's type, "f16" (half the memory, as llama.cpp) or "f32" (exact)."""
    return Model(path, ram=ram, context=context, threads=threads, verbose=verbose, on_progress=on_progress, log=log,
                 stream=stream, criterion=criterion, device=device, gpu_layers=gpu_layers, vram=vram,
                 kv_dtype=kv_dtype)


# With threads, the smallest matrix of at least this many weights also warms up the parallel
# kernels: every codec splits matvecs over threads from 2^19 weights (or fewer) on.
PARALLEL_WARM_UP_WEIGHTS = 1 << 19


def warm_up_kernels(ebin, defer: bool | None = None) -> None:
    """Compile (or load from the on-disk cache) every kernel this model will run, so their memory
    is measured before planning and no compiler runs mid-generation (LLVM compiling a kernel can
    take hundreds of MiB). Each kind of matrix (codec and params) runs matvec, a few-token matmul,
    a prefill-chunk matmul and row on the model's own smallest matrix of that kind (nothing is
    encoded); with several threads also on its smallest matrix large enough for the parallel
    kernels.

    On a cold JIT cache (the single-token kernels had to be compiled) and with `defer` (default
    `kernels.DEFER_COLD_COMPILE`), only those are compiled here: a child process compiles the
    batched and parallel ones into the cache while this one generates on the serial kernels
    (kernels.py, "Cold JIT cache"); their code, loaded later, is then not part of the measured
    runtime memory (not measured how much; the compiler's own peak is in the child)."""
    kernels.wait_full_kernels()             # another model's child first
    defer = kernels.DEFER_COLD_COMPILE if defer is None else defer
    with numba_event.install_recorder("numba:compile") as compiled:
        _warm_up(ebin, batched=False)
    if not (defer and compiled.buffer):
        # hand back what the first phase's matrices freed before the second loads its own (the
        # peak: spqr4.ebin's warm-up 204 -> 172 MiB)
        release_free_memory()
        _warm_up(ebin, batched=True)
        return
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys, edgerun.api as a; a._warm_up_file(sys.argv[1], int(sys.argv[2]))",
             str(ebin.path), str(kernels.get_threads())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    except OSError:
        _warm_up(ebin, batched=True)
        return
    # when the child is done, each of its kernels loads from the cache at its first call here (or
    # compiles, with the real error if there is one, when the child failed). Not by running the
    # warm-up again: mid-generation that read the pack's smallest matrix of each kind and a
    # prefill chunk's output outside the plan (a 1.5B pack's 147 MiB head: --ram 800MB peaked
    # at 955 MiB, BENCHMARKS.md)
    kernels.defer_full_kernels(child, lambda: None)


def _warm_up_file(path, threads: int) -> None:
    """The batched and parallel kernels of the pack at `path` (the child of warm_up_kernels)."""
    kernels.set_threads(threads)
    with EbinFile(path) as ebin:
        _warm_up(ebin, batched=True)


def _warm_up(ebin, batched: bool) -> None:
    # batched=False: what the first token needs (serial matvec and row); True: the prefill matmul
    # (T >= 4), the layer ops and, with threads, the parallel kernels
    manifest = ebin.manifest
    tensors = manifest["tensors"]
    # an embedding that is not also the output head is only looked up by rows: its matvec and
    # matmul never run (warming them on a 1.5B model's 151936-row embedding took 1.6 s of its load)
    lookup_only = {"model.embed_tokens.weight"} if "lm_head.weight" in tensors else set()
    kinds: dict[str, list] = {}
    for name, entry in tensors.items():
        if len(entry["shape"]) == 2:
            key = entry["codec"] + json.dumps([entry["params"], "rotation" in entry], sort_keys=True)
            kinds.setdefault(key, []).append((name, entry))
    rng = np.random.default_rng(0)
    parallel = batched and kernels.get_threads() > 1
    for named in kinds.values():
        rows_only = all(name in lookup_only for name, _ in named)
        if rows_only and batched:
            continue
        entries = sorted((e for _, e in named), key=lambda e: e["shape"][0] * e["shape"][1])
        picks = [entries[0]]
        if parallel:
            big = [e for e in entries if e["shape"][0] * e["shape"][1] >= PARALLEL_WARM_UP_WEIGHTS]
            picks += [e for e in (big[:1] if big else entries[-1:]) if e is not entries[0]]
        for entry in picks:
            w = load_tensor(entry, {p: ebin.read(a) for p, a in entry["parts"].items()})
            d, n = entry["shape"]
            x = rng.standard_normal((PREFILL_CHUNKS[-1], n), dtype=np.float32)
            out = np.empty((PREFILL_CHUNKS[-1], d), np.float32)
            if batched:
                w.matvec(x[0], out[0])
                w.matmul(x[:8], out[:8])            # a prefill chunk: the batched kernel
                w.matmul(x, out)
            else:
                if not rows_only:
                    w._matvec(x[0], out[0], 1)
                w.row(0, x[0])
            del w
    if "flash" in manifest and not batched:
        from . import streaming
        streaming.warm_up(manifest)
    # the ops every layer runs (with threads, also the parallel attention of long prefills): not
    # first-token kernels, the model runs their NumPy stand-ins until they are ready
    # (kernels.NumpyLayerOps), so on a cold cache the child compiles them
    H, D = 8, 64
    for T in ((1, 64) if parallel else (1,) if batched else ()):
        x = rng.standard_normal((T, H, D), dtype=np.float32)
        kernels.rmsnorm_rows(x.reshape(T * H, D), np.ones(D, np.float32), 1e-5, x.reshape(T * H, D))
        cos, sin = kernels.rope_tables(D, T, 10000.0, None)
        kernels.rope(x, 0, cos, sin)
        cache = np.zeros((H, T, D), np.uint16)       # the model's f16 KV cache, as bits
        kernels.attention(x, cache, cache, 0, np.empty_like(x), np.empty((H, T), np.float32))
        # the FFN calls it on (T, ffn) arrays: wide enough that a chunk's rows go to the threads
        ffn = rng.standard_normal((T, max(H * D, -(-kernels.SILU_PAR_MIN // T))), dtype=np.float32)
        kernels.silu_mul(ffn, ffn, np.empty_like(ffn))


def stack_quality(order, n: int) -> str:
    """The pack's measured perplexity at the nearest size on its size/quality curve, if any."""
    if not order.curve:
        return ""
    size = order.weight_bytes(n)
    nearest = min(order.curve, key=lambda point: abs(point[0] - size))
    return f"; calibration perplexity ≈ {nearest[1]:.1f} at this size"


def stop_ids(tokenizer) -> list[int]:
    """Every token that ends generation: the model's EOS ids and the end-of-turn tokens it has."""
    return sorted(set(tokenizer.eos_token_ids) | {tokenizer.token_to_id(t) for t in END_OF_TURN_TEXTS} - {None})


def tokenizer_from_manifest(manifest: dict) -> Tokenizer:
    t = manifest["tokenizer"]
    return Tokenizer(t["json"], bos_token_id=t.get("bos_token_id"), eos_token_ids=t.get("eos_token_ids") or [],
                     add_bos_token=t.get("add_bos_token", False), chat_template=t.get("chat_template"),
                     special_tokens=t.get("special_tokens"))


def measure_runtime(ebin) -> int:
    """The process's RSS once every kernel `ebin` needs is compiled (or loaded from the JIT cache)
    and the compiler's leftovers are released: the runtime's part of the plan (edgerun/plan.py)."""
    warm_up_kernels(ebin)
    release_free_memory()       # what the tokenizer's and the compiler's work left behind
    return current_rss()


class Model:
    """A loaded model. One generation runs at a time: calls from several threads are served in
    the order they arrive (FIFO), never interleaved; see `_Turns`."""

    def __init__(self, path, ram=None, context=None, threads=None, verbose=False, on_progress=None, log=None,
                 stream=None, criterion=None, device="auto", gpu_layers="all", vram=None, kv_dtype="f16"):
        self.path = Path(path)
        log = log or (lambda msg: None)
        self._turns = _Turns()
        self._closed = threading.Event()
        self._active: threading.Event | None = None     # cancel flag of the running generation
        self._local = threading.local()                  # per-thread last Stats
        self._last_stats = Stats()
        report = _Progress(on_progress)
        try:
            report(0.0)
            with EbinFile(self.path) as ebin:
                manifest = ebin.manifest
                self.config = check_model(ebin)          # every field, every shape, before any kernel
                self.tokenizer = tokenizer_from_manifest(manifest)
                self.generation_defaults = manifest.get("generation", {})
                self.manifest = {k: v for k, v in manifest.items() if k != "tokenizer"}
                self.context = self._context(context)
                self.ram_auto = ram in (None, "auto")
                kernels.set_threads(threads or kernels.default_threads())
                if verbose:
                    log(f"CPU: {isa.target().describe()}, {kernels.get_threads()} threads")
                if kv_dtype not in KV_DTYPES:
                    raise EdgerunError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
                placed = self._device(device, manifest, log, verbose)
                runtime = measure_runtime(ebin)
                self.budget = auto_budget() if self.ram_auto else parse_size(ram)
                self.plan = p = plan(manifest, self.budget, self.context, runtime, kv_dtype=kv_dtype,
                                     stream=stream, criterion=criterion,
                                     threads=max(2, kernels.get_threads()), device=placed, gpu_layers=gpu_layers,
                                     vram=self._vram(placed, gpu_layers, vram))
                self._log_plan(p, log, verbose)
                read_parts = None if p.order is None else prefix_reader(ebin, p.order, p.blocks)
                weights = Weights.from_ebin(ebin, self.config, progress=lambda done, total: report(done / total),
                                            read_parts=read_parts, total=p.weights - p.ffn_bytes,
                                            mapped=p.mapped)
                self._stack = None if p.order is None else BlockStack(
                    p.order, manifest, {name: weights[name] for name in p.order.stacked}, p.blocks)
            self.weight_bytes = weights.nbytes
            self.stream_plan, ffns = p.ffn, None
            if p.ffn is not None:
                from . import streaming
                ffns = streaming.flash_ffns(self.path, manifest, p.ffn)
            self._transformer = Transformer(self.config, weights, self.context, p.chunk, kv_dtype=kv_dtype,
                                            ffns=ffns, gpu=p.gpu)
            del weights, ffns
            self.device = "cuda" if p.gpu is not None else "cpu"
            if p.gpu is not None:
                log(f"CUDA: {p.gpu.layers}/{self.config.num_layers} layers{' + output head' if p.gpu.head else ''} "
                    f"on the device, {fmt(p.gpu.device_bytes)} of device memory (compressed weights, KV cache, "
                    "scratch)")
            del manifest, ebin          # the parsed manifest (the tokenizer JSON is ~2 MB of it)
            release_free_memory()
            report(1.0)
        except Cancelled as e:
            # The traceback's frames hold the tensors read so far; clear them so the memory is
            # returned now, not whenever the caller drops the exception.
            traceback.clear_frames(e.__traceback__)
            self._transformer = None
            gc.collect()
            release_free_memory()
            raise Cancelled("loading was cancelled by on_progress") from None
        self._generator = Generator(self._transformer)
        self.stop_ids = stop_ids(self.tokenizer)

    @staticmethod
    def _device(device, manifest, log, verbose) -> str:
        """The device the plan places layers on: cpu | cuda ("cuda" without one raises CudaError)."""
        from . import cuda as ecuda
        placed, why = ecuda.resolve_device(device)
        if placed == "cuda" and device == "auto" and manifest.get("flash"):
            placed, why = "cpu", "running on the CPU: flash-layout packs stream their feed-forward there"
        if placed == "cuda" and device == "auto" and any("rotation" in e for e in manifest["tensors"].values()):
            placed, why = "cpu", "running on the CPU: rotated matrices (pack --rotate) have no CUDA kernels yet"
        if placed == "cpu" and device == "auto" and verbose:
            log(why)
        return placed

    @staticmethod
    def _vram(placed, gpu_layers, vram) -> int | None:
        """The device bytes the plan may fill: --vram, else for -ngl auto the device's free memory."""
        if vram:
            return parse_size(vram)
        if placed == "cuda" and str(gpu_layers).lower() == "auto":
            from . import cuda as ecuda
            return ecuda.device_free_bytes()
        return None

    def _log_plan(self, p, log, verbose) -> None:
        if p.order is not None:
            log(f"BitStack: {p.blocks} of {p.order.total} blocks fit ({fmt(p.order.weight_bytes(p.blocks))} of "
                f"weights; all blocks: {fmt(p.order.weight_bytes(p.order.total))})" + stack_quality(p.order, p.blocks))
        if p.ffn is not None:
            log("feed-forward: " + ("resident" if p.ffn.mode == "resident" else
                                    f"streamed from {self.path.name} ({p.ffn.mode})"))
        if verbose:
            log("memory plan:\n" + "\n".join(p.lines()))

    # --- BitStack: a model whose size follows free RAM ----------------------------------------
    def resize(self, ram=None, weights=None) -> int:
        """Grow or shrink a BitStack model in place: to a whole-process budget `ram` (as --ram;
        "auto" sizes from the memory available now) or to `weights` bytes of weights. Returns the
        bytes of weights now held. The conversation (KV cache) is kept."""
        if self._stack is None:
            raise EdgerunError("only BitStack models (edgerun pack --codec bitstack) can be resized")
        order = self._stack.order
        other = self.plan.total - order.weight_bytes(self.plan.blocks)
        if weights is not None:
            target = parse_size(weights)
        elif ram in (None, "auto"):
            # what we hold now plus what is free beyond the headroom; when even the smallest size
            # is more than that, shrink to the smallest (best effort: the memory is short)
            vm = psutil.virtual_memory()
            target = self._stack.weight_bytes + vm.available - max(AUTO_HEADROOM_MIN,
                                                                   int(vm.total * AUTO_HEADROOM_FRACTION))
            target = max(target, order.weight_bytes(order.minimum))
        else:
            self.budget = parse_size(ram)
            target = self.budget - other
        order.check(target, other)
        with self._turn(None):
            with EbinFile(self.path) as ebin:
                self._stack.resize(ebin, order.prefix_for(target))
            release_free_memory()
            self.plan.blocks = self._stack.loaded
            self.weight_bytes = self._stack.weight_bytes
        return self.weight_bytes

    @property
    def blocks(self) -> tuple[int, int] | None:
        """(loaded, total) BitStack blocks, or None for other models."""
        return None if self._stack is None else (self._stack.loaded, self._stack.order.total)

    def _context(self, requested):
        limit = self.config.max_position_embeddings
        if requested is None:
            return min(DEFAULT_CONTEXT, limit)
        if requested < 16:
            raise EdgerunError(f"context -c {requested} is too small (minimum 16)")
        if requested > limit:
            raise EdgerunError(f"context -c {requested} exceeds the model's trained context {limit}")
        if self.config.sliding_window and requested > self.config.sliding_window:
            raise EdgerunError(f"context -c {requested} exceeds the model's sliding window "
                               f"{self.config.sliding_window}, which edgerun does not implement yet")
        return requested

    # --- inference -----------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """float32 [len(ids), vocab] for a fresh sequence; the conversation cache is reset."""
        ids = [int(i) for i in ids]
        if not ids or len(ids) > self.context:
            raise EdgerunError(f"logits needs 1..{self.context} tokens, got {len(ids)}")
        with self._turn(None):
            self._generator.reset()
            return self._transformer.forward(ids, 0, all_logits=True)

    def stream_tokens(self, ids, max_tokens=256, cancel=None, **sampling):
        """Yield generated token ids for prompt `ids` (list of ints). `cancel` (a
        threading.Event) stops it within one layer's work, also while it waits its turn."""
        params = SamplingParams.from_generation_config(self.generation_defaults, **sampling)
        ids = list(ids)
        mine = threading.Event()
        try:
            turn = self._turn(cancel)
        except Cancelled:                    # cancelled while waiting for another generation
            self._set_stats(Stats(finish_reason="cancelled"))
            return
        with turn:
            self._active = mine
            generator = self._generator
            streamed = self.stream_plan.stats if self.plan.streams else None    # FFN reads (flash packs)
            before = streamed.copy() if streamed is not None else None
            try:
                for token in generator.tokens(ids, params, max_tokens, self.stop_ids,
                                              _AnyEvent(mine, cancel, self._closed)):
                    self._turns.suspended = True       # the caller holds the stream between tokens
                    yield token
                    self._turns.suspended = False
            finally:
                self._turns.suspended = False
                self._active = None
                if streamed is not None:
                    generator.stats.streamed = streamed.since(before)
                self._set_stats(generator.stats)

    def stream(self, prompt: str, max_tokens: int = 256, cancel=None, **sampling):
        """Yield text pieces of the continuation of `prompt` (encoded with the tokenizer's BOS rule)."""
        yield from self._stream_ids(self.tokenizer.encode(prompt), max_tokens, cancel, sampling)

    def generate(self, prompt: str, max_tokens: int = 256, cancel=None, **sampling) -> str:
        return "".join(self.stream(prompt, max_tokens=max_tokens, cancel=cancel, **sampling))

    def chat(self, messages, stream: bool = False, max_tokens: int = 512, cancel=None, **sampling):
        """Reply to an OpenAI/HF-style message list using the model's chat template."""
        pieces = self._stream_ids(self.tokenizer.encode_chat(messages), max_tokens, cancel, sampling)
        return pieces if stream else "".join(pieces)

    def _stream_ids(self, ids, max_tokens, cancel, sampling):
        decoder = self.tokenizer.stream_decoder()
        for token in self.stream_tokens(ids, max_tokens, cancel, **sampling):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    @property
    def stats(self) -> Stats:
        """Statistics of the calling thread's last generation (if it ran none: the model's last)."""
        return getattr(self._local, "stats", None) or self._last_stats

    def _set_stats(self, stats: Stats) -> None:
        self._local.stats = self._last_stats = stats

    def reset(self) -> None:
        """Forget the cached conversation prefix."""
        with self._turn(None):
            self._generator.reset()

    def cancel(self) -> None:
        """Stop the generation running now (from any thread) within one layer's work. To stop a
        particular request without racing its start, pass it a `cancel=threading.Event()`."""
        active = self._active
        if active is not None:
            active.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _turn(self, cancel):
        """Wait (FIFO) for the model; a context manager holding it. Raises if closed or busy."""
        if self._closed.is_set():
            raise EdgerunError("the model is closed")
        if self._turns.owner == threading.get_ident():
            # waiting would deadlock: only this thread can finish its own open stream
            raise EdgerunError("model is busy: this thread is still iterating another stream of this "
                               "model; exhaust it or call its close() first")
        if not self._turns.acquire(_AnyEvent(cancel, self._closed)):
            if self._closed.is_set():
                raise EdgerunError("the model is closed")
            raise Cancelled("cancelled while waiting for the model")
        return self._turns

    # --- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Release the weights, KV cache and buffers. A running generation stops (within one
        layer's work) first; later calls raise EdgerunError. Safe to call twice."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._turns.wait_idle()
        t, self._transformer, self._generator = self._transformer, None, None
        if self.stream_plan is not None and self.stream_plan.reader is not None:
            self.stream_plan.reader.close()         # its thread pool and file descriptor
        if t is not None:
            # a stream the caller left open still references the transformer: empty it so the
            # arrays are freed now (that stream ends at its next step: the closed flag is set)
            t.release()
            del t
        release_free_memory()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Turns:
    """A FIFO lock over the model with a polled abort: generations run one at a time in arrival
    order. `suspended` is True while the holder is a stream paused between tokens in its caller."""

    def __init__(self):
        self._cv = threading.Condition()
        self._queue: deque = deque()
        self.owner: int | None = None
        self.suspended = False

    def acquire(self, abort) -> bool:
        ticket = object()
        with self._cv:
            self._queue.append(ticket)
            while self.owner is not None or self._queue[0] is not ticket:
                if abort.is_set():
                    self._queue.remove(ticket)
                    self._cv.notify_all()
                    return False
                self._cv.wait(0.02)       # events cannot notify this condition: poll the abort
            self._queue.popleft()
            self.owner = threading.get_ident()
            return True

    def release(self) -> None:
        with self._cv:
            self.owner = None
            self._cv.notify_all()

    def wait_idle(self) -> None:
        """Until no call runs (a stream paused in its caller counts as idle)."""
        with self._cv:
            while self.owner is not None and not self.suspended:
                self._cv.wait(0.01)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class _Progress:
    """Calls on_progress(fraction) with increasing values ending at 1.0; False from it cancels."""

    def __init__(self, callback):
        self.callback, self.last = callback, -1.0

    def __call__(self, fraction: float) -> None:
        fraction = min(1.0, max(0.0, fraction))
        if self.callback is None or fraction <= self.last:
            return
        self.last = fraction
        if self.callback(fraction) is False:
            raise Cancelled("loading was cancelled by on_progress")


class _AnyEvent:
    """Set when any of the given events (None ignored) is set."""

    def __init__(self, *events):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)

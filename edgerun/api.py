"""The Python API a desktop app embeds: load, logits, stream, generate, chat, cancel, close."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import psutil

from . import kernels
from .codecs import get_codec
from .config import ModelConfig
from .ebin import EbinFile
from .errors import Cancelled, EdgerunError
from .generate import Generator, Stats
from .memory import MemoryPlan, current_rss, parse_size
from .model import RunState, Transformer, Weights
from .sampling import SamplingParams
from .tokenizer import Tokenizer

DEFAULT_CONTEXT = 2048
PREFILL_CHUNK = 64
# Texts of end-of-turn tokens used by common chat templates; generation also stops on them
# (llama.cpp does the same) because some checkpoints list only the base EOS in their config.
END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def load(path, ram=None, context: int | None = None, threads: int | None = None, verbose: bool = False,
         on_progress=None, log=None) -> "Model":
    """Open an .ebin and load it within `ram` (e.g. "1GB"; None: the memory available now)."""
    return Model(path, ram=ram, context=context, threads=threads, verbose=verbose, on_progress=on_progress, log=log)


def warm_up_kernels(manifest: dict) -> None:
    """Compile (or load from the on-disk cache) every kernel this model uses, on tiny inputs,
    so the memory they take is measured before planning and the first token is not slowed."""
    rng = np.random.default_rng(0)
    seen = set()
    for entry in manifest["tensors"].values():
        key = (entry["codec"], str(sorted(entry["params"].items())), len(entry["shape"]))
        if key in seen or len(entry["shape"]) != 2:
            continue
        seen.add(key)
        codec = get_codec(entry["codec"])
        w = codec.load(codec.encode(rng.standard_normal((32, 64), dtype=np.float32), entry["params"]), entry["params"])
        x = rng.standard_normal((2, 64), dtype=np.float32)
        out = np.empty((2, 32), np.float32)
        w.matvec(x[0], out[0])
        w.matmul(x, out)
        w.row(0, x[0])
    # the ops every model runs, at a decode (T=1) and a prefill (T=2) shape
    for T in (1, 2):
        x = rng.standard_normal((T, 2, 8), dtype=np.float32)
        kernels.rmsnorm_rows(x.reshape(T * 2, 8), np.ones(8, np.float32), 1e-5, x.reshape(T * 2, 8))
        cos, sin = kernels.rope_tables(8, 4, 10000.0, None)
        kernels.rope(x, np.arange(T, dtype=np.int64), cos, sin)
        cache = np.zeros((1, 4, 8), np.float32)
        kernels.attention(x, cache, cache, 0, np.empty_like(x))
        kernels.silu_mul(x, x, np.empty_like(x))


def tokenizer_from_manifest(manifest: dict) -> Tokenizer:
    t = manifest["tokenizer"]
    return Tokenizer(t["json"], bos_token_id=t.get("bos_token_id"), eos_token_ids=t.get("eos_token_ids") or [],
                     add_bos_token=t.get("add_bos_token", False), chat_template=t.get("chat_template"),
                     special_tokens=t.get("special_tokens"))


def plan_memory(ebin, cfg: ModelConfig, context: int, budget: int | None) -> MemoryPlan:
    """What loading `ebin` at `context` will take; the runtime's own part is measured after the
    kernels it needs are compiled (or loaded from the JIT cache)."""
    warm_up_kernels(ebin.manifest)
    tensors = ebin.manifest["tensors"].values()
    weight_bytes = sum(ebin.arrays[a].length for e in tensors for a in e["parts"].values())
    scratch, kv = RunState.nbytes(cfg, context, PREFILL_CHUNK)
    return MemoryPlan(runtime=current_rss(), weights=weight_bytes, kv_cache=kv, scratch=scratch,
                      context=context, budget=budget)


class Model:
    def __init__(self, path, ram=None, context=None, threads=None, verbose=False, on_progress=None, log=None):
        self.path = Path(path)
        log = log or (lambda msg: None)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        with EbinFile(self.path) as ebin:
            manifest = ebin.manifest
            self.config = ModelConfig.from_dict(manifest["config"])
            self.tokenizer = tokenizer_from_manifest(manifest)
            self.generation_defaults = manifest.get("generation", {})
            self.manifest = {k: v for k, v in manifest.items() if k != "tokenizer"}
            self.context = self._context(context)
            self.budget = psutil.virtual_memory().available if ram in (None, "auto") else parse_size(ram)
            if threads:
                kernels.set_threads(threads)
            self.plan = plan_memory(ebin, self.config, self.context, self.budget)
            if verbose:
                log("memory plan:\n" + "\n".join(self.plan.lines()))
            self.plan.check()
            cancel = self._cancel

            def progress(done, total):
                if on_progress is not None and on_progress(done / total) is False:
                    cancel.set()
                if cancel.is_set():
                    raise Cancelled("loading was cancelled")

            self._cancel.clear()
            weights = Weights.from_ebin(ebin, self.config, progress=progress)
        self.weight_bytes = weights.nbytes
        self._transformer = Transformer(self.config, weights, self.context, PREFILL_CHUNK)
        self._generator = Generator(self._transformer)
        self.stop_ids = sorted(set(self.tokenizer.eos_token_ids) | {self.tokenizer.token_to_id(t) for t in END_OF_TURN_TEXTS} - {None})

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
        with self._acquire():
            self._generator.reset()
            return self._transformer.forward(ids, 0, all_logits=True)

    def stream_tokens(self, ids, max_tokens=256, cancel=None, **sampling):
        """Yield generated token ids for prompt `ids` (list of ints)."""
        params = SamplingParams.from_generation_config(self.generation_defaults, **sampling)
        with self._acquire():
            self._cancel.clear()
            stop = _AnyEvent(self._cancel, cancel)
            yield from self._generator.tokens(list(ids), params, max_tokens, self.stop_ids, stop)

    def stream(self, prompt: str, max_tokens: int = 256, cancel=None, **sampling):
        """Yield text pieces of the continuation of `prompt` (encoded with the tokenizer's BOS rule)."""
        yield from self._stream_ids(self.tokenizer.encode(prompt), max_tokens, cancel, sampling)

    def generate(self, prompt: str, max_tokens: int = 256, **kwargs) -> str:
        return "".join(self.stream(prompt, max_tokens=max_tokens, **kwargs))

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
        """Statistics of the last generation."""
        return self._generator.stats

    def reset(self) -> None:
        """Forget the cached conversation prefix."""
        self._generator.reset()

    def cancel(self) -> None:
        """Stop the running generation (from any thread) within one layer's work."""
        self._cancel.set()

    def _acquire(self):
        if self._transformer is None:
            raise EdgerunError("the model is closed")
        return self._lock

    # --- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Release the weights and buffers."""
        self._cancel.set()
        with self._lock:
            self._transformer = None
            self._generator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _AnyEvent:
    """Set when either the model's own cancel flag or the caller's token is set."""

    def __init__(self, *events):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)

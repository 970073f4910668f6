"""The generation loop: prefill (reusing the KV cache of a shared prefix), sample, decode,
stop on end-of-generation tokens, the context limit, or a cancel request."""
from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import Cancelled, EdgerunError
from .sampling import Sampler, SamplingParams


@dataclass
class Stats:
    prompt_tokens: int = 0          # tokens actually run through prefill (after prefix reuse)
    reused_tokens: int = 0          # prompt tokens whose KV cache was kept from the previous call
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    decode_steps: int = 0            # one-token forward passes timed in generate_seconds
    first_token_seconds: float = 0.0   # from the call to the first sampled token
    finish_reason: str = ""          # stop | length | cancelled
    streamed: object = None          # streaming.FlashStats of this call's FFN reads (packs that stream)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tps(self) -> float:
        return self.decode_steps / self.generate_seconds if self.generate_seconds else 0.0


class Generator:
    """Owns the KV cache's contents: `cached` lists the tokens whose keys/values it holds."""

    def __init__(self, transformer):
        self.model = transformer
        self.cached: list[int] = []
        self.stats = Stats()

    def reset(self) -> None:
        self.cached = []

    def tokens(self, prompt: list[int], params: SamplingParams, max_tokens: int, stop_ids, cancel=None):
        """Yield sampled token ids; `self.stats` describes the run when the iterator ends."""
        context = self.model.context
        if not prompt:
            raise EdgerunError("the prompt is empty")
        if len(prompt) >= context:
            raise EdgerunError(f"the prompt has {len(prompt)} tokens but the context holds {context}: "
                               "shorten it, clear the conversation, or raise -c")
        stats = self.stats = Stats()
        start = time.perf_counter()
        keep = 0
        for a, b in zip(self.cached, prompt[:-1]):     # always run at least the last prompt token
            if a != b:
                break
            keep += 1
        self.cached = prompt[:keep]
        stats.reused_tokens, stats.prompt_tokens = keep, len(prompt) - keep
        try:
            logits = self.model.forward(prompt[keep:], keep, cancel=cancel)
        except Cancelled:
            # the KV cache past `keep` is partly written: `cached` already excludes it
            stats.finish_reason = "cancelled"
            stats.prompt_seconds = time.perf_counter() - start
            return
        self.cached = list(prompt)
        stats.prompt_seconds = time.perf_counter() - start
        sampler = Sampler(params, logits.shape[0])
        history = list(prompt)
        stop_ids = set(stop_ids)
        decode_start = time.perf_counter()
        while True:
            token = sampler.sample(logits, history)
            if stats.generated_tokens == 0:
                stats.first_token_seconds = time.perf_counter() - start
                decode_start = time.perf_counter()
            if token in stop_ids:
                stats.finish_reason = "stop"
                break
            stats.generated_tokens += 1
            history.append(token)
            try:
                yield token
            except GeneratorExit:       # the caller stopped iterating (closed the stream)
                stats.finish_reason = "cancelled"
                stats.generate_seconds = time.perf_counter() - decode_start
                raise
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                break
            if stats.generated_tokens >= max_tokens or len(self.cached) + 1 >= context:
                stats.finish_reason = "length"
                break
            try:
                # the check between layers bounds cancel latency by one layer here too
                logits = self.model.forward([token], len(self.cached), cancel=cancel)
            except Cancelled:
                stats.finish_reason = "cancelled"
                break
            self.cached.append(token)
            stats.decode_steps += 1
        stats.generate_seconds = time.perf_counter() - decode_start

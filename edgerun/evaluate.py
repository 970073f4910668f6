"""Perplexity under one fixed protocol, so packs and llama.cpp types compare on the same windows.

Protocol (the one llama.cpp's `perplexity` tool uses):
- the whole text is tokenized once, without special tokens;
- it is cut into consecutive, non-overlapping windows of `context` tokens (the remainder is
  dropped); `max_windows` keeps only the first windows;
- when the tokenizer adds BOS to a plain prompt, the first token of every window is replaced by BOS;
- each window is evaluated from scratch; only the second half is scored: the negative
  log-likelihood of token j+1 given tokens 0..j, for j = context/2 .. context-2;
- perplexity = exp(mean NLL over all scored tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import EdgerunError


@dataclass
class Perplexity:
    ppl: float
    nll: float
    stderr: float          # standard error of the mean NLL
    windows: int
    scored_tokens: int
    context: int

    def __str__(self):
        return (f"perplexity {self.ppl:.4f} (NLL {self.nll:.4f} ± {self.stderr:.4f}) over {self.scored_tokens} tokens "
                f"in {self.windows} windows of {self.context}")


def windows(tokenizer, text: str, context: int, max_windows: int | None = None) -> np.ndarray:
    """(n, context) token ids of the protocol's windows."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = len(ids) // context
    if max_windows:
        n = min(n, max_windows)
    if n < 1:
        raise EdgerunError(f"the text has {len(ids)} tokens; at least one window of {context} is needed")
    out = np.asarray(ids[:n * context], dtype=np.int64).reshape(n, context)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer.encode("a")[:1] == [bos]:      # the tokenizer adds BOS to prompts
        out[:, 0] = bos
    return out


def window_nll(logits: np.ndarray, window: np.ndarray) -> np.ndarray:
    """NLL of the scored (second-half) tokens of one window, from its (context, vocab) logits."""
    first = len(window) // 2
    scored = logits[first:-1].astype(np.float64)
    targets = window[first + 1:]
    top = scored.max(axis=1, keepdims=True)
    logz = np.log(np.exp(scored - top).sum(axis=1)) + top[:, 0]
    return logz - scored[np.arange(len(targets)), targets]


def perplexity(logits_fn, token_windows: np.ndarray, progress=None) -> Perplexity:
    """`logits_fn(ids) -> (len, vocab)` for a fresh sequence (edgerun's `m.logits`, or llama.cpp's)."""
    nlls = []
    for i, window in enumerate(token_windows):
        nlls.append(window_nll(logits_fn(window.tolist()), window))
        if progress is not None:
            progress(i + 1, len(token_windows))
    nll = np.concatenate(nlls)
    mean = float(nll.mean())
    return Perplexity(ppl=math.exp(mean), nll=mean, stderr=float(nll.std() / math.sqrt(len(nll))),
                      windows=len(token_windows), scored_tokens=len(nll), context=token_windows.shape[1])

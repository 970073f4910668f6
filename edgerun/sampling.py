"""Token sampling with llama.cpp's common sampler chain.

Order (llama.cpp `common/sampling.cpp`): repetition penalty -> top-k -> top-p -> min-p ->
temperature -> softmax -> draw; temperature <= 0 means greedy argmax after the penalty. The
filters see temperature-1 probabilities, as in llama.cpp (HF applies temperature first).
The repetition penalty is CTRL's (Keskar et al. 2019) as HF and llama.cpp implement it: over the
distinct ids among the last `repeat_last_n` tokens, positive logits are divided by the penalty
and negative ones multiplied.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import EdgerunError

# When top-k is disabled, top-p looks at the best few hundred tokens first and widens only if they
# hold less than top_p of the mass, so a full-vocabulary sort is rare (llama.cpp does the same).
_TOP_P_FIRST_WINDOW = 256


# The valid range of every user-settable sampling parameter: (integer?, low, high, low
# inclusive?, what the user is told). One table, checked by `check_sampling`, which the CLI flags,
# the server's request fields and SamplingParams all call.
SAMPLING_RANGES = {
    "temperature": (False, 0.0, None, True, "a number >= 0 (0 = greedy)"),
    "top_k": (True, 0, 2**31 - 1, True, "an integer in [0, 2147483647] (0 = off)"),
    "top_p": (False, 0.0, 1.0, False, "a number in (0, 1] (1 = off)"),
    "min_p": (False, 0.0, 1.0, True, "a number in [0, 1] (0 = off)"),
    "repeat_penalty": (False, 0.0, None, False, "a number > 0 (1 = off)"),
    "seed": (True, 0, 2**64 - 1, True, "an integer in [0, 2**64 - 1] (leave it out for a random seed)"),
}


class SamplingError(EdgerunError):
    """A sampling parameter of the wrong type or out of its range; `name` says which."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def check_sampling(name: str, value):
    """`value` as the type `name` takes (int or float), or SamplingError naming the valid range.
    Booleans, strings, NaN and infinities are refused; an integer parameter takes only integers."""
    integer, low, high, low_inclusive, valid = SAMPLING_RANGES[name]
    ok = not isinstance(value, bool) and isinstance(value, numbers.Integral if integer else numbers.Real)
    if ok:
        value = int(value) if integer else float(value)
        ok = (math.isfinite(value) and (value >= low if low_inclusive else value > low)
              and (high is None or value <= high))
    if not ok:
        raise SamplingError(name, f"{name} must be {valid}, got {value!r}")
    return value


@dataclass
class SamplingParams:
    """Sampling settings; defaults are llama.cpp's except temperature (0.7)."""
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64     # < 0: the whole history
    seed: int | None = None

    def __post_init__(self):
        for name in SAMPLING_RANGES:
            value = getattr(self, name)
            if value is not None or name != "seed":
                setattr(self, name, check_sampling(name, value))
        if isinstance(self.repeat_last_n, bool) or not isinstance(self.repeat_last_n, numbers.Integral):
            raise SamplingError("repeat_last_n", f"repeat_last_n must be an integer, got {self.repeat_last_n!r}")

    @classmethod
    def from_generation_config(cls, gen: dict | None, **overrides) -> "SamplingParams":
        """Defaults, then an HF generation_config dict, then the non-None `overrides`.
        `do_sample: false` in the config means greedy (temperature 0)."""
        params = cls()
        gen = gen if isinstance(gen, dict) else {}
        names = {f.name for f in fields(cls)}
        for key in overrides:
            if key not in names:
                raise TypeError(f"unknown sampling parameter {key!r}")
        mapping = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                   "min_p": "min_p", "repetition_penalty": "repeat_penalty"}
        values = {}
        for theirs, ours in mapping.items():
            if gen.get(theirs) is not None and overrides.get(ours) is None:
                try:
                    values[ours] = check_sampling(ours, gen[theirs])
                except SamplingError as e:
                    raise SamplingError(ours, f"the model's default sampling is invalid: {e}; "
                                              f"give {ours} explicitly") from None
        if "do_sample" in gen and gen["do_sample"] is not None and not gen["do_sample"]:
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(params, **values)


class Sampler:
    """Draws one token id from a logits vector; buffers are preallocated for `vocab_size`."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(params.seed)
        self._buf = np.empty(self.vocab_size, dtype=np.float64)  # full-vocab softmax scratch

    # -- the chain ------------------------------------------------------------------------------
    def sample(self, logits: np.ndarray, history) -> int:
        """logits float32 (V,), modified in place by the penalty; history: previous token ids."""
        logits = self._prepare(logits, history)
        if self.params.temperature <= 0:
            return int(np.argmax(logits))
        cand = self._candidates(logits)
        if cand is None:
            return self._draw_full(logits)
        idx, vals = cand
        weights = np.exp((vals - vals[0]) / self.params.temperature)
        cum = np.cumsum(weights)
        j = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(idx[min(j, len(idx) - 1)])

    def distribution(self, logits: np.ndarray, history=()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) that `sample` draws from, ids by descending probability
        (all ids when no filter is active). For tests and diagnostics; not the fast path."""
        logits = self._prepare(logits, history)
        if self.params.temperature <= 0:
            return np.array([int(np.argmax(logits))]), np.ones(1)
        cand = self._candidates(logits)
        if cand is None:
            idx = _top_sorted(logits, logits.shape[0])
            cand = idx, logits[idx].astype(np.float64)
        idx, vals = cand
        weights = np.exp((vals - vals[0]) / self.params.temperature)
        return idx, weights / weights.sum()

    def _prepare(self, logits: np.ndarray, history) -> np.ndarray:
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        if logits.shape[0] > self._buf.shape[0]:  # a model whose logits outnumber the declared vocab
            self._buf = np.empty(logits.shape[0], dtype=np.float64)
        p = self.params
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0:
            apply_repeat_penalty(logits, history, p.repeat_penalty, p.repeat_last_n)
        return logits

    def _candidates(self, logits: np.ndarray):
        """top-k -> top-p -> min-p at temperature 1: (ids, float64 logits) sorted by descending
        logit, or None when no filter is active (draw from the whole vocabulary)."""
        p = self.params
        n_vocab = logits.shape[0]
        top_k = p.top_k if 0 < p.top_k < n_vocab else 0
        use_top_p = p.top_p < 1.0
        use_min_p = p.min_p > 0.0
        if not (top_k or use_top_p or use_min_p):
            return None

        # log_z normalizes top-p's probabilities over everything still in play: the top-k set,
        # else the whole vocabulary.
        if top_k:
            idx = _top_sorted(logits, top_k)
            vals = logits[idx].astype(np.float64)
            log_z = _logsumexp(vals)
        else:
            log_z = self._full_logsumexp(logits) if use_top_p else 0.0
            idx, vals = self._pre_top_p_candidates(logits, log_z, use_top_p, use_min_p)

        if use_top_p:
            cum = np.cumsum(np.exp(vals - log_z))
            # keep through the first token where the cumulative mass reaches top_p (>= 1 token)
            n_keep = int(np.searchsorted(cum, p.top_p, side="left")) + 1
            idx, vals = idx[:n_keep], vals[:n_keep]
        if use_min_p:
            # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); vals[0] is the max
            n_keep = max(int(np.searchsorted(-vals, -(vals[0] + math.log(p.min_p)), side="right")), 1)
            idx, vals = idx[:n_keep], vals[:n_keep]
        return idx, vals

    # -- helpers --------------------------------------------------------------------------------
    def _full_logsumexp(self, logits: np.ndarray) -> float:
        buf = self._buf[:logits.shape[0]]
        mx = float(logits.max())
        np.subtract(logits, mx, out=buf)
        np.exp(buf, out=buf)
        return mx + math.log(float(buf.sum()))

    def _pre_top_p_candidates(self, logits, log_z, use_top_p, use_min_p):
        """Sorted candidates that surely contain all survivors of top-p then min-p."""
        n_vocab = logits.shape[0]
        if use_min_p:
            # min-p's threshold is relative to the max logit, which top-p always keeps.
            thr = float(logits.max()) + math.log(self.params.min_p)
            idx = np.flatnonzero(logits >= np.float64(thr))  # float64 compare: a superset of the final cut
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            # If these hold less than top_p of the mass, top-p keeps a superset of them and
            # min-p then cuts back to exactly them, so they are the answer either way.
            return idx, logits[idx].astype(np.float64)
        m = min(_TOP_P_FIRST_WINDOW, n_vocab)
        while True:
            idx = _top_sorted(logits, m)
            vals = logits[idx].astype(np.float64)
            if m == n_vocab or float(np.exp(vals - log_z).sum()) >= self.params.top_p:
                return idx, vals
            m = min(m * 4, n_vocab)

    def _draw_full(self, logits: np.ndarray) -> int:
        """Softmax over the whole vocabulary at the temperature, then one draw."""
        buf = self._buf[:logits.shape[0]]
        np.subtract(logits, float(logits.max()), out=buf)
        buf /= self.params.temperature
        np.exp(buf, out=buf)
        np.cumsum(buf, out=buf)
        j = int(np.searchsorted(buf, self.rng.random() * buf[-1], side="right"))
        return min(j, logits.shape[0] - 1)


def apply_repeat_penalty(logits: np.ndarray, history, penalty: float, last_n: int) -> None:
    """In place: logits of distinct ids among the last `last_n` (all if < 0) history ids get
    divided by `penalty` when positive, multiplied when negative."""
    hist = np.asarray(history, dtype=np.int64).reshape(-1)
    if last_n >= 0:
        hist = hist[max(len(hist) - last_n, 0):]
    hist = hist[(hist >= 0) & (hist < logits.shape[0])]
    if hist.size == 0:
        return
    ids = np.unique(hist)  # each id is penalized once, however often it repeats
    vals = logits[ids]
    logits[ids] = np.where(vals > 0, vals / penalty, vals * penalty)


def _top_sorted(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits, sorted by descending logit (ties: lower id first)."""
    n = logits.shape[0]
    idx = np.arange(n) if k >= n else np.argpartition(logits, n - k)[n - k:]
    return idx[np.lexsort((idx, -logits[idx]))]


def _logsumexp(vals: np.ndarray) -> float:
    mx = float(vals.max())
    return mx + math.log(float(np.exp(vals - mx).sum()))

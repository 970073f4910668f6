"""Sampler vs a plain NumPy reference of llama.cpp's chain (full sort, no shortcuts), and vs
transformers' RepetitionPenaltyLogitsProcessor."""
import math
import re

import numpy as np
import pytest

from edgerun.errors import EdgerunError
from edgerun.sampling import Sampler, SamplingParams, apply_repeat_penalty


def reference_distribution(logits, p: SamplingParams):
    """top-k -> top-p -> min-p at temperature 1, then softmax at the temperature; dense (V,)."""
    x = np.asarray(logits, dtype=np.float64)
    order = np.lexsort((np.arange(len(x)), -x))  # descending logit, ties by id
    if p.top_k > 0:
        order = order[:p.top_k]
    if p.top_p < 1.0:
        probs = np.exp(x[order] - x[order].max())
        probs /= probs.sum()
        cum = 0.0
        for n, q in enumerate(probs, start=1):
            cum += q
            if cum >= p.top_p:
                break
        order = order[:n]
    if p.min_p > 0.0:
        order = order[x[order] >= x[order[0]] + math.log(p.min_p)]
    out = np.zeros(len(x))
    w = np.exp((x[order] - x[order[0]]) / p.temperature)
    out[order] = w / w.sum()
    return out


def dense(sampler, logits):
    ids, probs = sampler.distribution(logits.copy())
    out = np.zeros(len(logits))
    out[ids] = probs
    return out


CONFIGS = [
    dict(top_k=5, top_p=1.0, min_p=0.0),
    dict(top_k=0, top_p=0.8, min_p=0.0),
    dict(top_k=0, top_p=1.0, min_p=0.2),
    dict(top_k=8, top_p=0.9, min_p=0.05),
    dict(top_k=0, top_p=1.0, min_p=0.0),
    dict(top_k=3, top_p=0.3, min_p=0.0),    # top-p cuts to one token
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_empirical_distribution_matches_filtered_softmax(cfg):
    # Distinct, well separated logits so no candidate sits on a filter boundary.
    logits = np.array([2.0, 1.5, 0.3, -0.4, 1.1, 0.8, -2.0, 0.05, 1.9, -1.0, 0.6, -0.2], np.float32)
    params = SamplingParams(temperature=0.9, seed=1234, **cfg)
    expected = reference_distribution(logits, params)
    sampler = Sampler(params, len(logits))
    n = 20000
    counts = np.bincount([sampler.sample(logits.copy(), []) for _ in range(n)], minlength=len(logits))
    support = expected > 0
    # exactly the right candidate set: nothing drawn outside it, everything in it drawn
    assert not counts[~support].any(), (counts, expected)
    assert (counts[support] > 0).all()
    # chi-square over the support; the bound is ~6 sigma above the mean for its degrees of freedom
    if support.sum() > 1:
        e = expected[support] * n
        chi2 = float(((counts[support] - e) ** 2 / e).sum())
        df = int(support.sum()) - 1
        assert chi2 < df + 6 * math.sqrt(2 * df) + 5, (chi2, df)
    np.testing.assert_allclose(dense(sampler, logits), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS + [dict(top_k=0, top_p=0.99, min_p=0.0), dict(top_k=40, top_p=0.95, min_p=0.05)])
def test_candidate_set_large_vocab(cfg):
    # Flat-ish logits over 5000 tokens: top-p alone needs thousands of tokens (widening path).
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(5000) * 1.5).astype(np.float32)
    params = SamplingParams(temperature=0.7, **cfg)
    got = dense(Sampler(params, len(logits)), logits)
    np.testing.assert_allclose(got, reference_distribution(logits, params), rtol=1e-6, atol=1e-12)


def test_seeded_sampling_is_deterministic():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    runs = []
    for seed in (42, 42, 43):
        s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed), 1000)
        runs.append([s.sample(logits.copy(), []) for _ in range(50)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    s = Sampler(SamplingParams(temperature=0.0, seed=0), 50000)
    for _ in range(20):
        logits = rng.standard_normal(50000).astype(np.float32)
        assert s.sample(logits.copy(), []) == int(np.argmax(logits))
    # greedy sees the penalized logits: the repeated argmax loses to the runner-up
    logits = np.array([1.0, 3.0, 2.9, -1.0], np.float32)
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.1), 4)
    assert s.sample(logits.copy(), [1]) == 2


def numpy_repeat_penalty(logits, history, penalty, last_n):
    out = logits.copy()
    window = history if last_n < 0 else history[max(len(history) - last_n, 0):]
    for tok in set(window):
        out[tok] = out[tok] / penalty if out[tok] > 0 else out[tok] * penalty
    return out


@pytest.mark.parametrize("last_n", [64, 5, -1])
def test_repeat_penalty_matches_reference(last_n):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(300).astype(np.float32) * 4
    history = list(rng.integers(0, 300, 200)) + [7, 7, 7]
    got = logits.copy()
    apply_repeat_penalty(got, history, 1.3, last_n)
    np.testing.assert_array_equal(got, numpy_repeat_penalty(logits, history, 1.3, last_n))
    assert not np.array_equal(got, logits)


def test_repeat_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(4)
    logits = rng.standard_normal(500).astype(np.float32) * 3
    history = rng.integers(0, 500, 40)
    ref = RepetitionPenaltyLogitsProcessor(1.25)(torch.tensor(history)[None], torch.tensor(logits)[None])[0].numpy()
    got = logits.copy()
    apply_repeat_penalty(got, history, 1.25, 64)  # the window covers all 40 ids, as HF does
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_from_generation_config():
    gen = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
           "min_p": None, "max_new_tokens": 100}
    p = SamplingParams.from_generation_config(gen)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty) == (0.6, 20, 0.8, 0.05, 1.05)
    p = SamplingParams.from_generation_config(gen, temperature=None, top_k=5, seed=9)
    assert (p.temperature, p.top_k, p.seed) == (0.6, 5, 9)
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.6}).temperature == 0.0
    assert SamplingParams.from_generation_config({"do_sample": False}, temperature=0.8).temperature == 0.8
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    with pytest.raises(TypeError):
        SamplingParams.from_generation_config({}, temprature=1.0)
    with pytest.raises(EdgerunError):
        SamplingParams.from_generation_config({"repetition_penalty": 0.0})


def test_fast_on_large_vocab():
    import time

    rng = np.random.default_rng(5)
    logits = rng.standard_normal(151936).astype(np.float32) * 3
    s = Sampler(SamplingParams(seed=0, repeat_penalty=1.1), 151936)
    history = list(range(64))
    t = time.perf_counter()
    for _ in range(100):
        s.sample(logits.copy(), history)
    assert (time.perf_counter() - t) / 100 < 0.01  # typically ~0.3 ms


@pytest.mark.parametrize("name, value", [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0.7"),
    ("temperature", True), ("top_k", -3), ("top_k", 1.5), ("top_k", 1e12), ("top_k", 2**40), ("top_k", "x"),
    ("top_p", 0), ("top_p", 2), ("min_p", -0.1), ("min_p", 1.5), ("repeat_penalty", 0),
    ("repeat_penalty", -1), ("seed", -1), ("seed", 2**70), ("seed", "x"), ("seed", 1.0),
])
def test_check_sampling_refuses_with_the_range(name, value):
    """The one check behind the CLI flags, the server's fields and SamplingParams."""
    from edgerun.sampling import SAMPLING_RANGES, SamplingError, check_sampling
    with pytest.raises(SamplingError, match=re.escape(SAMPLING_RANGES[name][-1])) as e:
        check_sampling(name, value)
    assert e.value.name == name
    with pytest.raises(EdgerunError):
        SamplingParams(**{name: value})


def test_check_sampling_accepts_and_normalizes():
    from edgerun.sampling import check_sampling
    assert check_sampling("temperature", 0) == 0.0 and isinstance(check_sampling("temperature", 1), float)
    assert check_sampling("top_k", np.int64(40)) == 40 and check_sampling("top_p", np.float32(0.5)) == 0.5
    assert check_sampling("min_p", 1) == 1.0 and check_sampling("seed", 2**64 - 1) == 2**64 - 1


def test_invalid_model_defaults_name_the_parameter_unless_overridden():
    with pytest.raises(EdgerunError, match="the model's default sampling is invalid: top_p"):
        SamplingParams.from_generation_config({"top_p": 0.0})
    assert SamplingParams.from_generation_config({"top_p": 0.0}, top_p=0.5).top_p == 0.5
    assert SamplingParams.from_generation_config(["not", "a", "dict"]) == SamplingParams()

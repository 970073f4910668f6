"""What the kernel benchmarks in tools/ share: SmolLM2-135M's matrix shapes, a median timer and
"one token of matvecs" (every matrix of the model once, as a real decode step runs them)."""
from __future__ import annotations

import time

import numpy as np

# one layer: q, k, v, o, gate, up, down; the output head is tied to the embedding
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
N_LAYERS = 30
LM_HEAD = (49152, 576)
TOKEN_SHAPES = LAYER * N_LAYERS + [LM_HEAD]


def median_time(fn, reps: int) -> float:
    """Median wall time of `reps` calls of fn(), in seconds."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def token_of_matvecs(lins, rng):
    """A function that runs matvec on every loaded matrix in `lins` once (inputs and outputs
    allocated here, once), and the bytes those matrices hold."""
    xs = {n: rng.standard_normal(n).astype(np.float32) for n in {lin.shape[1] for lin in lins}}
    outs = {d: np.empty(d, np.float32) for d in {lin.shape[0] for lin in lins}}

    def run():
        for lin in lins:
            lin.matvec(xs[lin.shape[1]], outs[lin.shape[0]])
    return run, sum(lin.nbytes for lin in lins)


def matvec_over_copies(lins, x, out, reps: int) -> float:
    """Median seconds of one matvec, cycling through `lins` (copies of one matrix, together larger
    than the caches) so the weights stream from DRAM as in a real token."""
    it = iter(range(1 << 62))
    lins[0].matvec(x, out)

    def run():
        lins[next(it) % len(lins)].matvec(x, out)
    return median_time(run, max(reps, len(lins)))

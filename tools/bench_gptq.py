"""CPU and wall seconds of the GPTQ factor's two phases (edgerun/codecs/gptq.py: blocked Cholesky,
blocked triangular inverse) at size n, on the kernel threads; the 1.5B model's down_proj has n = 8960.

    nice -n 10 python tools/bench_gptq.py 8960 -t 2
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from edgerun import kernels  # noqa: E402
from edgerun.codecs import gptq  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    kernels.set_threads(a.threads)
    Y = np.random.default_rng(0).standard_normal((1024, a.n)).astype(np.float32)
    A = (Y.T @ Y / len(Y)).astype(np.float64)       # rank 1024 + damping, like a short calibration
    A[np.diag_indices(a.n)] += 0.01 * np.mean(np.diag(A)) + 0.05
    for name, phase in (("cholesky", gptq._cholesky_lower), ("invert", gptq._invert_lower)):
        t0, c0 = time.perf_counter(), cpu()
        phase(A)
        print(f"n={a.n} {name}: {time.perf_counter() - t0:.1f} s wall, {cpu() - c0:.1f} s CPU, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()

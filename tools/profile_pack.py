"""Where a compressed pack spends its time and memory: the calibrated pack (edgerun/calibrate.py)
on the first LAYERS layers of a checkpoint, with wall time per phase and peak RSS.

Phases: reading/dequantizing the source, the f32 calibration forward (Hessians collected),
Hessian accumulation, each matrix's encode, the forward through the compressed layer, and the
embedding/head encodes at the end (`--no-ends` skips them). Nothing is written.

    nice -n 10 python tools/profile_pack.py /tmp/qwen/q.gguf --codec cluster --bits 4 --layers 2
"""
from __future__ import annotations

import argparse
import cProfile
import os
import dataclasses
import pstats
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from edgerun import calibrate  # noqa: E402
from edgerun.config import ModelConfig  # noqa: E402
from edgerun.convert import pack as packmod  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)
CPU: dict[str, float] = defaultdict(float)      # process CPU seconds (getrusage) per phase
PEAK: dict[str, int] = defaultdict(int)


class RssSampler(threading.Thread):
    """Samples this process's RSS every 20 ms; `peak` since the last `reset()`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = psutil.Process(), 0, False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def reset(self) -> int:
        p, self.peak = self.peak, self.proc.memory_info().rss
        return p


SAMPLER = RssSampler()


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(label, fn):
    def wrapper(*a, **kw):
        t0, c0 = time.perf_counter(), cpu()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[label] += time.perf_counter() - t0
            CPU[label] += cpu() - c0
    return wrapper


class NullWriter:
    def add_array(self, name, arr):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--codec", default="cluster")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=packmod.DEFAULT_CALIB_TOKENS)
    ap.add_argument("--no-ends", action="store_true", help="skip the embedding and head encodes")
    ap.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: as pack)")
    ap.add_argument("--cprofile", default=None, help="write cProfile stats here and print the top 25")
    a = ap.parse_args()

    SAMPLER.start()
    from edgerun import kernels
    kernels.set_threads(a.threads or kernels.default_threads())
    print(f"{kernels.get_threads()} kernel threads", flush=True)
    recipe = packmod.make_recipe("f16", a.codec, a.bits, a.recipe)
    source = packmod.open_source(a.src)
    cfg = dataclasses.replace(ModelConfig.from_dict(source.meta.config), num_layers=a.layers)
    seqs = calibrate.source_calibration_sequences(source.meta, None, a.calib_tokens, packmod.CALIB_SEQ_LEN)

    # phase timers around the functions calibrate_and_store calls
    source.read = timed("read source (dequantize)", source.read)
    calibrate.HessianAccumulator.add = timed("hessian accumulate", calibrate.HessianAccumulator.add)
    calibrate.HessianAccumulator.hessian = timed("hessian finalize", calibrate.HessianAccumulator.hessian)
    store = packmod.TensorStore(NullWriter(), recipe)
    encode_times = {}

    def timed_store(name, w, hessian=None):
        if a.no_ends and ("embed_tokens" in name or name.startswith("lm_head")):
            return None                       # calibrate_and_store does not use what these return
        SAMPLER.reset()
        t0, c0 = time.perf_counter(), cpu()
        out = packmod.TensorStore.__call__(store, name, w, hessian)
        dt, dc = time.perf_counter() - t0, cpu() - c0
        encode_times[name] = (dt, SAMPLER.peak)
        TIMES["encode (all)"] += dt
        CPU["encode (all)"] += dc
        print(f"  encode {name} {tuple(w.shape)}: {dt:.1f} s, {dc:.1f} s CPU, peak RSS in it {SAMPLER.peak / 2**30:.2f} GiB",
              flush=True)
        return out

    layer_t = [time.perf_counter()]

    layer_cpu = [cpu()]

    def progress(i, n):
        now = time.perf_counter()
        c, layer_cpu[0] = cpu() - layer_cpu[0], cpu()
        print(f"layer {i}/{n}: {now - layer_t[-1]:.1f} s wall, {c:.1f} s CPU, load {os.getloadavg()[0]:.1f}, ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB",
              flush=True)
        layer_t.append(now)

    block = calibrate.Transformer.block
    calibrate.Transformer.block = timed("forward (block)", block)
    prof = cProfile.Profile() if a.cprofile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    calibrate.calibrate_and_store(source, cfg, seqs, timed_store, progress=progress)
    if prof:
        prof.disable()
    total = time.perf_counter() - t0
    print(f"\n{a.layers} layers, {seqs.size} calibration tokens, recipe {a.codec}:{a.bits}: {total:.1f} s total "
          f"({cpu():.1f} s CPU in the process)")
    for k, v in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {v:8.1f} s wall {CPU[k]:8.1f} s CPU")
    print(f"peak RSS (ru_maxrss) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if prof:
        prof.dump_stats(a.cprofile)
        pstats.Stats(a.cprofile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()

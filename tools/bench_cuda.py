"""Benchmark CUDA offload (edgerun/cuda, docs/cuda.md): decode tokens/s and host<->device bytes
per token, for 0..all GPU layers, against the CPU run of the same .ebin.

    python tools/bench_cuda.py model.ebin [--gpu-layers all,8,0] [--tokens 64] [--context 512]
    python tools/bench_cuda.py --sim --tiny          # proves it runs, under the CUDA simulator

On a real GPU run it with a compressed pack (e.g. the cluster or spqr recipe): the point of
uploading compressed parts is that decode reads fewer bytes. Bytes per token are counted from
the transfers the layers make (x up/down at the ends of each run of GPU layers, logits down).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help=".ebin file")
    ap.add_argument("--gpu-layers", default="all,0", help="comma list of all | N (0 = CPU only)")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    ap.add_argument("--prompt", type=int, default=32, help="prefill tokens")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--sim", action="store_true", help="use numba-cuda's simulator (NUMBA_ENABLE_CUDASIM=1)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama (needs transformers), f32")
    a = ap.parse_args(argv)
    if a.sim:       # must be set before numba.cuda is imported
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        os.environ.setdefault("EDGERUN_CUDA_LANES", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np

    from edgerun import cuda as ecuda
    from edgerun.config import ModelConfig
    from edgerun.ebin import EbinFile
    from edgerun.model import Transformer, Weights
    from edgerun.plan import GpuPlan

    try:
        device, why = ecuda.resolve_device("cuda")
    except ecuda.CudaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"device: {why}")
    if a.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_checkpoint

        from edgerun.convert.pack import pack
        tmp = Path(tempfile.mkdtemp(prefix="bench_cuda_"))
        a.model = str(tmp / "tiny.ebin")
        pack(make_tiny_checkpoint("llama", tmp / "src"), a.model, dtype="f32")
        a.tokens, a.prompt, a.context = min(a.tokens, 3), min(a.prompt, 4), min(a.context, 16)
    if not a.model:
        ap.error("give a model .ebin or --tiny")

    results = {}
    for spec in a.gpu_layers.split(","):
        with EbinFile(a.model) as e:
            cfg = ModelConfig.from_dict(e.manifest["config"])
            n = cfg.num_layers if spec == "all" else int(spec)
            tf = Transformer(cfg, Weights.from_ebin(e, cfg), a.context, min(64, a.prompt),
                             gpu=GpuPlan(n, n == cfg.num_layers, 0) if n else None)
        device_bytes = tf.ops[0].nbytes if n else 0
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, a.prompt)   # same prompt for every spec
        logits = tf.forward(ids[:a.prompt], 0)
        t0 = time.perf_counter()
        for k in range(a.tokens):
            logits = tf.forward([int(logits.argmax())], a.prompt + k)
        dt = time.perf_counter() - t0
        # per decoded token: x (d f32) up at each run start and down at each run end, logits down
        on = [ops.name == "cuda" for ops in tf.ops]
        runs = sum(1 for i in range(cfg.num_layers) if on[i] and (i == 0 or not on[i - 1]))
        moved = runs * 2 * 4 * cfg.hidden_size + (4 * cfg.vocab_size if tf.head_ops.name == "cuda" else 0)
        results[spec] = logits.copy()
        print(f"gpu layers {spec:>4}: {a.tokens / dt:8.2f} tok/s, device {device_bytes / 2**20:8.1f} MiB, "
              f"host<->device {moved} B/token")
    if "0" in results and len(results) > 1:
        ref = results["0"]
        for spec, lg in results.items():
            print(f"max |logit - cpu| with {spec} GPU layers: {float(np.max(np.abs(lg - ref))):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

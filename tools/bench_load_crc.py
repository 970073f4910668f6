"""What checking every array's crc32 on load costs (issue #16).

    python3 tools/bench_load_crc.py MODEL.ebin [--repeat 5]

Three measurements, each alternating "checked" and "unchecked" runs in one process and reporting
medians: (1) zlib.crc32 alone over the model's bytes already in memory; (2) reading every array
(EbinFile.read: preadv + page-cache drop) with and without the check; (3) the whole
`edgerun.load` (plan, kernels from the JIT cache, tokenizer, weights) with and without it. The
unchecked runs flip EbinFile.read's `verify` default, which is what loading used before.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgerun import ebin as ebin_mod  # noqa: E402
from edgerun.ebin import EbinFile  # noqa: E402

_READ = EbinFile.read


def checked(on: bool) -> None:
    EbinFile.read = functools.partialmethod(_READ, verify=on) if not on else _READ


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import edgerun
    with EbinFile(args.model) as f:
        names = list(f.arrays)
        total = sum(a.length for a in f.arrays.values())
        blobs = [f.read(n).reshape(-1).view("uint8") for n in names]
    crc = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for b in blobs:
            zlib.crc32(b)
        crc.append(time.perf_counter() - t0)
    del blobs
    times = {("read", True): [], ("read", False): [], ("load", True): [], ("load", False): []}
    for _ in range(args.repeat):
        for on in (True, False):
            checked(on)
            with EbinFile(args.model) as f:
                t0 = time.perf_counter()
                for n in names:
                    f.read(n)
                times[("read", on)].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with edgerun.load(args.model, context=512):
                times[("load", on)].append(time.perf_counter() - t0)
    checked(True)
    med = {k: statistics.median(v) for k, v in times.items()}
    c = statistics.median(crc)
    print(f"{args.model.name}: {len(names)} arrays, {total / 1e6:.0f} MB, chunk {ebin_mod.CHUNK >> 20} MiB, "
          f"median of {args.repeat}")
    print(f"  zlib.crc32 alone (bytes in memory)  {c:.3f} s  ({total / c / 1e9:.2f} GB/s)")
    for what in ("read", "load"):
        on, off = med[(what, True)], med[(what, False)]
        label = "read every array" if what == "read" else "edgerun.load"
        print(f"  {label:<36} {off:.3f} s unchecked, {on:.3f} s checked: +{on - off:.3f} s "
              f"({(on - off) / off:+.0%})")


if __name__ == "__main__":
    main()

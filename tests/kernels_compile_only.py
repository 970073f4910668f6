"""Compile every codec's kernels for the CPU Numba targets without running them.

`python tests/kernels_compile_only.py PARTS.npz`, PARTS made by `save_cases` on the host (encoders
run jitted code, so they cannot run in the child).

Run as a subprocess with NUMBA_CPU_NAME / NUMBA_CPU_FEATURES naming a CPU this host may lack
(AVX-512 on an AVX2 host): each dispatcher called from Python compiles for its argument types
and returns without executing, so LLVM's code generation is checked for that CPU. An LLVM abort
kills the process; the parent test reads the exit status. Prints the ISA variant chosen.
"""
import json
import sys

import numpy as np
from numba.core.dispatcher import Dispatcher

from edgerun import kernels
from edgerun.codecs import all_codecs, get_codec
from edgerun.isa import target

_compile = Dispatcher._compile_for_args


def _compile_only(self, *args, **kws):
    _compile(self, *args, **kws)
    # A compile also registers its callees' overloads: clear every edgerun dispatcher, so the next
    # call from Python compiles (from the cache) instead of running.
    for mod in [m for name, m in sys.modules.items() if name.startswith("edgerun")]:
        for obj in vars(mod).values():
            if isinstance(obj, Dispatcher):
                obj._clear()
    self._clear()       # a kernel made by a factory (a closure, e.g. per bit width) is no module attribute
    return lambda *a, **k: None


D, N = 40, 70


def cases() -> list[tuple[str, dict]]:
    """(codec, params) for every registered codec: its example params and every value of its
    argument's range (every bit width has its own code path)."""
    out = []
    for name, cls in all_codecs().items():
        out += [(name, dict(p)) for p in cls.example_params]
        if not isinstance(cls.arg_range[0], str):
            out += [(name, cls.params_from_arg(a)) for a in range(cls.arg_range[0], cls.arg_range[1] + 1)]
    return out


def save_cases(path) -> None:
    """Encode a (D, N) matrix with every case of `cases()` into an .npz at `path`."""
    w = np.random.default_rng(0).standard_normal((D, N)).astype(np.float32)
    arrays = {}
    for name, params in cases():
        for part, a in get_codec(name).encode(w, params, np.eye(N)).items():
            arrays[f"{name}|{json.dumps(params)}|{part}"] = a
    np.savez(path, **arrays)


def compile_all(path) -> None:
    """Load every case of `path` and call each kernel once (compiled, not run)."""
    Dispatcher._compile_for_args = _compile_only
    cases = {}
    with np.load(path) as z:
        for key in z.files:
            name, params, part = key.split("|")
            cases.setdefault((name, params), {})[part] = z[key]
    np.seterr(all="ignore")             # the outputs are never computed: garbage in, garbage out
    for (name, params), parts in cases.items():
        lin = get_codec(name).load(parts, json.loads(params))
        for threads in (1, 2):
            kernels.set_threads(threads)
            lin.matvec(np.ones(N, np.float32), np.empty(D, np.float32))
            for T in (2, 9):
                lin.matmul(np.ones((T, N), np.float32), np.empty((T, D), np.float32))
            lin.row(1, np.empty(N, np.float32))
    q = np.ones((3, 4, 8), np.float32)
    for cache in (np.float32, np.uint16):
        kernels.attention(q, np.zeros((2, 8, 8), cache), np.zeros((2, 8, 8), cache), 0, np.empty_like(q))
    print(target().describe())


if __name__ == "__main__":
    compile_all(sys.argv[1])

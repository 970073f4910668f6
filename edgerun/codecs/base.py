"""The two base classes every codec package builds on (DESIGN §4).

`Codec`: a subclass registers itself once, by name, when its package is imported
(`class ClusterCodec(Codec, name="cluster")`, as gguf-py's quant classes do), and declares what
the CLI and recipes need: the `CODEC:ARG` rule syntax, the argument's default and valid range,
how the argument becomes params, and the params the registry tests encode with.

`Linear`: a loaded weight W (d, n) on its stored parts. What is really shared lives here:
`shape`, `nbytes`, `bits_per_weight`, the thread-count choice, matvec's serial/parallel split and
"below `matmul_min_t` tokens (or until the batched kernels are compiled, kernels.py's cold JIT
cache) a matmul is a loop of matvecs".
"""
from __future__ import annotations

import importlib

import numpy as np

from ..errors import EdgerunError, UnsupportedModelError
from ..kernels import full_kernels_ready, get_threads

# name -> Codec subclass, filled by Codec.__init_subclass__ as the codec packages are imported
REGISTRY: dict[str, type] = {}


class Codec:
    """A weight format. Subclasses set `name=` in their class statement and implement
    `encode(w, params, hessian=None) -> parts`, `decode(parts, params) -> float32` (the NumPy
    reference, reference.py) and `load(parts, params) -> Linear` (kernels.py)."""

    name: str = ""
    arg: str = "bits"              # the param that `CODEC:ARG` in a recipe sets
    default_arg: int | str = 4     # ARG when a recipe or `--codec` gives none
    arg_range: tuple = (2, 8)      # valid ARG: (low, high) ints inclusive, or a tuple of strings
    shorthands: tuple = ()         # bare rules that mean this codec, e.g. "f16" for dense:f16
    example_params: tuple = ()     # params the registry tests (tests/test_codecs_registry.py) run
    calibrated: bool = True        # encode uses the input statistics (pack calibrates first)
    # parts "block.i" form an ordered stack that pack writes last, in a global importance order
    # (`encode_stack` returns the parts and each block's importance), and a model may load any
    # prefix of (BitStack)
    stacked: bool = False
    # parts whose row i holds row i's data and nothing else: an embedding that is only looked up
    # (not the output head) leaves these in the file and reads a token's row on demand (plan.py)
    row_parts: tuple = ()
    # names a file holding this codec's tensors lists in its manifest's format.features, so that
    # older readers refuse it instead of misreading (formats/ebin.md § Evolution)
    file_features: tuple = ()

    def __init_subclass__(cls, name: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if name is None:           # an intermediate base, not a format
            return
        if name in REGISTRY and REGISTRY[name].__qualname__ != cls.__qualname__:
            raise TypeError(f"codec {name!r} is registered twice ({REGISTRY[name].__qualname__}, {cls.__qualname__})")
        cls.name = name
        REGISTRY[name] = cls

    # -- recipes and the CLI ------------------------------------------------------------------
    @classmethod
    def syntax(cls) -> str:
        """The rule syntax for help and error messages, e.g. `spqr:BITS (2-4)`."""
        valid = "|".join(cls.arg_range) if isinstance(cls.arg_range[0], str) else "%d-%d" % cls.arg_range
        return f"{cls.name}:{cls.arg.upper()} ({valid}, default {cls.default_arg})"

    @classmethod
    def check_arg(cls, arg):
        """ARG as given in a recipe (str) or by `--bits` (int) -> the checked value; EdgerunError
        naming the valid range otherwise."""
        if isinstance(cls.arg_range[0], str):
            if arg in cls.arg_range:
                return arg
        else:
            try:
                v = int(arg)
            except (TypeError, ValueError):
                v = None
            if v is not None and cls.arg_range[0] <= v <= cls.arg_range[1]:
                return v
        raise EdgerunError(f"codec rule {cls.name}:{arg}: expected {cls.syntax()}")

    @classmethod
    def params_from_arg(cls, arg=None) -> dict:
        """`CODEC:ARG` -> the params written in the manifest (ARG None or "" -> `default_arg`)."""
        return {cls.arg: cls.check_arg(cls.default_arg if arg in (None, "") else arg)}

    @classmethod
    def describe(cls, params: dict) -> str:
        """The rule text of `params`, e.g. `spqr:3` (pack summaries)."""
        return f"{cls.name}:{(params or {}).get(cls.arg, cls.default_arg)}"

    # -- sizes: what `pack --bpw/--size` chooses among (edgerun/convert/budget.py) -------------
    @classmethod
    def part_nbytes(cls, shape: tuple, params: dict) -> dict[str, int] | None:
        """Exact bytes of each part `encode` makes for a weight of `shape` with `params`, known
        before encoding; None when some part's size depends on the values (e.g. outliers above
        a threshold). pack --bpw/--size sizes recipes with it."""
        return None

    @classmethod
    def candidates(cls) -> tuple[dict, ...]:
        """The params `pack --bpw/--size` may choose for a group of matrices (each must have an
        exact `part_nbytes`); () = never chosen automatically. A new codec plugs into the
        size-targeted packs by returning its options here."""
        return ()

    # -- the format ---------------------------------------------------------------------------
    @staticmethod
    def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def decode(parts: dict, params: dict | None = None) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def load(parts: dict, params: dict | None = None) -> "Linear":
        raise NotImplementedError

    @staticmethod
    def nbytes(parts: dict) -> int:
        """Bytes of every stored part: the honest size (scales, codebooks, outliers, meta...)."""
        return int(sum(p.nbytes for p in parts.values()))

    # -- the flash layout (formats/flash-layout.md § "Compressed codecs") -----------------------
    @classmethod
    def flash_cut(cls, gate: dict, up: dict, down: dict, params: dict, perm) -> tuple:
        """Encoded parts of a layer's gate, up (f, d) and down (d, f), and the stored neuron order
        `perm` -> (bundles (f, bundle_bytes) uint8, shared {name: array}) (pack --layout flash)."""
        raise UnsupportedModelError(f"--layout flash does not support the {cls.name} codec yet")

    @classmethod
    def flash_bundle_parts(cls, params: dict, d: int) -> dict:
        """name -> [byte offset, length] of the parts of one bundle (the manifest lists them)."""
        raise UnsupportedModelError(f"--layout flash does not support the {cls.name} codec yet")

    @classmethod
    def flash_kernels(cls, shared: dict, nid, params: dict, d: int, f: int, scratch: dict):
        """One layer's bundle kernels over its `shared` arrays (`nid`: stored position -> neuron):
        an object with `matmul_min_t`, `prepare(x)`, `act`, `down`, `widen` (streaming.ffn_rows)."""
        raise UnsupportedModelError(f"flash-layout bundles of the {cls.name} codec are not supported")

    @classmethod
    def flash_scratch_bytes(cls, d: int, f: int) -> int:
        """Bytes of the per-token scratch that `flash_kernels` shares across layers (the plan)."""
        return 0

    @classmethod
    def to_device(cls, lin: "Linear"):
        """The CUDA twin of a loaded Linear: `DeviceLinear` of the codec package's cuda.py
        (imports numba.cuda: call only when CUDA was asked for)."""
        try:
            mod = importlib.import_module(cls.__module__ + ".cuda")     # the package's cuda.py
        except ModuleNotFoundError as e:
            if e.name != cls.__module__ + ".cuda":                      # e.g. numba.cuda itself
                raise
            mod = None
        if mod is None or not hasattr(mod, "DeviceLinear"):
            raise UnsupportedModelError(f"no CUDA kernel for the {cls.name} codec")
        return mod.DeviceLinear(lin)


class Linear:
    """A loaded weight W (d, n): `matvec(x, out)`, `matmul(X, out)`, `row(i, out)` straight from
    the stored parts. Subclasses implement `_matvec(x, out, threads)` (threads > 1: their
    prange kernel), `_matmul(X, out)` (T >= matmul_min_t) and `row`."""

    codec: str = ""                # the registered codec name (the CUDA upload looks it up)
    matmul_min_t: int = 4          # below this many tokens a matmul is a loop of matvecs
    # True where the matmul gives each token the floats its matvec would, on every CPU (a prompt
    # then yields what a token-by-token decode does; tools/target_check.py holds it per target)
    matmul_equals_matvec: bool = False

    def __init__(self, shape: tuple, nbytes: int, par_min_weights: int):
        d, n = (int(s) for s in shape)
        self.shape = (d, n)
        self._nbytes = int(nbytes)
        # matvecs this large take the prange kernel when threads > 1 (a 2-thread region costs
        # microseconds, DESIGN §6: small matrices lose)
        self._big = d * n >= par_min_weights

    @property
    def nbytes(self) -> int:
        """Bytes of the stored parts this Linear uses."""
        return self._nbytes

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / (self.shape[0] * self.shape[1])

    @staticmethod
    def threads_for(parallel: bool) -> int:
        """How many threads a kernel call should use: `get_threads()` when the work is big
        enough to pay for a parallel region (and the parallel kernels are compiled), else 1."""
        threads = get_threads()
        return threads if parallel and threads > 1 and full_kernels_ready() else 1

    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        """out (d,) = W (d, n) @ x (n,)."""
        self._matvec(x, out, self.threads_for(self._big))

    def matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        """out (T, d) = X (T, n) @ W.T."""
        T = X.shape[0]
        if T < self.matmul_min_t or not full_kernels_ready():     # (cold JIT cache: kernels.py)
            for t in range(T):
                self.matvec(X[t], out[t])
            return
        self._matmul(X, out)

    def _matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        raise NotImplementedError

    def _matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        raise NotImplementedError

    @classmethod
    def stack(cls, linears: list) -> "Linear | None":
        """One Linear whose rows are those of `linears` in order (W = [W1; W2; ...]), or None
        when this codec cannot join these (the default). Weights that share an input (q/k/v,
        gate/up) then run as one matvec: the input is prepared once, and one kernel call (one
        parallel region) replaces several that each cost microseconds (model.StackedLinear)."""
        return None


def stack_outliers(csrs: list) -> tuple:
    """The CSR outliers (rowptr, col, val) of matrices stacked by rows, in order."""
    rps, off = [csrs[0][0]], int(csrs[0][0][-1])
    for rp, _, _ in csrs[1:]:
        rps.append(rp[1:] + off)
        off += int(rp[-1])
    return (np.concatenate(rps).astype(np.int32), np.concatenate([c for _, c, _ in csrs]),
            np.concatenate([v for _, _, v in csrs]))


def outlier_rows(rp: np.ndarray) -> np.ndarray:
    """CSR row pointers (d + 1,) -> each outlier's row (nnz,) int32, sorted. Kernels keep outliers
    by row id (COO) and loop over outliers, not rows: a few per row made a per-row loop
    mispredict its exit on most rows (BENCHMARKS.md, "Outliers by row id")."""
    return np.repeat(np.arange(len(rp) - 1, dtype=np.int32), np.diff(rp))


def outlier_rowptr(orow: np.ndarray, d: int) -> np.ndarray:
    """outlier_rows' inverse: the CSR row pointers (d + 1,) int32 of row ids `orow`."""
    return np.searchsorted(orow, np.arange(d + 1)).astype(np.int32)


"""Calibration for the compressed codecs: the input statistics H = E[x xᵀ] of every linear
layer, measured on calibration text.

Layer-wise in one pass: the calibration tokens' hidden states go through one layer at a time
with its original weights, which gives the layer's Hessians and the next layer's inputs; the
layer is compressed from its Hessians on a worker thread while the next layer runs. GPTQ/SpQR's
sequential scheme (the *compressed* layer producing the next layer's inputs) ran every layer
twice; one pass measured the same held-out perplexity (SmolLM2 spqr:4 and cluster:3, the 1.5B
spqr:4) and, with the overlap, packs the 1.5B in 14.6 minutes on 2 cores (BENCHMARKS.md, pack
time). At most two layers' weights and Hessians are in memory at once, plus the hidden states of
the calibration tokens.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np

from . import kernels
from .codecs import get_codec
from .config import ModelConfig
from .model import LAYER_TENSORS, Layer, Transformer, Weights

# Layer fields that read the same input share one Hessian.
SHARED_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
                "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}


def default_calibration_text() -> str:
    """The bundled WikiText-2 train excerpt (see edgerun/data/README.md)."""
    return resources.files("edgerun").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_sequences(tokenizer, text: str, n_tokens: int, seq_len: int) -> np.ndarray:
    """(n_seq, seq_len) token ids: consecutive windows of the tokenized text."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    n_seq = min(n_tokens // seq_len, len(ids) // seq_len)
    if n_seq < 1:
        from .errors import EdgerunError
        raise EdgerunError(f"the calibration text has {len(ids)} tokens; at least {seq_len} are needed")
    return np.asarray(ids[:n_seq * seq_len], dtype=np.int64).reshape(n_seq, seq_len)


def source_calibration_sequences(meta, text: str | None, n_tokens: int, seq_len: int) -> np.ndarray:
    """`calibration_sequences` of `text` (None: the bundled excerpt) with the tokenizer of a
    checkpoint's metadata (convert/source.py SourceMeta)."""
    from .tokenizer import Tokenizer
    tokenizer = Tokenizer(meta.tokenizer_json, bos_token_id=meta.bos_token_id, eos_token_ids=meta.eos_token_ids,
                          add_bos_token=meta.add_bos_token, chat_template=None)
    return calibration_sequences(tokenizer, text if text is not None else default_calibration_text(), n_tokens,
                                 seq_len)


class HessianAccumulator:
    """Running sum of X^T X over the rows X fed to a linear layer.

    Rows are buffered and multiplied in batches of about BUFFER_BYTES: one rank-k update per
    batch instead of one per forward chunk. Adding a 64-row product of an (n, n) matrix costs as
    much memory traffic as the product itself: for the 1.5B model's down_proj (n = 8960) that
    alone took most of a layer's ten minutes (BENCHMARKS.md, pack time). Only the lower block
    triangle is multiplied (column panels of PANEL, BLAS gemm on the kernel threads): NumPy's
    `B.T @ B` costs a full gemm. `hessian()` mirrors it. The sum is float32 (a dozen batch sums
    per layer), half the memory of float64 for the 1.5B's largest Hessian (321 MB)."""

    BUFFER_BYTES = 32 << 20
    PANEL = 512

    def __init__(self, n: int):
        self.sum = np.zeros((n, n), np.float32)
        self.count = 0
        self._buf = np.empty((max(256, self.BUFFER_BYTES // (4 * n)), n), np.float32)
        self._fill = 0
        # lower block triangle: row panel [j, j1) against columns [0, j1); largest first, so
        # that the threads (which take the next panel when free) finish together
        self._panels = [(j, min(n, j + self.PANEL)) for j in range(0, n, self.PANEL)][::-1]

    def add(self, X: np.ndarray) -> None:
        while X.shape[0]:
            take = min(X.shape[0], self._buf.shape[0] - self._fill)
            self._buf[self._fill:self._fill + take] = X[:take]
            self._fill += take
            X = X[take:]
            if self._fill == self._buf.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if not self._fill:
            return
        B = self._buf[:self._fill]

        def panel(jj):
            j, j1 = jj
            self.sum[j:j1, :j1] += B[:, j:j1].T @ B[:, :j1]
        kernels.threaded_map(panel, self._panels)
        self.count += self._fill
        self._fill = 0

    def hessian(self) -> np.ndarray:
        """E[x xᵀ] (n, n) float32. Computed once, in place (no second n×n copy); the
        accumulator is finished afterwards."""
        if self._buf is not None:
            self._flush()
            self._buf = None
            for j, j1 in self._panels:               # the upper part from the lower: exactly symmetric
                self.sum[j:j1, j1:] = self.sum[j1:, j:j1].T
                block = self.sum[j:j1, j:j1]
                upper = np.triu_indices(j1 - j, 1)
                block[upper] = block.T[upper]
            self.sum /= max(self.count, 1)
        return self.sum


class RecordingLinear:
    """A linear that records its inputs into an accumulator, then computes as `inner`."""

    def __init__(self, inner, acc: HessianAccumulator, observe=None):
        self.inner, self.acc, self.observe = inner, acc, observe

    def matvec(self, x, out):
        if self.observe is not None:
            self.observe(x[None, :])
        self.acc.add(x[None, :])
        self.inner.matvec(x, out)

    def matmul(self, X, out):
        if self.observe is not None:
            self.observe(X)
        self.acc.add(X)
        self.inner.matmul(X, out)


class F32Linear:
    """A float32 W (d, n) for the calibration forward pass: BLAS sgemm on whole calibration
    sequences, the tokens split over the kernel threads (BLAS itself runs one thread,
    edgerun/__init__.py): about twice the runtime kernels' speed at 256 tokens (BENCHMARKS.md,
    pack time)."""

    def __init__(self, w: np.ndarray):
        self.w = np.ascontiguousarray(w, dtype=np.float32)
        self.shape = self.w.shape

    def matvec(self, x, out):
        np.matmul(self.w, x, out=out)

    def matmul(self, X, out):
        kernels.threaded_matmul(X, self.w.T, out)


def f32_linear(w: np.ndarray) -> F32Linear:
    """An uncompressed float32 linear for the calibration forward pass (no copy of a float32 `w`)."""
    return F32Linear(w)


def calibrate_and_store(source, cfg: ModelConfig, sequences: np.ndarray, store, progress=None,
                        observe=None) -> None:
    """Run calibration layer by layer and hand every tensor to `store(name, w, hessian)` (which
    compresses and writes it), in file order. `progress(layer_done, layers_total)` after each
    layer is stored. `observe(layer, key, X)`, if given, sees every batch of input rows X of each
    SHARED_INPUT key (once, e.g. "mlp_in"), before the layer's tensors are stored (the flash
    layout's neuron order and predictor: streaming.write_flash); it runs on the calling thread
    while `store` may be storing the previous layer on the worker thread."""
    n_seq, seq_len = sequences.shape
    chunk = seq_len                 # one BLAS matmul per sequence and linear
    tf = Transformer(cfg, Weights({"model.embed_tokens.weight": None}, cfg), context=seq_len, chunk=chunk,
                     layers=[None] * cfg.num_layers)
    # (n_seq, seq_len, d) float32: only the tokens' rows of the embedding (a 1.5B model's largest
    # matrix, read whole at the end)
    tokens, where = np.unique(sequences, return_inverse=True)
    hidden = source.read_rows("model.embed_tokens.weight", tokens)[where.reshape(sequences.shape)]
    available = set(source.tensor_names())

    def store_layer(jobs):
        while jobs:                 # each tensor and its Hessian freed once stored
            store(*jobs.pop(0))

    if progress is not None:
        progress(0, cfg.num_layers)
    # one worker: layer i is compressed and written while layer i + 1's forward runs (the
    # compression's serial stretches fill the second core); its result is awaited before the
    # next layer is handed over, so tensors reach `store` in file order, one layer at a time
    with ThreadPoolExecutor(1, thread_name_prefix="edgerun-encode") as worker:
        pending = None
        for i in range(cfg.num_layers):
            names = {field: f"model.layers.{i}.{name}" for field, name in LAYER_TENSORS.items()}
            originals = {f: source.read(n) for f, n in names.items() if n in available}
            accs = {}
            recording = {}
            for field, w in originals.items():
                if field in SHARED_INPUT:
                    key = SHARED_INPUT[field]
                    if key in accs:        # q, k, v (gate, up) read the same input: record it once
                        recording[field] = f32_linear(w)
                    else:
                        accs[key] = HessianAccumulator(w.shape[1])
                        seen = None if observe is None else (lambda X, i=i, key=key: observe(i, key, X))
                        recording[field] = RecordingLinear(f32_linear(w), accs[key], seen)
                else:
                    recording[field] = w
            tf.layers[i] = Layer(**{f: recording.get(f) for f in LAYER_TENSORS})
            for s in range(n_seq):              # in place: the original layer feeds the next
                tf.block(i, hidden[s], 0)
            tf.layers[i] = None
            jobs = [(names[f], w, accs[SHARED_INPUT[f]].hessian() if f in SHARED_INPUT else None)
                    for f, w in originals.items()]
            del originals, recording, accs
            if pending is not None:
                pending.result()
                if progress is not None:
                    progress(i, cfg.num_layers)
            pending = worker.submit(store_layer, jobs)
            del jobs
        if pending is not None:
            pending.result()
        if progress is not None:
            progress(cfg.num_layers, cfg.num_layers)

    final = source.read("model.norm.weight")
    head_acc = HessianAccumulator(cfg.hidden_size)
    normed = np.empty((seq_len, cfg.hidden_size), np.float32)
    for s in range(n_seq):
        kernels.rmsnorm_rows(hidden[s], final, cfg.rms_norm_eps, normed)
        head_acc.add(normed)
    del hidden, tf                              # before the largest matrices are read
    store("model.norm.weight", final, None)
    # The output head's input statistics also serve a tied embedding (it is the head).
    store("model.embed_tokens.weight", source.read("model.embed_tokens.weight"),
          head_acc.hessian() if cfg.tie_word_embeddings else None)
    if not cfg.tie_word_embeddings:
        store("lm_head.weight", source.read("lm_head.weight"), head_acc.hessian())

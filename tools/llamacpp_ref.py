"""llama.cpp as a reference, through llama-cpp-python: F32 GGUFs, llama.cpp's own quant types,
stored bits per weight, and logits for edgerun's perplexity protocol (edgerun/evaluate.py).

    python tools/llamacpp_ref.py              # self-check on the default SmolLM2 GGUF

All llama.cpp types are made the way llama.cpp's `llama-quantize` makes them: from an F32 (or F16)
GGUF, with `llama_model_quantize` and its default parameters (no importance matrix). For a model
whose only public weights are quantized (SmolLM2's Q4_1), the F32 GGUF holds the dequantized values,
in llama.cpp's own tensor layout (Q/K rows stay permuted as llama.cpp stores them).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import gguf

# Types `quantize` accepts: llama_ftype names without the LLAMA_FTYPE_MOSTLY_ prefix. The IQ1/IQ2
# types need an importance matrix in llama.cpp (it refuses them without one), so they are left out.
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S"}


def ftype_of(type_name: str) -> int:
    """llama_ftype value of e.g. 'Q4_K_M' (LLAMA_FTYPE_MOSTLY_Q4_K_M)."""
    import llama_cpp
    name = type_name.upper()
    if name in NEEDS_IMATRIX:
        raise ValueError(f"{name} needs an importance matrix; not supported here")
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if value is None:
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"unknown llama.cpp type {type_name!r}; known: {', '.join(known)}")
    return int(value)


def _field_value(field):
    """(value, vtype, sub_type) of a GGUFReader field, as GGUFWriter.add_key_value wants them."""
    vtype = gguf.GGUFValueType(field.types[0])
    sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
    return field.contents(), vtype, sub


def dequantized_f32_gguf(src_gguf, out_path) -> Path:
    """Write a GGUF with `src_gguf`'s metadata and tensor names, every tensor dequantized to F32.

    Tensors keep llama.cpp's layout (nothing is un-permuted): llama.cpp reads this file exactly as
    it reads the source, only the storage type differs. general.file_type becomes ALL_F32.
    """
    src, out_path = Path(src_gguf), Path(out_path)
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    for key, field in reader.fields.items():
        # GGUF.* are the header's own counters; the writer adds general.architecture itself
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
            continue
        value, vtype, sub = _field_value(field)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        # numpy order is GGUF's ne reversed: (rows, columns) for a matrix
        shape = tuple(int(d) for d in reversed(t.shape))
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        writer.add_tensor(t.name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return out_path


@contextlib.contextmanager
def captured_stderr():
    """Collect what C code writes to fd 2 (llama.cpp logs every tensor while quantizing)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 2)
        lines: list[str] = []
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            lines.extend(buf.read().decode("utf-8", "replace").splitlines())


def quantize(f32_gguf, out_path, type_name: str, threads: int = 0) -> Path:
    """llama.cpp's own `type_name` (Q4_0, Q4_K_M, Q3_K_S, ...) of `f32_gguf`, default parameters."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(type_name)
    params.nthread = threads
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) failed with code {rc}: " + " | ".join(log[-3:]))
    os.replace(tmp, out_path)
    return out_path


def stored_bits_per_weight(gguf_path) -> dict:
    """What a GGUF actually stores: bits per weight over all tensors and over the 2-D ones
    (sum of n_bytes × 8 / sum of n_elements), the block types found, and the file size.

    K-quants need rows that are multiples of 256; SmolLM2's hidden size 576 is not, so llama.cpp
    falls back to other block types on most matrices: the type's name says little.
    """
    reader = gguf.GGUFReader(gguf_path)
    all_bytes = all_n = mat_bytes = mat_n = 0
    types = collections.Counter()          # block type -> elements of 2-D tensors stored in it
    for t in reader.tensors:
        all_bytes += int(t.n_bytes)
        all_n += int(t.n_elements)
        if len(t.shape) == 2:
            mat_bytes += int(t.n_bytes)
            mat_n += int(t.n_elements)
            types[t.tensor_type.name] += int(t.n_elements)
    return {"bpw_all": all_bytes * 8 / all_n, "bpw_2d": mat_bytes * 8 / mat_n,
            "params": all_n, "file_size": Path(gguf_path).stat().st_size,
            "block_types": {k: v / mat_n for k, v in types.most_common()}}


def identical_tensors(a_gguf, b_gguf) -> tuple[int, int]:
    """(tensors with the same name, type and bytes in both files, tensors in a): re-quantizing the
    F32 GGUF to the source's own type should give the source back, byte for byte."""
    a, b = gguf.GGUFReader(a_gguf), gguf.GGUFReader(b_gguf)
    theirs = {t.name: t for t in b.tensors}
    same = sum(1 for t in a.tensors if t.name in theirs and t.tensor_type == theirs[t.name].tensor_type
               and np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)))
    return same, len(a.tensors)


def tensor_digest(gguf_path) -> str:
    """sha1 over every tensor's name, type and bytes (metadata such as file_type left out)."""
    import hashlib
    h = hashlib.sha1()
    for t in gguf.GGUFReader(gguf_path).tensors:
        h.update(f"{t.name}|{t.tensor_type.name}|".encode())
        h.update(np.ascontiguousarray(t.data).view(np.uint8).tobytes())
    return h.hexdigest()


def block_types_text(info: dict) -> str:
    """'Q5_0 72%, Q8_0 18%, ...' (share of 2-D weights per block type)."""
    return ", ".join(f"{k} {v:.0%}" for k, v in info["block_types"].items())


class LlamaCppLogits:
    """`fn(ids) -> (len, vocab) float32` for a fresh sequence, as edgerun's Model.logits."""

    def __init__(self, gguf_path, context: int, threads: int | None = None):
        import llama_cpp
        self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=context, n_batch=context, n_ubatch=context,
                                   logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.context = context

    def __call__(self, ids) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids or len(ids) > self.context:
            raise ValueError(f"needs 1..{self.context} tokens, got {len(ids)}")
        self.llm.reset()                  # n_tokens = 0; eval() then drops the old KV cells
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization, without BOS and without parsing special tokens."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def close(self):
        self.llm.close()


def llamacpp_logits_fn(gguf_path, context: int, threads: int | None = None) -> LlamaCppLogits:
    """`fn(ids) -> (len, vocab) float32` logits of llama.cpp on `gguf_path` for a fresh sequence."""
    return LlamaCppLogits(gguf_path, context, threads)


def _self_check():
    """F32 GGUF loads and matches the Q4_1 file's logits; a K-quant's stored bits."""
    src = Path("/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory() as d:
        f32 = dequantized_f32_gguf(src, Path(d) / "f32.gguf")
        for path in (src, f32):
            info = stored_bits_per_weight(path)
            print(f"{path.name}: {info['bpw_all']:.3f} bpw all, {info['bpw_2d']:.3f} 2-D; {block_types_text(info)}")
        ids = list(range(1000, 1064))
        a, b = llamacpp_logits_fn(src, 64, 2), llamacpp_logits_fn(f32, 64, 2)
        la, lb = a(ids), b(ids)
        print(f"Q4_1 vs F32 GGUF logits: max |Δ| {np.abs(la - lb).max():.4f} (scale {np.abs(la).max():.1f}), "
              f"argmax agree {np.mean(la.argmax(1) == lb.argmax(1)):.0%}")
        assert np.abs(la - lb).max() < 0.05 * np.abs(la).max()
        q = quantize(f32, Path(d) / "q3ks.gguf", "Q3_K_S", threads=2)
        info = stored_bits_per_weight(q)
        print(f"Q3_K_S: {info['bpw_all']:.3f} bpw all, {info['bpw_2d']:.3f} 2-D; {block_types_text(info)}")


if __name__ == "__main__":
    _self_check()

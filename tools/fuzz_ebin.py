"""Corrupted and crafted .ebin files against `edgerun verify` / `info` / `generate` (issue #16).

A seeded corpus of mutations of tiny packs (a 2-layer Llama at f16, plus flash-layout, cluster,
SpQR and BitStack packs of it): truncations, byte flips and overwrites in the header, manifest
and data, crafted manifests with recomputed checksums (config vs shapes, types, ranges, array
table, codec parts, nesting), crafted data with recomputed checksums (NaN weights, bad
permutations and row pointers), harmless edits (padding bytes, unknown keys, trailing bytes), and
a FIFO, a directory and a device. Each case says what each command must do: fail with a clean
error, run normally (harmless), or either (e.g. `info` reads no weights, so it cannot see a
flipped weight byte).

    python3 tools/fuzz_ebin.py                       # the corpus through the real CLI, tabulated
    python3 tools/fuzz_ebin.py --root /tmp/orig      # ... through another edgerun tree (e.g. before a change)
    python3 tools/fuzz_ebin.py --list                # the cases only

Outcomes of a run: `ok` (exit 0 where that is right), `exit 0 on corrupted` (exit 0 where an error
was due), `clean error` (non-zero exit, no traceback, not killed), `false alarm` (a clean error on
a harmless case), `traceback`, `signal` (killed, e.g. SIGABRT), `hang` (timeout).

tests/test_fuzz_ebin.py runs the same corpus in-process (`run_inprocess`) and a sample through
the CLI.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("verify", "info", "generate")
PROMPT = "Once upon a time"
CONTEXT = 128

ERR = {"verify": "error", "info": "error", "generate": "error"}       # every command must refuse it
OK = {"verify": "ok", "info": "ok", "generate": "ok"}                 # harmless: every command runs
DATA = {"verify": "error", "info": "any", "generate": "error"}        # weight bytes: info reads none
NUMERIC = {"verify": "ok", "info": "ok", "generate": "error"}         # valid file, weights NaN/inf
RUNTIME = {"verify": "any", "info": "any", "generate": "error"}       # only running the model shows it

CORPUS = """The quick brown fox jumps over the lazy dog. 0123456789 3.14159 2026-11-24
Once upon a time, in a land far away, there lived a small robot who loved to read books.
User: what is the capital of France? Assistant: The capital of France is Paris.
Naïve café résumé — emoji 🙂 and tabs\tand  double  spaces.
""" * 3
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# ----------------------------------------------------------------------------- base packs

def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama as a Hugging Face directory (safetensors + tokenizer.json), no torch."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML}))
    V, d, f, L, H, Hkv = tok.get_vocab_size(), 64, 96, 2, 4, 2
    D = d // H
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
           "intermediate_size": f, "num_hidden_layers": L, "num_attention_heads": H,
           "num_key_value_heads": Hkv, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "vocab_size": V, "tie_word_embeddings": False,
           "bos_token_id": tok.token_to_id("<|endoftext|>"), "eos_token_id": tok.token_to_id("<|im_end|>")}
    (directory / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    w = lambda *s: (0.08 * rng.standard_normal(s)).astype(np.float32)          # noqa: E731
    norm = lambda n: (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)     # noqa: E731
    t = {"model.embed_tokens.weight": w(V, d), "model.norm.weight": norm(d), "lm_head.weight": w(V, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d),
                  p + "self_attn.q_proj.weight": w(H * D, d), p + "self_attn.k_proj.weight": w(Hkv * D, d),
                  p + "self_attn.v_proj.weight": w(Hkv * D, d), p + "self_attn.o_proj.weight": w(d, H * D),
                  p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                  p + "mlp.down_proj.weight": w(d, f)})
    save_file(t, str(directory / "model.safetensors"))
    return directory


BASE_KINDS = ("f16", "flash", "spqr", "cluster", "bitstack", "rotated")


def make_bases(directory: Path, kinds=BASE_KINDS, log=print) -> dict[str, Path]:
    """The packs every mutation starts from: f16 and flash made by this tree's `edgerun pack`;
    the codec packs re-encode the f16 pack's attention and FFN matrices (`craft_codec_pack`)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from edgerun.convert.pack import pack
    src = directory / "hf"
    if not (src / "model.safetensors").exists():
        make_checkpoint(src)
    out = {}
    for kind in kinds:
        path = directory / f"base-{kind}.ebin"
        if not path.exists():
            t0 = time.perf_counter()
            if kind == "f16":
                pack(src, path, dtype="f16")
            elif kind == "flash":
                pack(src, path, dtype="f16", layout="flash", calib_text=CORPUS * 8, calib_tokens=512)
            else:
                craft_codec_pack(make_bases(directory, ("f16",), log)["f16"], path, kind)
            log(f"made {path.name} in {time.perf_counter() - t0:.1f} s")
        out[kind] = path
    return out


def craft_codec_pack(base: Path, out: Path, codec: str, seed: int = 0) -> None:
    """`base` (a dense pack) with its attention and FFN matrices in `codec`, parts made with NumPy
    by the codec's spec (formats/codec-*.md) rather than its encoder: no Numba kernel runs, so the
    corpus can be built on a CPU the codec's kernels do not compile for yet. SpQR uses its encoder
    (plain NumPy without calibration); cluster and BitStack parts are random but well formed."""
    from edgerun.ebin import EbinFile, EbinWriter
    rng = np.random.default_rng(seed)
    with EbinFile(base) as f, EbinWriter(out) as w:
        man = {k: v for k, v in f.manifest.items() if k not in ("arrays", "format")}
        man["tensors"] = tensors = json.loads(json.dumps(man["tensors"]))
        if codec == "rotated":
            man["format"] = {"features": ["rotation"]}
        elif codec == "cluster":
            from edgerun.codecs.cluster import FILE_FEATURE
            man["format"] = {"features": [FILE_FEATURE]}
        blocks, K = {}, 4
        for name, e in f.manifest["tensors"].items():
            mat = len(e["shape"]) == 2 and name.startswith("model.layers.")
            if not mat:
                w.add_array(name, f.read(name))
                continue
            d, n = e["shape"]
            rotation = None
            if codec in ("spqr", "rotated"):
                from edgerun.codecs import rotation as rot
                from edgerun.codecs.spqr import SpQRCodec
                W = f.read(name).view(np.float16).astype(np.float32)
                if codec == "rotated":      # codecs/rotation.py: W·Tᵀ stored, signs beside it
                    rotation, signs = {"block": rot.block_for(n)}, rot.make_signs(n, name)
                    W = rot.rotate(W, signs, rotation["block"])
                params, parts = {"bits": 3}, SpQRCodec.encode(W, {"bits": 3})
                if rotation:
                    parts[rot.SIGNS_PART] = signs
            elif codec == "cluster":
                params, parts = {"bits": 4, "outliers": 0.003}, _cluster_parts(rng, d, n)
            else:
                params = {"blocks": K, "rank": 2, "overshoot": 1.0, "signs": "sign", "joint": 0}
                parts = _bitstack_parts(rng, d, n, 2, K)
            base_name = name.rsplit(".", 1)[0]
            tensors[name] = {"codec": "spqr" if rotation else codec, "params": params, "shape": [d, n],
                             "parts": {p: f"{base_name}.{p}" for p in parts}}
            if rotation:
                tensors[name]["rotation"] = rotation
            for p, arr in parts.items():
                if p.startswith("block."):
                    blocks[(name, int(p.split(".")[1]))] = arr
                else:
                    w.add_array(f"{base_name}.{p}", arr)
        if blocks:   # BitStack: blocks last, level by level (formats/codec-bitstack.md, global order)
            order = sorted(blocks, key=lambda k: (k[1], k[0]))
            for name, i in order:
                w.add_array(tensors[name]["parts"][f"block.{i}"], blocks[(name, i)])
            man["bitstack"] = {"order": [[n, i] for n, i in order], "curve": [[1000000, 50.0], [2000000, 30.0]]}
        w.close(man)


def _cluster_parts(rng, d: int, n: int, bits: int = 4, g: int = 16) -> dict:
    from edgerun.codecs.cluster import meta_array
    nblk, G = -(-n // 32), -(-d // g)
    book = np.sort(rng.uniform(-0.2, 0.2, (G, 1 << bits)), axis=1).astype(np.float16).view(np.uint16)
    per_row = rng.integers(0, 3, d)
    rowptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    cols = np.concatenate([np.sort(rng.choice(n, k, replace=False)) for k in per_row]).astype(np.uint16)
    vals = rng.uniform(-0.1, 0.1, len(cols)).astype(np.float16).view(np.uint16)
    return {"meta": meta_array(d, n, bits, g), "codebook": book,
            "codes": rng.integers(0, 256, (d, nblk * 4 * bits), dtype=np.uint8),
            "outlier_rowptr": rowptr, "outlier_col": cols, "outlier_val": vals}


def _bitstack_parts(rng, d: int, n: int, k: int, K: int) -> dict:
    from edgerun.codecs.bitstack import block_layout
    uo, vo, total = block_layout(d, n, k)
    parts = {"meta": np.array([d, n, k, K], np.int32), "inv_scale": np.ones(n, np.float32)}
    nb = (n + 7) // 8
    for i in range(K):
        blob = np.zeros(total, np.uint8)
        signs = rng.integers(0, 256, (d, nb), dtype=np.uint8)
        if n % 8:
            signs[:, -1] &= (1 << (n % 8)) - 1          # padding bits are 0
        blob[:d * nb] = signs.ravel()
        scale = 0.3 / (i + 1)
        blob[uo:uo + 2 * d * k] = rng.uniform(0, scale, (d, k)).astype(np.float16).view(np.uint8).ravel()
        blob[vo:vo + 2 * n * k] = rng.uniform(0, scale, (n, k)).astype(np.float16).view(np.uint8).ravel()
        parts[f"block.{i}"] = blob
    return parts


def codec_runs(codec: str, root: Path = ROOT) -> bool:
    """Whether `codec`'s kernels compile and run on this CPU (a subprocess: a kernel that does not
    compile for it aborts the process, e.g. an AVX-512 intrinsic on an AVX2 machine)."""
    if codec in ("f16", "flash", "dense"):
        return True
    codec = "spqr" if codec == "rotated" else codec         # a rotated pack is SpQR behind the transform
    code = ("import numpy as np, sys; sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[3]);"
            "import fuzz_ebin as fz; from edgerun.codecs import get_codec;"
            "rng = np.random.default_rng(0); c = sys.argv[1];"
            "parts = fz._cluster_parts(rng, 40, 70) if c == 'cluster' else fz._bitstack_parts(rng, 40, 70, 2, 2)"
            " if c == 'bitstack' else get_codec(c).encode(rng.standard_normal((40, 70)).astype(np.float32), {});"
            "lin = get_codec(c).load(parts, {}); out = np.empty((8, 40), np.float32);"
            "x = np.ones((8, 70), np.float32); lin.matvec(x[0], out[0]); lin.matmul(x, out); lin.row(0, x[0, :70])")
    r = subprocess.run([sys.executable, "-c", code, codec, str(root), str(ROOT / "tools")], capture_output=True,
                       timeout=600)
    return r.returncode == 0


# ----------------------------------------------------------------------------- file surgery

class Ebin:
    """The bytes of an .ebin, parsed just enough to rewrite it (formats/ebin.md §Layout)."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.m_off, self.m_len = struct.unpack_from("<QQ", data, 16)
        self.manifest = json.loads(bytes(data[self.m_off:self.m_off + self.m_len]))
        self.arrays = self.manifest["arrays"]

    def copy(self) -> "Ebin":
        return Ebin(bytes(self.data))

    def with_manifest(self, manifest=None, text: bytes | None = None) -> bytes:
        """The file with a new manifest (same offset), manifest and header crc32 recomputed."""
        body = text if text is not None else json.dumps(manifest if manifest is not None else self.manifest,
                                                        ensure_ascii=False).encode()
        data = bytearray(self.data[:self.m_off]) + body
        struct.pack_into("<QI", data, 24, len(body), zlib.crc32(body))
        struct.pack_into("<I", data, 60, zlib.crc32(bytes(data[:60])))
        return bytes(data)

    def set_array(self, name: str, raw: bytes) -> None:
        """Overwrite array `name`'s bytes (same length) and record their crc32."""
        a = self.arrays[name]
        assert len(raw) == a["length"], (name, len(raw), a["length"])
        self.data[a["offset"]:a["offset"] + len(raw)] = raw
        a["crc32"] = zlib.crc32(raw)

    def array(self, name: str) -> np.ndarray:
        a = self.arrays[name]
        raw = bytes(self.data[a["offset"]:a["offset"] + a["length"]])
        return np.frombuffer(raw, dtype=a["dtype"]).reshape(a["shape"]).copy()

    def spans(self):
        return sorted((a["offset"], a["offset"] + a["length"]) for a in self.arrays.values() if a["length"])

    def region(self, start: int, end: int) -> dict:
        """What must happen when bytes [start, end) change without any checksum recomputed."""
        if start < 64 or (self.m_off < end and start < self.m_off + self.m_len):
            return ERR
        if any(s < end and start < e for s, e in self.spans()):
            return DATA
        return OK           # header padding, padding between arrays, bytes after the manifest


@dataclass
class Case:
    name: str
    base: str                     # which base pack (BASE_KINDS), or "" for special files
    build: object                 # callable(Ebin) -> bytes, or a special: "fifo" | "dir" | "device"
    expect: dict = field(default_factory=lambda: dict(ERR))

    def write(self, bases: dict, directory: Path) -> Path:
        path = directory / f"{self.name}.ebin"
        if path.exists() or path.is_symlink():
            if path.is_dir():
                os.rmdir(path)
            else:
                path.unlink()
        if self.build == "fifo":
            os.mkfifo(path)
        elif self.build == "dir":
            path.mkdir()
        elif self.build == "device":
            path.symlink_to("/dev/zero")
        else:
            path.write_bytes(self.build(Ebin(bases[self.base].read_bytes())))
        return path


def _manifest_edit(fn):
    """A build step: edit the parsed manifest in place, recompute the checksums."""
    def build(e: Ebin) -> bytes:
        m = e.manifest
        fn(m)
        return e.with_manifest(m)
    return build


def _data_edit(fn):
    """A build step: edit array bytes (crc32 recomputed) and/or the manifest, recompute checksums."""
    def build(e: Ebin) -> bytes:
        fn(e)
        return e.with_manifest(e.manifest)
    return build


def flip(pos: int, mask: int):
    """A build step: XOR one byte, no checksum recomputed."""
    def build(e: Ebin) -> bytes:
        d = bytearray(e.data)
        d[pos] ^= mask
        return bytes(d)
    return build


def _set_array(part: str, arr: np.ndarray):
    """A build step: array `part` := arr (same byte length), checksums recomputed."""
    return _data_edit(lambda e: e.set_array(part, np.ascontiguousarray(arr).tobytes()))


def _f16(value) -> bytes:
    return np.float16(value).tobytes()


def cases(bases_info: dict, seed: int = 0) -> list[Case]:
    """The corpus. `bases_info[kind]` is an Ebin of each base pack (for sizes and names)."""
    rng = np.random.default_rng(seed)
    out: list[Case] = []
    add = lambda *a, **k: out.append(Case(*a, **k))                      # noqa: E731
    B = bases_info["f16"]
    size = len(B.data)
    arrays = B.arrays
    L0 = "model.layers.0."
    nonempty = sorted(n for n, a in arrays.items() if a["length"])

    # --- truncations (the manifest is last: every cut is caught before reading data)
    cuts = [0, 5, 12, 40, 63, 64, 2000, 4096, 4097, B.m_off - 1, B.m_off, B.m_off + 10, size - 1]
    cuts += sorted(int(c) for c in rng.integers(4096, B.m_off, 5))
    for c in cuts:
        add(f"truncate-{c}", "f16", lambda e, c=c: bytes(e.data[:c]))

    # --- single byte flips, no checksum recomputed
    for pos in list(range(0, 64, 5)) + [int(p) for p in rng.integers(64, 4096, 4)]:
        add(f"flip-header-{pos}", "f16", flip(pos, 1 << int(rng.integers(8))), B.region(pos, pos + 1))
    for pos in rng.integers(B.m_off, B.m_off + B.m_len, 12):
        add(f"flip-manifest-{pos}", "f16", flip(int(pos), int(rng.integers(1, 256))))
    for k in range(30):
        name = nonempty[int(rng.integers(len(nonempty)))]
        a = arrays[name]
        pos = a["offset"] + int(rng.integers(a["length"]))
        add(f"flip-data-{k}-{name}", "f16", flip(pos, int(rng.integers(1, 256))), DATA)
    gaps = [(e, -(-e // 4096) * 4096) for _, e in B.spans() if e % 4096]
    for k in range(10):
        s, e_ = gaps[int(rng.integers(len(gaps)))]
        pos = int(rng.integers(s, e_))
        add(f"flip-padding-{k}", "f16", flip(pos, int(rng.integers(1, 256))), OK)

    # --- overwrites with random bytes, no checksum recomputed
    def overwrite(pos, n):
        junk = rng.bytes(n)

        def build(e):
            d = bytearray(e.data)
            d[pos:pos + n] = junk[:max(0, min(n, len(d) - pos))]
            return bytes(d[:len(e.data)])
        return build
    spots = [(int(p), int(n)) for p, n in zip(rng.integers(0, 64, 3), rng.integers(4, 32, 3))]
    spots += [(int(p), int(n)) for p, n in zip(rng.integers(B.m_off, B.m_off + B.m_len - 64, 6), rng.integers(8, 64, 6))]
    spots += [(int(p), int(n)) for p, n in zip(rng.integers(4096, B.m_off - 512, 10), rng.integers(16, 512, 10))]
    for p, n in spots:
        add(f"overwrite-{p}-{n}", "f16", overwrite(p, n), B.region(p, p + n))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        def zero(e, name=name):
            a = e.arrays[name]
            d = bytearray(e.data)
            d[a["offset"]:a["offset"] + a["length"]] = bytes(a["length"])
            return bytes(d)
        add(f"zero-array-{name}", "f16", zero, DATA)
    for n in (1, 4096, 1 << 20):
        add(f"trailing-{n}", "f16", lambda e, n=n: bytes(e.data) + b"\x01" * n, OK)

    # --- header fields with the header crc recomputed
    def header(fmt, off, value):
        def build(e):
            d = bytearray(e.data)
            struct.pack_into(fmt, d, off, value)
            struct.pack_into("<I", d, 60, zlib.crc32(bytes(d[:60])))
            return bytes(d)
        return build
    for label, fmt, off, value in [("version-0", "<I", 8, 0), ("version-2", "<I", 8, 2), ("flags", "<I", 12, 4),
                                   ("moff-0", "<Q", 16, 0), ("moff-unaligned", "<Q", 16, B.m_off + 1),
                                   ("moff-past-end", "<Q", 16, size + 4096), ("mlen-0", "<Q", 24, 0),
                                   ("mlen-huge", "<Q", 24, 1 << 31), ("mlen-short", "<Q", 24, B.m_len - 1),
                                   ("align-1000", "<I", 36, 1000), ("align-0", "<I", 36, 0),
                                   ("mcrc", "<I", 32, 12345)]:
        add(f"header-{label}", "f16", header(fmt, off, value))
    add("header-reserved", "f16", header("<I", 44, 0xDEADBEEF), OK)    # reserved: readers ignore it

    # --- raw manifest text (checksums recomputed)
    def text(t):
        return lambda e: e.with_manifest(text=t if isinstance(t, bytes) else t.encode())
    add("manifest-not-json", "f16", text("{not json"))
    add("manifest-array", "f16", text("[1, 2, 3]"))
    add("manifest-empty-object", "f16", text("{}"))
    add("manifest-not-utf8", "f16", text(b'{"a": "\xff\xfe"}'))
    for depth in (200, 10000, 100000):
        add(f"manifest-nested-{depth}", "f16",
            lambda e, depth=depth: e.with_manifest(text=(json.dumps(e.manifest)[:-1] + ', "deep": '
                                                         + "[" * depth + "]" * depth + "}").encode()))
    add("manifest-nan-eps", "f16", lambda e: e.with_manifest(
        text=json.dumps(e.manifest).replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN').encode()))
    add("manifest-infinity-theta", "f16", lambda e: e.with_manifest(
        text=json.dumps(e.manifest).replace('"rope_theta": 10000.0', '"rope_theta": Infinity').encode()))
    add("manifest-unknown-keys", "f16", _manifest_edit(lambda m: m.update(future={"x": [1, 2]}, extra=3)), OK)
    add("manifest-large-source", "f16", _set("source.description", "x" * (2 << 20)), OK)

    # --- format section
    for label, value in [("min-reader-2", {"min_reader_version": 2, "features": []}),
                         ("min-reader-str", {"min_reader_version": "1", "features": []}),
                         ("features-str", {"min_reader_version": 1, "features": "abc"}),
                         ("features-int", {"min_reader_version": 1, "features": 5}),
                         ("features-lists", {"min_reader_version": 1, "features": [[1]]}),
                         ("features-unknown", {"min_reader_version": 1, "features": ["teleport"]}),
                         ("not-object", [])]:
        add(f"format-{label}", "f16", _set("format", value))

    # --- config vs shapes, types and ranges
    config_cases = [
        ("num_attention_heads", v) for v in (0, -1, 3, 5, 8, 64, 1 << 40, "4", 4.5, None, True)] + [
        ("hidden_size", v) for v in (0, -64, 10, 65, 128, 1 << 40, "64", 64.0)] + [
        ("vocab_size", v) for v in (10, 0, -1, 1 << 31, 1e9, 301)] + [
        ("intermediate_size", v) for v in (0, 95, 97, 1 << 40)] + [
        ("num_hidden_layers", v) for v in (0, 1, 3, 1 << 31)] + [
        ("num_key_value_heads", v) for v in (0, 3, 4, 8, -2)] + [
        ("head_dim", v) for v in (0, 7, 15, 32, 1 << 20)] + [
        ("rms_norm_eps", v) for v in (0, -1.0, 1e30, "x")] + [
        ("rope_theta", v) for v in (0, -10000.0, "x")] + [
        ("max_position_embeddings", v) for v in (0, -5, 1 << 62)] + [
        ("tie_word_embeddings", v) for v in (True, "no")] + [
        ("attention_bias", True), ("mlp_bias", True), ("sliding_window", 0), ("use_sliding_window", "no"),
        ("architectures", []), ("architectures", ["GPT2LMHeadModel"]), ("architectures", 5),
        ("architectures", ["Qwen3ForCausalLM"]), ("architectures", [None]),
        ("rope_scaling", {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 64}),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8, "low_freq_factor": 2, "high_freq_factor": 2,
                          "original_max_position_embeddings": 64}),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8}),
        ("rope_scaling", {"rope_type": "linear", "factor": 0}),
        ("rope_scaling", {"rope_type": "linear", "factor": "2"}),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2}),
        ("rope_scaling", "linear"), ("rope_scaling", [1, 2]), ("rope_parameters", 7),
        ("hidden_size", "!"), ("vocab_size", "!"),
    ]
    for key, value in config_cases:
        add(f"config-{key}-{str(value)[:24]}", "f16", _set(f"config.{key}", value))
    add("config-not-object", "f16", _set("config", [1]))
    for key, value in [("max_position_embeddings", 4096), ("rope_theta", 20000.0), ("rms_norm_eps", 1e-6),
                       ("unknown_key", {"a": 1}), ("head_dim", 16), ("num_key_value_heads", 2)]:
        add(f"config-valid-{key}", "f16", _set(f"config.{key}", value), OK)

    # vocab_size 10 with embedding and head cut to 10 rows, every checksum recomputed: a
    # consistent file whose tokenizer emits ids the model does not have
    def vocab10(e):
        e.manifest["config"]["vocab_size"] = 10
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            a = e.arrays[name]
            rows = a["shape"][1] * 2
            a["shape"][0], a["length"] = 10, 10 * rows
            a["crc32"] = zlib.crc32(bytes(e.data[a["offset"]:a["offset"] + 10 * rows]))
            e.manifest["tensors"][name]["shape"][0] = 10
        return e.with_manifest(e.manifest)
    add("config-vocab10-consistent", "f16", vocab10, RUNTIME)

    # --- the arrays table
    emb = "model.embed_tokens.weight"
    q = L0 + "self_attn.q_proj.weight"
    table_cases = [
        ("negative-offset", emb, "offset", -4096), ("offset-past-end", emb, "offset", 1 << 40),
        ("offset-unaligned", emb, "offset", arrays[emb]["offset"] + 2), ("offset-zero", emb, "offset", 0),
        ("offset-float", emb, "offset", float(arrays[emb]["offset"])),
        ("overlap", q, "offset", arrays[emb]["offset"]),
        ("length-short", emb, "length", arrays[emb]["length"] - 2), ("length-negative", emb, "length", -1),
        ("shape-huge", emb, "shape", [1 << 40, 1 << 40]), ("shape-negative", emb, "shape", [-1, 64]),
        ("shape-bool", "model.norm.weight", "shape", [True] * 1), ("shape-float", emb, "shape", [300.0, 64]),
        ("shape-deep", emb, "shape", [1] * 40), ("shape-str", emb, "shape", "300x64"),
        ("transposed", emb, "shape", arrays[emb]["shape"][::-1]),
        ("dtype-int16", emb, "dtype", "int16"), ("dtype-bool", emb, "dtype", "bool"), ("dtype-obj", emb, "dtype", "object"),
        ("dtype-float16", emb, "dtype", "float16"), ("dtype-list", emb, "dtype", ["uint16"]),
        ("crc-negative", emb, "crc32", -1), ("crc-huge", emb, "crc32", 1 << 33), ("crc-str", emb, "crc32", "0"),
        ("crc-wrong", emb, "crc32", (arrays[emb]["crc32"] + 1) % (1 << 32)),
        ("missing-offset", emb, "offset", "!"),
    ]
    for label, name, key, value in table_cases:
        expect = DATA if label == "crc-wrong" else ERR
        add(f"arrays-{label}", "f16", _set(f"arrays.{name}.{key}", value), expect)
    add("arrays-entry-list", "f16", _set(f"arrays.{emb}", [1, 2]))
    add("arrays-not-object", "f16", _set("arrays", [1]))
    add("arrays-delete-used", "f16", _set(f"arrays.{q}", "!"))

    # --- the tensors table
    tensor_cases = [
        ("delete-layer-tensor", f"tensors.{L0}mlp.up_proj.weight", "!"),
        ("delete-embed", f"tensors.{emb}", "!"),
        ("shape-plus-one", f"tensors.{q}.shape", [65, 64]), ("shape-transposed", f"tensors.{L0}mlp.down_proj.weight.shape", [96, 64]),
        ("codec-unknown", f"tensors.{q}.codec", "q4_1"), ("codec-int", f"tensors.{q}.codec", 5),
        ("dtype-f32", f"tensors.{q}.params.dtype", "f32"), ("dtype-f8", f"tensors.{q}.params.dtype", "f8"),
        ("dtype-list", f"tensors.{q}.params.dtype", ["f16"]),
        ("params-list", f"tensors.{q}.params", []), ("parts-missing-array", f"tensors.{q}.parts.weight", "nope"),
        ("parts-empty", f"tensors.{q}.parts", {}), ("parts-list", f"tensors.{q}.parts", ["a"]),
        ("parts-other-tensor", f"tensors.{q}.parts.weight", L0 + "self_attn.k_proj.weight"),
        ("parts-extra", f"tensors.{q}.parts.extra", emb),
        ("extra-tensor", "tensors.model.layers.7.mlp.up_proj.weight", {"codec": "dense", "params": {}, "shape": [1],
                                                                        "parts": {"weight": emb}}),
        ("vector-cluster", f"tensors.model.norm.weight.codec", "cluster"),
        ("entry-str", f"tensors.{q}", "dense"), ("not-object", "tensors", []),
    ]
    for label, path, value in tensor_cases:
        add(f"tensors-{label}", "f16", _set(path, value))

    # --- tokenizer and generation sections
    for label, path, value, expect in [
            ("json-int", "tokenizer.json", 5, ERR), ("json-bad", "tokenizer.json", "{not", ERR),
            ("json-empty", "tokenizer.json", "{}", ERR), ("missing", "tokenizer", "!", ERR),
            ("bos-str", "tokenizer.bos_token_id", "1", ERR), ("eos-str", "tokenizer.eos_token_ids", "abc", ERR),
            ("eos-negative", "tokenizer.eos_token_ids", [-1], ERR), ("eos-huge", "tokenizer.eos_token_ids", [10 ** 20], ERR),
            ("template-int", "tokenizer.chat_template", 5, ERR), ("special-list", "tokenizer.special_tokens", [], ERR),
            ("add-bos-str", "tokenizer.add_bos_token", "yes", ERR),
            ("not-object", "tokenizer", "tok", ERR),
            ("temperature-str", "generation.temperature", "hot", ERR), ("temperature-neg", "generation.temperature", -1, ERR),
            ("top-k-str", "generation.top_k", "x", ERR), ("top-k-neg", "generation.top_k", -5, ERR),
            ("top-p-2", "generation.top_p", 2.0, ERR), ("penalty-0", "generation.repetition_penalty", 0, ERR),
            ("do-sample-str", "generation.do_sample", "no", ERR), ("generation-list", "generation", [], ERR),
            ("generation-valid", "generation", {"temperature": 0.3, "top_k": 10, "do_sample": True}, OK),
            ("source-int", "source", 5, OK), ("source-str", "source", "somewhere", OK)]:
        add(f"section-{label}", "f16", _set(path, value), expect)

    def bos_out_of_range(e):
        e.manifest["tokenizer"].update(bos_token_id=100000, add_bos_token=True)
        return e.with_manifest(e.manifest)
    add("tokenizer-bos-out-of-vocab", "f16", bos_out_of_range, RUNTIME)

    # --- weights with recomputed checksums: valid files, non-finite numbers
    def fill(name, value, count=None):
        def fn(e):
            a = e.arrays[name]
            n = a["length"] // 2 if count is None else count
            raw = bytearray(e.data[a["offset"]:a["offset"] + a["length"]])
            raw[:2 * n] = _f16(value) * n
            e.set_array(name, bytes(raw))
        return _data_edit(fn)
    add("nan-final-norm", "f16", _data_edit(lambda e: e.set_array(
        "model.norm.weight", np.full(64, np.nan, np.float32).tobytes())), NUMERIC)
    add("nan-q-proj", "f16", fill(q, np.nan, 64), NUMERIC)
    add("inf-embed", "f16", fill(emb, np.inf), NUMERIC)
    add("inf-down-proj", "f16", fill(L0 + "mlp.down_proj.weight", -np.inf, 500), NUMERIC)
    add("zero-input-norm", "f16", _data_edit(lambda e: e.set_array(
        L0 + "input_layernorm.weight", bytes(64 * 4))), OK)

    if "flash" in bases_info:
        _flash_cases(bases_info["flash"], add, rng)
    if "cluster" in bases_info:
        _cluster_cases(bases_info["cluster"], add)
    if "spqr" in bases_info:
        _spqr_cases(bases_info["spqr"], add)
    if "bitstack" in bases_info:
        _bitstack_cases(bases_info["bitstack"], add)
    if "rotated" in bases_info:
        _rotated_cases(bases_info["rotated"], add)

    # --- not regular files
    add("special-fifo", "", "fifo")
    add("special-directory", "", "dir")
    add("special-device", "", "device")
    return out


def _flash_cases(F: Ebin, add, rng) -> None:
    L0 = "model.layers.0."
    layers = F.manifest["flash"]["layers"]
    b0 = layers[0]["bundles"]
    for label, path, value in [("layers-short", "flash.layers", layers[:1]),
                               ("dtype-f32", "flash.dtype", "f32"), ("hidden-65", "flash.hidden_size", 65),
                               ("inter-1000", "flash.intermediate_size", 1000), ("rank-0", "flash.predictor_rank", 0),
                               ("version-3", "flash.version", 3), ("codec-spqr", "flash.codec", "spqr"),
                               ("not-object", "flash", 5)]:
        add(f"flash-{label}", "flash", _set(path, value))
    add("flash-bundles-shape", "flash", _set(f"arrays.{b0}.shape", [96, 3, 32]))
    add("flash-thresholds", "flash", _manifest_edit(lambda m: m["flash"]["layers"][1]["thresholds"].update(gate=[1, 2])))
    add("flash-missing-bundles", "flash", _manifest_edit(lambda m: m["flash"]["layers"][0].pop("bundles")))
    add("flash-ffn-tensor", "flash", _manifest_edit(lambda m: m["tensors"].__setitem__(
        L0 + "mlp.up_proj.weight", m["tensors"]["model.norm.weight"])))
    a = F.arrays[b0]
    for k in range(3):
        add(f"flash-flip-bundle-{k}", "flash", flip(a["offset"] + int(rng.integers(a["length"])), 0x10), DATA)
    end = a["offset"] + 100
    add("flash-truncate", "flash", lambda e: bytes(e.data[:end]))


def _cluster_cases(C: Ebin, add) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    t = C.manifest["tensors"][name]["parts"]
    m0 = C.array(t["meta"])          # [d, n, bits, group_rows, plane_order]
    for label, k, v in [("rows", 0, m0[0] + 64), ("bits", 2, 8), ("group", 3, 0), ("cols", 1, m0[1] * 4),
                        ("order", 4, 3)]:
        meta = np.array(m0, np.int32)
        meta[k] = v
        add(f"cluster-meta-{label}", "cluster", _set_array(t["meta"], meta), DATA)
    add("cluster-codes-shape", "cluster", _set(f"arrays.{t['codes']}.shape", [48, C.arrays[t["codes"]]["shape"][1] * 2]))
    add("cluster-codebook-shape", "cluster", _set(f"arrays.{t['codebook']}.shape", [1, 64]))
    add("cluster-params-bits", "cluster", _set(f"tensors.{name}.params.bits", "four"))
    add("cluster-params-outliers", "cluster", _set(f"tensors.{name}.params.outliers", 0.5))
    if "outlier_rowptr" in t:
        rp = C.array(t["outlier_rowptr"])
        bad = rp.copy()
        bad[1] = rp[-1] + 5
        add("cluster-rowptr", "cluster", _set_array(t["outlier_rowptr"], bad), DATA)
        col = C.array(t["outlier_col"])
        if len(col):
            col[0] = 60000
            add("cluster-outlier-col", "cluster", _set_array(t["outlier_col"], col), DATA)
        add("cluster-outlier-part-missing", "cluster", _set(f"tensors.{name}.parts.outlier_val", "!"))


def _spqr_cases(S: Ebin, add) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    t = S.manifest["tensors"][name]["parts"]
    perm = S.array(t["perm"])
    p2 = perm.copy()
    p2[3] = 60000
    add("spqr-perm-out-of-range", "spqr", _set_array(t["perm"], p2), DATA)
    p3 = perm.copy()
    p3[1] = p3[0]
    add("spqr-perm-duplicate", "spqr", _set_array(t["perm"], p3), DATA)
    rp = S.array(t["outlier_rowptr"])
    r2 = rp.copy()
    r2[-1] = rp[-1] + 1000
    add("spqr-rowptr-end", "spqr", _set_array(t["outlier_rowptr"], r2), DATA)
    r3 = rp.copy()
    r3[0] = -7
    add("spqr-rowptr-negative", "spqr", _set_array(t["outlier_rowptr"], r3), DATA)
    col = S.array(t["outlier_col"])
    if len(col):
        col[-1] = 5000
        add("spqr-outlier-col", "spqr", _set_array(t["outlier_col"], col), DATA)
    add("spqr-stats-shape", "spqr", _set(f"arrays.{t['stats']}.shape", [1, 4, 4]))
    add("spqr-params-bits", "spqr", _set(f"tensors.{name}.params.bits", 5))
    add("spqr-params-stat-group", "spqr", _set(f"tensors.{name}.params.stat_group", 0))
    add("spqr-params-threshold", "spqr", _set(f"tensors.{name}.params.outlier_threshold", "x"))
    add("spqr-missing-part", "spqr", _set(f"tensors.{name}.parts.perm", "!"))
    add("spqr-flip-codes", "spqr", flip(S.arrays[t["codes"]]["offset"] + 7, 0x40), DATA)


def _rotated_cases(R: Ebin, add) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    signs = R.manifest["tensors"][name]["parts"]["rotation_signs"]
    for label, value in [("block-3", {"block": 3}), ("block-past-n", {"block": 1 << 20}), ("block-1", {"block": 1}),
                         ("block-str", {"block": "64"}), ("null", None), ("list", [64])]:
        add(f"rotated-{label}", "rotated", _set(f"tensors.{name}.rotation", value))
    add("rotated-signs-missing", "rotated", _set(f"tensors.{name}.parts.rotation_signs", "!"))
    add("rotated-entry-missing", "rotated", _set(f"tensors.{name}.rotation", "!"))   # signs: not spqr's part
    add("rotated-signs-shape", "rotated", _set(f"arrays.{signs}.shape", [3]))
    add("rotated-signs-dtype", "rotated", _set(f"arrays.{signs}.dtype", "uint8"))
    bad = R.array(signs)
    bad[5] = 2
    add("rotated-signs-value", "rotated", _set_array(signs, bad), DATA)
    add("rotated-norm", "rotated", _set("tensors.model.layers.0.input_layernorm.weight.rotation", {"block": 2}))
    block = R.manifest["tensors"][name]["rotation"]["block"]
    add("rotated-extra-key", "rotated", _set(f"tensors.{name}.rotation", {"block": block, "note": "x"}), OK)


def _bitstack_cases(K: Ebin, add) -> None:
    name = "model.layers.0.mlp.gate_proj.weight"
    t = K.manifest["tensors"][name]["parts"]
    first = list(K.manifest["bitstack"]["order"][0])
    for label, fn in [("missing-tensor", lambda o: o.append(["nope", 0])), ("block-range", lambda o: o.append([name, 99])),
                      ("duplicate", lambda o: o.insert(0, first)), ("drop", lambda o: o.pop()),
                      ("reverse", lambda o: o.reverse()), ("entry-int", lambda o: o.append(3))]:
        add(f"bitstack-order-{label}", "bitstack", _manifest_edit(lambda m, fn=fn: fn(m["bitstack"]["order"])))
    add("bitstack-order-str", "bitstack", _set("bitstack.order", "all"))
    add("bitstack-section-null", "bitstack", _set("bitstack", None))
    add("bitstack-curve-bad", "bitstack", _set("bitstack.curve", [["x", 1]]))
    m0 = K.array(t["meta"])
    add("bitstack-meta-rank", "bitstack", _set_array(t["meta"], np.array([m0[0], m0[1], m0[2] + 1, m0[3]], np.int32)),
        DATA)
    add("bitstack-meta-rows", "bitstack", _set_array(t["meta"], np.array([m0[0] * 2, m0[1], m0[2], m0[3]], np.int32)),
        DATA)
    add("bitstack-block-shape", "bitstack", _set(f"arrays.{t['block.1']}.shape", [K.arrays[t["block.1"]]["shape"][0] - 64]))
    add("bitstack-params-blocks", "bitstack", _set(f"tensors.{name}.params.blocks", 1000))
    add("bitstack-flip-block", "bitstack", flip(K.arrays[t["block.0"]]["offset"] + 3, 0x01), DATA)


def _edit_tensor(path: str, value, names: list[str]):
    """_set for paths through a tensor or array name (names contain dots)."""
    head, rest = path.split(".", 1)
    name = max((n for n in names if rest == n or rest.startswith(n + ".")), key=len, default=None)
    if name is None:                       # a new name (e.g. an extra tensor)
        name, keys = rest, []
    else:
        keys = rest[len(name) + 1:].split(".") if rest != name else []

    def fn(m):
        o = m[head]
        if not keys:
            if value == "!":
                del o[name]
            else:
                o[name] = value
            return
        o = o[name]
        for k in keys[:-1]:
            o = o[k]
        if value == "!":
            del o[keys[-1]]
        else:
            o[keys[-1]] = value
    return _manifest_edit(fn)


def _set(path: str, value):
    """Edit: manifest[k1][k2]... = value for path "k1.k2..." ("!" deletes); under "arrays" and
    "tensors" the next key is an array or tensor name, which contains dots itself."""
    head = path.split(".", 1)[0]
    if head in ("arrays", "tensors") and "." in path:
        return _edit_tensor(path, value, _KNOWN_NAMES)
    keys = path.split(".")

    def fn(m):
        o = m
        for k in keys[:-1]:
            o = o[k]
        if value == "!":
            del o[keys[-1]]
        else:
            o[keys[-1]] = value
    return _manifest_edit(fn)


_KNOWN_NAMES: list[str] = []


def load_cases(bases: dict, seed: int = 0) -> list[Case]:
    """The corpus for base packs `bases` (kind -> path); case names are unique file names."""
    infos = {k: Ebin(p.read_bytes()) for k, p in bases.items()}
    _KNOWN_NAMES[:] = sorted({n for e in infos.values() for n in list(e.arrays) + list(e.manifest["tensors"])})
    out = cases(infos, seed)
    seen = Counter()
    for c in out:
        clean = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c.name)[:80]
        seen[clean] += 1
        c.name = clean if seen[clean] == 1 else f"{clean}-{seen[clean]}"
    return out


# ----------------------------------------------------------------------------- running

def classify(expect: str, status: str) -> str:
    """status: ok | error | traceback | signal | hang -> outcome."""
    if status == "ok":
        return "exit 0 on corrupted" if expect == "error" else "ok"
    if status == "error":
        return "false alarm" if expect == "ok" else "clean error"
    return status


def cli_args(command: str, path: Path) -> list[str]:
    if command == "verify":
        return ["verify", str(path)]
    if command == "info":
        return ["info", str(path), "-c", str(CONTEXT)]
    return ["generate", str(path), "-p", PROMPT, "-n", "4", "--temp", "0", "-c", str(CONTEXT)]


def run_cli(command: str, path: Path, root: Path = ROOT, timeout: float = 120) -> tuple[str, str]:
    """(status, last line of stderr) of `python -m edgerun <command>` run from tree `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    try:
        r = subprocess.run([sys.executable, "-m", "edgerun", *cli_args(command, path)], capture_output=True,
                           text=True, timeout=timeout, env=env, cwd=str(root), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "hang", f"no exit within {timeout:.0f} s"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if r.returncode < 0:
        return "signal", f"killed by {signal.Signals(-r.returncode).name}: {last}"
    if "Traceback (most recent call last)" in r.stderr:
        return "traceback", last
    return ("ok" if r.returncode == 0 else "error"), last


def run_inprocess(command: str, path: Path) -> tuple[str, str]:
    """The functions the CLI calls, in this process: ("ok" | "error", message). Any exception that
    is not an EdgerunError propagates (a test failure)."""
    from edgerun.errors import EdgerunError
    try:
        if command == "verify":
            from edgerun.validate import verify_file
            verify_file(path)
        elif command == "info":
            from edgerun.cli import resolve_model
            from edgerun.info import describe
            describe(resolve_model(str(path)), CONTEXT)
        else:
            from edgerun import api
            from edgerun.cli import resolve_model
            with api.load(resolve_model(str(path)), context=CONTEXT) as m:
                m.generate(PROMPT, max_tokens=4, temperature=0)
    except EdgerunError as e:
        msg = str(e)
        if "\n" in msg.strip():
            raise AssertionError(f"a multi-line error message: {msg!r}") from e
        return "error", msg
    return "ok", ""


def run_corpus(corpus: list[Case], bases: dict, directory: Path, runner, commands=COMMANDS, jobs: int = 1,
               log=print, runnable=None) -> list[tuple[Case, str, str, str, str]]:
    """[(case, command, expectation, outcome, message)]. Cases on a base whose codec's kernels do
    not run on this CPU (`runnable[base]` False) run `verify` only, which runs no kernel."""
    runnable = runnable or {}
    tasks = [(c, cmd) for c in corpus for cmd in commands if cmd == "verify" or runnable.get(c.base, True)]
    paths = {c.name: c.write(bases, directory) for c in corpus}

    def one(task):
        c, cmd = task
        status, msg = runner(cmd, paths[c.name])
        return c, cmd, c.expect[cmd], classify(c.expect[cmd], status), msg

    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, res in enumerate(pool.map(one, tasks)):
            results.append(res)
            if res[3] not in ("ok", "clean error"):
                log(f"  {res[0].name} {res[1]}: {res[3]}: {res[4][:160]}")
            if (i + 1) % 100 == 0:
                log(f"  {i + 1}/{len(tasks)} runs")
    return results


OUTCOMES = ("exit 0 on corrupted", "traceback", "signal", "hang", "clean error", "ok", "false alarm")


def table(results) -> str:
    by = {cmd: Counter(r[3] for r in results if r[1] == cmd) for cmd in COMMANDS}
    total = Counter(r[3] for r in results)
    lines = ["| outcome | " + " | ".join(COMMANDS) + " | all |", "|---|" + "---:|" * (len(COMMANDS) + 1)]
    for o in OUTCOMES:
        lines.append(f"| {o} | " + " | ".join(str(by[c][o]) for c in COMMANDS) + f" | {total[o]} |")
    lines.append(f"| runs | " + " | ".join(str(sum(by[c].values())) for c in COMMANDS) + f" | {len(results)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the edgerun tree whose CLI runs the corpus")
    ap.add_argument("--work", type=Path, default=None, help="directory for the packs and the corpus (default: temp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument("--json", type=Path, default=None, help="write every run's outcome here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fuzz-ebin-"))
    work.mkdir(parents=True, exist_ok=True)
    bases = make_bases(work)
    corpus = load_cases(bases, args.seed)
    if args.only:
        corpus = [c for c in corpus if args.only in c.name]
    if args.list:
        for c in corpus:
            print(f"{c.name:60} {c.base:9} " + " ".join(f"{k}={v}" for k, v in c.expect.items()))
        print(f"{len(corpus)} cases")
        return
    files = work / "corpus"
    files.mkdir(exist_ok=True)
    print(f"{len(corpus)} cases x {len(COMMANDS)} commands through {args.root} (python -m edgerun)", flush=True)
    runnable = {kind: codec_runs(kind, args.root) for kind in bases}
    for kind, ok in runnable.items():
        if not ok:
            print(f"  {kind}: its kernels do not compile for this CPU: its cases run verify only", flush=True)
    # warm the JIT cache of the tree under test once per base before running cases in parallel
    for kind, path in bases.items():
        for cmd in (COMMANDS if runnable[kind] else ("verify",)):
            status, msg = run_cli(cmd, path, args.root, timeout=900)
            if status != "ok":
                print(f"  base {kind} {cmd}: {status}: {msg}", flush=True)
    t0 = time.perf_counter()
    results = run_corpus(corpus, bases, files, lambda cmd, p: run_cli(cmd, p, args.root, args.timeout),
                         jobs=args.jobs, log=lambda s: print(s, flush=True), runnable=runnable)
    print(f"\n{len(results)} runs in {time.perf_counter() - t0:.0f} s\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([{"case": c.name, "command": cmd, "expect": e, "outcome": o, "message": m}
                                         for c, cmd, e, o, m in results], indent=1))


if __name__ == "__main__":
    main()

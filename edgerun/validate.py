"""Is this .ebin a model the runtime can run safely? (formats/ebin.md §Model checks)

`EbinFile` checks the container (header, manifest, array table, checksums). This module checks
what the manifest *says*, before any kernel runs: every field typed and ranged, the config
consistent with the stored arrays (each tensor present with the shape the config implies, each
codec's parts with the dtypes and shapes its kernels index), and, once the small index parts are
read, their contents (permutations, row pointers, column indices, dimensions in `meta`). The
kernels index without bounds checks: after these checks every index they compute is in range.

Every failure is a FormatError (UnsupportedModelError for a codec or architecture this edgerun
does not implement) naming the file and the tensor, array or key.
"""
from __future__ import annotations

import numpy as np

from .codecs import CODECS, codec_class
from .config import ModelConfig, _short, is_int, is_number, tensor_shapes
from .errors import EdgerunError, FormatError, UnsupportedModelError

# tensor entry keys / parts whose contents `check_parts` reads (small index arrays)
INDEX_PARTS = {
    "dense": (),
    "cluster": ("meta", "outlier_rowptr", "outlier_col"),
    "spqr": ("perm", "outlier_rowptr", "outlier_col"),
    "bitstack": ("meta",),
    "vq": ("meta", "perm"),
}
DENSE_STORED = {"f32": "float32", "f16": "uint16", "bf16": "uint16"}
FLASH_STORED = DENSE_STORED
MAX_BITSTACK_BLOCKS = 64
MAX_BITSTACK_RANK = 16
MAX_BITSTACK_JOINT = 8


class _Check:
    """Error helper: FormatError("<file>: <where>: <what>")."""

    def __init__(self, path):
        self.path = path

    def fail(self, msg: str, cls=FormatError):
        raise cls(f"{self.path}: {msg}")

    def require(self, ok, msg: str):
        if not ok:
            self.fail(msg)


def _int_in(v, lo, hi) -> bool:
    return is_int(v) and lo <= v <= hi


# ----------------------------------------------------------------------------- the manifest

def check_model(ebin) -> ModelConfig:
    """Validate `ebin.manifest` against `ebin.arrays` for running; returns the model config.

    Reads no array data. Raises FormatError (or UnsupportedModelError) naming the file."""
    c = _Check(ebin.path)
    man, arrays = ebin.manifest, ebin.arrays
    for key, kind in (("config", dict), ("tokenizer", dict), ("tensors", dict)):
        c.require(isinstance(man.get(key), kind), f'manifest has no "{key}" object')
    try:
        cfg = ModelConfig.from_dict(man["config"])
    except UnsupportedModelError as e:
        c.fail(str(e), UnsupportedModelError)
    except FormatError as e:
        c.fail(str(e))
    _check_tokenizer(c, man["tokenizer"])
    _check_generation(c, man.get("generation"))
    expected = tensor_shapes(cfg)
    flash = man.get("flash")
    if flash is not None:
        _check_flash(c, flash, cfg, arrays)
        expected = {n: s for n, s in expected.items() if not _is_ffn_weight(n)}
    tensors = man["tensors"]
    missing = [n for n in expected if n not in tensors]
    if missing:
        c.fail(f"tensor {missing[0]} is missing ({len(missing)} of the {len(expected)} tensors "
               f"{cfg.architecture} with this config needs are absent)")
    extra = [n for n in tensors if n not in expected]
    if extra:
        c.fail(f"tensor {_short(extra[0])} is not part of a {cfg.architecture} with this config "
               f"({len(extra)} unexpected tensors)")
    for name, shape in expected.items():
        _check_tensor(c, name, tensors[name], shape, arrays)
    stacked = [n for n, e in tensors.items() if e["codec"] == "bitstack"]
    if stacked or man.get("bitstack") is not None:
        c.require(stacked, 'manifest has a "bitstack" section but no BitStack tensors')
        _check_bitstack(c, man.get("bitstack"), tensors, stacked)
    return cfg


def _is_ffn_weight(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(
        ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"))


def _check_tokenizer(c: _Check, tok: dict) -> None:
    c.require(isinstance(tok.get("json"), str), 'manifest "tokenizer.json" must be the tokenizer.json text')
    template = tok.get("chat_template")
    ok = template is None or isinstance(template, str) or (
        isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                           and isinstance(t.get("template"), str) for t in template)) or (
        isinstance(template, dict) and all(isinstance(v, str) for v in template.values()))
    c.require(ok, f'manifest "tokenizer.chat_template" must be text or null, got {_short(template)}')
    bos = tok.get("bos_token_id")
    c.require(bos is None or _int_in(bos, 0, 1 << 31), f'manifest "tokenizer.bos_token_id" must be a token id or '
                                                         f"null, got {_short(bos)}")
    eos = tok.get("eos_token_ids")
    c.require(eos is None or (isinstance(eos, list) and all(_int_in(i, 0, 1 << 31) for i in eos)),
              f'manifest "tokenizer.eos_token_ids" must be a list of token ids, got {_short(eos)}')
    add = tok.get("add_bos_token", False)
    c.require(isinstance(add, bool), f'manifest "tokenizer.add_bos_token" must be true or false, got {_short(add)}')
    special = tok.get("special_tokens")
    c.require(special is None or (isinstance(special, dict) and all(
        v is None or isinstance(v, str) for v in special.values())),
        f'manifest "tokenizer.special_tokens" must map names to token texts, got {_short(special)}')


# generation_config keys the runtime reads -> (check, what it must be)
_GENERATION = {
    "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "top_k": (lambda v: _int_in(v, 0, 1 << 31), "an integer >= 0"),
    "top_p": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "min_p": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
}


def _check_generation(c: _Check, gen) -> None:
    if gen is None:
        return
    c.require(isinstance(gen, dict), f'manifest "generation" must be an object, got {_short(gen)}')
    for key, (ok, what) in _GENERATION.items():
        v = gen.get(key)
        c.require(v is None or ok(v), f'manifest "generation.{key}" must be {what}, got {_short(v)}')


def _array(c: _Check, arrays: dict, where: str, name) -> object:
    c.require(isinstance(name, str) and name in arrays,
              f"{where} names array {_short(name)}, which is not in the file")
    return arrays[name]


def _check_tensor(c: _Check, name: str, e, shape: tuple, arrays: dict) -> None:
    """One `tensors` entry: its codec, params, declared shape and its parts' dtypes and shapes."""
    where = f"tensor {name}"
    c.require(isinstance(e, dict), f"{where}: the entry is not an object")
    codec = e.get("codec")
    c.require(isinstance(codec, str), f"{where}: codec must be a name, got {_short(codec)}")
    if codec not in CODECS:
        c.fail(f"{where}: weight codec {_short(codec)} is not supported (known: {', '.join(sorted(CODECS))})",
               UnsupportedModelError)
    params = e.get("params", {})
    c.require(isinstance(params, dict), f"{where}: params must be an object, got {_short(params)}")
    declared = e.get("shape")
    c.require(isinstance(declared, list) and all(is_int(s) for s in declared),
              f"{where}: shape must be a list of integers, got {_short(declared)}")
    c.require(tuple(declared) == shape, f"{where}: shape {declared} does not match the config, which "
                                        f"implies {list(shape)}")
    parts = e.get("parts")
    c.require(isinstance(parts, dict) and parts, f"{where}: parts must name its arrays, got {_short(parts)}")
    info = {p: _array(c, arrays, f"{where} part {_short(p)}", a) for p, a in parts.items()}
    if len(shape) == 1:
        c.require(codec == "dense", f"{where}: a vector must be stored with the dense codec, not {codec}")
    if "rotation" in e:
        _check_rotation(c, where, e["rotation"], info, shape, codec)
    _PARTS[codec](_Parts(c, where, info, params), shape)


def _check_rotation(c: _Check, where: str, rot, info: dict, shape: tuple, codec: str) -> None:
    """A rotated matrix (codecs/rotation.py): Hadamard blocks of a power of two dividing n, one
    int8 sign per column; its signs part is taken out of `info` (the codec's parts remain)."""
    from .codecs.rotation import SIGNS_PART
    c.require(len(shape) == 2, f"{where}: only a matrix can be rotated")
    n = shape[1]
    block = rot.get("block") if isinstance(rot, dict) else None
    c.require(is_int(block) and 2 <= block <= n and block & (block - 1) == 0 and n % block == 0,
              f'{where}: "rotation" must be {{"block": B}} with B a power of two >= 2 dividing {n}, '
              f"got {_short(rot)}")
    c.require(not codec_class(codec).stacked, f"{where}: a {codec} matrix cannot be rotated")
    a = info.pop(SIGNS_PART, None)
    c.require(a is not None and a.dtype == "int8" and a.shape == (n,),
              f"{where}: a rotated matrix needs an int8 [{n}] part {SIGNS_PART!r}")


class _Parts:
    """A tensor's parts as the array table describes them (dtype, shape), for the codec checks."""

    def __init__(self, c: _Check, where: str, info: dict, params: dict):
        self.c, self.where, self.info, self.params = c, where, info, params

    def fail(self, msg: str):
        self.c.fail(f"{self.where}: {msg}")

    def param(self, key: str, ok, what: str, default, nullable: bool = False):
        """params[key] (or `default`), which must satisfy `ok` (None allowed when `nullable` or
        the default is None)."""
        v = self.params.get(key, default)
        if v is None and (nullable or default is None):
            return v
        if v is None or not ok(v):
            self.fail(f"codec parameter {key} must be {what}, got {_short(v)}")
        return v

    def expect(self, part: str, dtype: str, shape: tuple) -> None:
        a = self.info.get(part)
        if a is None:
            self.fail(f"part {part!r} is missing")
        if a.dtype != dtype or a.shape != tuple(shape):
            self.fail(f"part {part!r} is {a.dtype} {list(a.shape)}, the codec needs {dtype} {list(shape)}")

    def only(self, names) -> None:
        extra = sorted(set(self.info) - set(names))
        if extra:
            self.fail(f"unexpected part {_short(extra[0])} for its codec")

    def shape(self, part: str) -> tuple:
        a = self.info.get(part)
        if a is None:
            self.fail(f"part {part!r} is missing")
        return a.shape


def _dense_parts(p: _Parts, shape: tuple) -> None:
    dt = p.param("dtype", lambda v: isinstance(v, str) and v in DENSE_STORED, "one of f32, f16, bf16", "f32")
    p.expect("weight", DENSE_STORED[dt], shape)
    p.only(["weight"])


def _outlier_parts(p: _Parts, d: int, optional: bool) -> None:
    names = ("outlier_rowptr", "outlier_col", "outlier_val")
    present = [k for k in names if k in p.info]
    if optional and not present:
        return
    if len(present) != 3:
        p.fail(f"outlier parts must be all of {', '.join(names)} (found {', '.join(present) or 'none'})")
    p.expect("outlier_rowptr", "int32", (d + 1,))
    nnz = p.shape("outlier_col")
    if len(nnz) != 1:
        p.fail(f"part 'outlier_col' must be 1-D, got {list(nnz)}")
    p.expect("outlier_col", "uint16", nnz)
    p.expect("outlier_val", "uint16", nnz)


def _cluster_parts(p: _Parts, shape: tuple) -> None:
    d, n = shape
    p.param("bits", lambda v: _int_in(v, 2, 8), "an integer in 2..8", 4)
    p.param("group_rows", lambda v: _int_in(v, 0, 1 << 31), "an integer >= 1", None)
    p.param("outliers", lambda v: is_number(v) and 0 <= v <= 0.1, "a fraction in [0, 0.1]", 0)
    p.param("gptq", lambda v: isinstance(v, bool), "true or false", True)
    p.param("percdamp", lambda v: is_number(v) and 0 <= v <= 1e6, "a number >= 0", 0.01)
    p.expect("meta", "int32", (5,) if p.shape("meta") == (5,) else (4,))   # 4: plane order 1 (older packs)
    nblk = -(-n // 32)
    codes = p.shape("codes")
    bits = codes[1] // (4 * nblk) if len(codes) == 2 and nblk else 0
    if not 2 <= bits <= 8:
        p.fail(f"part 'codes' {list(codes)} does not hold 2..8-bit indices of a {d}x{n} weight")
    p.expect("codes", "uint8", (d, nblk * 4 * bits))
    book = p.shape("codebook")
    if len(book) != 2 or not 1 <= book[0] <= d:
        p.fail(f"part 'codebook' {list(book)} does not match a {d}-row weight")
    p.expect("codebook", "uint16", (book[0], 1 << bits))
    if "bits" in p.params and p.params["bits"] != bits:
        p.fail(f"codec parameter bits={p.params['bits']} but the codes are {bits}-bit")
    _outlier_parts(p, d, optional=True)
    p.only(["meta", "codes", "codebook", "outlier_rowptr", "outlier_col", "outlier_val"])


def _spqr_parts(p: _Parts, shape: tuple) -> None:
    d, n = shape
    bits = p.param("bits", lambda v: is_int(v) and v in (2, 3, 4), "2, 3 or 4", 3)
    p.param("group", lambda v: is_int(v) and v == 16, "16", 16)
    p.param("stat_bits", lambda v: _int_in(v, 1, 4), "an integer in 1..4", 3)
    sg = p.param("stat_group", lambda v: _int_in(v, 1, 1 << 31), "an integer >= 1", 16)
    p.param("outlier_threshold", lambda v: is_number(v) and v > 0, "a number > 0 or null", 0.2, nullable=True)
    p.param("permute", lambda v: v in ("act_order", "identity"), "act_order, identity or null", "act_order",
            nullable=True)
    p.param("percdamp", lambda v: is_number(v) and 0 <= v <= 1e6, "a number >= 0", 0.01)
    p.param("blocksize", lambda v: _int_in(v, 1, 1 << 20), "an integer >= 1", 128)
    if n > 65536:
        p.fail(f"spqr stores at most 65536 input columns, the weight has {n}")
    G = -(-n // 16)
    p.expect("codes", "uint8", (d, 2 * bits * G))
    p.expect("stat_codes", "uint8", (d, G))
    p.expect("stats", "uint16", (-(-d // sg), 4, G))
    p.expect("perm", "uint16", (n,))
    _outlier_parts(p, d, optional=False)
    p.only(["codes", "stat_codes", "stats", "perm", "outlier_rowptr", "outlier_col", "outlier_val"])


def _bitstack_parts(p: _Parts, shape: tuple) -> None:
    d, n = shape
    from .codecs.bitstack import block_layout
    K = p.param("blocks", lambda v: _int_in(v, 1, MAX_BITSTACK_BLOCKS), f"an integer in 1..{MAX_BITSTACK_BLOCKS}", 16)
    p.param("rank", lambda v: _int_in(v, 1, MAX_BITSTACK_RANK), f"an integer in 1..{MAX_BITSTACK_RANK}", 16)
    p.param("overshoot", lambda v: is_number(v) and 0.5 <= v <= 2, "a number in [0.5, 2]", 1.0)
    p.param("signs", lambda v: v in ("sign", "gptq"), "sign or gptq", "sign")
    p.param("joint", lambda v: _int_in(v, 0, min(K, MAX_BITSTACK_JOINT)), f"an integer in 0..{min(K, 8)}", 0)
    p.expect("meta", "int32", (4,))
    p.expect("inv_scale", "float32", (n,))
    blocks = [k for k in p.info if k.startswith("block.")]
    if sorted(blocks) != sorted(f"block.{i}" for i in range(len(blocks))) or len(blocks) != K:
        p.fail(f"parts must be block.0 .. block.{K - 1} (blocks={K}), found {len(blocks)} block parts")
    size = p.shape("block.0")
    rank = next((k for k in range(1, MAX_BITSTACK_RANK + 1) if (block_layout(d, n, k)[2],) == size), None)
    if rank is None:
        p.fail(f"part 'block.0' {list(size)} is not a block of a {d}x{n} weight at any rank 1..{MAX_BITSTACK_RANK}")
    for b in blocks:
        p.expect(b, "uint8", size)
    p.only(["meta", "inv_scale"] + blocks)


def _vq_parts(p: _Parts, shape: tuple) -> None:
    from .codecs.vq.format import CODE_BITS, DIM, layout
    d, n = shape
    p.param("bits", lambda v: _int_in(v, 2, 4), "an integer in 2..4", 3)
    p.param("code_bits", lambda v: _int_in(v, *CODE_BITS), "an integer in %d..%d" % CODE_BITS, None)
    p.param("group_rows", lambda v: _int_in(v, 0, 1 << 31), "an integer >= 1", None)
    p.param("gptq", lambda v: isinstance(v, bool), "true or false", True)
    p.param("percdamp", lambda v: is_number(v) and 0 <= v <= 1e6, "a number >= 0", 0.01)
    if n > 65536:
        p.fail(f"vq stores at most 65536 input columns, the weight has {n}")
    p.expect("meta", "int32", (4,))
    book = p.shape("codebook")
    c = (book[1].bit_length() - 1) if len(book) == 3 and book[1] > 0 else 0
    if len(book) != 3 or not 1 <= book[0] <= d or not CODE_BITS[0] <= c <= CODE_BITS[1]:
        p.fail(f"part 'codebook' {list(book)} is not (groups <= {d}, 2^c, 2) for c in {CODE_BITS[0]}..{CODE_BITS[1]}")
    p.expect("codebook", "uint16", (book[0], 1 << c, DIM))
    p.expect("codes", "uint8", (d, layout(n, c)[2]))
    p.expect("scale", "uint16", (d,))
    p.expect("perm", "uint16", (n,))
    p.only(["meta", "codes", "codebook", "scale", "perm"])


_PARTS = {"dense": _dense_parts, "cluster": _cluster_parts, "spqr": _spqr_parts, "bitstack": _bitstack_parts,
          "vq": _vq_parts}


def _check_bitstack(c: _Check, section, tensors: dict, stacked: list) -> None:
    """The global block order: every block of every BitStack tensor exactly once, each matrix's
    blocks in increasing order (so a prefix of the order is a prefix of every matrix)."""
    c.require(isinstance(section, dict) and isinstance(section.get("order"), list),
              'manifest "bitstack.order" must list the BitStack blocks')
    nxt = {n: 0 for n in stacked}
    for item in section["order"]:
        ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and is_int(item[1]))
        c.require(ok, f'manifest "bitstack.order" entry {_short(item)} is not [tensor, block]')
        name, i = item
        c.require(name in nxt, f'manifest "bitstack.order" names {_short(name)}, not a BitStack tensor')
        c.require(i == nxt[name], f'manifest "bitstack.order": block {i} of {name} comes where block '
                                  f"{nxt[name]} is due (each matrix's blocks in increasing order, once)")
        c.require(f"block.{i}" in tensors[name]["parts"], f'manifest "bitstack.order": {name} has no block {i}')
        nxt[name] += 1
    for name in stacked:
        K = sum(1 for p in tensors[name]["parts"] if p.startswith("block."))
        c.require(nxt[name] == K, f'manifest "bitstack.order" lists {nxt[name]} of the {K} blocks of {name}')
    curve = section.get("curve")
    c.require(curve is None or (isinstance(curve, list) and all(
        isinstance(pt, list) and len(pt) == 2 and all(is_number(v) for v in pt) for pt in curve)),
        'manifest "bitstack.curve" must be a list of [bytes, perplexity] pairs')


def _check_flash(c: _Check, fl, cfg: ModelConfig, arrays: dict) -> None:
    """The flash layout's section (formats/flash-layout.md): bundle arrays matching the config."""
    from .streaming import LAYOUT_VERSION, SPARSITY_GRID
    c.require(isinstance(fl, dict), 'manifest "flash" must be an object')
    version = fl.get("version", 0)
    c.require(is_int(version), f'manifest "flash.version" must be an integer, got {_short(version)}')
    if version > LAYOUT_VERSION:
        c.fail(f"flash layout v{version} is newer than this edgerun (v{LAYOUT_VERSION}): upgrade",
               UnsupportedModelError)
    codec = fl.get("codec", "dense")
    d, f = cfg.hidden_size, cfg.intermediate_size
    if codec == "dense":
        dt = fl.get("dtype")
        c.require(dt in FLASH_STORED, f'manifest "flash.dtype" must be one of f32, f16, bf16, got {_short(dt)}')
        bundle = (FLASH_STORED[dt], (f, 3, d))
    else:
        c.require(version >= 2, f'manifest "flash.codec" {_short(codec)} needs flash layout v2, got v{version}')
        try:
            expect = codec_class(codec).flash_bundle_parts(fl.get("params"), d)
        except (EdgerunError, TypeError, KeyError) as e:
            c.fail(f'manifest "flash.codec" {_short(codec)} with params {_short(fl.get("params"))}: {e}')
        c.require(fl.get("bundle_parts") == expect, f'manifest "flash.bundle_parts" {_short(fl.get("bundle_parts"))} '
                  f"does not match the {codec} codec's bundle {_short(expect)}")
        B = sum(n for _, n in expect.values())
        c.require(fl.get("bundle_bytes") == B, f'manifest "flash.bundle_bytes" {_short(fl.get("bundle_bytes"))} '
                  f"does not match its parts ({B} bytes)")
        bundle = ("uint8", (f, B))
    c.require(fl.get("hidden_size") == d and is_int(d), f'manifest "flash.hidden_size" '
              f"{_short(fl.get('hidden_size'))} does not match the config's hidden_size {d}")
    c.require(fl.get("intermediate_size") == f, f'manifest "flash.intermediate_size" '
              f"{_short(fl.get('intermediate_size'))} does not match the config's intermediate_size {f}")
    r = fl.get("predictor_rank")
    c.require(_int_in(r, 1, d), f'manifest "flash.predictor_rank" must be an integer in 1..{d}, got {_short(r)}')
    c.require(not cfg.mlp_bias, "the flash layout does not store FFN biases, but the config has mlp_bias")
    layers = fl.get("layers")
    c.require(isinstance(layers, list) and len(layers) == cfg.num_layers,
              f'manifest "flash.layers" must list the {cfg.num_layers} layers')
    shared_total = 0
    for i, e in enumerate(layers):
        where = f'manifest "flash.layers[{i}]'
        c.require(isinstance(e, dict), f'{where}" is not an object')
        if codec != "dense":
            sh = e.get("shared")
            c.require(isinstance(sh, dict) and sh, f'{where}.shared" must name the layer\'s shared arrays')
            for k, name in sh.items():
                shared_total += _array(c, arrays, f'{where}.shared.{k}"', name).length
        for key, dtype, shape in (("bundles",) + bundle, ("perm", "int32", (f,)),
                                  ("predictor_a", "uint16", (f, r)), ("predictor_b", "uint16", (r, d))):
            a = _array(c, arrays, f'{where}.{key}"', e.get(key))
            c.require(a.dtype == dtype and a.shape == shape, f'{where}.{key}": array {a.name} is {a.dtype} '
                                                              f"{list(a.shape)}, expected {dtype} {list(shape)}")
        thr = e.get("thresholds")
        ok = isinstance(thr, dict) and all(
            isinstance(thr.get(k), list) and len(thr[k]) == len(SPARSITY_GRID) and all(is_number(v) for v in thr[k])
            for k in ("gate", "lowrank"))
        c.require(ok, f'{where}.thresholds" must hold {len(SPARSITY_GRID)} numbers for gate and lowrank')
    c.require(codec == "dense" or fl.get("shared_bytes") == shared_total,
              f'manifest "flash.shared_bytes" {_short(fl.get("shared_bytes"))} is not the {shared_total} bytes '
              "of the shared arrays")


# ----------------------------------------------------------------------------- the contents

def index_parts(entry: dict) -> list[str]:
    """The parts of a (checked) tensor entry whose contents `check_parts` reads."""
    from .codecs.rotation import SIGNS_PART
    rotation = (SIGNS_PART,) if "rotation" in entry else ()
    return [p for p in INDEX_PARTS[entry["codec"]] + rotation if p in entry["parts"]]


def check_parts(path, name: str, entry: dict, parts: dict) -> None:
    """The contents of a tensor's index parts (read, checksummed), for an entry `check_model`
    accepted: dimensions in `meta`, permutations, CSR row pointers and column indices in range."""
    c = _Check(path)
    where = f"tensor {name}"
    shape = tuple(entry["shape"])
    d, n = shape if len(shape) == 2 else (shape[0], 1)
    codec = entry["codec"]
    if codec == "cluster":
        meta = [int(v) for v in parts["meta"]]
        bits = parts["codes"].shape[1] // (4 * -(-n // 32))
        g = meta[3]
        c.require(meta[:3] == [d, n, bits] and g >= 1 and parts["codebook"].shape[0] == -(-d // g),
                  f"{where}: meta {meta} does not match the {d}x{n} weight and its parts")
        from .codecs.cluster import PLANE_ORDER
        c.require(meta[4:] in ([], [PLANE_ORDER]), f"{where}: meta {meta}: unknown plane order {meta[4:]}")
    if codec == "bitstack":
        from .codecs.bitstack import block_layout
        meta = [int(v) for v in parts["meta"]]
        size = parts["block.0"].shape[0] if "block.0" in parts else None   # a BitStack prefix may hold none
        K = sum(1 for p in entry["parts"] if p.startswith("block."))
        c.require(meta[:2] == [d, n] and meta[3] == K and 1 <= meta[2] <= MAX_BITSTACK_RANK
                  and (size is None or block_layout(d, n, meta[2])[2] == size),
                  f"{where}: meta {meta} does not match the {d}x{n} weight and its {K} blocks")
    if codec == "vq":
        meta = [int(v) for v in parts["meta"]]
        G, K = parts["codebook"].shape[:2]
        g = meta[3]
        c.require(meta[:3] == [d, n, K.bit_length() - 1] and g >= 1 and G == -(-d // g),
                  f"{where}: meta {meta} does not match the {d}x{n} weight and its parts")
    if codec in ("spqr", "vq"):
        perm = parts["perm"]
        c.require(len(perm) == n and np.array_equal(np.sort(perm.astype(np.int64)), np.arange(n)),
                  f"{where}: perm is not a permutation of the {n} columns")
    if "rotation" in entry:
        from .codecs.rotation import SIGNS_PART
        c.require(bool(np.all(np.abs(parts[SIGNS_PART]) == 1)), f"{where}: a rotation sign is not +1 or -1")
    if "outlier_rowptr" in parts:
        rp, col = parts["outlier_rowptr"].astype(np.int64), parts["outlier_col"]
        c.require(rp[0] == 0 and rp[-1] == len(col) and bool(np.all(np.diff(rp) >= 0)),
                  f"{where}: outlier_rowptr is not a row pointer array over {len(col)} outliers")
        c.require(len(col) == 0 or int(col.max()) < n, f"{where}: an outlier column is outside the {n} columns")


def check_linear(path, name: str, entry: dict, linear) -> None:
    """A loaded matrix has the shape the manifest declared (what the forward pass sizes buffers by)."""
    shape = tuple(entry["shape"])
    got = tuple(getattr(linear, "shape", ()))
    if got != shape:
        raise FormatError(f"{path}: tensor {name} loads as {list(got)}, declared {list(shape)}")


# ----------------------------------------------------------------------------- edgerun verify

def verify_file(path, progress=None) -> str:
    """`edgerun verify`: every checksum, then (for a model) every check loading makes before the
    kernels run, without loading the weights. Returns the summary line; raises on a problem."""
    from .ebin import EbinFile
    with EbinFile(path) as f:
        f.verify(progress=progress)
        what = "all checksums match"
        if "tensors" in f.manifest or "config" in f.manifest:
            try:
                _check_loadable(f)
            except EdgerunError as e:
                raise type(e)(f"{e} (every checksum matches; loading refuses the file)") from None
            what += ", the model's manifest is consistent"
        return f"{path}: OK ({len(f.arrays)} arrays, {f.file_size / 1e6:.1f} MB, {what})"


def _check_loadable(f) -> None:
    """What loading checks before the weights: the manifest, the tokenizer, the index parts."""
    check_model(f)
    from .api import tokenizer_from_manifest
    tokenizer_from_manifest(f.manifest)             # parses tokenizer.json as loading does
    for name, entry in f.manifest["tensors"].items():
        parts = {p: f.read(entry["parts"][p]) for p in index_parts(entry)}
        parts.update({p: _Shape(f.arrays[a].shape) for p, a in entry["parts"].items() if p not in parts})
        check_parts(f.path, name, entry, parts)


class _Shape:
    """Stands in for an array that was not read: only its shape is known."""

    def __init__(self, shape):
        self.shape = tuple(shape)

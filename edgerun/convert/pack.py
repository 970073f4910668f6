"""`edgerun pack`: read a checkpoint lazily, encode each tensor with the codec its recipe names,
and write an .ebin atomically (see formats/ebin.md).

Dense recipes stream tensor by tensor. Recipes with compressed codecs calibrate first: the
model runs layer by layer over calibration text (edgerun/calibrate.py) and each linear is
encoded with its input statistics (one pass, the uncompressed model's activations).
"""
from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..codecs import codec_class, get_codec, parse_rule as _parse_rule, rotation
from ..config import ConfigError, ModelConfig, tensor_names
from ..ebin import EbinWriter
from ..errors import EdgerunError
from ..model import load_tensor
from .source import Source

DTYPES = ("f32", "f16", "bf16")
GROUPS = ("embed", "attention", "ffn", "head", "vectors")
DEFAULT_CALIB_TOKENS = 12288
CALIB_SEQ_LEN = 256
EMBED_RULE = "cluster:5"
# Calibration windows (the last ones) on which each stacked matrix's loss per block is estimated
# to set the global block order (bitstack_runtime.sensitivity_order).
ORDER_WINDOWS = 4


class PackInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while packing. Raised in the main thread like Ctrl+C's
    KeyboardInterrupt, so the writer removes its `.tmp` file on the way out."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextmanager
def signals_interrupt():
    """Within: SIGTERM and SIGHUP raise PackInterrupted (once; a repeated signal during the
    cleanup is ignored). Only the main thread can own signal handlers: elsewhere this does
    nothing. The previous handlers are restored on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def interrupt(signum, frame):
        if not fired:
            fired.append(signum)
            raise PackInterrupted(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            sig = getattr(signal, name)
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def check_output(out: str | Path) -> None:
    """Before any source is read: `out` can be written (its directory exists and is writable, it
    is not a directory). A stale `out.tmp` from a killed pack is removed (also when it is a
    read-only file or a symlink, which writing through could not replace)."""
    out = Path(out)
    parent = out.parent
    if out.is_dir():
        raise EdgerunError(f"{out} is a directory: give the .ebin file to write, e.g. {out / 'model.ebin'}")
    if not parent.is_dir():
        raise EdgerunError(f"cannot write {out}: {parent} " +
                           ("is not a directory" if parent.exists() else "does not exist"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgerunError(f"cannot write {out}: the directory {parent} is not writable")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.is_symlink() or tmp.is_file():
        try:
            tmp.unlink()
        except OSError as e:
            raise EdgerunError(f"cannot remove the stale {tmp}: {e.strerror}") from None


def open_source(path: str | Path) -> Source:
    """A Hugging Face directory or a GGUF file, told apart by content, not by name."""
    path = Path(path)
    if path.is_dir():
        from .hf import HFSource
        return HFSource(path)
    if not path.exists():
        raise EdgerunError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf import GGUFSource
        return GGUFSource(path)
    raise EdgerunError(f"{path}: not a GGUF file or a Hugging Face model directory")


# --- recipes: which codec stores which tensors ------------------------------------------------

def tensor_group(name: str, ndim: int) -> str:
    if ndim != 2:
        return "vectors"
    if "embed_tokens" in name:
        return "embed"
    if name.startswith("lm_head"):
        return "head"
    return "attention" if ".self_attn." in name else "ffn"


def parse_rule(text: str) -> dict:
    """`f16` / `dense:bf16` -> dense; `spqr:3`, `cluster:4`, `bitstack:16` -> that codec with the
    params its class makes of the argument (edgerun.codecs.parse_rule: the registry decides)."""
    return _parse_rule(text)


def make_recipe(dtype: str = "f16", codec: str | None = None, bits: int | None = None,
                recipe: str | None = None) -> dict:
    """The recipe for `pack`: every group dense at `dtype`; `codec`/`bits` compress attention
    and feed-forward; `recipe` ("embed=cluster:8,attention=spqr:4,ffn=spqr:3") overrides groups."""
    if dtype not in DTYPES:
        raise EdgerunError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    rules = {g: {"codec": "dense", "params": {"dtype": dtype}} for g in GROUPS}
    rules["vectors"] = {"codec": "dense", "params": {"dtype": "f32"}}
    if codec and codec != "dense":
        rule = {"codec": codec, "params": codec_class(codec).params_from_arg(bits)}   # None: its default
        rules["attention"] = rules["ffn"] = rule
        # Embeddings (and an untied head) are a fifth of a small model's weights and the head runs every
        # token: 5-bit palettization keeps them accurate at a third of f16 and its kernel is fast
        # (16/32-entry codebooks are register permutes; 6-8 bits would need slow gathers).
        rules["embed"] = rules["head"] = parse_rule(EMBED_RULE)
    for item in filter(None, (recipe or "").split(",")):
        group, _, rule = item.partition("=")
        group = group.strip()
        if group not in GROUPS[:-1]:
            raise EdgerunError(f"recipe group {group!r} is unknown; groups: {', '.join(GROUPS[:-1])}")
        rules[group] = parse_rule(rule.strip())
    return rules


ROTATED_GROUPS = ("embed", "attention", "ffn", "head")


def with_rotation(recipe: dict, block: int = 0) -> dict:
    """The recipe with the input axis of every compressed matrix rotated in Hadamard blocks of up
    to `block` columns (codecs/rotation.py; 0: as it is). Dense groups stay as they are."""
    if not block:
        return recipe
    recipe = {g: dict(rule) for g, rule in recipe.items()}
    for g in ROTATED_GROUPS:
        codec = codec_class(recipe[g]["codec"])
        if codec.stacked:
            raise EdgerunError(f"--rotate: {codec.name} matrices cannot be rotated (their blocks load as a prefix)")
        if codec.name != "dense":
            recipe[g]["rotate"] = block
    if not any("rotate" in recipe[g] for g in ROTATED_GROUPS):
        raise EdgerunError("--rotate applies to compressed matrices: give --codec, --recipe or --bpw")
    return recipe


def input_key(name: str) -> str:
    """The input a matrix reads, named so that the matrices sharing it (q/k/v, gate/up: calibrate's
    SHARED_INPUT) get one key: their rotation signs are seeded by it, so they can still be joined."""
    from ..calibrate import SHARED_INPUT
    from ..model import LAYER_TENSORS
    if not name.startswith("model.layers."):
        return name
    layer, _, suffix = name[len("model.layers."):].partition(".")
    field = {v: k for k, v in LAYER_TENSORS.items()}.get(suffix)
    return f"model.layers.{layer}.{SHARED_INPUT.get(field, suffix)}"


def needs_calibration(recipe: dict) -> bool:
    return any(codec_class(rule["codec"]).calibrated for rule in recipe.values())


def array_name(tensor: str, part: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` + part `indices` -> `model.layers.0.mlp.up_proj.indices`;
    a part named `weight` keeps the tensor's own name."""
    return tensor if part == "weight" else tensor.rsplit(".", 1)[0] + "." + part


class GroupTotals:
    """Parameters and stored bytes per tensor group (`group_params`, `group_bytes`: dicts)."""

    @property
    def parameters(self) -> int:
        return sum(self.group_params.values())

    @property
    def weight_bytes(self) -> int:
        return sum(self.group_bytes.values())

    def bits(self, groups=None) -> float:
        """Bits/weight over `groups` (default: every weight)."""
        groups = [g for g in (groups or list(self.group_params)) if self.group_params.get(g)]
        return 8 * sum(self.group_bytes[g] for g in groups) / max(1, sum(self.group_params[g] for g in groups))


@dataclass
class PackSummary(GroupTotals):
    path: Path
    file_bytes: int
    seconds: float
    group_params: dict = field(default_factory=dict)
    group_bytes: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return self.bits()

    def __str__(self):
        groups = ", ".join(f"{g} {self.group_bytes[g] * 8 / self.group_params[g]:.2f}"
                           for g in GROUPS if self.group_params.get(g))
        return (f"wrote {self.path} ({self.file_bytes / 1e6:.1f} MB, {self.parameters / 1e6:.1f}M parameters, "
                f"{self.bits_per_weight:.2f} bits/weight [{groups}], {self.seconds:.1f} s)")


class TensorStore:
    """Encodes tensors by the recipe, writes their parts, and keeps the manifest entries.

    BitStack blocks are held back and written last, all matrices' blocks together in their
    global importance order, so that loading the first N blocks of the file is one prefix."""

    def __init__(self, writer: EbinWriter, recipe: dict):
        self.writer, self.recipe = writer, recipe
        self.entries = {}
        self.group_params, self.group_bytes = defaultdict(int), defaultdict(int)
        self.stack_parts, self.stack_scores = {}, {}
        self.loaded = {}              # BitStack packs keep the model to measure its size/quality curve
        self.rotate_hessian = rotation.HessianRotations()

    def __call__(self, name: str, w, hessian=None):
        group = tensor_group(name, w.ndim)
        rule = self.recipe[group]
        codec = get_codec(rule["codec"])
        block = rotation.block_for(w.shape[1], rule["rotate"]) if w.ndim == 2 and rule.get("rotate") else 1
        if block > 1:                 # encode W·Tᵀ with T H Tᵀ (codecs/rotation.py)
            signs = rotation.make_signs(w.shape[1], input_key(name))
            w = np.asarray(w, np.float32)
            # in place when the array is ours (sources read a new float32 array per tensor, which
            # nothing reads after this call): a 1.5B embedding is 0.9 GB of float32
            mine = w.flags.owndata and w.flags.writeable and w.flags.c_contiguous
            w = rotation.rotate(w, signs, block, out=w if mine else None)
            self.rotate_hessian(hessian, signs, block)
        if codec.stacked:
            parts, self.stack_scores[name] = codec.encode_stack(w, rule["params"], hessian=hessian)
        else:
            parts = codec.encode(w, rule["params"], hessian=hessian)
        entry = {"codec": rule["codec"], "params": rule["params"], "shape": list(w.shape),
                 "parts": {p: array_name(name, p) for p in parts}}
        if block > 1:
            parts[rotation.SIGNS_PART] = signs
            entry["parts"][rotation.SIGNS_PART] = array_name(name, rotation.SIGNS_PART)
            entry["rotation"] = {"block": block}
        for part, arr in parts.items():
            if codec.stacked and part.startswith("block."):
                continue
            self.writer.add_array(entry["parts"][part], arr)
        if codec.stacked:
            self.stack_parts[name] = parts
        self.group_bytes[group] += codec.nbytes(parts)
        self.group_params[group] += w.size
        self.entries[name] = entry
        loaded = load_tensor(entry, parts)
        if any(codec_class(r["codec"]).stacked for r in self.recipe.values()):
            self.loaded[name] = loaded
        return loaded

    def finish(self, cfg: ModelConfig, order_windows, curve_windows, progress=None,
               curve_progress=None) -> dict | None:
        """Write the held-back BitStack blocks in global order, estimated on `order_windows`
        (bitstack_runtime.sensitivity_order, `progress(done, total)` per matrix); the manifest's
        `bitstack` section, with the size/quality curve measured on `curve_windows` (both
        calibration text; `curve_progress(done, total)` per level)."""
        if not self.stack_parts:
            return None
        from ..bitstack_runtime import sensitivity_order, size_quality_curve
        from ..model import Transformer, Weights
        sizes = {n: parts["block.0"].nbytes for n, parts in self.stack_parts.items()}
        # a window per chunk: the compressed matmuls rebuild their weights' rows once per chunk
        window = max(order_windows.shape[1], curve_windows.shape[1])
        tf = Transformer(cfg, Weights(self.loaded, cfg), context=window, chunk=window)
        order, _ = sensitivity_order(tf, self.stack_parts, self.stack_scores, order_windows, progress=progress)
        for name, i in order:
            self.writer.add_array(self.entries[name]["parts"][f"block.{i}"], self.stack_parts[name][f"block.{i}"])
        fixed = sum(self.group_bytes.values()) - sum(
            a.nbytes for parts in self.stack_parts.values() for p, a in parts.items() if p.startswith("block."))
        levels = max(len(s) for s in self.stack_scores.values())
        curve = size_quality_curve(tf, {n: self.loaded[n] for n in self.stack_parts}, sizes, fixed,
                                   curve_windows, levels, curve_progress)
        self.stack_parts, self.loaded = {}, {}
        return {"order": [[name, i] for name, i in order], "curve": curve,
                "importance": {n: [float(v) for v in s] for n, s in self.stack_scores.items()}}


def pack(src: str | Path, out: str | Path, dtype: str = "f16", recipe: dict | None = None,
         calib_text: str | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS, progress=None,
         layer_progress=None, layout: str = "standard", order_progress=None, curve_progress=None,
         generation: dict | None = None, threads: int | None = None) -> PackSummary:
    """Convert `src` into `out`. `progress(done_bytes, total_bytes)` is called after each tensor
    of a dense pack; `layer_progress(done, total)` after each calibrated layer; `order_progress`
    after each BitStack matrix whose sensitivity is estimated, `curve_progress` after each level
    of its size/quality curve. `layout="flash"`
    stores the FFN as neuron bundles for streaming (edgerun/streaming.py, formats/flash-layout.md).
    `generation` overrides keys of the source's default sampling (HF generation_config names).
    `threads`: kernel threads of the calibration forward and its Hessians (default
    kernels.default_threads(): the idle cores)."""
    start = time.perf_counter()
    recipe = recipe or make_recipe(dtype)
    if layout not in ("standard", "flash"):
        raise EdgerunError(f"--layout must be standard or flash, not {layout!r}")
    if layout == "flash" and recipe["ffn"].get("rotate"):
        raise EdgerunError("--rotate does not support --layout flash yet (the FFN bundle kernels read unrotated inputs)")
    check_output(out)
    # The writer first: an unwritable output fails now, not after the source is parsed; any error
    # or signal (Ctrl+C, SIGTERM, SIGHUP) from here on leaves no .tmp behind.
    with signals_interrupt(), EbinWriter(out) as writer, open_source(src) as source:
        meta = source.meta
        try:
            cfg = ModelConfig.from_dict(meta.config)
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
        names = tensor_names(cfg)
        available = set(source.tensor_names())
        missing = [n for n in names if n not in available]
        if missing:
            raise EdgerunError(f"{src}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
        calibration = flash = stack = None
        store = TensorStore(writer, recipe)
        if needs_calibration(recipe):
            from .. import kernels
            from ..calibrate import calibrate_and_store, source_calibration_sequences
            sequences = source_calibration_sequences(meta, calib_text, calib_tokens, CALIB_SEQ_LEN)
            calibration = {"tokens": int(sequences.size), "sequence_length": CALIB_SEQ_LEN,
                           "text": "bundled WikiText-2 train excerpt" if calib_text is None else "user file"}
            before = kernels.get_threads()
            kernels.set_threads(threads or kernels.default_threads())
            take, observe = store, None
            if layout == "flash":     # the FFN becomes bundles, calibrated in the same pass
                from ..streaming import CalibratedFlash, is_ffn_weight
                take = CalibratedFlash(cfg, writer, recipe["ffn"], store, calibration)
                observe = take.observe
                names = [n for n in names if not is_ffn_weight(n)]
            try:
                calibrate_and_store(source, cfg, sequences, take, progress=layer_progress, observe=observe)
                stack = store.finish(cfg, sequences[-ORDER_WINDOWS:], sequences[-2:], order_progress,
                                     curve_progress)
            finally:
                kernels.set_threads(before)
            if layout == "flash":
                flash = take.section()
                store.group_params["ffn"] += take.params
                store.group_bytes["ffn"] += take.nbytes
        else:
            if layout == "flash":
                from ..streaming import is_ffn_weight, write_flash
                names = [n for n in names if not is_ffn_weight(n)]
                flash, params, nbytes = write_flash(source, cfg, meta, writer, recipe["ffn"], calib_text,
                                                    calib_tokens, progress=layer_progress)
                store.group_params["ffn"] += params
                store.group_bytes["ffn"] += nbytes
            total = sum(source.tensor_nbytes(n) for n in names)
            done = 0
            if progress:
                progress(0, total)
            for name in names:
                store(name, source.read(name))
                done += source.tensor_nbytes(name)
                if progress:
                    progress(done, total)
        tensors = {n: store.entries[n] for n in names}
        features = sorted({f for e in tensors.values() for f in codec_class(e["codec"]).file_features}
                          | ({"rotation"} if any("rotation" in e for e in tensors.values()) else set()))
        writer.close({
            **({"format": {"features": features}} if features else {}),
            "config": meta.config,
            "tokenizer": {"json": meta.tokenizer_json, "chat_template": meta.chat_template,
                          "bos_token_id": meta.bos_token_id, "eos_token_ids": meta.eos_token_ids,
                          "add_bos_token": meta.add_bos_token, "special_tokens": meta.special_tokens},
            "generation": {**meta.generation, **(generation or {})},
            "recipe": recipe,
            "calibration": calibration,
            "bitstack": stack,
            "tensors": tensors,
            **({"flash": flash} if flash else {}),
            "source": {"description": meta.description, "name": Path(src).name,
                       "packed_by": f"edgerun {__version__}",
                       "packed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        })
    out = Path(out)
    return PackSummary(out, out.stat().st_size, time.perf_counter() - start,
                       dict(store.group_params), dict(store.group_bytes))

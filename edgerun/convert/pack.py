"""`edgerun pack`: read a checkpoint lazily, tensor by tensor, encode each with the codec its
recipe names, and write an .ebin atomically (see formats/ebin.md)."""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..codecs import get_codec
from ..config import ModelConfig, tensor_names
from ..ebin import EbinWriter
from ..errors import EdgerunError
from .source import Source

DTYPES = ("f32", "f16", "bf16")


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


def default_recipe(dtype: str) -> dict:
    """Codec choice per tensor kind. Norms and biases are tiny and stay f32."""
    if dtype not in DTYPES:
        raise EdgerunError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return {"matrices": {"codec": "dense", "params": {"dtype": dtype}},
            "vectors": {"codec": "dense", "params": {"dtype": "f32"}}}


def array_name(tensor: str, part: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` + part `indices` -> `model.layers.0.mlp.up_proj.indices`;
    a part named `weight` keeps the tensor's own name."""
    return tensor if part == "weight" else tensor.rsplit(".", 1)[0] + "." + part


@dataclass
class PackSummary:
    path: Path
    file_bytes: int
    parameters: int
    weight_bytes: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bytes * 8 / max(self.parameters, 1)

    def __str__(self):
        return (f"wrote {self.path} ({self.file_bytes / 1e6:.1f} MB, {self.parameters / 1e6:.1f}M parameters, "
                f"{self.bits_per_weight:.2f} bits/weight, {self.seconds:.1f} s)")


def pack(src: str | Path, out: str | Path, dtype: str = "f16", progress=None) -> PackSummary:
    """Convert `src` into `out`. `progress(done_bytes, total_bytes)` is called after each tensor."""
    start = time.perf_counter()
    recipe = default_recipe(dtype)
    with open_source(src) as source:
        meta = source.meta
        cfg = ModelConfig.from_dict(meta.config)
        names = tensor_names(cfg)
        available = set(source.tensor_names())
        missing = [n for n in names if n not in available]
        if missing:
            raise EdgerunError(f"{src}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
        total = sum(source.tensor_nbytes(n) for n in names)
        done = weight_bytes = parameters = 0
        tensors = {}
        with EbinWriter(out) as writer:
            for name in names:
                w = source.read(name)
                rule = recipe["matrices" if w.ndim == 2 else "vectors"]
                parts = get_codec(rule["codec"]).encode(w, rule["params"])
                tensors[name] = {"codec": rule["codec"], "params": rule["params"], "shape": list(w.shape),
                                 "parts": {p: array_name(name, p) for p in parts}}
                for part, arr in parts.items():
                    writer.add_array(array_name(name, part), arr)
                    weight_bytes += arr.nbytes
                parameters += w.size
                done += source.tensor_nbytes(name)
                del w, parts
                if progress:
                    progress(done, total)
            writer.close({
                "config": meta.config,
                "tokenizer": {"json": meta.tokenizer_json, "chat_template": meta.chat_template,
                              "bos_token_id": meta.bos_token_id, "eos_token_ids": meta.eos_token_ids,
                              "add_bos_token": meta.add_bos_token, "special_tokens": meta.special_tokens},
                "generation": meta.generation,
                "recipe": recipe,
                "tensors": tensors,
                "source": {"description": meta.description, "name": Path(src).name,
                           "packed_by": f"edgerun {__version__}",
                           "packed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
            })
    out = Path(out)
    return PackSummary(out, out.stat().st_size, parameters, weight_bytes, time.perf_counter() - start)

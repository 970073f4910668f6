"""Hugging Face checkpoint directories: config.json, model.safetensors or sharded
model-0000k-of-0000N.safetensors (+ model.safetensors.index.json), tokenizer files.

Tensors are read one at a time straight from the safetensors byte ranges (the format is an
8-byte header length, a JSON header with dtype/shape/data_offsets, then raw little-endian data),
so packing never holds more than one tensor in memory.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import EdgerunError, FormatError
from .source import Source, SourceMeta

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; anything else (unreadable, not JSON, a list) is a FormatError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def _check_entry(path: Path, name: str, entry) -> None:
    """A safetensors header entry: {"dtype": str, "shape": [int...], "data_offsets": [begin, end]}."""
    ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
    if not ok or not 0 <= offsets[0] <= offsets[1]:
        raise FormatError(f"{path}: corrupted safetensors header entry for tensor {name!r}")


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor table, byte offset where data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise FormatError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise FormatError(f"{path}: corrupted safetensors header") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupted safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n


class HFSource(Source):
    """A Hugging Face model directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "config.json").exists():
            raise EdgerunError(f"{self.dir}: no config.json (expected a Hugging Face model directory)")
        config = _read_json(self.dir / "config.json")
        try:
            ModelConfig.from_dict(config)          # every key the model needs, checked before any weight
        except EdgerunError as e:
            raise type(e)(f"{self.dir / 'config.json'}: {e}") from None
        self._tensors: dict[str, tuple[Path, dict, int]] = {}
        files = sorted(self.dir.glob("*.safetensors"))
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f
                                                           for f in weight_map.values()):
                raise FormatError(f"{index}: 'weight_map' must map tensor names to shard file names")
            files = sorted({self.dir / f for f in weight_map.values()})
        if not files:
            raise EdgerunError(f"{self.dir}: no .safetensors weights (PyTorch .bin checkpoints are not supported)")
        for path in files:
            if not path.exists():
                raise FormatError(f"{path}: missing shard named by model.safetensors.index.json")
            header, data_start = _safetensors_header(path)
            size = path.stat().st_size
            for name, entry in header.items():
                _check_entry(path, name, entry)
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise EdgerunError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
                if data_start + entry["data_offsets"][1] > size:
                    raise FormatError(f"{path}: truncated (tensor {name} ends past the end of the file)")
                self._tensors[name] = (path, entry, data_start)
        self.meta = self._read_meta(config)

    def _read_meta(self, config: dict) -> SourceMeta:
        tok_path = self.dir / "tokenizer.json"
        if not tok_path.exists():
            raise EdgerunError(f"{self.dir}: no tokenizer.json (a fast tokenizer is required)")
        tok_cfg = _read_json(self.dir / "tokenizer_config.json") if (self.dir / "tokenizer_config.json").exists() else {}
        gen = _read_json(self.dir / "generation_config.json") if (self.dir / "generation_config.json").exists() else {}
        template = tok_cfg.get("chat_template")
        if (self.dir / "chat_template.jinja").exists():        # newer transformers save it separately
            template = (self.dir / "chat_template.jinja").read_text(encoding="utf-8")
        elif (self.dir / "chat_template.json").exists():
            template = _read_json(self.dir / "chat_template.json").get("chat_template")
        if isinstance(template, list):                         # named templates: take "default"
            named = [t for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
            if not named:
                raise FormatError(f"{self.dir}: the chat template list holds no {{'name', 'template'}} entries")
            template = next((t["template"] for t in named if t.get("name") == "default"), named[0]["template"])
        if template is not None and not isinstance(template, str):
            raise FormatError(f"{self.dir}: 'chat_template' must be a string or a list of named templates")
        tokenizer_json = tok_path.read_text(encoding="utf-8")
        vocab = _token_ids(tokenizer_json)

        def token_str(key):
            value = tok_cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return value if isinstance(value, str) else None

        special = {k: token_str(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if token_str(k)}
        bos = gen.get("bos_token_id", config.get("bos_token_id"))
        if bos is None and special.get("bos_token") in vocab:
            bos = vocab[special["bos_token"]]
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        eos = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
        for key, ids in (("bos_token_id", [] if bos is None else [bos]), ("eos_token_id", eos)):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise FormatError(f"{self.dir}: {key} must be a token id (an integer >= 0) or a list of them")
        if special.get("eos_token") in vocab and vocab[special["eos_token"]] not in eos:
            eos.append(vocab[special["eos_token"]])
        sampling = {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p", "min_p",
                                        "repetition_penalty") if k in gen}
        return SourceMeta(
            config=config,
            tokenizer_json=tokenizer_json,
            chat_template=template,
            bos_token_id=bos,
            eos_token_ids=eos,
            add_bos_token=bool(tok_cfg.get("add_bos_token", False)),
            generation=sampling,
            special_tokens=special,
            description=f"Hugging Face directory {self.dir.name}",
        )

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name][1]["shape"])

    def tensor_nbytes(self, name: str) -> int:
        start, end = self._tensors[name][1]["data_offsets"]
        return end - start

    def read(self, name: str) -> np.ndarray:
        path, entry, data_start = self._tensors[name]
        start, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        # read straight into the array (no intermediate bytes object: peak = the tensor once,
        # plus its float32 widening for 16-bit sources)
        raw = np.empty(entry["shape"], dtype=dtype)
        with open(path, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(memoryview(raw.reshape(-1)).cast("B")) != end - start:
                raise FormatError(f"{path}: truncated while reading tensor {name}")
        if entry["dtype"] == "BF16":                 # bf16 is the high half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw if raw.dtype == np.float32 else raw.astype(np.float32)


def _token_ids(tokenizer_json: str) -> dict[str, int]:
    """Token string -> id for the added (special) tokens of a tokenizer.json."""
    try:
        data = json.loads(tokenizer_json)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"tokenizer.json is not JSON ({e})") from None
    added = data.get("added_tokens") if isinstance(data, dict) else None
    return {t["content"]: t["id"] for t in added or []
            if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)}

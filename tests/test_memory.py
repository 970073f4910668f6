"""Where the runtime's own memory goes: regressions of measured fixes (BENCHMARKS.md, "Where
edgerun's RSS goes"). Each check would fail on the code before its fix."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from edgerun.config import ModelConfig
from edgerun.memory import current_rss
from edgerun.model import RunState


def test_kv_cache_resident_only_as_written():
    # SmolLM2's shape at a long context: a 190 MiB f16 cache. Writing the first position of every
    # layer and head used to make all of it resident (NumPy's huge-page advice on np.zeros).
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                                 "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                                 "num_key_value_heads": 3, "vocab_size": 64, "max_position_embeddings": 8192,
                                 "rms_norm_eps": 1e-5})
    before = current_rss()
    st = RunState(cfg, 8192, 4)
    assert st.key_cache.dtype == np.float16 and st.key_cache.nbytes == 30 * 3 * 8192 * 64 * 2
    st.key_cache[:, :, :4] = 1.0
    st.value_cache[:, :, :4] = 1.0
    grown = current_rss() - before
    assert grown < 8 * 2**20, f"{grown / 2**20:.1f} MiB resident after writing 4 positions"
    assert float(st.key_cache[29, 2, 3, 63]) == 1.0 and float(st.key_cache[0, 0, 4, 0]) == 0.0


def _fresh_python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="only matters with SciPy installed")
def test_first_compile_does_not_import_scipy_linalg():
    # Numba's array math imported scipy.linalg (and numpy.testing, f2py, every text codec: 16 MiB)
    # at the first compile; edgerun.kernels hides it for that import
    out = _fresh_python(
        "import sys, numpy as np, edgerun.kernels as k\n"
        "x = np.ones((2, 4), np.float32)\n"
        "k.rmsnorm_rows(x, np.ones(4, np.float32), 1e-5, x)\n"
        "print('scipy.linalg' in sys.modules, 'charset_normalizer' in sys.modules)\n")
    assert out.split() == ["False", "False"]


def test_cpu_detection_does_not_import_numba_cuda():
    # without a CUDA driver, asking for the device must not pay numba.cuda's ~40 MiB
    from edgerun.cuda import driver_loads
    if driver_loads():
        pytest.skip("this machine has a CUDA driver")
    out = _fresh_python("import sys\nfrom edgerun.cuda import resolve_device\n"
                        "print(resolve_device('auto')[0], 'numba.cuda' in sys.modules)\n")
    assert out.split() == ["cpu", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_compiler_code_released_after_kernels_are_ready():
    # LLVM's code (~65 MiB of libllvmlite.so touched by compiling or linking cached kernels) is
    # dropped from our RSS once the kernels are ready; a later compile still works
    out = _fresh_python(
        "import numpy as np, numba, edgerun.kernels as k\n"
        "from edgerun.memory import release_free_memory\n"
        "def llvm_rss():\n"
        "    total, ours = 0, False\n"
        "    for line in open('/proc/self/smaps'):\n"
        "        if line[:1] in '0123456789abcdef' and '-' in line.split()[0]: ours = 'libllvmlite' in line\n"
        "        elif ours and line.startswith('Rss:'): total += int(line.split()[1])\n"
        "    return total // 1024\n"
        "x = np.ones((2, 4), np.float32)\n"
        "k.rmsnorm_rows(x, np.ones(4, np.float32), 1e-5, x)\n"
        "before = llvm_rss()\n"
        "release_free_memory()\n"
        "after = llvm_rss()\n"
        "print(before, after, numba.njit(lambda v: v * 2 + 1)(3))\n")
    before, after, result = map(int, out.split())
    assert before > 20 and after < 8, f"libllvmlite resident: {before} MiB before, {after} MiB after"
    assert result == 7

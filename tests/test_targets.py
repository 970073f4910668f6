"""Every codec on every CPU our users have (DESIGN §6, issue #8): every codec's kernels and a tiny
packed model (one pack per codec and a mixed recipe) run for an AVX2 CPU (Haswell's feature list),
for baseline x86-64 (`generic`: SSE2, no F16C) and under an aarch64 Python (qemu user mode,
tools/arm64_python.sh), and match this host's run: kernels within 1e-4 of their NumPy decode,
logits within 1e-3 relative or twice the model's own move under a 1e-6 perturbation (int8
activations), greedy tokens identical (tools/target_check.py).

The x86 targets run in the main suite (each with its own NUMBA_CACHE_DIR). arm64 is slow (Numba
compiles under emulation, ~2 min per unit) and downloads an arm64 Python and aarch64 wheels
(~100 MB, plus qemu-user-static's 63 MB when it is not installed) into
${EDGERUN_ARM64_ROOT:-~/.cache/edgerun/arm64}: skipped unless EDGERUN_TEST_ARM64=1; .ci/run runs
it as its own step."""
from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "arm64_python.sh"
CHECK = REPO / "tools" / "target_check.py"
UNIT_TIMEOUT = 900          # seconds per unit under qemu (measured ~2-4 min)

_spec = importlib.util.spec_from_file_location("target_check", CHECK)
target_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(target_check)

HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,"
           "+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")
X86_TARGETS = {"haswell": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL},
               "generic": {"NUMBA_CPU_NAME": "generic"}}
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    """(fixture dir, this host's results .npz, tmp dir)."""
    tmp = tmp_path_factory.mktemp("targets")
    fixture, host = tmp / "fixture", tmp / "host.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # a pack that fails is reported per unit by `compare`
    subprocess.run([sys.executable, str(CHECK), "make-fixture", str(fixture)], env=env)
    subprocess.run([sys.executable, str(CHECK), "run", str(fixture), str(host)], env=env)
    return fixture, host, tmp


_results = {}


def _target_results(host_run, target):
    if target not in _results:
        fixture, host, tmp = host_run
        out = tmp / f"{target}.npz"
        cache = {"NUMBA_CACHE_DIR": str(tmp / f"numba-{target}")}
        if target == "arm64":
            subprocess.run([str(TOOL), "setup"], check=True)
            subprocess.run([str(TOOL), "run", str(CHECK), "run", str(fixture), str(out), "--timeout",
                            str(UNIT_TIMEOUT)], env={**os.environ, **cache})
        else:
            subprocess.run([sys.executable, str(CHECK), "run", str(fixture), str(out)],
                           env={**os.environ, "PYTHONPATH": str(REPO), **X86_TARGETS[target], **cache})
        _results[target] = target_check.compare(host, out)
        target_check.print_compare(_results[target])
    return _results[target]


@pytest.mark.parametrize("unit", list(target_check.UNITS))
@pytest.mark.parametrize("target", [
    pytest.param("haswell", marks=pytest.mark.skipif(not X86, reason="x86 targets")),
    pytest.param("generic", marks=pytest.mark.skipif(not X86, reason="x86 targets")),
    pytest.param("arm64", marks=pytest.mark.skipif(os.environ.get("EDGERUN_TEST_ARM64") != "1",
                                                   reason="arm64 emulation check: set EDGERUN_TEST_ARM64=1")),
])
def test_target_matches_host(host_run, target, unit):
    ok, report = _target_results(host_run, target)[unit]
    assert ok, report

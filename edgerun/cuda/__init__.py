"""Optional CUDA offload (issue #7): some or all transformer layers, and the output head, on a GPU.

Needs the `numba-cuda` package (`pip install 'edgerun[cuda]'`) and a CUDA device; under
NUMBA_ENABLE_CUDASIM=1 numba-cuda's simulator stands in for the device (tests). Nothing here
imports numba.cuda until asked, so the CPU path never pays for it.

    device, why = resolve_device("auto")          # -> ("cpu", "no CUDA device: ...") here

How many layers (and whether the head) go on the device is the plan's (edgerun/plan.py); the
model is built with them there (model.Transformer, gpu=...), running the one forward pass with
layer.DeviceOps.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

from ..errors import EdgerunError

INSTALL = "pip install 'edgerun[cuda]' (adds numba-cuda)"


class CudaError(EdgerunError):
    """CUDA was asked for but cannot be used (no numba-cuda, no driver, no device), or a
    --gpu-layers / --vram request cannot be met; the message says why and what to do."""


def simulated() -> bool:
    """True when numba-cuda's simulator stands in for a device (NUMBA_ENABLE_CUDASIM=1)."""
    return bool(int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0))


def driver_loads() -> bool:
    """Whether the CUDA driver library loads. Checked before importing numba.cuda, which alone
    costs ~40 MiB of RSS: a machine without a GPU should not pay that to learn it has none."""
    names = [os.environ["NUMBA_CUDA_DRIVER"]] if os.environ.get("NUMBA_CUDA_DRIVER") else []
    for name in names + ["libcuda.so.1", "libcuda.so", "nvcuda.dll"]:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def status() -> tuple[bool, str]:
    """(usable, reason): whether a CUDA device can run edgerun, and a one-line why/what."""
    if importlib.util.find_spec("numba_cuda") is None:
        return False, f"numba-cuda is not installed: {INSTALL}"
    if not simulated() and not driver_loads():
        return False, "no CUDA driver found (libcuda does not load): no NVIDIA GPU, or its driver is not installed"
    try:
        from numba import cuda
    except Exception as e:  # noqa: BLE001 - any import failure means: not usable, say why
        return False, f"numba-cuda does not import ({type(e).__name__}: {e})"
    if simulated():
        return True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    try:
        if not cuda.is_available():
            cuda.current_context()          # raises with the driver's reason
            return False, "no CUDA device found"
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        return True, f"{name} (compute {dev.compute_capability[0]}.{dev.compute_capability[1]})"
    except Exception as e:  # noqa: BLE001 - driver errors are many; the first line says enough
        msg = " ".join(str(e).split()) or type(e).__name__
        return False, f"no usable CUDA device: {msg[:160]}"


def resolve_device(device: str = "auto") -> tuple[str, str]:
    """"cuda" | "cpu" | "auto" -> (chosen device, reason). "cuda" without a device raises
    CudaError; "auto" falls back to "cpu" with the reason."""
    if device not in ("auto", "cuda", "cpu"):
        raise CudaError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "cpu":
        return "cpu", "asked for the CPU"
    ok, why = status()
    if ok:
        return "cuda", why
    if device == "cuda":
        raise CudaError(f"--device cuda: {why}")
    return "cpu", f"running on the CPU: {why}"


def device_free_bytes() -> int | None:
    """Free device memory in bytes, or None when unknown (the simulator)."""
    if simulated():
        return None
    from numba import cuda
    free, _total = cuda.current_context().get_memory_info()
    return int(free)


__all__ = ["CudaError", "INSTALL", "status", "resolve_device", "simulated", "device_free_bytes"]

"""Which accelerator JAX runs on, said once in every role's log.

With the CUDA build installed (`uv sync --frozen --extra cuda`) JAX falls back to the CPU
without a word when no GPU is visible (no driver, CUDA_VISIBLE_DEVICES empty, a CPU node): a
run that was meant for GPUs would then crawl unnoticed. `describe()` names the backend, the
devices, and that fallback.
"""
from __future__ import annotations

import importlib.util
import os


def cuda_build_installed() -> bool:
    return importlib.util.find_spec("jax_cuda12_plugin") is not None


def describe() -> str:
    """One line: backend, device count and kind, and a CPU fallback of the CUDA build."""
    import jax
    devices = jax.devices()
    backend = jax.default_backend()
    line = f"JAX {jax.__version__} on {backend}: {len(devices)} x {devices[0].device_kind}"
    if backend == "cpu" and cuda_build_installed():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        line += (" -- the CUDA build of JAX is installed but no GPU is usable (driver missing, "
                 f"or CUDA_VISIBLE_DEVICES={visible!r}): running on the CPU")
    return line

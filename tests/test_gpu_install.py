"""The CUDA build of JAX from the lock (`uv sync --frozen --extra cuda`).

On a machine without a GPU the CUDA build must still import, run on the CPU, and say so in one
line (crl.backend.describe, logged by every JAX role at start). The install downloads ~3 GB of
NVIDIA wheels, so that test is on demand: `uv run --frozen pytest -m slow tests/test_gpu_install.py`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO


def test_describe_names_the_backend_and_no_fallback_without_the_cuda_build():
    from crl.backend import cuda_build_installed, describe
    line = describe()
    assert line.startswith("JAX ") and " on " in line
    if not cuda_build_installed():
        assert "running on the CPU" not in line


@pytest.mark.slow
def test_cuda_extra_installs_from_the_lock_and_falls_back_to_cpu(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    venv = tmp_path / "venv"
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(venv), UV_PYTHON=sys.executable,
               UV_PYTHON_DOWNLOADS="never")
    env.pop("VIRTUAL_ENV", None)
    sync = subprocess.run([uv, "sync", "--frozen", "--extra", "cuda"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert sync.returncode == 0, sync.stderr[-3000:]
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import jax, jax.numpy as jnp; from crl.backend import describe; "
         "print(float(jnp.arange(4.0).sum())); print(describe())"],
        cwd=REPO, env=dict(env, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
        timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    lines = probe.stdout.strip().splitlines()
    assert lines[0] == "6.0"
    assert "on cpu" in lines[1] and "CUDA build of JAX is installed" in lines[1], lines

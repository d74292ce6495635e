"""Imports MuJoCo MJX without the two lines it prints when its optional Warp backend is absent.

mujoco-mjx >= 3.3.6 prints "Failed to import warp: ..." and "Failed to import mujoco_warp: ..."
to stdout at import unless NVIDIA's warp-lang (141 MB; the `warp` extra of mujoco-mjx) is
installed. We use MJX's JAX implementation only, so those lines are noise on every role's stdout
(and in front of the YAML that `crl config` writes). The last matched pair without them, 3.3.5,
simulates the arm tasks differently from the validated 3.17 (docs/research.md), hence this
filter: every other line the import prints passes through.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import sys

_WARP_ABSENT = re.compile(r"^Failed to import (mujoco_)?warp: ")


def import_mjx(module: str = "mujoco.mjx") -> None:
    """Imports `module` (MJX; Brax imports it too) once, without the Warp lines."""
    if module in sys.modules:
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            importlib.import_module(module)
    finally:
        for line in captured.getvalue().splitlines(keepends=True):
            if not _WARP_ABSENT.match(line):
                sys.stdout.write(line)
